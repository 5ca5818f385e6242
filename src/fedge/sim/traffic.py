"""What simulated devices send: their updates encoded as on the wire, and the bytes that takes.

Each simulated device's delta goes through the federation's encoding
pipeline (:mod:`fedge.encoding`) and is then serialized by the real wire
codec, :func:`fedge.wire.encode_update` (safetensors, zstd level 3, with the
same metadata an agent sends), and the payload's length is the device's
bytes up for the round: a measurement, not an estimate. The coordinator side
is simulated by decoding the wire tensors with the same pipeline, so the
strategy aggregates exactly what a coordinator would.

Top-k's error-feedback residual stays with the device: one residual per
device, kept by the :class:`UpdateEncoder` of the runner that trains that
device (a device always trains on the same worker).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedge.encoding import EncodingConfig, Pipeline, build_pipeline
from fedge.errors import ProtocolError
from fedge.params import Params, ParamsSpec
from fedge.wire import encode_params, encode_update

__all__ = ["UpdateEncoder", "params_payload_size"]


def params_payload_size(params: Mapping[str, np.ndarray], round_id: int) -> int:
    """Bytes of round ``round_id``'s params download, encoded as the coordinator encodes it."""
    return len(encode_params(params, {"fedge.kind": "params", "fedge.round": str(round_id)}))


class UpdateEncoder:
    """Encodes simulated devices' updates, keeps their residuals, and measures their payloads."""

    def __init__(self, config: EncodingConfig, *, secure_aggregation: bool = False) -> None:
        self.pipeline: Pipeline = build_pipeline(config, secure_aggregation=secure_aggregation)
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
        body = encode_update(
            encoded.tensors, round=round_id, attempt=1, num_examples=num_examples,
            metrics=metrics, encoding=pipe.name,
        )
        if pipe.identity:
            return delta, len(body)
        try:
            return pipe.decode(encoded.tensors, ParamsSpec.of(delta)), len(body)
        except ProtocolError:
            return None, len(body)
