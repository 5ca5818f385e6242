"""What simulated devices send: their updates encoded as on the wire, and the bytes that takes.

Each simulated device's delta goes through the federation's encoding
pipeline (:mod:`fedge.encoding`) and is then serialized as
:func:`fedge.wire.encode_update` serializes it (safetensors with the same
metadata an agent sends, zstd level 1), and the payload's length is the
device's bytes up for the round: a measurement, not an estimate. The
framing is written here rather than imported because :mod:`fedge.wire`
imports pydantic, which would cost the simulator ~0.3 s of start-up and
10 MB, and the safetensors header is built here too (its format is a
length, a JSON header and the raw tensor bytes): ``safetensors.numpy.save``
spends more time checking dtypes than a small update takes to train. Tests
check that the bytes are exactly those of :mod:`fedge.wire` and of
``safetensors``. The coordinator side
is simulated by decoding the wire tensors with the same pipeline, so the
strategy aggregates exactly what a coordinator would.

Serializing and compressing every update costs time (about 30 us per
device-round for the 650-value default model, 0.2 ms for a 38K-value MLP,
milliseconds for a 1M-value one), so what is counted is a choice
(:data:`COUNT_BYTES`, ``--count-bytes``):

* ``wire`` (default): the exact payload, zstd included, for every device;
* ``raw``: the exact payload *before* zstd (an upper bound of the wire
  bytes up to zstd's frame header: zstd saves ~5-10% on float32 deltas and
  more on quantization codes), for large models where zstd dominates;
* ``off``: nothing is serialized and the byte counts are 0.

Top-k's error-feedback residual stays with the device: one residual per
device, kept by the :class:`UpdateEncoder` of the runner that trains that
device (a device always trains on the same worker).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedge.encoding import EncodingConfig, Pipeline, build_pipeline
from fedge.errors import ProtocolError
from fedge.params import Params, ParamsSpec

__all__ = ["COUNT_BYTES", "UpdateEncoder", "params_payload_size", "update_payload_size"]

#: What the simulator counts as a payload's bytes: zstd included, before zstd, or nothing.
COUNT_BYTES = ("wire", "raw", "off")
# fedge.wire's protocol version and zstd level (tests/integration/test_compress_simulate.py
# checks that these sizes are those of fedge.wire's own payloads).
_PROTOCOL = "1"
_ZSTD_LEVEL = 1
_compressors: dict[str, Any] = {}  # one per process: making one costs more than a small payload


# The wire's dtypes with their safetensors codes, ranked as safetensors orders its header:
# by dtype (its enum order, largest first), then by name.
_ST_DTYPES: dict[np.dtype[Any], tuple[str, int]] = {
    np.dtype("<f8"): ("F64", 0), np.dtype("<f4"): ("F32", 1), np.dtype("<u4"): ("U32", 2),
    np.dtype("<f2"): ("F16", 3), np.dtype("<u2"): ("U16", 4), np.dtype("|u1"): ("U8", 5),
}


# As safetensors writes its JSON header: compact, UTF-8 as it is (made once: json.dumps
# with these options builds a new encoder on every call).
_HEADER_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_LAYOUTS: dict[tuple[tuple[str, np.dtype[Any], tuple[int, ...]], ...], tuple[str, tuple[str, ...]]] = {}


def _layout(arrays: Mapping[str, np.ndarray]) -> tuple[str, tuple[str, ...]]:
    """The tensors' part of the header, and the order their bytes follow it (cached per layout)."""
    key = tuple((k, a.dtype, a.shape) for k, a in arrays.items())
    cached = _LAYOUTS.get(key)
    if cached is None:
        parts, offset = [], 0
        for name, dtype, shape in sorted(key, key=lambda e: (_ST_DTYPES[e[1]][1], e[0])):
            end = offset + dtype.itemsize * int(np.prod(shape, dtype=np.int64))
            parts.append(f'{_HEADER_JSON(name)}:{{"dtype":"{_ST_DTYPES[dtype][0]}",'
                         f'"shape":[{",".join(map(str, shape))}],"data_offsets":[{offset},{end}]}}')
            offset = end
        order = tuple(sorted(arrays, key=lambda k: (_ST_DTYPES[arrays[k].dtype][1], k)))
        cached = _LAYOUTS[key] = (",".join(parts), order)
    return cached


def _safetensors_bytes(tensors: Mapping[str, np.ndarray], meta: Mapping[str, str]) -> bytes:
    """``safetensors.numpy.save(tensors, metadata=meta)``, byte for byte, for the wire's dtypes."""
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    if any(a.dtype not in _ST_DTYPES for a in arrays.values()):
        from safetensors.numpy import save  # another dtype or byte order: the library's own framing

        return save(arrays, metadata=dict(meta))
    body, order = _layout(arrays)
    if meta:
        metadata = _HEADER_JSON(meta)
        header = f'{{"__metadata__":{metadata}{"," if body else ""}{body}}}'.encode()
    else:
        header = f"{{{body}}}".encode()
    header += b" " * (-len(header) % 8)
    return b"".join([struct.pack("<Q", len(header)), header, *(arrays[k].data.cast("B") for k in order)])


def _payload_size(tensors: Mapping[str, np.ndarray], meta: dict[str, str], count: str) -> int:
    """The size of a wire payload: safetensors with ``meta``, zstd-compressed unless ``count`` is raw."""
    raw = _safetensors_bytes(tensors, {"fedge.protocol": _PROTOCOL, **meta})
    if count == "raw":
        return len(raw)
    compressor = _compressors.get("zstd")
    if compressor is None:
        import zstandard

        compressor = _compressors["zstd"] = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
    return len(compressor.compress(raw))


def params_payload_size(params: Mapping[str, np.ndarray], round_id: int, *, count: str = "wire") -> int:
    """Bytes of round ``round_id``'s params download, encoded as the coordinator encodes it."""
    if count == "off":
        return 0
    return _payload_size(params, {"fedge.kind": "params", "fedge.round": str(round_id)}, count)


def update_payload_size(
    tensors: Mapping[str, np.ndarray], *, round_id: int, num_examples: int, metrics: Mapping[str, float],
    encoding: str, count: str = "wire",
) -> int:
    """Bytes of a device's upload, as :func:`fedge.wire.encode_update` (attempt 1) makes it."""
    if count == "off":
        return 0
    meta = {
        "fedge.kind": "update",
        "fedge.round": str(round_id),
        "fedge.attempt": "1",
        "fedge.num_examples": str(num_examples),
        "fedge.metrics": json.dumps({k: float(v) for k, v in metrics.items()}),
    }
    if encoding != "none":
        meta["fedge.encoding"] = encoding
    return _payload_size(tensors, meta, count)


class UpdateEncoder:
    """Encodes simulated devices' updates, keeps their residuals, and measures their payloads."""

    def __init__(
        self, config: EncodingConfig, *, secure_aggregation: bool = False, count: str = "wire"
    ) -> None:
        if count not in COUNT_BYTES:
            raise ValueError(f"count must be one of {COUNT_BYTES}, got {count!r}")
        self.pipeline: Pipeline = build_pipeline(config, secure_aggregation=secure_aggregation)
        self.count = count
        self._residuals: dict[int, Params] = {}

    def encode(
        self,
        device_id: int,
        round_id: int,
        delta: Params,
        *,
        num_examples: int,
        metrics: Mapping[str, float],
        rng: np.random.Generator,
    ) -> tuple[Params | None, int]:
        """Encode ``delta`` as device ``device_id`` would upload it.

        Returns:
            The delta as the coordinator decodes it (``None`` if it would be
            refused, e.g. float16 overflowing to infinity), and the upload's
            size in bytes.
        """
        pipe = self.pipeline
        encoded = pipe.encode(delta, rng=rng, residual=self._residuals.get(device_id))
        if encoded.residual is not None:
            self._residuals[device_id] = encoded.residual
        size = update_payload_size(
            encoded.tensors, round_id=round_id, num_examples=num_examples, metrics=metrics,
            encoding=pipe.name, count=self.count,
        )
        if pipe.identity:
            return delta, size
        try:
            return pipe.decode(encoded.tensors, ParamsSpec.of(delta)), size
        except ProtocolError:
            return None, size
