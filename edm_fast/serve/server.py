"""Running the app with uvicorn, with bounded resources per connection.

uvicorn's h11 protocol is used (its header limit is configurable): a request head still arriving
past ``max_header_bytes`` gets 400 and its connection is closed, so an unfinished head holds at
most that much memory; a complete head over ``max_headers`` headers or ``max_header_bytes``
bytes gets 431 (the app). ``limit_concurrency`` caps connections and requests in flight (then
503). SIGINT/SIGTERM stop accepting and wait ``graceful_timeout_s`` for requests in flight: by
default the request deadline plus the longest batch the limits allow (estimated at warm-up), so
every request in flight is answered (200, or 504 at its deadline) and the running batch ends.
"""

from __future__ import annotations

import math
import socket

from .settings import SWITCH_INTERVAL_S, UvicornLimits

__all__ = ["bind", "make_server", "run"]


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: any free port); ValueError saying why it cannot."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be in 0..65535 (0: any free port), got {port}")
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(2048)
    except OSError as exc:  # in use, not permitted, unknown host (socket.gaierror)
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.set_inheritable(True)
    return sock


def make_server(app, limits: UvicornLimits | None = None, log_level: str = "warning"):
    """A uvicorn.Server for ``app`` (``create_app``) under ``limits`` (default UvicornLimits())."""
    import uvicorn

    s, limits = app.state.settings, limits or UvicornLimits()
    graceful = limits.graceful_timeout_s or s.request_timeout_s + app.state.longest_batch_s + 5
    config = uvicorn.Config(
        app, http="h11", lifespan="on", log_level=log_level, access_log=False,
        limit_concurrency=limits.limit_concurrency, timeout_keep_alive=limits.keep_alive_s,
        timeout_graceful_shutdown=math.ceil(graceful),
        h11_max_incomplete_event_size=s.max_header_bytes)
    return uvicorn.Server(config)


def run(app, sock: socket.socket, limits: UvicornLimits | None = None,
        log_level: str = "warning") -> None:
    """Serve ``app`` on ``sock`` (``bind``) until SIGINT/SIGTERM, then shut down gracefully and
    return (uvicorn re-raises the signal it caught: absorbed here, so the exit status is 0).
    Meanwhile the process's GIL switch interval is ``SWITCH_INTERVAL_S``."""
    import signal
    import sys

    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
    interval = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, SWITCH_INTERVAL_S))  # see settings.SWITCH_INTERVAL_S
    try:
        make_server(app, limits, log_level).run(sockets=[sock])
    finally:
        sys.setswitchinterval(interval)
        for s, handler in previous.items():
            signal.signal(s, handler)
