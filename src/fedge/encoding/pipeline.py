"""The encoding pipeline: which stages run on an update, in which order, and their inverse.

DESIGN.md's data flow fixes the device-side order once, here::

    delta -> [clip, DP noise: privacy] -> sparsify (top-k, with error feedback)
          -> value coding (fp16 | q8 | q4) -> [fixed point + masking: secagg] -> zstd (wire)

:data:`STAGE_ORDER` names the stages this package owns in that order;
:meth:`Pipeline.encode` applies them front to back and :meth:`Pipeline.decode`
undoes them back to front. zstd is the wire codec's own last step
(:func:`fedge.wire.encode_update`), so it applies to every payload.

A ``--compress`` spec names the stages: ``none``, ``fp16``, ``q8``, ``q4``,
``topk:FRACTION``, or a sparsifier then a value coder joined by ``+``
(``topk:0.01+fp16``). Building a pipeline checks the combination:

* with secure aggregation the coordinator only ever sees the *sum* of the
  cohort's encoded updates, so every stage must keep sums meaningful: top-k
  (each device sends other coordinates) and per-device quantization scales
  (each device's codes are on its own grid) are refused; float16 and a
  quantizer on a shared grid (``shared_range``) are allowed.

Top-k's error feedback keeps what was not sent (and the value coder's
rounding error) on the device, and adds it to the next round's delta; the
caller owns that residual (the simulator's device runner, the agent's state
directory) and passes it in and out, so this module stays pure.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedge.encoding.stages import (
    Float16,
    Float32,
    Layout,
    StochasticQuantizer,
    TopK,
    ValueCoder,
)
from fedge.errors import ConfigError, ProtocolError
from fedge.params import Params, ParamsSpec

__all__ = ["STAGE_ORDER", "Encoded", "EncodingConfig", "Pipeline", "build_pipeline"]

#: The encoding stages this package owns, in the order a device applies them.
STAGE_ORDER = ("sparsify", "values")

_VALUE_CODERS = ("fp16", "q8", "q4")
# A part name is joined to its tensor's name with this separator on the wire.
_SEP = "/"


@dataclass(frozen=True)
class EncodingConfig:
    """How updates are encoded: the ``--compress`` spec and the quantizer's options.

    Args:
        compress: ``none``, ``fp16``, ``q8``, ``q4``, ``topk:FRACTION`` or
            ``topk:FRACTION+fp16|q8|q4``.
        bucket_size: values per quantization scale (``None``: one scale per tensor).
        shared_range: quantize on the shared grid [-R, R] instead of per-device
            scales (values beyond R are clipped).
    """

    compress: str = "none"
    bucket_size: int | None = None
    shared_range: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Encoded:
    """An encoded update: its wire tensors, and the residual the device keeps."""

    tensors: dict[str, np.ndarray]
    residual: Params | None


class Pipeline:
    """The stages of one :class:`EncodingConfig`, in :data:`STAGE_ORDER`.

    Build with :func:`build_pipeline`, which refuses combinations that break
    secure aggregation.
    """

    def __init__(self, *, sparsifier: TopK | None, coder: ValueCoder | None, config: EncodingConfig) -> None:
        self.sparsifier = sparsifier
        self.coder: ValueCoder | None = coder
        self.config = config
        self._layouts: dict[ParamsSpec, ParamsSpec] = {}

    @property
    def identity(self) -> bool:
        """No stage at all: the wire carries the delta's own float tensors."""
        return self.sparsifier is None and self.coder is None

    @property
    def name(self) -> str:
        """The canonical spec, sent in the update's metadata and checked by the decoder."""
        if self.identity:
            return "none"
        stages = [s.name for s in (self.sparsifier, self.coder) if s is not None]
        out = "+".join(stages)
        if self.config.bucket_size is not None:
            out += f";bucket={self.config.bucket_size}"
        if self.config.shared_range is not None:
            out += f";range={self.config.shared_range!r}"
        return out

    @property
    def error_feedback(self) -> bool:
        """Whether encoding leaves a residual on the device (top-k does)."""
        return self.sparsifier is not None

    def _values(self) -> ValueCoder:
        return self.coder if self.coder is not None else Float32()

    def _tensor_layout(self, n: int) -> Layout:
        out: Layout = {}
        m = n
        if self.sparsifier is not None:
            out.update(self.sparsifier.layout(n))
            m = self.sparsifier.k(n)
        out.update(self._values().layout(m))
        return out

    def wire_spec(self, spec: ParamsSpec) -> ParamsSpec:
        """The names, shapes and dtypes of the wire tensors that encode params of ``spec``."""
        if self.identity:
            return spec
        cached = self._layouts.get(spec)
        if cached is not None:
            return cached
        names: list[str] = []
        shapes: list[tuple[int, ...]] = []
        dtypes: list[str] = []
        for name, shape in zip(spec.names, spec.shapes, strict=True):
            for part, (dt, part_shape) in self._tensor_layout(math.prod(shape)).items():
                names.append(f"{name}{_SEP}{part}")
                shapes.append(part_shape)
                dtypes.append(np.dtype(dt).str)
        out = ParamsSpec(tuple(names), tuple(shapes), tuple(dtypes))
        self._layouts[spec] = out
        return out

    def encode(
        self, delta: Mapping[str, np.ndarray], *, rng: np.random.Generator, residual: Params | None = None
    ) -> Encoded:
        """Encode ``delta`` (plus ``residual``, with error feedback) into wire tensors.

        Args:
            delta: the device's params delta.
            rng: the generator stochastic rounding draws from.
            residual: what error feedback kept from earlier rounds (same
                structure as ``delta``), or ``None`` for none yet.

        Returns:
            The wire tensors and, with error feedback, the new residual:
            ``decode(tensors) + new residual == delta + residual``.
        """
        if self.identity:
            return Encoded(dict(delta), None)
        coder = self._values()
        tensors: dict[str, np.ndarray] = {}
        kept: Params | None = {} if self.error_feedback else None
        for name, a in delta.items():
            flat = np.asarray(a).reshape(-1)
            if self.sparsifier is not None:
                assert kept is not None
                u = flat.astype(np.float32, copy=True)
                if residual is not None:
                    u += np.asarray(residual[name], dtype=np.float32).reshape(-1)
                idx = self.sparsifier.select(u)
                parts = self.sparsifier.encode_indices(idx, flat.size)
                values = u[idx]
                coded = coder.encode(values, rng)
                parts.update(coded)
                # The residual is everything the receiver will not reconstruct:
                # the coordinates left out and the value coder's rounding error.
                try:
                    sent = coder.decode(coded, values.size)
                except ProtocolError:
                    # Values beyond the coder's range (float16 overflow): the
                    # receiver refuses this update as non-finite, as it would
                    # any diverged one; the residual keeps only what was left out.
                    sent = values.astype(np.float64)
                u[idx] -= sent.astype(np.float32)
                kept[name] = u.reshape(np.shape(a))
            else:
                parts = coder.encode(flat, rng)
            for part, t in parts.items():
                tensors[f"{name}{_SEP}{part}"] = t
        return Encoded(tensors, kept)

    def decode(self, tensors: Mapping[str, np.ndarray], spec: ParamsSpec) -> Params:
        """Rebuild the delta of ``spec``'s structure from wire tensors a device sent.

        Raises:
            ProtocolError: ``shape_mismatch`` when the tensors are not exactly
                :meth:`wire_spec`'s, ``bad_payload`` for positions or scales no
                honest encoder makes, ``non_finite`` for NaN or infinity.
        """
        if self.identity:
            _check_layout(tensors, spec)
            return {name: tensors[name] for name in spec.names}
        _check_layout(tensors, self.wire_spec(spec))
        coder = self._values()
        out: Params = {}
        for name, shape, dt in zip(spec.names, spec.shapes, spec.dtypes, strict=True):
            n = math.prod(shape)
            parts = {
                part: tensors[f"{name}{_SEP}{part}"] for part in self._tensor_layout(n)
            }
            if self.sparsifier is not None:
                idx = self.sparsifier.decode_indices(parts, n)
                dense = np.zeros(n, dtype=np.float64)
                dense[idx] = coder.decode(parts, idx.size)
            else:
                dense = coder.decode(parts, n)
            with np.errstate(over="ignore"):
                value = dense.astype(np.dtype(dt)).reshape(shape)
            if not np.isfinite(value).all():
                raise ProtocolError("non_finite", f"tensor {name!r} decodes to NaN or infinity", 422)
            out[name] = value
        return out


def _check_layout(tensors: Mapping[str, np.ndarray], spec: ParamsSpec) -> None:
    if set(tensors) != set(spec.names):
        missing = sorted(set(spec.names) - set(tensors))
        extra = sorted(set(tensors) - set(spec.names))
        raise ProtocolError(
            "shape_mismatch", f"encoded tensor names differ: missing {missing}, unexpected {extra}", 422
        )
    for name, shape, dt in zip(spec.names, spec.shapes, spec.dtypes, strict=True):
        t = tensors[name]
        if not isinstance(t, np.ndarray) or t.shape != shape or t.dtype != np.dtype(dt):
            got = (getattr(t, "shape", None), getattr(t, "dtype", type(t).__name__))
            raise ProtocolError(
                "shape_mismatch", f"encoded tensor {name!r} is {got}, expected {(shape, np.dtype(dt))}", 422
            )


def build_pipeline(config: EncodingConfig, *, secure_aggregation: bool) -> Pipeline:
    """The pipeline for ``config``, refusing what cannot work.

    Args:
        config: the stages and their options.
        secure_aggregation: whether the updates will be summed under masks
            (the coordinator then sees only the cohort's sum).

    Raises:
        ConfigError: an unknown stage, a malformed option, stages out of
            order, or a combination that breaks secure aggregation.
    """
    spec = config.compress.strip()
    if not spec:
        raise ConfigError("--compress is empty; use none, fp16, q8, q4 or topk:FRACTION")
    sparsifier: TopK | None = None
    coder_name: str | None = None
    if spec != "none":
        for i, raw in enumerate(spec.split("+")):
            part = raw.strip()
            if part.startswith("topk"):
                if i != 0:
                    raise ConfigError(
                        f"--compress {spec!r}: top-k comes first (the order is "
                        f"{' -> '.join(STAGE_ORDER)}), then at most one of {', '.join(_VALUE_CODERS)}"
                    )
                sparsifier = _topk(part, spec)
            elif part in _VALUE_CODERS:
                if coder_name is not None:
                    raise ConfigError(
                        f"--compress {spec!r} names two value coders ({coder_name} and {part}); use one"
                    )
                coder_name = part
            else:
                raise ConfigError(
                    f"--compress: unknown stage {part!r}; known: none, fp16, q8, q4, topk:FRACTION "
                    "(a top-k and a value coder may be joined with '+')"
                )
    quantizes = coder_name in ("q8", "q4")
    if config.bucket_size is not None:
        if isinstance(config.bucket_size, bool) or not isinstance(config.bucket_size, int) or (
            config.bucket_size < 1
        ):
            raise ConfigError(f"--compress-bucket must be an integer >= 1, got {config.bucket_size!r}")
        if not quantizes:
            raise ConfigError("--compress-bucket applies only to q8 and q4 (quantization scales)")
    if config.shared_range is not None:
        r = config.shared_range
        if isinstance(r, bool) or not isinstance(r, int | float) or not (math.isfinite(r) and r > 0):
            raise ConfigError(f"--compress-range must be a positive finite number, got {r!r}")
        if not quantizes:
            raise ConfigError("--compress-range applies only to q8 and q4 (a shared quantization grid)")
        if config.bucket_size is not None:
            raise ConfigError(
                "--compress-bucket and --compress-range exclude each other: a shared grid has no "
                "per-device scales to bucket"
            )
    coder: ValueCoder | None = None
    if coder_name == "fp16":
        coder = Float16()
    elif coder_name is not None:
        coder = StochasticQuantizer(
            bits=int(coder_name[1:]), bucket_size=config.bucket_size, shared_range=config.shared_range
        )
    if secure_aggregation:
        if sparsifier is not None:
            raise ConfigError(
                f"--compress {spec!r} cannot be combined with secure aggregation: per-device top-k "
                "sends different coordinates from each device, and masked updates can only be "
                "summed coordinate by coordinate"
            )
        if coder is not None and coder.per_device_scale:
            raise ConfigError(
                f"--compress {spec!r} cannot be combined with secure aggregation: per-device "
                "quantization scales put each device's codes on its own grid, so their masked sum "
                "means nothing; set a shared grid (--compress-range R) instead"
            )
    return Pipeline(sparsifier=sparsifier, coder=coder, config=config)


def _topk(part: str, spec: str) -> TopK:
    name, _, arg = part.partition(":")
    if name != "topk" or not arg:
        raise ConfigError(f"--compress {spec!r}: top-k needs a fraction, as in topk:0.01")
    try:
        fraction = float(arg)
    except ValueError:
        raise ConfigError(f"--compress {spec!r}: top-k fraction {arg!r} is not a number") from None
    if not (math.isfinite(fraction) and 0 < fraction <= 1):
        raise ConfigError(f"--compress {spec!r}: top-k fraction must be in (0, 1], got {arg}")
    return TopK(fraction)
