"""A real uvicorn server for the tests that need one (browser, timeouts, concurrency)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import FastAPI

from breastvision.errors import BreastvisionError
from breastvision.serving.web import DEFAULT_HEADER_TIMEOUT_S, DEFAULT_KEEP_ALIVE_S, _uvicorn_config


@contextmanager
def background_server(
    app: FastAPI, host: str = "127.0.0.1", timeout: float = 30.0,
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S, keep_alive_s: int = DEFAULT_KEEP_ALIVE_S,
) -> Iterator[str]:
    """Run ``app`` with uvicorn in a thread on a free port; yields its base URL, stops on exit.
    The socket is bound here (port 0), so there is no race for a port."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))
    server = uvicorn.Server(_uvicorn_config(app, header_timeout_s, keep_alive_s, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise BreastvisionError("the web server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
