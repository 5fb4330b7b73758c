"""Start the real Triton Inference Server binary against a model repository, and stop it cleanly.

On machines without a Triton install the binary comes from the `nvidia-pytriton` wheel, which ships
tritonserver, the Python backend and backend stubs per Python version (see shared/recipes). The stub is
not in the wheel's backend folder, so we assemble a backend directory of symlinks; the stub finds this
environment through `python3` on PATH and links this interpreter's libpython through LD_LIBRARY_PATH.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import NLDError
from .stubenv import make_stub_env


class ServerError(NLDError):
    """The server could not be found, did not start, or died."""


def pytriton_root() -> Path | None:
    """The tritonserver tree inside the nvidia-pytriton wheel, if installed (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    return root if root.is_dir() else None


def find_tritonserver(path: str | Path | None = None) -> Path:
    """The binary to run: `path`, else the one nvidia-pytriton ships, else `tritonserver` on PATH."""
    if path is not None:
        p = Path(path)
        if not (p.is_file() and os.access(p, os.X_OK)):
            raise ServerError(f"{p} is not an executable tritonserver binary")
        return p
    root = pytriton_root()
    if root is not None and (root / "bin" / "tritonserver").is_file():
        return root / "bin" / "tritonserver"
    found = shutil.which("tritonserver")
    if found:
        return Path(found)
    raise ServerError(
        "no tritonserver found: install it with `pip install --no-deps nvidia-pytriton==0.7.0` "
        "or pass --tritonserver PATH"
    )


def make_backend_dir(target: Path) -> Path | None:
    """A backend directory whose python/ holds the wheel's Python backend plus the stub for this Python.

    Returns None when the binary is not the wheel's (a regular Triton install brings its own backends)."""
    root = pytriton_root()
    if root is None:
        return None
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"nvidia-pytriton has no Python backend stub for Python {version}")
    python = target / "python"
    python.mkdir(parents=True, exist_ok=True)
    for src in (root / "backends" / "python" / "libtriton_python.so",
                root / "backends" / "python" / "triton_python_backend_utils.py", stub):
        link = python / src.name
        if not link.exists():
            link.symlink_to(src)
    return target


def _die_with_parent() -> None:
    """In the child: SIGTERM when the launching process dies, so no server outlives a crashed client."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def stub_shm_regions(server_pid: int) -> list[str]:
    """Shared-memory regions of the server's Python-backend stubs (their command line names them); a clean
    stop removes them, a SIGKILL would leave them in /dev/shm."""
    names = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            if args[0].endswith(b"triton_python_backend_stub") and args[5:6] == [str(server_pid).encode()]:
                names.append(args[2].decode())
        except (OSError, IndexError, UnicodeDecodeError):
            continue
    return [n for n in names if n.startswith("triton_python_backend_shm_region")]


def client_host(host: str) -> str:
    """The address a local client reaches a server bound to `host` at (every interface: loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class TritonServer:
    """One tritonserver process. Use as a context manager, or `start()` / `stop()`."""

    repository: Path
    host: str = "127.0.0.1"
    http_port: int = 0  # 0: a free port
    grpc_port: int = 0
    metrics_port: int = 0
    binary: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    log: Callable[[str], None] | None = None  # each server log line; None: keep the last lines only
    env: dict[str, str] = field(default_factory=dict)  # added to its environment (CUDA_VISIBLE_DEVICES, say)
    process: subprocess.Popen | None = None
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.repository = Path(self.repository).resolve()
        self.http_port = self.http_port or free_port()
        self.grpc_port = self.grpc_port or free_port()
        self.metrics_port = self.metrics_port or free_port()
        self._tmp: str | None = None

    @property
    def http_url(self) -> str:
        return f"{self._client_host()}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host()}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host()}:{self.metrics_port}/metrics"

    def _client_host(self) -> str:
        return client_host(self.host)

    def command(self, backend_dir: Path | None) -> list[str]:
        cmd = [
            str(self.binary or find_tritonserver()),
            f"--model-repository={self.repository}",
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--disable-auto-complete-config",
        ]
        if backend_dir is not None:
            cmd.append(f"--backend-directory={backend_dir}")
        return cmd + list(self.extra_args)

    def environment(self, stub_bin: Path) -> dict[str, str]:
        """PATH starts with the stub environment's bin/ (the stub runs its `python3`); libpython on the
        loader path, so the stub links the same libpython as this interpreter."""
        env = {**os.environ, **self.env}
        env["PATH"] = str(stub_bin) + os.pathsep + env.get("PATH", "")
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        env["LD_LIBRARY_PATH"] = os.pathsep.join(x for x in (libdir, env.get("LD_LIBRARY_PATH", "")) if x)
        return env

    # ----------------------------------------------------------------------------------------------
    def start(self, timeout: float = 120.0, ready: bool = True) -> TritonServer:
        """Launch; with `ready`, wait until /v2/health/ready answers 200 (or the server exits)."""
        if not self.repository.is_dir():
            raise ServerError(f"model repository {self.repository} does not exist: run `nld-trt package` first")
        binary = self.binary or find_tritonserver()
        self.binary = binary
        self._tmp = tempfile.mkdtemp(prefix="nld-trt-server-")
        shipped = pytriton_root() is not None and Path(binary).resolve().is_relative_to(pytriton_root().resolve())
        # the wheel's stub needs NumPy < 2 (see stubenv); another Triton brings its own backends and stubs
        stub_bin = make_stub_env(Path(self._tmp) / "stub-env") if shipped else Path(sys.executable).parent
        backend = make_backend_dir(Path(self._tmp) / "backends") if shipped else None
        self.process = subprocess.Popen(
            self.command(backend), env=self.environment(stub_bin), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace", start_new_session=True, preexec_fn=_die_with_parent,
        )
        threading.Thread(target=self._pump, daemon=True).start()
        if ready:
            try:
                self.wait_ready(timeout)
            except BaseException:
                self.stop()
                raise
        return self

    def _pump(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            del self.lines[:-400]
            if self.log is not None:
                self.log(line)

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.process.returncode}:\n" + self.tail())
            if self.is_ready():
                return
            time.sleep(0.2)
        raise ServerError(f"tritonserver was not ready after {timeout:.0f} s:\n" + self.tail())

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait (the server unloads models and cleans up its stubs); SIGKILL as a last resort."""
        code = 0
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                code = self.process.wait(timeout)
            except subprocess.TimeoutExpired:  # it could not unload a model: kill it with its stubs
                regions = stub_shm_regions(self.process.pid)
                os.killpg(self.process.pid, signal.SIGKILL)
                code = self.process.wait()
                for name in regions:
                    Path("/dev/shm", name).unlink(missing_ok=True)
        elif self.process is not None:
            code = self.process.returncode
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        return code

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
