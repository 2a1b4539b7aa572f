"""Run an ASGI app under uvicorn on loopback, in a background thread, for tests and the dev stack."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import uvicorn


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class ServerHandle:
    url: str
    port: int
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve_in_thread(
    app, *, host: str = "127.0.0.1", port: int | None = None, lifespan: str = "auto"
) -> ServerHandle:
    """Start `app` on host:port (a free port when None) and return once it accepts connections."""
    port = port or free_port(host)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        lifespan=lifespan,
        access_log=False,
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"server on port {port} failed to start")
        if time.monotonic() > deadline:
            raise TimeoutError(f"server on port {port} did not start in 15 s")
        time.sleep(0.01)
    return ServerHandle(url=f"http://{host}:{port}", port=port, server=server, thread=thread)
