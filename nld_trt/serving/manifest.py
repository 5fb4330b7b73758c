"""The artifact manifest: the SHA-256 and size of every file a model repository serves from.

Written by `nld-trt package`, checked by the backend before it loads anything, so a tampered, truncated or
half-copied repository fails to load with a message naming the file, instead of serving wrong tokens.
Paths are relative to the manifest, so the repository can be moved or copied elsewhere.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

FORMAT = "nld-trt-manifest/1"


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def write_manifest(manifest: Path, artifacts: Path, kind: str = "checkpoint", **extra: Any) -> dict:
    """Hash every file under `artifacts` into `manifest` (artifacts given relative to the manifest)."""
    root = artifacts.relative_to(manifest.parent).as_posix()
    data = {
        "format": FORMAT,
        "kind": kind,
        "artifacts": root,
        **extra,
        "files": {
            p.relative_to(artifacts).as_posix(): {"sha256": sha256(p), "size": p.stat().st_size}
            for p in files_under(artifacts)
        },
    }
    manifest.write_text(json.dumps(data, indent=2) + "\n")
    return data


def verify_manifest(manifest: Path, only: tuple[str, ...] | None = None) -> tuple[Path, dict]:
    """Check every artifact against the manifest (or `only` those of these names it lists, for a model that
    reads no other); return the artifact directory and the manifest.

    Raises CheckpointError naming the first file that is missing, truncated, changed or unexpected."""
    hint = "re-run `nld-trt package` (or copy the repository again)"
    try:
        data = json.loads(manifest.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"artifact manifest {manifest} is missing: {hint}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"artifact manifest {manifest} is not valid JSON ({e}): {hint}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("files"), dict):
        raise CheckpointError(f"{manifest} is not an {FORMAT} manifest: {hint}")
    root = (manifest.parent / data["artifacts"]).resolve()
    if not root.is_dir():
        raise CheckpointError(f"artifact directory {root} named by {manifest} is missing: {hint}")
    expected: dict[str, dict] = data["files"]
    checked = expected if only is None else {k: v for k, v in expected.items() if k in only}
    for name, want in checked.items():
        path = root / name
        if not path.is_file():
            raise CheckpointError(f"artifact {name} is missing from {root}: {hint}")
        size = path.stat().st_size
        if size != want["size"]:
            what = "truncated" if size < want["size"] else "changed"
            raise CheckpointError(
                f"artifact {name} is {what}: {size} bytes, the manifest says {want['size']}: {hint}"
            )
        digest = sha256(path)
        if digest != want["sha256"]:
            raise CheckpointError(
                f"artifact {name} was modified: SHA-256 {digest[:16]}..., the manifest says "
                f"{want['sha256'][:16]}...: {hint}"
            )
    if only is not None:
        return root, data
    unexpected = [p.relative_to(root).as_posix() for p in files_under(root)]
    unexpected = [n for n in unexpected if n not in expected]
    if unexpected:
        raise CheckpointError(
            f"artifact directory {root} holds files the manifest does not list ({', '.join(unexpected[:3])}): {hint}"
        )
    return root, data
