"""A writer killed mid-write (SIGKILL: no cleanup runs) leaves its hidden `.partial` directory beside the
target; the next run writing the same target removes it. Only ours (our name and our marker) and only stale
(the process that wrote it is gone): a live writer's directory and anything else are kept."""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nld_trt import fileutil
from nld_trt.fileutil import atomic_directory

WRITER = """
import sys, time
from nld_trt.fileutil import atomic_directory
with atomic_directory(sys.argv[1]) as tmp:
    (tmp / "weights.bin").write_bytes(bytes(1 << 20))
    print(tmp, flush=True)
    time.sleep(600)
"""


def start_writer(target: Path) -> tuple[subprocess.Popen, Path]:
    """A process in the middle of writing `target`; returns it and its temporary directory."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    assert line, "the writer died before writing"
    return proc, Path(line)


def partials(target: Path) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}.*.partial"))


def write(target: Path) -> None:
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "done").write_text("yes")


def test_a_directory_left_by_a_killed_writer_is_removed_by_the_next_run(tmp_path):
    target = tmp_path / "repo"
    proc, left = start_writer(target)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert left.is_dir() and partials(target) == [left]  # what SIGKILL leaves behind
    write(target)
    assert not left.exists() and partials(target) == []
    assert sorted(p.name for p in target.iterdir()) == ["done"]  # the marker never reaches the artifact


def test_a_live_writers_directory_is_kept(tmp_path):
    target = tmp_path / "repo"
    proc, live = start_writer(target)
    try:
        write(target)
        assert live.is_dir() and (live / "weights.bin").stat().st_size == 1 << 20
        assert partials(target) == [live]
    finally:
        proc.kill()
        proc.wait()


def fake_partial(target: Path, name: str, marker: dict | str | None) -> Path:
    d = target.parent / name
    d.mkdir(parents=True)
    (d / "payload").write_text("x")
    if marker is not None:
        (d / fileutil.MARKER).write_text(marker if isinstance(marker, str) else json.dumps(marker))
    return d


def marker_of_this_process(target: Path) -> dict:
    with atomic_directory(target.parent / "probe") as tmp:
        marker = json.loads((tmp / fileutil.MARKER).read_text())
    return {**marker, "target": target.name}


def test_directories_that_are_not_ours_or_not_stale_are_kept(tmp_path):
    target = tmp_path / "repo"
    mine = marker_of_this_process(target)  # this process is alive: its directories are not stale
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout.strip()
    dead = {**mine, "pid": int(dead_pid)}
    kept = [
        fake_partial(target, ".repo.nomarker.partial", None),  # no marker: not ours (or not yet marked)
        fake_partial(target, ".repo.garbled.partial", "{ not json"),
        fake_partial(target, ".repo.alive.partial", mine),  # a live writer
        fake_partial(target, ".repo.otherhost.partial", {**dead, "host": "elsewhere"}),  # cannot tell: keep
        fake_partial(target, ".repo.v2.abc.partial", {**dead, "target": "repo.v2"}),  # another target's
        fake_partial(target, ".repo.nosuffix", dead),  # not our name pattern
        fake_partial(target, "repo.visible.partial", dead),
    ]
    (tmp_path / ".repo.link.partial").symlink_to(kept[0])
    removed = [
        fake_partial(target, ".repo.dead.partial", dead),
        fake_partial(target, ".repo.reused.partial", {**mine, "start": "1"}),  # our pid, reused by another process
        fake_partial(target, ".repo.reboot.partial", {**mine, "boot": "another-boot"}),  # before a reboot
    ]
    write(target)
    assert all(d.is_dir() and (d / "payload").is_file() for d in kept)
    assert (tmp_path / ".repo.link.partial").is_symlink()
    assert not any(d.exists() for d in removed)


@pytest.mark.parametrize("fails", [False, True])
def test_the_next_run_cleans_even_when_it_fails_itself(tmp_path, fails):
    target = tmp_path / "repo"
    proc, left = start_writer(target)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with pytest.raises(RuntimeError) if fails else nullcontext():
        with atomic_directory(target) as tmp:
            if fails:
                raise RuntimeError("interrupted")
    assert not left.exists() and partials(target) == []
    assert target.exists() != fails
