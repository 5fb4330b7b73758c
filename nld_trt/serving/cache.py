"""`nld-trt serve MODEL_DIR`: the model repository of a checkpoint (or quantized checkpoint, or engine build),
packaged once into a cache and reused, as `vllm serve MODEL` takes a model directly.

A cached repository is keyed by the model's content (SHA-256 of every file), the package options and what
shapes a repository (nld-trt's version, the tensor specs, the template files): it is reused while none of
them changed and packaged anew when one did. Packaging writes the repository whole or not at all
(`atomic_directory`), under a lock, so two `serve` runs of the same model never write one repository twice.
Hashing a large checkpoint takes a while: each file's digest is remembered by (path, size, mtime), so a
model whose files did not change is not read again.

The cache is `$NLD_TRT_CACHE/repositories` (else `$XDG_CACHE_HOME/nld-trt/...`, else `~/.cache/nld-trt/...`),
or `--cache-dir`. Entries of models or options no longer used stay until removed (`rm -r` the directory).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from ..fileutil import user_cache_dir
from .manifest import files_under, sha256
from .package import (STREAM_MODEL, TEMPLATE_FILES, ServingOptions, check_checkpoint, check_engine,
                      package_repository, template_dir)

DIGESTS = "file-digests.json"


def default_cache() -> Path:
    return user_cache_dir() / "repositories"


def is_repository(path: Path) -> bool:
    """A Triton model repository of nld-trt (what `nld-trt package` writes), as opposed to a model directory."""
    return (Path(path) / STREAM_MODEL / "config.pbtxt").is_file()


def model_digest(model_dir: Path, cache: Path, progress: Callable[[str], None] | None = None) -> str:
    """SHA-256 over every file of the model (relative path, size, content digest); unchanged files (same path,
    size and mtime) reuse the digest remembered in the cache."""
    memo_file = cache / DIGESTS
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    files = [p for p in files_under(model_dir)
             if not any(part.startswith(".") for part in p.relative_to(model_dir).parts)]  # as package copies them
    total = sum(p.stat().st_size for p in files)
    h, done, fresh = hashlib.sha256(), 0, 0
    for p in files:
        st = p.stat()
        key = str(p.resolve())
        stamp = [st.st_size, st.st_mtime_ns]
        entry = memo.get(key)
        if entry is None or entry[:2] != stamp:
            if progress is not None and st.st_size > 1 << 26:
                progress(f"hashing {p.name} ({st.st_size / 1e9:.1f} GB; {done / max(total, 1):.0%} of the model done)")
            entry = stamp + [sha256(p)]
            memo[key] = entry
            fresh += 1
        done += st.st_size
        h.update(json.dumps([p.relative_to(model_dir).as_posix(), st.st_size, entry[2]]).encode())
    if fresh:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_file)
    return h.hexdigest()


def layout_digest() -> str:
    """What a repository's layout depends on besides the model and the options: nld-trt's version, the
    tensors of its models, the template files."""
    from .. import __version__
    from . import tokenize
    from .protocol import INPUTS, OUTPUTS

    h = hashlib.sha256(__version__.encode())
    h.update(repr((INPUTS, OUTPUTS, tokenize.INPUTS, tokenize.OUTPUTS)).encode())
    for name in TEMPLATE_FILES:
        h.update((template_dir() / name).read_bytes())
    return h.hexdigest()


def cached_repository(model_dir: Path, options: ServingOptions, engine: bool, cache: Path | None = None,
                      progress: Callable[[str], None] | None = None) -> tuple[Path, bool]:
    """The repository serving `model_dir` with `options`: (path, True) when reused, (path, False) when packaged
    now. Errors (not a model, bad options) are package_repository's."""
    if engine:
        check_engine(model_dir, options)
    else:
        check_checkpoint(model_dir)  # a directory that is not a model fails here, before hashing anything
    cache = Path(cache) if cache is not None else default_cache()
    cache.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(json.dumps({
        "model": model_digest(model_dir, cache, progress), "kind": "engine" if engine else "checkpoint",
        "options": asdict(options), "layout": layout_digest(),
    }, sort_keys=True).encode()).hexdigest()[:24]
    target = cache / key
    with open(cache / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another serve packaging the same repository: wait for it, then reuse
        if is_repository(target):
            return target, True
        if progress is not None:
            progress(f"packaging {model_dir} into {target}")
        package_repository(model_dir, target, options, engine=engine, overwrite=target.exists())
        return target, False
