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
import dataclasses
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, make_asgi_app
from starlette.exceptions import HTTPException as StarletteHTTPException

from fedge import __version__
from fedge.coordinator.dashboard import add_dashboard_routes
from fedge.coordinator.identity import Identity
from fedge.coordinator.metrics import CoordinatorCollector
from fedge.coordinator.secagg import SecureRound
from fedge.coordinator.service import Coordinator
from fedge.errors import ProtocolError
from fedge.wire import (
    DEVICE_HEADER,
    DEVICE_ID_PATTERN,
    REFUSALS,
    AbortReport,
    CheckIn,
    CheckInReply,
    EnrolReply,
    EnrolRequest,
    EvalReport,
    EventBatch,
    EventsAck,
    Message,
    RenewRequest,
    SecAggDirectory,
    SecAggInbox,
    SecAggKeys,
    SecAggPoll,
    SecAggShares,
    SecAggUnmaskRequest,
    SecAggUnmaskShares,
    TokenReply,
    TokenRequest,
    UpdateAck,
    parse_message,
)

__all__ = ["TLS_IDENTITY", "create_app", "device_identity"]

logger = logging.getLogger(__name__)

_JSON_LIMIT = 64 * 1024
# Secure aggregation's JSON messages grow with the neighbours (k): ~250 bytes per encrypted share.
_SECAGG_JSON_LIMIT = 4 * 1024 * 1024
# The longest a phase's result is held open for (?wait_s=): well below any client's request timeout.
LONG_POLL_S = 10.0
_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)
_OCTETS = "application/octet-stream"
_CHUNK = 64 * 1024


def _refusal(reason: str, detail: str) -> ProtocolError:
    return ProtocolError(reason, detail, REFUSALS[reason])


#: Where the TLS server protocol puts the verified client certificate's
#: (device id, serial) in the ASGI scope, next to the ASGI TLS extension.
TLS_IDENTITY = "fedge.identity"


def device_identity(request: Request, identity: Identity | None) -> str:
    """The sending device's id.

    With mutual TLS (``identity`` given) it is the subject of the verified
    client certificate, checked against the store's revocations; the
    ``X-Fedge-Device`` header is ignored. Only a coordinator started with
    ``--insecure`` (plain HTTP) reads that header instead.

    Raises:
        ProtocolError: ``no_certificate``, ``revoked``, or ``unknown_device``
            (insecure mode: the header is missing or malformed).
    """
    if identity is not None:
        tls = request.scope.get("extensions", {}).get("tls", {})
        value = identity.authenticate(tls.get(TLS_IDENTITY))
    else:
        header = request.headers.get(DEVICE_HEADER)
        if header is None or not _DEVICE_ID.fullmatch(header):
            raise _refusal("unknown_device", f"the {DEVICE_HEADER} header is missing or malformed")
        value = header
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
    identity: Identity | None = None,
    on_done: Callable[[], None] | None = None,
    on_crash: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The ASGI app serving ``coordinator``; its lifespan runs the round driver.

    ``on_done`` is called once every round is complete; ``on_crash`` if the
    driver fails (a store that cannot be written, a strategy that raises):
    the process should then exit and be restarted, resuming from the store.
    """
    registry = CollectorRegistry()
    registry.register(CoordinatorCollector(coordinator))

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
        device = device_identity(request, identity)
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
        device = device_identity(request, identity)
        payload, etag = coordinator.params_payload(round, device)
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={"ETag": etag})
        coordinator.count_download(device, round, len(payload))
        # Streamed in chunks: each waits for the connection to drain, so a
        # cohort downloading at once holds ~one chunk per connection in memory
        # rather than a whole (TLS-encrypted) copy each.
        view = memoryview(payload)
        chunks = (bytes(view[i : i + _CHUNK]) for i in range(0, len(view), _CHUNK))
        return StreamingResponse(
            chunks, media_type=_OCTETS, headers={"ETag": etag, "Content-Length": str(len(payload))}
        )

    @app.post(
        "/v1/rounds/{round}/update",
        response_model=UpdateAck,
        openapi_extra={"requestBody": {"required": True, "content": {_OCTETS: {}}}},
    )
    async def update(request: Request, round: int) -> Response:
        """A device's update: zstd-compressed safetensors of its params delta."""
        device = device_identity(request, identity)
        body = await read_body(request, coordinator.config.max_body_bytes)
        return _json(await coordinator.submit_update(device, round, body))

    @app.post("/v1/rounds/{round}/abort", response_model=UpdateAck, openapi_extra=_schema(AbortReport))
    async def abort(request: Request, round: int) -> Response:
        """A device says it stopped training for this round, and why (its policy or a limit)."""
        device = device_identity(request, identity)
        report = parse_message(AbortReport, await read_body(request, _JSON_LIMIT))
        return _json(coordinator.submit_abort(device, round, report))

    @app.post("/v1/rounds/{round}/metrics", response_model=UpdateAck, openapi_extra=_schema(EvalReport))
    async def metrics(request: Request, round: int) -> Response:
        """A device's evaluation of the round's params on its local data."""
        device = device_identity(request, identity)
        report = parse_message(EvalReport, await read_body(request, _JSON_LIMIT))
        return _json(coordinator.submit_eval(device, round, report))

    def admin(request: Request) -> None:
        # Without TLS (--insecure, loopback only) there is no admin credential.
        if identity is not None:
            identity.check_admin(request.headers.get("authorization"))

    @app.get("/v1/status")
    async def status(request: Request) -> dict[str, Any]:
        """Progress: rounds complete, the open round, devices, history, refusals (admin)."""
        admin(request)
        return coordinator.status()

    @app.post("/v1/events", response_model=EventsAck, openapi_extra=_schema(EventBatch))
    async def events(request: Request) -> Response:
        """A device's batch of notable events (policy skips, aborts, errors, enrolment, renewal)."""
        device = device_identity(request, identity)
        batch = parse_message(EventBatch, await read_body(request, _JSON_LIMIT))
        return _json(coordinator.submit_events(device, batch))

    @app.get("/v1/admin/events")
    async def list_events(request: Request, device: str | None = None, since: float | None = None,
                          limit: int = 200) -> list[dict[str, object]]:
        """Admin: the latest events, newest last; ``device`` and ``since`` (unix time) narrow them."""
        admin(request)
        if not 1 <= limit <= 10_000:
            raise _refusal("bad_request", f"limit must be between 1 and 10000, got {limit}")
        rows = coordinator.store.events(device_id=device, since=since, limit=limit)
        return [row.to_json() for row in rows]

    _add_secagg_routes(app, coordinator, identity)
    if identity is not None:
        _add_identity_routes(app, identity, admin)
    add_dashboard_routes(app, coordinator, admin)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def _same_round(sent: int, path: int) -> None:
    if sent != path:
        raise _refusal("bad_request", f"the message is for round {sent}, sent to round {path}")


def _add_secagg_routes(app: FastAPI, coordinator: Coordinator, identity: Identity | None) -> None:
    """Secure aggregation's phases (docs/secagg.md): each a POST of the device's message and a GET
    of the phase's result, which answers ``ready: false`` until the phase has closed (held open up
    to ``wait_s`` seconds for it, at most :data:`LONG_POLL_S`)."""

    def ack(round: int, attempt: int) -> Response:
        return _json(UpdateAck(round=round, attempt=attempt))

    async def body(request: Request, device: str, round: int) -> bytes:
        # Counted before parsing, as an update is: the round's bytes up include every phase.
        raw = await read_body(request, _SECAGG_JSON_LIMIT)
        coordinator.count_upload(device, round, len(raw))
        return raw

    async def result(device: str, round: int, wait_s: float,
                     get: Callable[[SecureRound], SecAggPoll]) -> Response:
        # A long poll: held until the phase has closed (the result is ready) or wait_s passed.
        if not (math.isfinite(wait_s) and wait_s >= 0):
            raise _refusal("bad_request", f"wait_s must be a number >= 0, got {wait_s}")
        loop = asyncio.get_running_loop()
        until = loop.time() + min(wait_s, LONG_POLL_S)
        while True:
            secure = coordinator.secure_round(device, round)  # refused if the round ended meanwhile
            message = get(secure)
            left = until - loop.time()
            if message.ready or left <= 0:
                break
            await secure.wait_change(left)
        response = _json(message)
        coordinator.count_download(device, round, len(response.body))
        return response

    @app.post("/v1/rounds/{round}/secagg/keys", response_model=UpdateAck, openapi_extra=_schema(SecAggKeys))
    async def secagg_advertise(request: Request, round: int) -> Response:
        """Phase 0 (advertise keys): the device's two X25519 public keys."""
        device = device_identity(request, identity)
        msg = parse_message(SecAggKeys, await body(request, device, round))
        _same_round(msg.round, round)
        coordinator.secure_round(device, round).receive_keys(device, msg)
        return ack(round, msg.attempt)

    @app.get("/v1/rounds/{round}/secagg/keys", response_model=SecAggDirectory)
    async def secagg_directory(request: Request, round: int, attempt: int, wait_s: float = 0.0) -> Response:
        """Phase 0's result: the public keys of the device's neighbours that advertised."""
        device = device_identity(request, identity)
        return await result(device, round, wait_s, lambda s: s.directory(device, attempt))

    @app.post("/v1/rounds/{round}/secagg/shares", response_model=UpdateAck,
              openapi_extra=_schema(SecAggShares))
    async def secagg_share(request: Request, round: int) -> Response:
        """Phase 1 (share keys): encrypted Shamir shares for each neighbour, by receiver."""
        device = device_identity(request, identity)
        msg = parse_message(SecAggShares, await body(request, device, round))
        _same_round(msg.round, round)
        coordinator.secure_round(device, round).receive_shares(device, msg)
        return ack(round, msg.attempt)

    @app.get("/v1/rounds/{round}/secagg/shares", response_model=SecAggInbox)
    async def secagg_inbox(request: Request, round: int, attempt: int, wait_s: float = 0.0) -> Response:
        """Phase 1's result: the encrypted shares the device's neighbours addressed to it."""
        device = device_identity(request, identity)
        return await result(device, round, wait_s, lambda s: s.inbox(device, attempt))

    @app.post(
        "/v1/rounds/{round}/secagg/masked",
        response_model=UpdateAck,
        openapi_extra={"requestBody": {"required": True, "content": {_OCTETS: {}}}},
    )
    async def secagg_masked(request: Request, round: int) -> Response:
        """Phase 2 (masked input): the packed masked vector (fedge.wire.encode_masked)."""
        device = device_identity(request, identity)
        frame = await read_body(request, coordinator.config.max_body_bytes)
        return _json(await coordinator.submit_masked(device, round, frame))

    @app.get("/v1/rounds/{round}/secagg/unmask", response_model=SecAggUnmaskRequest)
    async def secagg_unmask_request(request: Request, round: int, attempt: int, wait_s: float = 0.0
                                    ) -> Response:
        """Phase 2's result: the survivors and the dropped, for a survivor to answer."""
        device = device_identity(request, identity)
        return await result(device, round, wait_s, lambda s: s.unmask_request(device, attempt))

    @app.post("/v1/rounds/{round}/secagg/unmask", response_model=UpdateAck,
              openapi_extra=_schema(SecAggUnmaskShares))
    async def secagg_unmask(request: Request, round: int) -> Response:
        """Phase 3 (unmask): shares of each survivor's self-mask seed and each dropped device's key."""
        device = device_identity(request, identity)
        msg = parse_message(SecAggUnmaskShares, await body(request, device, round))
        _same_round(msg.round, round)
        coordinator.secure_round(device, round).receive_unmask(device, msg)
        return ack(round, msg.attempt)


def _add_identity_routes(app: FastAPI, identity: Identity, admin: Callable[[Request], None]) -> None:
    """Enrolment, renewal, the CA certificate, and the admin endpoints (TLS mode only)."""

    @app.get("/v1/ca.pem", response_class=Response)
    async def ca_pem() -> Response:
        """The CA certificate (public): what an agent pins by its SHA-256 fingerprint."""
        return Response(identity.ca_pem, media_type="application/x-pem-file")

    @app.post("/v1/enrol", response_model=EnrolReply, openapi_extra=_schema(EnrolRequest))
    async def enrol(request: Request) -> Response:
        """A device's CSR and one-time token; the answer is its client certificate."""
        req = parse_message(EnrolRequest, await read_body(request, _JSON_LIMIT))
        return _json(identity.enrol(req))

    @app.post("/v1/renew", response_model=EnrolReply, openapi_extra=_schema(RenewRequest))
    async def renew(request: Request) -> Response:
        """An enrolled device's CSR for a fresh certificate (mutual TLS)."""
        device = device_identity(request, identity)
        req = parse_message(RenewRequest, await read_body(request, _JSON_LIMIT))
        return _json(identity.renew(device, req))

    @app.post("/v1/admin/tokens", response_model=TokenReply, openapi_extra=_schema(TokenRequest))
    async def create_token(request: Request) -> Response:
        """Admin: a new enrolment token (shown once)."""
        admin(request)
        req = parse_message(TokenRequest, await read_body(request, _JSON_LIMIT))
        return _json(identity.create_token(req))

    @app.get("/v1/admin/devices")
    async def devices(request: Request) -> list[dict[str, Any]]:
        """Admin: every device the store knows, with its enrolment and revocation times."""
        admin(request)
        return [dataclasses.asdict(row) for row in identity.store.devices()]

    @app.post("/v1/admin/devices/{device_id}/revoke")
    async def revoke(request: Request, device_id: str) -> dict[str, Any]:
        """Admin: revoke a device; its next request is refused."""
        admin(request)
        try:
            count = identity.store.revoke_device(device_id, now=time.time())
        except ValueError as e:
            raise _refusal("bad_request", str(e)) from None
        logger.warning("device %s revoked (%d certificates)", device_id, count)
        return {"device_id": device_id, "revoked_certificates": count}
