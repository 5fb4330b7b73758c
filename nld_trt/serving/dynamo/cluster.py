"""`nld-trt cluster`: N nld-trt Triton deployments behind one Dynamo frontend on one machine, in one command.

What runs (every process a child of this one, everything bound to 127.0.0.1 except the frontend's HTTP port when
`--host` says otherwise):
- N tritonservers, each serving the same repository with its own KV cache (on a GPU host, one GPU each through
  CUDA_VISIBLE_DEVICES);
- N Dynamo workers (`nld-trt dynamo-worker`), one per tritonserver;
- one Dynamo frontend (`python -m dynamo.frontend`): the OpenAI API, the router (`--router-mode`), migration of
  interrupted streams (`--migration-limit`);
- a loopback relay for Dynamo's event plane (`Broker`, a thread of this process): in its default mode every KV
  event publisher binds a socket on 0.0.0.0; through the relay they connect to 127.0.0.1 instead.
Discovery is Dynamo's file backend in a fresh folder (no etcd, no NATS), and the frontend's asset cache goes under
the cluster's own HOME, so nothing outside the cluster's folder is written.

A worker or tritonserver that dies is reported and the others keep serving; Ctrl-C or SIGTERM stops the workers
first (they unregister, so the frontend routes nowhere stale), then the frontend, the tritonservers, the relay.
Children get SIGTERM if this process dies (PR_SET_PDEATHSIG), so none outlives it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import NLDError
from ..server import TritonServer, _die_with_parent, free_port

ROUTER_MODES = ("kv", "round-robin", "random", "power-of-two", "least-loaded")


def loopback_env(store: Path, home: Path, broker: str | None) -> dict[str, str]:
    """Dynamo's environment for one machine: file discovery in `store`, every plane on loopback, nothing fetched."""
    env = {
        "DYN_DISCOVERY_BACKEND": "file", "DYN_FILE_KV": str(store), "DYN_REQUEST_PLANE": "tcp",
        "DYN_TCP_RPC_HOST": "127.0.0.1", "DYN_TCP_RESPONSE_STREAM_HOST": "127.0.0.1",
        "DYN_EVENT_PLANE_HOST": "127.0.0.1", "DYN_SYSTEM_HOST": "127.0.0.1", "HF_HUB_OFFLINE": "1",
        "HOME": str(home),  # the frontend caches model cards under ~/.cache/dynamo
        "PYTHONUNBUFFERED": "1",
    }
    if broker:
        env["DYN_ZMQ_BROKER_URL"] = broker
    return env


class Broker:
    """A loopback XSUB/XPUB relay for Dynamo's ZMQ event plane (DYN_ZMQ_BROKER_URL), run in a thread."""

    def __init__(self) -> None:
        import zmq

        self._ctx = zmq.Context()
        self._xsub, self._xpub = self._ctx.socket(zmq.XSUB), self._ctx.socket(zmq.XPUB)
        self.xsub_port = self._xsub.bind_to_random_port("tcp://127.0.0.1")
        self.xpub_port = self._xpub.bind_to_random_port("tcp://127.0.0.1")
        self._control = self._ctx.socket(zmq.PAIR)
        self._control.bind("inproc://nld-broker-control")
        steer = self._ctx.socket(zmq.PAIR)
        steer.connect("inproc://nld-broker-control")
        self._thread = threading.Thread(target=self._run, args=(steer,), name="nld-zmq-broker", daemon=True)
        self._thread.start()

    def _run(self, steer: Any) -> None:
        import zmq

        try:
            zmq.proxy_steerable(self._xsub, self._xpub, None, steer)
        finally:
            steer.close(linger=0)

    @property
    def url(self) -> str:
        return f"xsub=tcp://127.0.0.1:{self.xsub_port} , xpub=tcp://127.0.0.1:{self.xpub_port}"

    def close(self) -> None:
        self._control.send(b"TERMINATE")
        self._thread.join(5)
        for sock in (self._control, self._xsub, self._xpub):
            sock.close(linger=0)
        self._ctx.term()


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    log: Path
    reported: bool = False

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float) -> int | None:
        """SIGTERM, then SIGKILL to its process group after `timeout`."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.wait()


def cuda_devices(repository: Path, gpus: str | None) -> list[str]:
    """The GPUs to give the tritonservers in turn: `gpus` (comma-separated), else every visible GPU when the
    repository is packaged for CUDA, else none (CPU)."""
    if gpus:
        return [g.strip() for g in gpus.split(",") if g.strip()]
    config = (repository / "nld" / "config.pbtxt").read_text() if (repository / "nld" / "config.pbtxt").is_file() else ""
    if "KIND_GPU" not in config:
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [g for g in visible.split(",") if g]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def http_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


@dataclass
class Cluster:
    """See the module docstring. Use as a context manager, or `start()` / `stop()`."""

    repository: Path
    workers: int = 2
    router_mode: str = "kv"
    host: str = "127.0.0.1"  # the frontend's HTTP address; everything else is loopback
    http_port: int = 0  # 0: a free port
    migration_limit: int = 3
    served_model_name: str = "nld"
    gpus: str | None = None
    binary: Path | None = None  # tritonserver
    workdir: Path | None = None  # logs, discovery store, HOME (default: a temporary folder, removed at stop)
    frontend_args: list[str] = field(default_factory=list)
    worker_args: list[str] = field(default_factory=list)
    log: Callable[[str], None] = lambda line: None
    servers: list[TritonServer] = field(default_factory=list)
    children: list[Child] = field(default_factory=list)
    broker: Broker | None = None
    _own_workdir: bool = False
    _files: list[Any] = field(default_factory=list)
    _dead_servers: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.repository = Path(self.repository).resolve()
        if self.workers < 1:
            raise NLDError(f"--workers must be at least 1, got {self.workers}")
        if self.router_mode not in ROUTER_MODES:
            raise NLDError(f"--router-mode {self.router_mode!r}: choose one of {', '.join(ROUTER_MODES)}")
        if not (self.repository / "nld" / "config.pbtxt").is_file():
            raise NLDError(f"{self.repository} is not an nld-trt model repository (no nld/config.pbtxt): run "
                           "nld-trt package, or give a model directory")

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.http_port}"

    @property
    def model_dir(self) -> Path:
        """The served model's tokenizer and chat template, inside the repository."""
        return self.repository / "nld" / "1" / "artifacts"

    # ----------------------------------------------------------------------------------------------------
    def start(self, timeout: float = 600.0) -> Cluster:
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        if self.workdir is None:
            self.workdir, self._own_workdir = Path(tempfile.mkdtemp(prefix="nld-trt-cluster-")), True
        self.workdir = Path(self.workdir).resolve()
        (self.workdir / "home").mkdir(parents=True, exist_ok=True)
        self.http_port = self.http_port or free_port()
        self.broker = Broker()
        self.env = {**os.environ, **loopback_env(self.workdir / "discovery", self.workdir / "home", self.broker.url)}
        devices = cuda_devices(self.repository, self.gpus)
        deadline = time.monotonic() + timeout
        self.log(f"starting {self.workers} tritonserver(s) for {self.repository}"
                 + (f" on GPUs {', '.join(devices[i % len(devices)] for i in range(self.workers))}" if devices else ""))
        for i in range(self.workers):
            env = {"CUDA_VISIBLE_DEVICES": devices[i % len(devices)]} if devices else {}
            logfile = open(self.workdir / f"tritonserver-{i}.log", "w")  # noqa: SIM115 - closed at stop()
            self._files.append(logfile)
            server = TritonServer(self.repository, binary=self.binary, env=env,
                                  log=lambda line, f=logfile: (f.write(line + "\n"), f.flush()))
            self.servers.append(server)
            server.start(ready=False)
        for i, server in enumerate(self.servers):
            server.wait_ready(max(1.0, deadline - time.monotonic()))
            self.log(f"tritonserver {i} ready: gRPC {server.grpc_url}, metrics {server.metrics_url}")
        self._spawn("frontend", [sys.executable, "-m", "dynamo.frontend", "--http-host", self.host, "--http-port",
                                 str(self.http_port), "--discovery-backend", "file", "--router-mode", self.router_mode,
                                 "--migration-limit", str(self.migration_limit), *self.frontend_args])
        for i, server in enumerate(self.servers):
            self._spawn(f"worker-{i}", [sys.executable, "-m", "nld_trt.cli", "dynamo-worker", "--triton", server.grpc_url,
                                        "--model-dir", str(self.model_dir), "--served-model-name",
                                        self.served_model_name, *self.worker_args])
        self.wait_workers(self.workers, max(1.0, deadline - time.monotonic()))
        (self.workdir / "cluster.json").write_text(json.dumps(self.describe(), indent=1))

    def describe(self) -> dict[str, Any]:
        """What runs where (written to WORKDIR/cluster.json): the OpenAI URL, every process's pid and ports, and the
        Dynamo environment another process needs to join this cluster (a second frontend, say)."""
        return {
            "url": self.url, "model": self.served_model_name, "router_mode": self.router_mode,
            "frontend_pid": self.child("frontend").process.pid,
            "dynamo_env": {k: v for k, v in self.env.items() if k.startswith("DYN_") or k in ("HOME", "HF_HUB_OFFLINE")},
            "workers": [{"pid": self.child(f"worker-{i}").process.pid, "tritonserver_pid": s.process.pid,
                         "grpc": s.grpc_url, "http": s.http_url, "metrics": s.metrics_url}
                        for i, s in enumerate(self.servers)],
        }

    def _spawn(self, name: str, argv: list[str]) -> Child:
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                       preexec_fn=_die_with_parent)
        child = Child(name, process, log)
        self.children.append(child)
        return child

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def instances(self) -> int:
        """Worker instances the frontend sees for the served model (its /health lists them)."""
        try:
            health = http_json(f"{self.url}/health")
            models = http_json(f"{self.url}/v1/models")
        except (urllib.error.URLError, OSError, ValueError):
            return 0
        if not any(m.get("id") == self.served_model_name for m in models.get("data", [])):
            return 0
        return sum(1 for i in health.get("instances", []) if i.get("endpoint") == "generate")

    def wait_workers(self, count: int, timeout: float) -> None:
        """Until the frontend serves the model from `count` workers (or a child dies)."""
        deadline = time.monotonic() + timeout
        while self.instances() < count:
            dead = [c for c in self.children if not c.alive()]
            if dead:
                raise NLDError(f"{dead[0].name} exited with code {dead[0].process.returncode} while the cluster "
                               f"started:\n{dead[0].tail()}")
            if time.monotonic() > deadline:
                raise NLDError(f"the frontend did not list {count} workers for model {self.served_model_name!r} "
                               f"after {timeout:.0f} s (logs in {self.workdir})")
            time.sleep(0.2)

    def check(self) -> list[str]:
        """Report (once each) children and tritonservers that died; NLDError if the frontend did."""
        lines = []
        for c in self.children:
            if not c.alive() and not c.reported:
                c.reported = True
                if c.name == "frontend":
                    raise NLDError(f"the Dynamo frontend exited with code {c.process.returncode}:\n{c.tail()}")
                lines.append(f"{c.name} exited with code {c.process.returncode} (log {c.log}); the others keep serving")
        for i, s in enumerate(self.servers):
            if s.process is not None and s.process.poll() is not None and i not in self._dead_servers:
                self._dead_servers.add(i)
                lines.append(f"tritonserver {i} exited with code {s.process.returncode}; its worker stops, the others "
                             "keep serving")
        return lines

    def stop(self, timeout: float = 30.0) -> None:
        """Workers first (they unregister), then the frontend, the tritonservers, the relay; parallel within each."""
        workers = [c for c in self.children if c.name.startswith("worker")]
        others = [c for c in self.children if c not in workers]
        for group in (workers, others):
            threads = [threading.Thread(target=c.stop, args=(timeout,)) for c in group]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        threads = [threading.Thread(target=s.stop, args=(timeout,)) for s in self.servers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if self.broker is not None:
            self.broker.close()
            self.broker = None
        for f in self._files:
            f.close()
        self._files.clear()
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
