"""What one forward pass costs on the executor that serves: measured over a grid, fitted, saved, reused.

The `auto` mode (nld_trt/decoding/auto.py) chooses ar or linear_spec (and the block length) by the time a
step will take, so the time of a pass must be known for any batch: `calibrate` times passes over a grid of
(rows, tokens per row, cache length) on the executor itself and fits them roofline-shaped,

    time = base + slope * max(0, tokens - knee) + attention_cost * attention + read_cost * keys,

flat while the pass is bound by reading the weights (a 32-token pass costs what a 1-token pass costs) and
linear once it is compute-bound; `attention` is the number of query-key pairs (rows x chunk x keys) and
`keys` the cache positions the rows read (each row's pages are gathered, or read by the kernel, whatever its
chunk: what a decode step pays per sequence for its context). The
fit, with the measured points and their fit error, is saved as JSON under a name that hashes the executor's
identity (its class, device, dtype, model shape, limits, torch version), so it is reused until any of them
changes, and remeasured otherwise.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import NLDError
from ..fileutil import user_cache_dir
from ..kv.pages import PageManager, PageTable
from .base import Chunk, Executor, PassBatch, PassRow

FORMAT = 2


@dataclass
class CostModel:
    """Seconds per forward pass as a function of its tokens, its query-key pairs and the cache positions its
    rows read."""

    base: float  # seconds of a pass while weight-bound
    knee: float  # tokens where compute starts to dominate
    slope: float  # seconds per token beyond the knee
    attention_cost: float  # seconds per query-key pair
    read_cost: float = 0.0  # seconds per cache position a row reads
    points: list[dict[str, float]] = field(default_factory=list)  # what was measured
    identity: dict[str, Any] = field(default_factory=dict)

    def pass_time(self, tokens: float, attention: float = 0.0, rows: float = 0.0, keys: float = 0.0) -> float:
        """`keys`: cache positions read, summed over the rows (each row's committed length + chunk)."""
        return (self.base + self.slope * max(0.0, tokens - self.knee) + self.attention_cost * attention
                + self.read_cost * keys)

    @property
    def max_error(self) -> float:
        """The largest relative error of the fit over the measured points."""
        return max((abs(self._fitted(p) / p["seconds"] - 1) for p in self.points), default=0.0)

    def _fitted(self, p: dict[str, float]) -> float:
        return self.pass_time(p["tokens"], p["attention"], p["rows"], p.get("keys", 0.0))

    def table(self) -> str:
        rows = [f"{'rows':>5} {'tokens/row':>10} {'cache':>6} {'measured ms':>12} {'fitted ms':>10}"]
        for p in self.points:
            rows.append(f"{int(p['rows']):5d} {int(p['chunk']):10d} {int(p['cache']):6d} {1e3 * p['seconds']:12.3f} "
                        f"{1e3 * self._fitted(p):10.3f}")
        rows.append(f"fit: {1e3 * self.base:.3f} ms flat up to {self.knee:.0f} tokens, then {1e6 * self.slope:.2f} us "
                    f"per token; {1e9 * self.attention_cost:.3f} ns per query-key pair; {1e9 * self.read_cost:.2f} ns "
                    f"per cache position read; max error "
                    f"{100 * self.max_error:.1f}%")
        return "\n".join(rows)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CostModel:
        if data.get("format") != FORMAT:
            raise NLDError(f"calibration format {data.get('format')!r} is not {FORMAT}: recalibrate")
        return cls(**{k: v for k, v in data.items() if k != "format"})


def fit(points: list[dict[str, float]]) -> CostModel:
    """Least squares in relative error (small and large passes count alike), the knee chosen among the
    measured token counts."""
    t = torch.tensor([p["seconds"] for p in points], dtype=torch.float64)
    n = torch.tensor([p["tokens"] for p in points], dtype=torch.float64)
    a = torch.tensor([p["attention"] for p in points], dtype=torch.float64)
    k = torch.tensor([p.get("keys", 0.0) for p in points], dtype=torch.float64)
    best = None
    for knee in sorted({p["tokens"] for p in points}):
        x = torch.stack([torch.ones_like(n), (n - knee).clamp_min(0), a, k], 1) / t[:, None]
        coef = nonnegative_lstsq(x, torch.ones_like(t))
        err = float(((x @ coef) - 1).pow(2).sum())
        if best is None or err < best[0]:
            best = (err, knee, coef)
    _, knee, (base, slope, attention, read) = best
    return CostModel(float(base), float(knee), float(slope), float(attention), float(read), points)


def nonnegative_lstsq(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Least squares with every coefficient >= 0: refit without the coefficients that came out negative
    (few columns: a handful of refits at most). A column of zeros (no pass past a knee, or no attention term
    measured) makes the system rank deficient, where LAPACK's default driver can return garbage (NaN seen)
    for the free coefficient: only the columns that carry data are fitted, the others' coefficients are 0."""
    keep = [i for i in range(x.shape[1]) if bool(x[:, i].abs().sum() > 0)]
    while True:
        coef = torch.zeros(x.shape[1], dtype=x.dtype)
        coef[keep] = torch.linalg.lstsq(x[:, keep], y[:, None]).solution[:, 0]
        negative = [i for i in keep if coef[i] < 0]
        if not negative:
            return coef
        keep.remove(min(negative, key=lambda i: coef[i]))


def grid(executor: Executor) -> list[tuple[int, int, int]]:
    """(rows, tokens per row, cache length) to time: batch and chunk sizes the decoding loops use."""
    rows = [r for r in (1, 2, 4, 8, 16, 32, 64) if r <= executor.max_batch]
    chunks = [c for c in (1, 4, 8, 16, 32) if c <= executor.max_chunk]
    caches = sorted({c for c in (64, 512) if c + max(chunks) <= executor.max_seq_len} or {0})
    return [(r, c, k) for r in rows for c in chunks for k in caches]


def measure(executor: Executor, pages: PageManager, shape: tuple[int, int, int], repeats: int = 3) -> float:
    """Median seconds of one pass of `rows` chunks of `chunk` tokens after `cache` committed positions. The
    rows share one page table of pages taken from the pool (what they hold does not matter for the time, and
    they go back unindexed)."""
    rows, chunk, cache = shape
    table = PageTable()
    if not pages.grow(table, cache + chunk):
        raise NLDError(f"calibration needs {pages.pages_for(cache + chunk)} free KV-cache pages, the pool has "
                       f"{pages.available}")
    try:
        batch = PassBatch([PassRow(Chunk([1] * chunk, block=chunk > 1), cache, table.pages)] * rows)
        executor.forward(batch)  # warm-up
        times = []
        for _ in range(repeats):
            if executor.device.type == "cuda":
                torch.cuda.synchronize(executor.device)
            start = time.perf_counter()
            executor.forward(batch)
            if executor.device.type == "cuda":
                torch.cuda.synchronize(executor.device)
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    finally:
        pages.release(table)


def calibrate(executor: Executor, pages: PageManager, progress: Callable[[str], None] | None = None) -> CostModel:
    """Time every grid point on this executor and fit the cost model."""
    points = []
    shapes = grid(executor)
    start = time.perf_counter()
    for i, (rows, chunk, cache) in enumerate(shapes, 1):
        seconds = measure(executor, pages, (rows, chunk, cache))
        points.append({"rows": rows, "chunk": chunk, "cache": cache, "tokens": rows * chunk,
                       "attention": rows * chunk * (cache + chunk), "keys": rows * (cache + chunk),
                       "seconds": seconds})
        if progress is not None and (i % 10 == 0 or i == len(shapes)):
            progress(f"calibrating the pass cost: {i}/{len(shapes)} shapes, {time.perf_counter() - start:.1f} s")
    model = fit(points)
    model.identity = identity(executor)
    return model


def identity(executor: Executor) -> dict[str, Any]:
    """What a calibration is valid for: the executor, the device, the model's shape, the limits."""
    c = executor.config
    dev = executor.device
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
    return {
        "executor": type(executor).__name__,
        "passes": getattr(getattr(executor, "passes", None), "kind", None),  # eager, or compiled / captured
        "kernels": bool(getattr(executor, "kernels", False)),
        "device": f"{dev.type}:{device_name}",
        "dtype": str(getattr(executor, "dtype", "")),
        "model": [c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
                  c.num_key_value_heads, c.head_dim, c.quantization_config is not None],
        "limits": [executor.max_batch, executor.max_seq_len, executor.max_chunk],
        "kv": [executor.layout.page_size, str(executor.layout.dtype)],
        "threads": torch.get_num_threads() if dev.type == "cpu" else 0,
        "torch": torch.__version__,
    }


def default_directory() -> Path:
    """$NLD_TRT_CACHE, else $XDG_CACHE_HOME/nld-trt, else ~/.cache/nld-trt; calibrations go in calibration/."""
    return user_cache_dir() / "calibration"


def calibration_file(executor: Executor, directory: Path) -> Path:
    digest = hashlib.sha256(json.dumps(identity(executor), sort_keys=True).encode()).hexdigest()[:16]
    return directory / f"cost-{digest}.json"


def load_or_calibrate(executor: Executor, pages: PageManager, directory: str | Path | None = None,
                      progress: Callable[[str], None] | None = None) -> tuple[CostModel, Path, bool]:
    """The saved calibration of this executor if there is one for its identity, else a new one (saved
    atomically). Returns (model, file, whether it was measured now)."""
    path = calibration_file(executor, Path(directory) if directory else default_directory())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.parent / ".lock", "a")  # noqa: SIM115 - held until the calibration is saved
    except OSError:
        lock = None
    try:
        if lock is not None:  # two model instances loading at once: one measures, the other then loads
            fcntl.flock(lock, fcntl.LOCK_EX)
        return _load_or_calibrate(executor, pages, path, progress)
    finally:
        if lock is not None:
            lock.close()


def _load_or_calibrate(executor: Executor, pages: PageManager, path: Path, progress) -> tuple[CostModel, Path, bool]:
    if path.is_file():
        try:
            model = CostModel.from_json(json.loads(path.read_text()))
            if model.identity == identity(executor):
                return model, path, False
        except (ValueError, TypeError, KeyError, NLDError):
            pass  # unreadable or stale: measure again
    model = calibrate(executor, pages, progress)
    try:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(model.to_json(), indent=1) + "\n")
        tmp.replace(path)
    except OSError as e:
        if progress is not None:
            progress(f"calibration not saved ({e}): it will be measured again at the next load")
    return model, path, True
