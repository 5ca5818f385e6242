"""The coordinator's HTTP API as the agent calls it, over any transport.

This module is the one place that knows the routes, attaches the device's
identity and turns statuses into outcomes:

* 2xx (and 304 for params): the answer, parsed with :mod:`fedge.wire`;
* 4xx: a :class:`RefusalError` carrying the coordinator's ``{"error", "detail"}``;
* 5xx: a :class:`~fedge.errors.TransportError`, retried like a lost connection;
* anything else (a redirect from a misconfigured proxy): a
  :class:`~fedge.errors.ProtocolError` ``unexpected_status``.

Identity: until mutual TLS arrives the device names itself in the
:data:`~fedge.wire.DEVICE_HEADER` header, added by :meth:`CoordinatorClient._identity`
alone; with client certificates the header goes and the transport carries the
identity instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError

from fedge.errors import ProtocolError, TransportError
from fedge.transport.base import Response, Transport
from fedge.wire import (
    DEVICE_HEADER,
    AbortReport,
    CheckIn,
    CheckInReply,
    ErrorBody,
    EvalReport,
    EventBatch,
    EventsAck,
    Message,
    SecAggDirectory,
    SecAggInbox,
    SecAggKeys,
    SecAggShares,
    SecAggUnmaskRequest,
    SecAggUnmaskShares,
    UpdateAck,
    parse_message,
)

__all__ = ["CoordinatorClient", "ParamsReply", "RefusalError"]

_DETAIL_LIMIT = 300


class RefusalError(ProtocolError):
    """The coordinator answered a request with a 4xx refusal.

    Attributes:
        reason: the refusal code (one of :data:`fedge.wire.REFUSALS`, or
            ``http_<status>`` when the body was not a fedge error body).
        detail: the coordinator's explanation, on one line.
        status: the HTTP status.
        request: what was refused, e.g. ``POST /v1/rounds/3/update``.
    """

    def __init__(self, reason: str, detail: str, status: int, *, request: str) -> None:
        super().__init__(reason, detail, status)
        self.request = request
        self.args = (f"{request} refused with HTTP {status} {reason}: {detail}",)


@dataclass(frozen=True)
class ParamsReply:
    """A params download: the payload's ETag and its body, or ``None`` if not modified."""

    etag: str
    body: bytes | None


class CoordinatorClient:
    """Calls the coordinator's ``/v1`` routes for one device.

    Args:
        transport: carries the requests.
        device_id: this device's identity.
        timeout_s: the bound on each request.
    """

    def __init__(self, transport: Transport, *, device_id: str, timeout_s: float) -> None:
        self._transport = transport
        self._device_id = device_id
        self._timeout_s = timeout_s

    def check_in(self, message: CheckIn) -> CheckInReply:
        """``POST /v1/check-in``.

        Raises:
            TransportError: no answer, or a 5xx.
            RefusalError: a 4xx.
            ProtocolError: the reply is not a valid :class:`~fedge.wire.CheckInReply`.
        """
        r = self._call("POST", "/v1/check-in", content=message.model_dump_json().encode(), json_body=True)
        return parse_message(CheckInReply, r.body)

    def fetch_params(self, round_id: int, *, etag: str | None) -> ParamsReply:
        """``GET /v1/rounds/{round_id}/params``, conditional on ``etag`` when given.

        Raises:
            TransportError: no answer, or a 5xx.
            RefusalError: a 4xx.
            ProtocolError: no ETag, or "not modified" when nothing was cached.
        """
        path = f"/v1/rounds/{round_id}/params"
        headers = {"if-none-match": etag} if etag is not None else {}
        r = self._call("GET", path, extra_headers=headers, ok=(200, 304))
        if r.status == 304:
            if etag is None:
                raise ProtocolError(
                    "unexpected_status", f"GET {path}: 304 Not Modified to an unconditional request"
                )
            # Not modified means: still the params this agent asked about.
            return ParamsReply(etag=etag, body=None)
        served = r.headers.get("etag")
        if not served:
            raise ProtocolError("bad_payload", f"GET {path}: the params response carries no ETag")
        return ParamsReply(etag=served, body=r.body)

    def send_events(self, batch: EventBatch) -> EventsAck:
        """``POST /v1/events`` with a batch of device events.

        Raises:
            TransportError: no answer, or a 5xx.
            RefusalError: a 4xx (``rate_limited``: send them later).
            ProtocolError: the reply is not a valid :class:`~fedge.wire.EventsAck`.
        """
        r = self._call("POST", "/v1/events", content=batch.model_dump_json().encode(), json_body=True)
        return parse_message(EventsAck, r.body)

    def send_abort(self, report: AbortReport) -> UpdateAck:
        """``POST /v1/rounds/{round}/abort``: this device stopped training the round, and why.

        Raises:
            TransportError: no answer, or a 5xx.
            RefusalError: a 4xx.
            ProtocolError: the reply is not a valid :class:`~fedge.wire.UpdateAck`.
        """
        r = self._call(
            "POST", f"/v1/rounds/{report.round}/abort",
            content=report.model_dump_json().encode(), json_body=True,
        )
        return parse_message(UpdateAck, r.body)

    def send_metrics(self, report: EvalReport) -> UpdateAck:
        """``POST /v1/rounds/{round}/metrics`` with an evaluation report.

        Raises:
            TransportError: no answer, or a 5xx.
            RefusalError: a 4xx.
            ProtocolError: the reply is not a valid :class:`~fedge.wire.UpdateAck`.
        """
        r = self._call(
            "POST", f"/v1/rounds/{report.round}/metrics",
            content=report.model_dump_json().encode(), json_body=True,
        )
        return parse_message(UpdateAck, r.body)

    def send_update(self, round_id: int, body: bytes) -> UpdateAck:
        """``POST /v1/rounds/{round_id}/update`` with an encoded update.

        Raises:
            TransportError: no answer, or a 5xx.
            RefusalError: a 4xx.
            ProtocolError: the reply is not a valid :class:`~fedge.wire.UpdateAck`.
        """
        r = self._call(
            "POST", f"/v1/rounds/{round_id}/update", content=body,
            extra_headers={"content-type": "application/octet-stream"},
        )
        return parse_message(UpdateAck, r.body)

    # Secure aggregation (docs/secagg.md): each phase's message, and its result once the phase closed.
    # Every one raises as the calls above: TransportError, RefusalError, ProtocolError.

    def send_secagg_keys(self, message: SecAggKeys) -> UpdateAck:
        """``POST /v1/rounds/{round}/secagg/keys``: this device's two public keys."""
        return self._post_step(message, "keys")

    def fetch_secagg_keys(self, round_id: int, attempt: int, *, wait_s: float = 0.0) -> SecAggDirectory:
        """``GET /v1/rounds/{round}/secagg/keys``: the neighbours' public keys, once phase 0 closed.

        ``wait_s`` > 0: the coordinator holds the request until the phase closes or that long passes.
        """
        return parse_message(SecAggDirectory, self._get_step(round_id, attempt, "keys", wait_s))

    def send_secagg_shares(self, message: SecAggShares) -> UpdateAck:
        """``POST /v1/rounds/{round}/secagg/shares``: the encrypted shares, by receiver."""
        return self._post_step(message, "shares")

    def fetch_secagg_shares(self, round_id: int, attempt: int, *, wait_s: float = 0.0) -> SecAggInbox:
        """``GET /v1/rounds/{round}/secagg/shares``: the shares addressed here, once phase 1 closed."""
        return parse_message(SecAggInbox, self._get_step(round_id, attempt, "shares", wait_s))

    def send_masked(self, round_id: int, body: bytes) -> UpdateAck:
        """``POST /v1/rounds/{round}/secagg/masked``: the frame of :func:`fedge.wire.encode_masked`."""
        r = self._call(
            "POST", f"/v1/rounds/{round_id}/secagg/masked", content=body,
            extra_headers={"content-type": "application/octet-stream"},
        )
        return parse_message(UpdateAck, r.body)

    def fetch_unmask_request(
        self, round_id: int, attempt: int, *, wait_s: float = 0.0
    ) -> SecAggUnmaskRequest:
        """``GET /v1/rounds/{round}/secagg/unmask``: survivors and dropped, once phase 2 closed."""
        return parse_message(SecAggUnmaskRequest, self._get_step(round_id, attempt, "unmask", wait_s))

    def send_unmask_shares(self, message: SecAggUnmaskShares) -> UpdateAck:
        """``POST /v1/rounds/{round}/secagg/unmask``: the shares the unmask request asked for."""
        return self._post_step(message, "unmask")

    def _post_step(self, message: SecAggKeys | SecAggShares | SecAggUnmaskShares, step: str) -> UpdateAck:
        r = self._call("POST", f"/v1/rounds/{message.round}/secagg/{step}",
                       content=_json_bytes(message), json_body=True)
        return parse_message(UpdateAck, r.body)

    def _get_step(self, round_id: int, attempt: int, step: str, wait_s: float) -> bytes:
        query = f"attempt={int(attempt)}" + (f"&wait_s={wait_s:.3f}" if wait_s > 0 else "")
        return self._call("GET", f"/v1/rounds/{round_id}/secagg/{step}?{query}").body

    def _identity(self) -> dict[str, str]:
        """The headers that say who is asking (a client certificate, once mutual TLS arrives)."""
        return {DEVICE_HEADER: self._device_id}

    def _call(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        json_body: bool = False,
        extra_headers: dict[str, str] | None = None,
        ok: tuple[int, ...] = (200,),
    ) -> Response:
        headers = self._identity()
        if json_body:
            headers["content-type"] = "application/json"
        headers.update(extra_headers or {})
        r = self._transport.request(method, path, headers=headers, content=content, timeout_s=self._timeout_s)
        if r.status in ok:
            return r
        request = f"{method} {path}"
        if r.status >= 500:
            reason, detail = _error_body(r)
            raise TransportError(f"{request}: HTTP {r.status} {reason}: {detail}")
        if 400 <= r.status < 500:
            reason, detail = _error_body(r)
            raise RefusalError(reason, detail, r.status, request=request)
        where = f", location {_one_line(r.headers['location'])}" if "location" in r.headers else ""
        raise ProtocolError("unexpected_status", f"{request}: HTTP {r.status}{where}", r.status)


def _json_bytes(message: Message) -> bytes:
    return message.model_dump_json().encode()


def _error_body(r: Response) -> tuple[str, str]:
    """The ``(error, detail)`` of a fedge error body, or a stand-in for any other body."""
    try:
        body = ErrorBody.model_validate_json(r.body)
    except ValidationError:
        return f"http_{r.status}", _one_line(r.body.decode("utf-8", "replace")) or "(no detail)"
    return _one_line(body.error), _one_line(body.detail)


def _one_line(text: str) -> str:
    """Server-supplied text made safe for one log line: whitespace collapsed, length bounded."""
    line = " ".join(text.split())
    return line if len(line) <= _DETAIL_LIMIT else line[:_DETAIL_LIMIT] + "..."
