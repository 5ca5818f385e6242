"""Encoding of updates: compression and quantization stages, and the pipeline that orders them.

:mod:`fedge.encoding.stages` holds the stages (each an encode/decode pair),
:mod:`fedge.encoding.pipeline` the fixed stage order and the combinations it
refuses. Pure: no sockets, no disk, no clock; randomness is passed in.
"""

from fedge.encoding.pipeline import STAGE_ORDER, Encoded, EncodingConfig, Pipeline, build_pipeline

__all__ = ["STAGE_ORDER", "Encoded", "EncodingConfig", "Pipeline", "build_pipeline"]
