"""Run the OpenAI front end with uvicorn: in a background thread beside tritonserver (`nld-trt serve`), or in
the foreground against a tritonserver started elsewhere (`nld-trt openai`).

The listening socket is bound here, before uvicorn starts, so port 0 means a free port with no race and a
port in use is a clear error instead of a log line in a thread.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ...errors import NLDError
from .app import create_app
from .media import MAX_BODY_BYTES, MediaOptions
from .triton import MODEL, TritonBridge


@dataclass
class FrontEnd:
    triton_url: str  # host:port of tritonserver's gRPC endpoint
    host: str = "127.0.0.1"
    port: int = 9000  # 0: a free port
    triton_model: str = MODEL
    served_model: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    media: MediaOptions = field(default_factory=MediaOptions)  # which image URLs it may fetch
    _server: Any = None
    _thread: threading.Thread | None = None
    _socket: socket.socket | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def bind(self) -> FrontEnd:
        """Take the listening socket now (a port in use fails here, before anything else starts)."""
        if self._socket is not None:
            return self
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as e:
            sock.close()
            raise NLDError(f"the OpenAI front end cannot listen on {self.host}:{self.port} ({e.strerror}): "
                           "choose another --openai-port") from None
        sock.listen(2048)
        self.port = sock.getsockname()[1]
        self._socket = sock
        return self

    def _prepare(self) -> Any:
        import uvicorn

        self.bind()
        app = create_app(TritonBridge(self.triton_url, self.triton_model), self.served_model, self.max_body_bytes,
                         self.media)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", timeout_keep_alive=30)
        return uvicorn.Server(config)

    def start(self, timeout: float = 30.0) -> FrontEnd:
        """Serve from a background thread; returns once the front end accepts connections."""
        self._server = self._prepare()
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="nld-openai", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise NLDError(f"the OpenAI front end did not start on {self.url}")
            time.sleep(0.02)
        return self

    def serve_forever(self, announce: Callable[[str], None] | None = None) -> None:
        """Serve in this thread until SIGINT or SIGTERM (uvicorn's handlers); `announce` gets the URL."""
        self._server = self._prepare()
        if announce is not None:
            announce(self.url)
        try:
            self._server.run(sockets=[self._socket])
        finally:
            self._socket.close()

    def stop(self, timeout: float = 10.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> FrontEnd:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
