"""Artifacts are written whole or not at all: build in a temporary directory, rename at the end.

A writer killed outright (SIGKILL, out of memory, power) cannot remove its temporary directory, so each one
holds a marker naming the process that writes it (pid, start time, boot, host, pid namespace), and the next
run writing the same target removes the ones whose writer is gone. A directory without our marker, or whose
writer may still run (alive, on another host or in another pid namespace), is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import NLDError

MARKER = ".nld-trt-partial.json"  # inside each temporary directory, removed before the rename
MARKER_FORMAT = "nld-trt-partial/1"
SUFFIX = ".partial"


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _link(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot: field 22 of /proc/PID/stat), or None when there is
    no such process or it is a zombie (it writes nothing more)."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name in (...) may hold spaces
    return None if fields[0] in ("Z", "X") else fields[19]


def this_process() -> dict:
    """What identifies this process to a later run, even after its pid is reused or the machine rebooted."""
    pid = os.getpid()
    return {"format": MARKER_FORMAT, "pid": pid, "start": process_start(pid),
            "boot": _read("/proc/sys/kernel/random/boot_id"), "host": socket.gethostname(),
            "pid_namespace": _link("/proc/self/ns/pid")}


def writer_gone(owner: dict) -> bool:
    """Whether the process a marker names has certainly exited; when that cannot be told, False."""
    me = this_process()
    if owner.get("host") != me["host"] or owner.get("pid_namespace") != me["pid_namespace"]:
        return False  # another machine (a shared disk) or container: its pids mean nothing here
    if owner.get("boot") and me["boot"] and owner["boot"] != me["boot"]:
        return True  # written before this machine rebooted
    pid = owner.get("pid")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    if me["start"] is not None:  # /proc: the pid must still be the same process
        return process_start(pid) != owner.get("start")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, belongs to someone else
        return False
    return False


def remove_stale_partials(target: Path) -> list[Path]:
    """Remove the temporary directories of earlier runs writing `target` that were killed mid-write: only
    ours (our name pattern, our marker naming this target, our user) and only those whose writer is gone."""
    removed = []
    prefix = f".{target.name}."
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for entry in entries:
        if not (entry.name.startswith(prefix) and entry.name.endswith(SUFFIX)):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
            owner = json.loads((Path(entry.path) / MARKER).read_text())
        except (OSError, ValueError):  # not ours, or its writer has not written the marker yet
            continue
        if (isinstance(owner, dict) and owner.get("format") == MARKER_FORMAT and owner.get("target") == target.name
                and writer_gone(owner)):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


@contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; on success it becomes `target`, on failure it vanishes.
    Temporary directories that killed earlier runs left beside `target` are removed first."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise NLDError(f"{target} already exists: choose another output or remove it first")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=SUFFIX, dir=target.parent))
    try:
        (tmp / MARKER).write_text(json.dumps({**this_process(), "target": target.name}))
        yield tmp
        (tmp / MARKER).unlink(missing_ok=True)
        os.chmod(tmp, 0o755)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_file(path: str | Path, data, what: str = "the file") -> None:
    """Write bytes to a temporary file beside `path` and rename it over `path`: whole or not at all. The file gets
    the mode a plain open() would give it; a directory that cannot be written is an NLDError naming `what`."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=SUFFIX, dir=path.parent)
    except OSError as e:
        raise NLDError(f"{what} {str(path)!r}: cannot write there ({e.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(data))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's is 0600
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise NLDError(f"{what} {str(path)!r}: cannot write it ({e.strerror})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def user_cache_dir() -> Path:
    """nld-trt's cache: $NLD_TRT_CACHE, else $XDG_CACHE_HOME/nld-trt, else ~/.cache/nld-trt."""
    return Path(os.environ.get("NLD_TRT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                / "nld-trt")


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


def read_json_object(path: Path, error: type[Exception], hint: str = "") -> dict:
    """A JSON file holding one object; `error` (naming the file, plus `hint`) when it is not."""
    try:
        raw = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON ({e}){hint}") from None
    if not isinstance(raw, dict):
        raise error(f"{path} must hold a JSON object")
    return raw
