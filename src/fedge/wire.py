"""Versioned messages between agent and coordinator, and the tensor payload codec.

Two kinds of thing cross the wire (see "Round protocol" in DESIGN.md):

* **JSON messages** (check-in, its reply, evaluation reports, acks, error
  bodies) are pydantic models with ``extra="forbid"``: an unknown field or a
  wrong type is refused, never ignored. Every message carries ``protocol``;
  a version this build does not speak is refused with ``bad_version``.
* **Secure-aggregation messages** (:class:`SecAggPlan` in the train plan,
  the keys, shares and unmask messages, see docs/secagg.md) are JSON too,
  their keys and shares base64 in strings; the masked vector is a compact
  binary frame (:func:`encode_masked`): a 26-byte header and the packed
  ``wire_bits`` of every value, no compression (masked values are uniform).
* **Tensor payloads** (the round's params, a device's update) are
  safetensors files compressed with zstd. Nothing is ever unpickled. The
  decoder reads the safetensors header itself first, so names, shapes and
  dtypes are checked against the round's params *before* any tensor memory
  is allocated, and it never decompresses more than the expected size (a
  small body cannot inflate into gigabytes).

Every refusal raises :class:`~fedge.errors.ProtocolError` whose ``reason``
is one of :data:`REFUSALS`; the coordinator sends it back as
``{"error": reason, "detail": text}`` with the matching HTTP status.
This module is pure: no sockets, no disk, no clock.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import math
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import numpy as np
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)

from fedge.errors import ProtocolError
from fedge.params import Array, Params, ParamsSpec

if TYPE_CHECKING:
    from fedge.encoding.pipeline import Pipeline

__all__ = [
    "DEVICE_HEADER",
    "DEVICE_ID_PATTERN",
    "EVENT_KINDS",
    "EVENT_LEVELS",
    "PROTOCOL_VERSION",
    "REFUSALS",
    "SECAGG_REFUSALS",
    "AbortReport",
    "CheckIn",
    "CheckInReply",
    "DeviceEvent",
    "EncodingInfo",
    "EnrolReply",
    "EnrolRequest",
    "ErrorBody",
    "EvalReport",
    "EventBatch",
    "EventsAck",
    "MaskedUpload",
    "Message",
    "RenewRequest",
    "SecAggDirectory",
    "SecAggInbox",
    "SecAggKeyPair",
    "SecAggKeys",
    "SecAggPlan",
    "SecAggPoll",
    "SecAggShares",
    "SecAggUnmaskRequest",
    "SecAggUnmaskShares",
    "TaskInfo",
    "TokenReply",
    "TokenRequest",
    "TrainPlan",
    "Update",
    "UpdateAck",
    "decode_masked",
    "decode_params",
    "decode_update",
    "encode_masked",
    "encode_params",
    "encode_update",
    "parse_message",
    "payload_etag",
    "secagg_setup_id",
]

#: The protocol version this build speaks (the ``/v1`` in every path).
PROTOCOL_VERSION = 1

#: The header naming the sending device until mutual TLS supplies its
#: certificate's subject instead (the identity is never read from a body).
DEVICE_HEADER = "X-Fedge-Device"
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"

#: Every refusal code, with the HTTP status the coordinator answers it with.
REFUSALS: dict[str, int] = {
    "bad_request": 400,  # a JSON body or header is malformed
    "bad_version": 400,  # a protocol version this build does not speak
    "bad_payload": 400,  # not zstd, not safetensors, or metadata missing
    "unknown_device": 401,  # no device identity, or a malformed one
    "no_certificate": 401,  # a device endpoint reached without a client certificate
    "unauthorized": 401,  # an admin endpoint without the admin credential
    "revoked": 403,  # the device or its certificate has been revoked
    "bad_token": 403,  # an enrolment token that is unknown, expired, used up or for another device
    "bad_csr": 400,  # a certificate signing request that is malformed, mis-signed or for another name
    "device_exists": 409,  # enrolment under an id that an active device already holds
    "not_invited": 403,  # the device is not in this round's cohort
    "unknown_round": 404,  # no such round (or its params are gone)
    "closed": 409,  # the round (attempt) has ended
    "late": 409,  # past the round's deadline
    "duplicate": 409,  # this device already reported to this round
    "too_large": 413,  # the body exceeds the size limit
    "shape_mismatch": 422,  # names, shapes or dtypes differ from the round's params
    "non_finite": 422,  # NaN or infinity in a tensor or a metric
    "bad_weight": 422,  # the example count is not a positive number
    "rate_limited": 429,  # more events than a device may send in a minute
    # Secure aggregation (docs/secagg.md): a message the round's SecAgg+ state machine refuses.
    "out_of_phase": 409,  # a step of another phase than the open one, or one the device may not take
    "not_neighbour": 422,  # an encrypted share addressed to a device that is not a neighbour
    "wrong_length": 422,  # a masked vector of another length or bit width than the round's
    "malformed": 400,  # keys of the wrong size, too few shares, an unrequested unmask share
}

#: The refusal codes only secure-aggregation rounds send.
SECAGG_REFUSALS = ("out_of_phase", "not_neighbour", "wrong_length", "malformed")

# zstd level 1: on float32 deltas it packs as tightly as level 3 (within
# +-0.8% on fedge's tasks and encodings, smaller on a 1M-parameter MLP's)
# and compresses 2.4x as fast (455 against 186 MB/s on x86), which a small
# board pays on every upload and the simulator on every device it counts.
_ZSTD_LEVEL = 1
# A safetensors header lists names, dtypes, shapes and offsets; 1 MiB is far
# more than any real model needs, and bounds what a hostile header can cost.
_MAX_HEADER = 1 << 20
_DTYPES: dict[str, str] = {"<f2": "F16", "<f4": "F32", "<f8": "F64"}
# Encoded updates (fedge.encoding) also carry codes, scales' companions and
# positions as unsigned integers; only a spec that names them admits them.
_INT_DTYPES: dict[str, str] = {"|u1": "U8", "<u2": "U16", "<u4": "U32"}
_META_PREFIX = "fedge."


def _refuse(reason: str, detail: str) -> ProtocolError:
    return ProtocolError(reason, detail, REFUSALS[reason])


# ---------------------------------------------------------------- JSON messages


class Message(BaseModel):
    """Base of every JSON message: frozen, unknown fields refused, versioned."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    protocol: int = PROTOCOL_VERSION

    @field_validator("protocol")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != PROTOCOL_VERSION:
            raise ValueError(f"protocol version {v} is not supported (this build speaks {PROTOCOL_VERSION})")
        return v


ProfileValue = str | int | float | bool


class CheckIn(Message):
    """The agent's periodic hello: how much data it holds and whether it may train now."""

    num_examples: Annotated[int, Field(ge=0)]
    ready: bool = True
    profile: Annotated[dict[str, ProfileValue], Field(max_length=64)] = Field(default_factory=dict)


class TaskInfo(Message):
    """What the agent needs to build the task: its name and the data's shape."""

    name: str
    num_features: Annotated[int, Field(ge=1)]
    num_classes: Annotated[int, Field(ge=2)]


class EncodingInfo(BaseModel):
    """How the device encodes its update (``[encoding]`` in the coordinator's config).

    The values are those of :class:`fedge.encoding.EncodingConfig`; the agent
    builds its pipeline from them, and the coordinator decodes with its own.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    compress: Annotated[str, Field(min_length=1, max_length=64)] = "none"
    bucket_size: Annotated[int | None, Field(ge=1)] = None
    shared_range: Annotated[float | None, Field(gt=0, allow_inf_nan=False)] = None


#: A device id as it may appear inside a message (a cohort list, a key directory).
DeviceName = Annotated[str, Field(pattern=DEVICE_ID_PATTERN)]


def _from_base64(value: object) -> object:
    """Standard base64 text -> bytes, strictly (no stray characters); bytes pass as they are."""
    if isinstance(value, str):
        try:
            return base64.b64decode(value.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise ValueError("not valid base64") from None
    return value


def _to_base64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


#: Bytes carried in JSON as a standard base64 string.
Base64Bytes = Annotated[bytes, BeforeValidator(_from_base64), PlainSerializer(_to_base64, return_type=str)]
_Key = Annotated[Base64Bytes, Field(min_length=32, max_length=32)]
# An encrypted share (196 bytes today) or a Shamir share (66): bounded well above either.
_Blob = Annotated[Base64Bytes, Field(min_length=1, max_length=1024)]
_MAX_COHORT = 100_000


def secagg_setup_id(round: int, attempt: int) -> int:
    """The id a secure round's SecAgg+ setup is bound to: (round, attempt) in 64 bits.

    Shares are encrypted with it as associated data and masks salted with it, so
    nothing of one attempt can be replayed into another of the same round.
    """
    return (int(round) << 32) | int(attempt)


class SecAggPlan(BaseModel):
    """What a cohort member needs for a secure round (docs/secagg.md), sent in the train plan.

    The cohort's order gives every device its Shamir point (the i-th device
    has point i + 1); ``k``, ``threshold``, ``graph_seed`` and ``vector_length``
    complete the SecAgg+ setup; ``clip``, ``bits`` and ``max_weight`` are the
    round's shared fixed-point grid, ``wire_bits`` how many bits of each masked
    value are sent. ``weighted`` false: every device encodes weight 1 (DP
    rounds, whose updates are clipped and weigh the same). ``noise_stddev``
    above 0 (distributed DP, docs/privacy.md): every device adds a noise share
    of that standard deviation (in the values' units) on the grid, sized for
    ``min_survivors`` shares, the fewest whose sum may be unmasked. The
    deadlines are seconds from the reply, like :attr:`TrainPlan.deadline_s`
    (the upload's).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    cohort: Annotated[list[DeviceName], Field(min_length=3, max_length=_MAX_COHORT)]
    k: Annotated[int, Field(ge=2)]
    threshold: Annotated[int, Field(ge=2)]
    graph_seed: _Key
    vector_length: Annotated[int, Field(ge=2)]
    clip: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    bits: Annotated[int, Field(ge=2, le=32)]
    max_weight: Annotated[int, Field(ge=1)]
    wire_bits: Annotated[int, Field(ge=1, le=32)]
    weighted: bool = True
    noise_stddev: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    min_survivors: Annotated[int, Field(ge=0)] = 0
    advertise_deadline_s: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    share_deadline_s: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    unmask_deadline_s: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    poll_s: Annotated[float, Field(gt=0, allow_inf_nan=False)]


class TrainPlan(Message):
    """An invitation to one round attempt: which params to fetch and how to train."""

    round: Annotated[int, Field(ge=1)]
    attempt: Annotated[int, Field(ge=1)]
    params_etag: str
    deadline_s: Annotated[float, Field(ge=0)]
    local_epochs: Annotated[int, Field(ge=1)]
    batch_size: Annotated[int, Field(ge=1)]
    lr: Annotated[float, Field(gt=0)]
    mu: Annotated[float, Field(ge=0)] = 0.0
    evaluate: bool = True
    encoding: EncodingInfo = Field(default_factory=EncodingInfo)
    # Local differential privacy (docs/privacy.md): the device clips its delta
    # to this L2 norm and adds N(0, noise_stddev^2) to every value before upload.
    clip_norm: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    noise_stddev: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    # Secure aggregation: the device runs the SecAgg+ phases and uploads only a masked vector.
    secagg: SecAggPlan | None = None

    @model_validator(mode="after")
    def _noise_needs_a_clip(self) -> TrainPlan:
        if self.noise_stddev > 0 and self.clip_norm is None:
            raise ValueError("noise_stddev needs clip_norm: noise on an unbounded update protects nothing")
        if self.secagg is not None and self.secagg.noise_stddev > 0 and self.clip_norm is None:
            raise ValueError("secagg.noise_stddev needs clip_norm: noise on an unbounded update protects "
                             "nothing")
        return self


class CheckInReply(Message):
    """The coordinator's answer: wait, train in a round, or stop (training is over)."""

    action: Literal["wait", "train", "done"]
    wait_s: Annotated[float, Field(ge=0)] = 0.0
    task: TaskInfo
    plan: TrainPlan | None = None


#: What a device event is about.
EVENT_KINDS = ("policy", "abort", "error", "warning", "enrolment", "renewal", "start", "stop", "dropped")
EVENT_LEVELS = ("info", "warning", "error")
EventField = str | int | float | bool


class DeviceEvent(BaseModel):
    """One notable event on a device (see :mod:`fedge.agent.events`); never params or secrets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    at: Annotated[float, Field(ge=0)]
    kind: Literal["policy", "abort", "error", "warning", "enrolment", "renewal", "start", "stop", "dropped"]
    level: Literal["info", "warning", "error"] = "info"
    message: Annotated[str, Field(min_length=1, max_length=500)]
    fields: Annotated[dict[Annotated[str, Field(max_length=64)], EventField], Field(max_length=16)] = Field(
        default_factory=dict
    )

    @field_validator("at")
    @classmethod
    def _finite_time(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("at must be a finite time")
        return v


class EventBatch(Message):
    """A device's batch of events, oldest first."""

    events: Annotated[list[DeviceEvent], Field(min_length=1, max_length=100)]


class EventsAck(Message):
    """The coordinator stored a batch of events."""

    stored: Annotated[int, Field(ge=0)]


class AbortReport(Message):
    """A device stopped training for a round: the policy turned against it (unplugged, hot, busy
    too long) or a limit was reached. The reasons are short human-readable phrases."""

    round: Annotated[int, Field(ge=1)]
    attempt: Annotated[int, Field(ge=1)]
    reasons: Annotated[list[Annotated[str, Field(min_length=1, max_length=200)]],
                       Field(min_length=1, max_length=16)]


class EvalReport(Message):
    """A device's evaluation of a round's params on its local data."""

    round: Annotated[int, Field(ge=1)]
    attempt: Annotated[int, Field(ge=1)]
    num_examples: Annotated[int, Field(ge=1)]
    metrics: Annotated[dict[str, float], Field(max_length=64)]

    @field_validator("metrics")
    @classmethod
    def _finite(cls, v: dict[str, float]) -> dict[str, float]:
        bad = sorted(k for k, x in v.items() if not math.isfinite(x))
        if bad:
            raise ValueError(f"metrics {bad} are not finite")
        return v


class UpdateAck(Message):
    """The coordinator accepted an update (or an evaluation report)."""

    round: int
    attempt: int


class _SecAggStep(Message):
    """A secure-aggregation message: which round attempt it belongs to.

    Validators are built on first use (``defer_build``): an agent that never
    runs a secure round does not pay their memory.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    round: Annotated[int, Field(ge=1)]
    attempt: Annotated[int, Field(ge=1)]


class SecAggPoll(_SecAggStep):
    """A phase's result, once the coordinator closed the phase (``ready``); until then poll
    again after ``retry_s``."""

    ready: bool
    retry_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0


class SecAggKeyPair(BaseModel):
    """A device's two X25519 public keys: ``c_pk`` encrypts shares, ``s_pk`` agrees masks."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    c_pk: _Key
    s_pk: _Key


class SecAggKeys(_SecAggStep):
    """Phase 0, device -> coordinator: this device's public keys."""

    c_pk: _Key
    s_pk: _Key


class SecAggDirectory(SecAggPoll):
    """Phase 0's result: the public keys of the device and of its neighbours that advertised."""

    keys: Annotated[dict[DeviceName, SecAggKeyPair], Field(max_length=_MAX_COHORT)] = Field(
        default_factory=dict)


class SecAggShares(_SecAggStep):
    """Phase 1, device -> coordinator: an encrypted share pair for each neighbour, by receiver."""

    shares: Annotated[dict[DeviceName, _Blob], Field(max_length=_MAX_COHORT)]


class SecAggInbox(SecAggPoll):
    """Phase 1's result: the encrypted shares neighbours addressed to this device, by sender."""

    shares: Annotated[dict[DeviceName, _Blob], Field(max_length=_MAX_COHORT)] = Field(default_factory=dict)


class SecAggUnmaskRequest(SecAggPoll):
    """Phase 2's result: who uploaded (survivors) and who shared keys but did not (dropped)."""

    survivors: Annotated[list[DeviceName], Field(max_length=_MAX_COHORT)] = Field(default_factory=list)
    dropped: Annotated[list[DeviceName], Field(max_length=_MAX_COHORT)] = Field(default_factory=list)


class SecAggUnmaskShares(_SecAggStep):
    """Phase 3, device -> coordinator: Shamir shares of survivors' self-masks and dropped devices' keys."""

    self_shares: Annotated[dict[DeviceName, _Blob], Field(max_length=_MAX_COHORT)]
    key_shares: Annotated[dict[DeviceName, _Blob], Field(max_length=_MAX_COHORT)]


_M = TypeVar("_M", bound=Message)


class EnrolRequest(Message):
    """A device's first request: its CSR (a PEM, made on the device) and a one-time token."""

    token: Annotated[str, Field(min_length=1, max_length=256)]
    csr_pem: Annotated[str, Field(min_length=1, max_length=60_000)]  # the CA refuses > 16 KiB


class RenewRequest(Message):
    """An enrolled device asks for a fresh certificate for a (new) key before its own expires."""

    csr_pem: Annotated[str, Field(min_length=1, max_length=60_000)]  # the CA refuses > 16 KiB


class EnrolReply(Message):
    """The signed client certificate, the CA that issued it, and when it expires (Unix time)."""

    device_id: str
    certificate_pem: str
    ca_pem: str
    not_after: float


class TokenRequest(Message):
    """Admin: create an enrolment token."""

    expires_s: Annotated[float, Field(gt=0, le=365 * 86400)] = 86400.0
    uses: Annotated[int, Field(ge=1, le=100_000)] = 1
    device_id: Annotated[str | None, Field(pattern=DEVICE_ID_PATTERN)] = None


class TokenReply(Message):
    """Admin: a new enrolment token (shown once; the store keeps only its hash)."""

    token: str
    expires_at: float
    uses: int
    device_id: str | None


class ErrorBody(BaseModel):
    """Every refusal's JSON body."""

    error: str
    detail: str


def parse_message(kind: type[_M], body: bytes | str | Mapping[str, Any]) -> _M:
    """Validate ``body`` (JSON text or an already-parsed mapping) as a ``kind``.

    Raises:
        ProtocolError: ``bad_version`` for an unknown protocol version,
            ``non_finite`` for a NaN or infinite metric, ``bad_request`` for
            anything else that does not fit ``kind``.
    """
    try:
        if isinstance(body, Mapping):
            return kind.model_validate(body)
        return kind.model_validate_json(body)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        msg = f"{kind.__name__}.{where}: {first['msg']}"
        if first["loc"][:1] == ("protocol",):
            raise _refuse("bad_version", msg) from None
        if "not finite" in first["msg"]:
            raise _refuse("non_finite", msg) from None
        raise _refuse("bad_request", msg) from None


# ------------------------------------------------------------ tensor payloads


@dataclass(frozen=True)
class Update:
    """A decoded update: the device's params delta plus what it reported with it."""

    round: int
    attempt: int
    num_examples: int
    metrics: dict[str, float]
    delta: Params


def payload_etag(body: bytes) -> str:
    """The strong ETag of an encoded payload (a quoted SHA-256 prefix)."""
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def encode_params(
    params: Mapping[str, Array], metadata: Mapping[str, str] | None = None, *, level: int | None = _ZSTD_LEVEL
) -> bytes:
    """Serialize ``params`` as zstd-compressed safetensors, ``metadata`` in its header.

    ``level=None`` skips zstd: the bare safetensors bytes, which no decoder
    here accepts (the simulator measures their size when told to).
    """
    from safetensors.numpy import save

    meta = {f"{_META_PREFIX}protocol": str(PROTOCOL_VERSION)}
    meta.update(metadata or {})
    tensors = {name: np.ascontiguousarray(a) for name, a in params.items()}
    raw = save(tensors, metadata=meta)
    return raw if level is None else bytes(_compressor(level).compress(raw))


_local = threading.local()


def _compressor(level: int) -> Any:
    """A zstd compressor for this thread, made once: making one costs more than
    compressing a small update (a compressor is not safe to share between threads)."""
    import zstandard

    cache: dict[int, Any] | None = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(level=level)
    return c


def encode_update(
    delta: Mapping[str, Array],
    *,
    round: int,
    attempt: int,
    num_examples: int,
    metrics: Mapping[str, float] | None = None,
    encoding: str = "none",
    level: int | None = _ZSTD_LEVEL,
) -> bytes:
    """Serialize a device's update for round ``round``, attempt ``attempt``.

    ``delta`` is the params delta itself, or, with ``encoding`` other than
    ``"none"``, the wire tensors :meth:`fedge.encoding.Pipeline.encode` made
    of it (``encoding`` is then that pipeline's :attr:`~fedge.encoding.Pipeline.name`).
    """
    meta = {
        f"{_META_PREFIX}kind": "update",
        f"{_META_PREFIX}round": str(round),
        f"{_META_PREFIX}attempt": str(attempt),
        f"{_META_PREFIX}num_examples": str(num_examples),
        f"{_META_PREFIX}metrics": json.dumps({k: float(v) for k, v in (metrics or {}).items()}),
    }
    if encoding != "none":
        meta[f"{_META_PREFIX}encoding"] = encoding
    return encode_params(delta, meta, level=level)


def decode_params(body: bytes, *, spec: ParamsSpec | None, max_bytes: int) -> tuple[Params, dict[str, str]]:
    """Decode a payload into params (in ``spec``'s order) and its header metadata.

    Args:
        body: the compressed payload as received.
        spec: the names, shapes and dtypes the payload must have; ``None``
            accepts any float tensors (for tools reading a checkpoint).
        max_bytes: the most the payload may occupy, compressed or not.

    Raises:
        ProtocolError: ``too_large``, ``bad_payload``, ``bad_version``,
            ``shape_mismatch`` or ``non_finite``.
    """
    if len(body) > max_bytes:
        raise _refuse("too_large", f"payload of {len(body)} bytes exceeds the limit of {max_bytes}")
    limit = max_bytes if spec is None else min(max_bytes, _expected_size(spec) + _MAX_HEADER)
    raw = _decompress(body, limit)
    header, data_start = _read_header(raw)
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _refuse("bad_payload", "the safetensors metadata is not a string mapping")
    version = meta.get(f"{_META_PREFIX}protocol")
    if version != str(PROTOCOL_VERSION):
        raise _refuse("bad_version", f"payload protocol {version!r}; this build speaks {PROTOCOL_VERSION}")
    # Integer tensors only where the spec names them (an encoded update).
    allowed = _DTYPES if spec is None else {**_DTYPES, **_INT_DTYPES}
    _check_layout(header, spec, len(raw) - data_start, allowed)
    names = spec.names if spec is not None else tuple(header)
    params: Params = {}
    view = memoryview(raw)
    for name in names:
        entry = header[name]
        dtype = np.dtype(_numpy_dtype(entry["dtype"], allowed))
        start, end = entry["data_offsets"]
        a = np.frombuffer(view[data_start + start : data_start + end], dtype=dtype).reshape(entry["shape"])
        if not np.isfinite(a).all():
            raise _refuse("non_finite", f"tensor {name!r} holds NaN or infinite values")
        params[name] = a
    return params, dict(meta)


def decode_update(
    body: bytes, *, spec: ParamsSpec, max_bytes: int, encoding: Pipeline | None = None
) -> Update:
    """Decode and check a device's update against the round's params ``spec``.

    Args:
        body: the payload as received.
        spec: the round's params layout.
        max_bytes: the most the payload may occupy, compressed or not.
        encoding: the federation's encoding pipeline (``None``: no encoding);
            the payload must be encoded with exactly this pipeline.

    Raises:
        ProtocolError: as :func:`decode_params`, ``bad_payload`` for missing or
            malformed metadata or another encoding than ``encoding``, or
            positions and scales no honest encoder makes, ``bad_weight`` for a
            non-positive example count, ``non_finite`` for a NaN or infinite
            metric or value.
    """
    expected = "none" if encoding is None else encoding.name
    if encoding is None or encoding.identity:
        delta, meta = decode_params(body, spec=spec, max_bytes=max_bytes)
    else:
        tensors, meta = decode_params(body, spec=encoding.wire_spec(spec), max_bytes=max_bytes)
    sent = meta.get(f"{_META_PREFIX}encoding", "none")
    if sent != expected:
        raise _refuse("bad_payload", f"the update is encoded as {sent!r}; this federation uses {expected!r}")
    if meta.get(f"{_META_PREFIX}kind") != "update":
        raise _refuse("bad_payload", "the payload is not an update")
    if encoding is not None and not encoding.identity:
        delta = encoding.decode(tensors, spec)
    try:
        round_id = int(meta[f"{_META_PREFIX}round"])
        attempt = int(meta[f"{_META_PREFIX}attempt"])
        num_examples = int(meta[f"{_META_PREFIX}num_examples"])
        metrics_raw = json.loads(meta.get(f"{_META_PREFIX}metrics", "{}"))
    except (KeyError, ValueError) as e:
        raise _refuse("bad_payload", f"update metadata is missing or malformed ({e})") from None
    if num_examples < 1:
        raise _refuse("bad_weight", f"num_examples must be at least 1, got {num_examples}")
    if not isinstance(metrics_raw, dict) or len(metrics_raw) > 64:
        raise _refuse("bad_payload", "update metrics must be a mapping of at most 64 names")
    metrics: dict[str, float] = {}
    for k, v in metrics_raw.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise _refuse("bad_payload", f"metric {k!r} is not a number")
        if not math.isfinite(v):
            raise _refuse("non_finite", f"metric {k!r} is {v}")
        metrics[str(k)] = float(v)
    return Update(round_id, attempt, num_examples, metrics, delta)


# ------------------------------------------------------------ masked vectors

# magic "FSM", protocol version, round, attempt, values, bits per value, training seconds.
_MASKED_HEADER = struct.Struct(">3sBIIIBd")
_MASKED_MAGIC = b"FSM"


@dataclass(frozen=True)
class MaskedUpload:
    """A decoded masked-vector frame: its round attempt and the packed low bits of each value."""

    round: int
    attempt: int
    length: int
    bits: int
    train_s: float
    packed: bytes


def encode_masked(
    packed: bytes, *, round: int, attempt: int, length: int, bits: int, train_s: float
) -> bytes:
    """The frame a device uploads in a secure round: a 25-byte header, then ``packed``.

    ``packed`` is :func:`fedge.encoding.fixedpoint.pack` of the masked vector
    (``length`` values, ``bits`` each). There is no compression: masked values are
    uniformly random and do not compress. ``train_s`` is the local training time,
    for the round's profile (participation metadata the coordinator sees anyway).
    """
    if len(packed) != (length * bits + 7) // 8:
        raise ValueError(f"{len(packed)} packed bytes do not hold {length} values of {bits} bits")
    if not (math.isfinite(train_s) and train_s >= 0):
        raise ValueError(f"train_s must be a finite number >= 0, got {train_s}")
    header = _MASKED_HEADER.pack(_MASKED_MAGIC, PROTOCOL_VERSION, round, attempt, length, bits, train_s)
    return header + packed


def decode_masked(body: bytes, *, length: int, bits: int) -> MaskedUpload:
    """Check a masked-vector frame against the round's vector ``length`` and ``bits``.

    Raises:
        ProtocolError: ``bad_payload`` (not such a frame), ``bad_version``,
            ``wrong_length`` (another length or bit width, or a payload of the
            wrong size), ``non_finite`` (the training time).
    """
    if len(body) < _MASKED_HEADER.size or body[:3] != _MASKED_MAGIC:
        raise _refuse("bad_payload", "not a masked-vector frame (secure aggregation)")
    magic, version, round_id, attempt, n, b, train_s = _MASKED_HEADER.unpack_from(body)
    del magic
    if version != PROTOCOL_VERSION:
        raise _refuse("bad_version",
                      f"masked vector of protocol {version}; this build speaks {PROTOCOL_VERSION}")
    if (n, b) != (length, bits):
        raise _refuse("wrong_length", f"a masked vector of {n} values of {b} bits; this round takes "
                                      f"{length} values of {bits} bits")
    size = len(body) - _MASKED_HEADER.size
    if size != (length * bits + 7) // 8:
        raise _refuse("wrong_length",
                      f"the masked vector holds {size} bytes, expected {(length * bits + 7) // 8}")
    if not math.isfinite(train_s) or train_s < 0:
        raise _refuse("non_finite", f"the training time {train_s} is not a finite number >= 0")
    return MaskedUpload(round_id, attempt, n, b, float(train_s), body[_MASKED_HEADER.size :])


def _expected_size(spec: ParamsSpec) -> int:
    return sum(
        int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
        for shape, dt in zip(spec.shapes, spec.dtypes, strict=True)
    )


def _decompress(body: bytes, limit: int) -> bytes:
    import zstandard

    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body)) as reader:
            raw = reader.read(limit + 1)
    except zstandard.ZstdError as e:
        raise _refuse("bad_payload", f"not a zstd frame ({e})") from None
    if len(raw) > limit:
        raise _refuse("too_large", f"payload decompresses to more than {limit} bytes")
    return raw


def _read_header(raw: bytes) -> tuple[dict[str, Any], int]:
    if len(raw) < 8:
        raise _refuse("bad_payload", "not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > _MAX_HEADER or 8 + n > len(raw):
        raise _refuse("bad_payload", f"safetensors header length {n} is invalid")
    try:
        header = json.loads(raw[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _refuse("bad_payload", f"safetensors header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise _refuse("bad_payload", "safetensors header is not an object")
    return header, 8 + n


def _numpy_dtype(st: object, allowed: Mapping[str, str] = _DTYPES) -> str:
    for np_dt, st_dt in allowed.items():
        if st == st_dt:
            return np_dt
    raise _refuse("shape_mismatch", f"tensor dtype {st!r} is not a type fedge accepts here")


def _check_layout(
    header: dict[str, Any], spec: ParamsSpec | None, data_len: int, allowed: Mapping[str, str] = _DTYPES
) -> None:
    """Names, shapes, dtypes and offsets, checked before any tensor is touched."""
    for name, entry in header.items():
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("shape"), list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry["shape"])
            and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in entry["data_offsets"])
        ):
            raise _refuse("bad_payload", f"tensor {name!r} has a malformed header entry")
        start, end = entry["data_offsets"]
        itemsize = np.dtype(_numpy_dtype(entry.get("dtype"), allowed)).itemsize
        if not (0 <= start <= end <= data_len) or end - start != itemsize * math.prod(entry["shape"]):
            raise _refuse("bad_payload", f"tensor {name!r} has inconsistent data offsets")
    if spec is None:
        return
    if set(header) != set(spec.names):
        missing = sorted(set(spec.names) - set(header))
        extra = sorted(set(header) - set(spec.names))
        raise _refuse("shape_mismatch", f"tensor names differ: missing {missing}, unexpected {extra}")
    for name, shape, dt in zip(spec.names, spec.shapes, spec.dtypes, strict=True):
        entry = header[name]
        if tuple(entry["shape"]) != shape:
            raise _refuse(
                "shape_mismatch", f"tensor {name!r} has shape {tuple(entry['shape'])}, expected {shape}"
            )
        if _numpy_dtype(entry["dtype"], allowed) != np.dtype(dt).newbyteorder("<").str:
            raise _refuse(
                "shape_mismatch", f"tensor {name!r} has dtype {entry['dtype']}, expected {np.dtype(dt)}"
            )
