"""The viewer's web application (Starlette): pages, JSON, tiles and the browser assets.

Routes (``{id}`` is a slide id of the run; anything else is a 404):

=============================================  ====================================================
``/``                                          the cohort page
``/slide/{id}``                                the slide page (OpenSeadragon + the evidence layer)
``/api/ping``                                  ``{"app": "wsi-mil view", "slides": [...]}`` (CORS: the
                                               static review page asks it whether a viewer runs)
``/api/slides``                                every slide, viewable or not, with the reason
``/api/slide/{id}``                            geometry, prediction, layers, colour table, neighbours
``/api/slide/{id}/layer/{layer}?class=&k=``    a layer's legend and its top-k and bottom-k tiles
``/api/slide/{id}/tile_at?x=&y=&class=``       the read-out of the tile under a level-0 point
``/api/slide/{id}/tissue.json``,               tissue contours and ground-truth annotations
``/api/slide/{id}/annotations.json``
``/tiles/{id}/{level}/{col}_{row}.jpeg``       a deep-zoom tile of the slide
``/overlay/{id}/{layer}/{level}/{col}_{row}.png|.jpeg?class=&smooth=1``  a tile of the evidence layer
``/crop/{id}/{index}.jpeg``                    scored tile ``index`` at the model's µm/px (galleries)
``/static/...``, ``/vendor/openseadragon/...`` the viewer's own scripts and OpenSeadragon (from npm)
``/review/...``                                the run's static review page (``index.html``), if any
=============================================  ====================================================

A slide id the run does not list, a slide that is not viewable, any path outside these routes
(``..``, encoded ``%2e%2e``, absolute paths, symlinks out of the served folders, dot-files) is a 404;
a level, column, row, tile index or coordinate that is malformed or outside the slide is a 400. Error
bodies are one line of plain text, never file content or a stack trace.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from wsi_mil.errors import InputError, NotServedError, SlideError
from wsi_mil.viewer.assets import STATIC_DIR, openseadragon_dir
from wsi_mil.viewer.service import ViewerService

logger = logging.getLogger(__name__)

__all__ = ["create_app"]

_TILE_NAME = re.compile(r"^(\d{1,9})_(\d{1,9})\.(jpeg|png)$")
_CROP_NAME = re.compile(r"^(\d{1,9})\.jpeg$")
_CACHE = {"Cache-Control": "private, max-age=3600"}
_SECURITY = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
        "script-src 'self'; connect-src 'self'; frame-ancestors 'none'"
    ),
}


class _OutputFiles(StaticFiles):
    """Files of one output folder: no dot-files (records, locks); symlinks out of it are refused (404)."""

    def lookup_path(self, path: str) -> tuple[str, os.stat_result | None]:
        if any(part.startswith(".") for part in Path(path).parts):
            return "", None
        return super().lookup_path(path)

    async def get_response(self, path: str, scope: Scope) -> Response:
        try:
            return await super().get_response(path, scope)
        except HTTPException as exc:
            raise HTTPException(404 if exc.status_code != 405 else 405) from None


#: the run's own review page has an inline script and styles
_REVIEW_CSP = _SECURITY["Content-Security-Policy"].replace("script-src 'self'", "script-src 'self' 'unsafe-inline'")


class _SecurityHeaders:
    """Adds :data:`_SECURITY` to every response (plain ASGI: no cost per tile beyond the headers)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if scope.get("path", "").startswith("/review/"):
                    headers.setdefault("Content-Security-Policy", _REVIEW_CSP)
                for key, value in _SECURITY.items():
                    headers.setdefault(key, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _page(title: str, script: str, body_attrs: dict[str, str], body: str) -> HTMLResponse:
    attrs = " ".join(f'data-{k}="{html.escape(v, quote=True)}"' for k, v in body_attrs.items())
    text = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title>"
        '<link rel="stylesheet" href="/static/viewer.css"></head>'
        f"<body {attrs}>{body}"
        '<script src="/vendor/openseadragon/openseadragon.min.js"></script>'
        f'<script src="/static/{script}"></script></body></html>\n'
    )
    return HTMLResponse(text, headers={"Cache-Control": "no-cache"})


def create_app(service: ViewerService) -> Starlette:
    """The Starlette application serving ``service`` (see the module docstring).

    Without OpenSeadragon installed the JSON, tiles and pages are still served (the command line refuses
    to start then; :func:`~wsi_mil.viewer.assets.openseadragon_dir` says how to install it).
    """
    try:
        osd: Path | None = openseadragon_dir()
    except InputError as exc:
        logger.error("%s", exc)
        osd = None

    async def cohort_page(request: Request) -> Response:
        return _page("wsi-mil view: cohort", "cohort.js", {"page": "cohort"}, '<div id="app"></div>')

    async def slide_page(request: Request) -> Response:
        slide_id = request.path_params["slide_id"]
        if service.catalog.get(slide_id) is None:
            raise NotServedError("no such slide in this run")
        return _page(f"wsi-mil view: {slide_id}", "slide.js", {"page": "slide", "slide-id": slide_id},
                     '<div id="app"></div>')

    async def ping(request: Request) -> Response:
        return JSONResponse(
            {"app": "wsi-mil view", "slides": service.catalog.viewable_ids()},
            headers={"Access-Control-Allow-Origin": "*", "Cache-Control": "no-store"},
        )

    def slides_api(request: Request) -> Response:
        return JSONResponse(service.cohort(), headers={"Cache-Control": "no-store"})

    def slide_api(request: Request) -> Response:
        return JSONResponse(service.slide_info(request.path_params["slide_id"]), headers={"Cache-Control": "no-store"})

    def layer_api(request: Request) -> Response:
        k_text = request.query_params.get("k")
        if k_text is not None and not (k_text.isascii() and k_text.isdigit() and len(k_text) <= 3):
            raise InputError("k must be a whole number")
        info = service.layer_info(request.path_params["slide_id"], request.path_params["layer"],
                                  request.query_params.get("class"), int(k_text) if k_text else None)
        return JSONResponse(info)

    def tile_at_api(request: Request) -> Response:
        q = request.query_params
        if "x" not in q or "y" not in q:
            raise InputError("give x and y (level-0 pixels)")
        return JSONResponse(service.tile_at(request.path_params["slide_id"], q["x"], q["y"], q.get("class")))

    def polygons_api(request: Request) -> Response:
        return JSONResponse(service.polygons(request.path_params["slide_id"], request.path_params["which"]))

    def _tile_name(request: Request) -> tuple[str, str, str]:
        match = _TILE_NAME.match(request.path_params["name"])
        if match is None:
            raise InputError("a tile is named <column>_<row>.jpeg (or .png for overlays)")
        return match.group(1), match.group(2), match.group(3)

    def slide_tile(request: Request) -> Response:
        slide_id = request.path_params["slide_id"]
        service.entry(slide_id)  # unknown or unviewable slide: 404 before the tile name is judged
        col, row, fmt = _tile_name(request)
        if fmt != "jpeg":
            raise NotServedError("slide tiles are .jpeg")
        data = service.slide_tile(slide_id, request.path_params["level"], col, row)
        return Response(data, media_type="image/jpeg", headers=_CACHE)

    def overlay_tile(request: Request) -> Response:
        slide_id = request.path_params["slide_id"]
        service.entry(slide_id)
        service.layer_name(request.path_params["layer"])
        col, row, fmt = _tile_name(request)
        smooth = request.query_params.get("smooth", "0")
        if smooth not in ("0", "1"):
            raise InputError("smooth is 0 or 1")
        data = service.overlay_tile(
            slide_id, request.path_params["layer"], request.path_params["level"], col, row, fmt=fmt,
            class_name=request.query_params.get("class"), smoothed=smooth == "1",
        )
        return Response(data, media_type=f"image/{fmt}", headers=_CACHE)

    def crop(request: Request) -> Response:
        slide_id = request.path_params["slide_id"]
        service.entry(slide_id)
        match = _CROP_NAME.match(request.path_params["name"])
        if match is None:
            raise InputError("a tile crop is named <tile index>.jpeg")
        return Response(service.crop(slide_id, match.group(1)), media_type="image/jpeg", headers=_CACHE)

    limiter = anyio.CapacityLimiter(service.cfg.worker_threads)

    def threaded(handler: Callable[[Request], Response]) -> Callable[[Request], Awaitable[Response]]:
        """A blocking handler run in the viewer's own bounded pool of threads (slide reads, encoding)."""

        async def run(request: Request) -> Response:
            return await anyio.to_thread.run_sync(handler, request, limiter=limiter)

        return run

    routes: list[Route | Mount] = [
        Route("/", cohort_page),
        Route("/slide/{slide_id}", slide_page),
        Route("/api/ping", ping),
        Route("/api/slides", threaded(slides_api)),
        Route("/api/slide/{slide_id}", threaded(slide_api)),
        Route("/api/slide/{slide_id}/layer/{layer}", threaded(layer_api)),
        Route("/api/slide/{slide_id}/tile_at", threaded(tile_at_api)),
        Route("/api/slide/{slide_id}/{which}.json", threaded(polygons_api)),
        Route("/tiles/{slide_id}/{level}/{name}", threaded(slide_tile)),
        Route("/overlay/{slide_id}/{layer}/{level}/{name}", threaded(overlay_tile)),
        Route("/crop/{slide_id}/{name}", threaded(crop)),
        Mount("/static", app=_OutputFiles(directory=STATIC_DIR)),
    ]
    if osd is not None:
        routes.append(Mount("/vendor/openseadragon", app=_OutputFiles(directory=osd)))
    if service.catalog.review_dir is not None:
        routes.append(Mount("/review", app=_OutputFiles(directory=service.catalog.review_dir)))

    async def not_found(request: Request, exc: Exception) -> Response:
        return PlainTextResponse("not found", status_code=404)

    async def bad_request(request: Request, exc: Exception) -> Response:
        return PlainTextResponse(f"bad request: {_one_line(exc)}", status_code=400)

    async def http_error(request: Request, exc: Exception) -> Response:
        code = exc.status_code if isinstance(exc, HTTPException) else 500
        return PlainTextResponse("not found" if code == 404 else "request refused", status_code=code)

    async def slide_error(request: Request, exc: Exception) -> Response:
        logger.warning("%s: %s", request.url.path, exc)
        return PlainTextResponse("this part of the slide could not be read (see the server log)", status_code=500)

    async def server_error(request: Request, exc: Exception) -> Response:
        logger.error("%s failed", request.url.path, exc_info=exc)
        return PlainTextResponse("internal error (see the server log)", status_code=500)

    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        NotServedError: not_found,
        InputError: bad_request,
        HTTPException: http_error,
        SlideError: slide_error,
        Exception: server_error,
    }

    app = Starlette(routes=routes, exception_handlers=handlers, middleware=[Middleware(_SecurityHeaders)])
    app.state.service = service
    return app


def _one_line(exc: Exception) -> str:
    """An error's message for a 400 body: first line, no paths longer than a file name, at most 200 chars."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return json.dumps(text[:200])[1:-1]
