"""The coordinator's HTTP API (``/v1``): routes only, over :class:`Coordinator`.

Each route reads the device's identity, reads the body within a size limit,
hands it to the coordinator and translates the answer. Every refusal is a
4xx with the JSON body ``{"error": CODE, "detail": TEXT}`` (see
:data:`fedge.wire.REFUSALS`) and a count in ``fedge_refusals_total``; an
unexpected failure is a 500 with the same shape and is logged, and neither
ends the round nor the process. The OpenAPI schema is at ``/openapi.json``
and browsable at ``/docs``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, make_asgi_app
from starlette.exceptions import HTTPException as StarletteHTTPException

from fedge import __version__
from fedge.coordinator.service import Coordinator
from fedge.errors import ProtocolError
from fedge.wire import (
    DEVICE_HEADER,
    DEVICE_ID_PATTERN,
    REFUSALS,
    CheckIn,
    CheckInReply,
    EvalReport,
    Message,
    UpdateAck,
    parse_message,
)

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

_JSON_LIMIT = 64 * 1024
_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)
_OCTETS = "application/octet-stream"


def _refusal(reason: str, detail: str) -> ProtocolError:
    return ProtocolError(reason, detail, REFUSALS[reason])


def device_identity(request: Request) -> str:
    """The sending device's id.

    Until mutual TLS supplies the certificate's subject, it is the
    ``X-Fedge-Device`` header; this function is the one place to change.

    Raises:
        ProtocolError: ``unknown_device`` when it is missing or malformed.
    """
    value = request.headers.get(DEVICE_HEADER)
    if value is None or not _DEVICE_ID.match(value):
        raise _refusal("unknown_device", f"the {DEVICE_HEADER} header is missing or malformed")
    request.state.device_id = value
    return value


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused as ``too_large`` past ``limit`` bytes without reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise _refusal("bad_request", "Content-Length is not a number")
        if int(declared) > limit:
            raise _refusal("too_large", f"body of {declared} bytes exceeds the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _refusal("too_large", f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _json(message: Message) -> Response:
    return Response(message.model_dump_json(), media_type="application/json")


def _schema(model: type[Any]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


def create_app(
    coordinator: Coordinator,
    *,
    on_done: Callable[[], None] | None = None,
    on_crash: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The ASGI app serving ``coordinator``; its lifespan runs the round driver.

    ``on_done`` is called once every round is complete; ``on_crash`` if the
    driver fails (a store that cannot be written, a strategy that raises):
    the process should then exit and be restarted, resuming from the store.
    """
    registry = CollectorRegistry()
    refusals = Counter("fedge_refusals_total", "Requests refused, by error code", ["code"], registry=registry)
    rounds_complete = Gauge("fedge_rounds_complete", "Rounds completed so far", registry=registry)
    rounds_complete.set_function(lambda: coordinator.state.round)
    coordinator.on_refusal = lambda code: refusals.labels(code=code).inc()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        driver = asyncio.create_task(coordinator.run(on_done))

        def crashed(task: asyncio.Task[None]) -> None:
            error = None if task.cancelled() else task.exception()
            if error is not None:
                logger.error("the round driver failed", exc_info=error)
                if on_crash is not None:
                    on_crash(error)

        driver.add_done_callback(crashed)
        yield
        driver.cancel()
        # A failure was reported by ``crashed`` already; shutting down goes on.
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await driver

    app = FastAPI(
        title="fedge coordinator",
        version=__version__,
        lifespan=lifespan,
        description="Pull-based federated learning rounds. Every refusal is a 4xx with "
        '{"error": CODE, "detail": TEXT}.',
    )
    app.mount("/metrics", make_asgi_app(registry=registry))

    @app.exception_handler(ProtocolError)
    async def protocol_error(request: Request, exc: ProtocolError) -> JSONResponse:
        device = getattr(request.state, "device_id", None)
        raw = str(request.path_params.get("round", ""))  # as sent: the path's text
        coordinator.refuse(exc, device, int(raw) if raw.isdigit() and len(raw) < 10 else None)
        return JSONResponse({"error": exc.reason, "detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await protocol_error(request, _refusal("bad_request", str(exc.errors()[0].get("msg", exc))))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else "http_error"
        return JSONResponse({"error": code, "detail": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unexpected error serving %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": "internal", "detail": type(exc).__name__}, status_code=500)

    @app.post("/v1/check-in", response_model=CheckInReply, openapi_extra=_schema(CheckIn))
    async def check_in(request: Request) -> Response:
        """Say the device is alive; the reply says wait, train in a round, or stop."""
        device = device_identity(request)
        msg = parse_message(CheckIn, await read_body(request, _JSON_LIMIT))
        # Serialized directly: the reply is already a validated model, and
        # FastAPI's response validation would check it a second time.
        return _json(coordinator.check_in(device, msg))

    @app.get(
        "/v1/rounds/{round}/params",
        response_class=Response,
        responses={200: {"content": {_OCTETS: {}}}, 304: {"description": "Not modified"}},
    )
    async def params(request: Request, round: int) -> Response:
        """The open round's params: zstd-compressed safetensors, with a strong ETag."""
        device_identity(request)
        payload, etag = coordinator.params_payload(round)
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={"ETag": etag})
        return Response(payload, media_type=_OCTETS, headers={"ETag": etag})

    @app.post(
        "/v1/rounds/{round}/update",
        response_model=UpdateAck,
        openapi_extra={"requestBody": {"required": True, "content": {_OCTETS: {}}}},
    )
    async def update(request: Request, round: int) -> Response:
        """A device's update: zstd-compressed safetensors of its params delta."""
        device = device_identity(request)
        body = await read_body(request, coordinator.config.max_body_bytes)
        return _json(await coordinator.submit_update(device, round, body))

    @app.post("/v1/rounds/{round}/metrics", response_model=UpdateAck, openapi_extra=_schema(EvalReport))
    async def metrics(request: Request, round: int) -> Response:
        """A device's evaluation of the round's params on its local data."""
        device = device_identity(request)
        report = parse_message(EvalReport, await read_body(request, _JSON_LIMIT))
        return _json(coordinator.submit_eval(device, round, report))

    @app.get("/v1/status")
    async def status() -> dict[str, Any]:
        """Progress: rounds complete, the open round, devices, history, refusals."""
        return coordinator.status()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
