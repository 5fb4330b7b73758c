"""Artifacts are written whole or not at all: build in a temporary directory, rename at the end."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import NLDError


@contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; on success it becomes `target`, on failure it vanishes."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise NLDError(f"{target} already exists: choose another output or remove it first")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_jsonl_rows(path: str | Path, what: str, error: type[Exception]) -> list[tuple[str, object]]:
    """(`file:line`, parsed value) for every non-blank line of a JSONL file; a missing or unreadable file or
    a line that is not JSON raises `error` naming the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} file {path} not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{what} file {path} cannot be read as UTF-8 text ({e})") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise error(f"{path}:{n}: not valid JSON ({e.msg}); each line must be one JSON object") from None
    return rows
