"""`nld-trt dynamo-worker` and `nld-trt cluster`: click commands, registered on the main `nld-trt` group."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import click

from ...errors import NLDError
from ..cli import _repository, package_options

DYNAMO_INSTALL = ("pip install -e '.[dynamo]' && pip install --no-deps ai-dynamo==1.6.1 (the README's \"Scale out "
                  "with NVIDIA Dynamo\" says why --no-deps)")
LOOPBACK = ("DYN_TCP_RPC_HOST", "DYN_TCP_RESPONSE_STREAM_HOST", "DYN_EVENT_PLANE_HOST", "DYN_SYSTEM_HOST")


def require_dynamo() -> None:
    try:
        import dynamo.llm  # noqa: F401
        import dynamo.frontend  # noqa: F401
    except ImportError as e:
        raise NLDError(f"NVIDIA Dynamo is not installed ({e}): {DYNAMO_INSTALL}") from None


def _err(message: str) -> None:
    click.echo(message, err=True)


@click.command("dynamo-worker")
@click.option("--triton", "triton_url", default="127.0.0.1:8001", show_default=True,
              help="gRPC address of the tritonserver serving an nld-trt repository")
@click.option("--triton-model", default="nld", show_default=True, help="its decoupled (streaming) model")
@click.option("--model-dir", type=click.Path(file_okay=False, exists=True), required=True,
              help="the served model's tokenizer and chat template for Dynamo's frontend: the checkpoint directory, "
                   "or REPO/nld/1/artifacts")
@click.option("--served-model-name", default="nld", show_default=True, help="the model id OpenAI clients send")
@click.option("--endpoint", default="nld.backend.generate", show_default=True,
              help="Dynamo endpoint (namespace.component.endpoint): every worker of one model uses the same")
@click.option("--discovery-backend", type=click.Choice(["file", "etcd", "kubernetes"]), default="file",
              show_default=True, help="file: one machine (DYN_FILE_KV); etcd/kubernetes: several")
@click.option("--request-plane", type=click.Choice(["tcp", "nats"]), default="tcp", show_default=True)
@click.option("--kv-events/--no-kv-events", default=True, show_default=True,
              help="publish the deployment's KV events to Dynamo's KV router")
@click.option("--ready-timeout", type=float, default=600.0, show_default=True,
              help="seconds to wait for the tritonserver to be ready")
@click.option("--grace-period", type=float, default=None,
              help="seconds between unregistering and stopping on SIGTERM (default: Dynamo's, 5)")
@click.option("--reasoning-parser", default=None,
              help="Dynamo's reasoning parser, which sends the thinking as reasoning_content (e.g. mistral for "
                   "[THINK] ... [/THINK]); default: none, the thinking stays in content")
def worker_command(triton_url, triton_model, model_dir, served_model_name, endpoint, discovery_backend, request_plane,
                   kv_events, ready_timeout, grace_period, reasoning_parser) -> None:
    """Serve one nld-trt tritonserver as a worker of an NVIDIA Dynamo deployment (its frontend and KV router),
    until SIGTERM or Ctrl-C. With file discovery (one machine) every Dynamo socket binds 127.0.0.1."""
    require_dynamo()
    from .worker import WorkerOptions, serve

    if discovery_backend == "file":
        for key in LOOPBACK:
            os.environ.setdefault(key, "127.0.0.1")
    options = WorkerOptions(triton_url=triton_url, model_dir=Path(model_dir), served_model_name=served_model_name,
                            triton_model=triton_model, endpoint=endpoint, discovery_backend=discovery_backend,
                            request_plane=request_plane, kv_events=kv_events, ready_timeout=ready_timeout,
                            grace_period=grace_period, reasoning_parser=reasoning_parser)
    import uvloop

    uvloop.run(serve(options, announce=lambda line: _err(f"nld-trt: {line}")))


@click.command("cluster")
@click.argument("path", type=click.Path(file_okay=False), required=False)
@click.option("--workers", type=int, default=2, show_default=True, help="tritonservers, one Dynamo worker each")
@click.option("--router-mode", type=click.Choice(["kv", "round-robin", "random", "power-of-two", "least-loaded"]),
              default="kv", show_default=True, help="how Dynamo's frontend picks a worker (kv: where the prompt's "
              "prefix is cached, weighed against load)")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="the OpenAI API's address (0.0.0.0: every interface); everything else stays on loopback")
@click.option("--http-port", type=int, default=8080, show_default=True, help="the OpenAI API's port (0: a free one)")
@click.option("--migration-limit", type=int, default=3, show_default=True,
              help="times a stream may move to another worker when its worker dies")
@click.option("--served-model-name", default="nld", show_default=True, help="the model id OpenAI clients send")
@click.option("--gpus", default=None, help="GPUs for the tritonservers in turn, e.g. 0,1,2,3 (default: every visible "
              "GPU when the repository is packaged for cuda)")
@click.option("--tritonserver", "binary", type=click.Path(dir_okay=False), default=None,
              help="tritonserver binary (default: the one nvidia-pytriton ships, else tritonserver on PATH)")
@click.option("--reasoning-parser", default=None, help="the workers' --reasoning-parser (Dynamo's; default none)")
@click.option("--log-dir", type=click.Path(file_okay=False), default=None,
              help="keep every process's log and Dynamo's discovery folder here (default: a temporary folder)")
@click.option("--ready-timeout", type=float, default=600.0, show_default=True, help="seconds to wait for ready")
@package_options
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="where a model directory is packaged (default: the user cache)")
@click.pass_context
def cluster_command(ctx, path, workers, router_mode, host, http_port, migration_limit, served_model_name, gpus, binary,
                    reasoning_parser, log_dir, ready_timeout, cache_dir, **options) -> None:
    """Serve PATH from WORKERS tritonservers behind one NVIDIA Dynamo frontend (one OpenAI endpoint, KV-aware
    routing), until Ctrl-C or SIGTERM. PATH is a model repository (nld-trt package), or a model directory packaged
    with the package options first, as `nld-trt serve` does (the embedded model when omitted)."""
    from .cluster import Cluster

    require_dynamo()
    if http_port < 0:
        raise click.BadParameter("must be a port number, or 0 for a free one", param_hint="--http-port")
    repo = _repository(ctx, path, cache_dir, options)
    cluster = Cluster(Path(repo), workers=workers, router_mode=router_mode, host=host, http_port=http_port,
                      migration_limit=migration_limit, served_model_name=served_model_name, gpus=gpus,
                      binary=Path(binary) if binary else None, workdir=Path(log_dir) if log_dir else None,
                      worker_args=["--reasoning-parser", reasoning_parser] if reasoning_parser else [],
                      log=lambda line: _err(f"nld-trt: {line}"))

    def interrupt(signum, frame) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        cluster.start(timeout=ready_timeout)
        _err(f"nld-trt: {workers} worker(s), router {router_mode}, logs in {cluster.workdir}; Ctrl-C or SIGTERM stops")
        click.echo(f"OpenAI API {cluster.url}/v1 (model {served_model_name!r})", err=True)
        while True:
            for line in cluster.check():
                _err(f"nld-trt: {line}")
            time.sleep(0.5)
    except KeyboardInterrupt:
        _err("nld-trt: stopping the cluster")
    finally:
        cluster.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    _err("nld-trt: cluster stopped")


COMMANDS = (worker_command, cluster_command)
