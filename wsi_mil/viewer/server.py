"""Serving the viewer with uvicorn: bind first (so the URL is known, also for port 0), then serve.

:class:`ViewerServer` binds ``127.0.0.1`` unless another host is asked for; a host that is not a
loopback address is logged as a warning, since anyone who reaches it sees the slides. ``run()`` serves
until Ctrl-C (the command line); ``start()`` serves from a background thread and ``stop()`` ends it
(tests and the benchmark).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from typing import Any

from wsi_mil.config.view import ViewConfig
from wsi_mil.errors import InputError
from wsi_mil.viewer.app import create_app
from wsi_mil.viewer.catalog import Catalog
from wsi_mil.viewer.service import ViewerService

logger = logging.getLogger(__name__)

__all__ = ["ViewerServer", "is_loopback", "warn_if_exposed"]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_exposed(host: str, port: int) -> None:
    """Log a warning when ``host`` is not a loopback address (the server is then reachable from elsewhere)."""
    if not is_loopback(host):
        logger.warning(
            "serving on %s, not only on this machine: anyone who can reach it on port %d sees these slides "
            "and predictions (there is no login). Use --host 127.0.0.1 unless that is what you want.",
            host, port,
        )


class ViewerServer:
    """One viewer over one run's :class:`Catalog`, bound to ``cfg.host:cfg.port`` on construction."""

    def __init__(self, catalog: Catalog, cfg: ViewConfig | None = None) -> None:
        import uvicorn

        self.cfg = cfg or ViewConfig()
        self.service = ViewerService(catalog, self.cfg)
        app = create_app(self.service)
        warn_if_exposed(self.cfg.host, self.cfg.port)
        family = socket.AF_INET6 if ":" in self.cfg.host else socket.AF_INET
        # IPPROTO_TCP named explicitly: asyncio then sets TCP_NODELAY on every accepted connection (a socket of
        # protocol 0 keeps Nagle's algorithm, and each response waits ~40 ms for the client's delayed ACK)
        self._socket = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((self.cfg.host, self.cfg.port))
        except OSError as exc:
            self._socket.close()
            raise InputError(
                f"cannot listen on {self.cfg.host}:{self.cfg.port} ({exc.strerror or exc}); choose another --port "
                "(0: any free port) or stop the program using it."
            ) from exc
        self._socket.listen(128)
        self.port: int = int(self._socket.getsockname()[1])
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_keep_alive=5, limit_concurrency=256, log_config=None)
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = self.cfg.host
        shown = f"[{host}]" if ":" in host else ("127.0.0.1" if host in ("0.0.0.0", "") else host)  # noqa: S104
        return f"http://{shown}:{self.port}/"

    def _check_slides_in_background(self) -> None:
        """Verify every slide (file present, fingerprint) while the first pages load, not on the first click."""
        threading.Thread(target=self.service.catalog.verify_all, name="wsi-mil-view-check", daemon=True).start()

    def run(self) -> None:
        """Serve until interrupted (Ctrl-C), then close the slides."""
        self._check_slides_in_background()
        try:
            self._server.run(sockets=[self._socket])
        finally:
            self.close()

    def start(self, timeout_s: float = 10.0) -> ViewerServer:
        """Serve from a background thread; returns once the server accepts requests."""
        self._check_slides_in_background()
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="wsi-mil-view", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the viewer did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
        self.close()

    def close(self) -> None:
        self.service.close()
        self._socket.close()

    def __enter__(self) -> ViewerServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
