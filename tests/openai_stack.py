"""The OpenAI tests' deployment: the embedded model packaged into a Triton repository and served by
`nld-trt serve` (a real tritonserver plus the OpenAI front end) in its own process, as a user runs it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from nld_trt.errors import NLDError
from nld_trt.serving.package import ServingOptions, package_repository
from nld_trt.serving.server import find_tritonserver, free_port
from nld_trt.serving.stubenv import stub_site

CAP = 400  # max_tokens cap of the test deployment
SLOTS = 8
# a stream that runs to the cap (for disconnects and migration): a raw prompt, sent with min_tokens = CAP (the
# embedded model, trained to finish its answers, ends this one with an EOS after about 60 tokens otherwise)
ENDLESS = "Tom has 12 apples. Tom has 12 apples. Tom has"


def require_stack() -> None:
    try:
        find_tritonserver()
        stub_site()
        import fastapi  # noqa: F401
        import openai  # noqa: F401
        import tritonclient.grpc.aio  # noqa: F401
    except (NLDError, ImportError) as e:  # pragma: no cover - the README's install command provides them
        pytest.skip(f"no Triton server or OpenAI front end here ({e})", allow_module_level=True)


@dataclass
class Stack:
    process: subprocess.Popen
    log: Path
    http_port: int
    grpc_port: int
    metrics_port: int
    openai_port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.openai_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def metric(self, name: str, model: str = "nld") -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        for line in text.splitlines():
            if line.startswith(name + "{") and f'model="{model}"' in line:
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no metric {name} for {model}")

    def model_inputs(self) -> set[str]:
        """The served model's inputs, from its Triton config (what decides which tests can run yet)."""
        import tritonclient.grpc as grpcclient

        config = grpcclient.InferenceServerClient(self.grpc_url).get_model_config("nld", as_json=True)["config"]
        return {i["name"] for i in config["input"]}

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def package_embedded(directory: Path, max_seq_len: int = 1024) -> Path:
    options = ServingOptions(max_batch=SLOTS, max_seq_len=max_seq_len, max_tokens_cap=CAP, torch_threads=1)
    return package_repository(None, directory / "repo", options)


def start_stack(repo: Path | None, directory: Path, timeout: float = 180, extra: tuple[str, ...] = ()) -> Stack:
    """`nld-trt serve REPO`, or with repo None `nld-trt serve` of the embedded model (packaged into the cache
    with the package options in `extra`)."""
    ports = [free_port() for _ in range(4)]
    log = directory / "serve.log"
    cmd = [sys.executable, "-m", "nld_trt.serving.cli", "serve", *([str(repo)] if repo is not None else []),
           "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
           "--openai-port", str(ports[3]), *extra]
    with open(log, "w") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
    stack = Stack(process, log, *ports)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError("nld-trt serve exited:\n" + log.read_text()[-3000:])
        try:
            with urllib.request.urlopen(f"{stack.base_url}/health", timeout=2) as r:
                if r.status == 200 and json.loads(r.read())["status"] == "ok":
                    return stack
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    stack.stop()
    raise AssertionError("nld-trt serve did not become ready:\n" + log.read_text()[-3000:])
