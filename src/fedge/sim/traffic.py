"""What simulated devices send: their updates encoded as on the wire, and the bytes that takes.

Each simulated device's delta goes through the federation's encoding
pipeline (:mod:`fedge.encoding`) and is then serialized as
:func:`fedge.wire.encode_update` serializes it (safetensors with the same
metadata an agent sends, zstd level 3), and the payload's length is the
device's bytes up for the round: a measurement, not an estimate. The
framing is repeated here rather than imported because :mod:`fedge.wire`
imports pydantic, which would cost the simulator ~0.3 s of start-up and
10 MB; a test checks that both produce the same bytes. The coordinator side
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
_ZSTD_LEVEL = 3
_compressors: dict[str, Any] = {}  # one per process: making one costs more than a small payload


def _payload_size(tensors: Mapping[str, np.ndarray], meta: dict[str, str], count: str) -> int:
    """The size of a wire payload: safetensors with ``meta``, zstd-compressed unless ``count`` is raw."""
    from safetensors.numpy import save

    raw = save({k: np.ascontiguousarray(v) for k, v in tensors.items()},
               metadata={"fedge.protocol": _PROTOCOL, **meta})
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
