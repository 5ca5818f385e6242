"""fedge.encoding: round trips within their bounds, unbiased rounding, error feedback, refusals.

Malformed encoded updates go through the real wire codec (zstd safetensors)
and must come back as a ProtocolError, never as another exception.
"""

from __future__ import annotations

import io
import json
import struct

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedge.encoding import STAGE_ORDER, EncodingConfig, Pipeline, build_pipeline
from fedge.encoding.stages import StochasticQuantizer, TopK, index_dtype
from fedge.errors import ConfigError, ProtocolError
from fedge.params import ParamsSpec
from fedge.wire import decode_update, encode_update

F32 = np.float32


def pipe(compress: str, *, secure_aggregation: bool = False, **options: object) -> Pipeline:
    return build_pipeline(EncodingConfig(compress, **options), secure_aggregation=secure_aggregation)  # type: ignore[arg-type]


vectors = hnp.arrays(
    F32,
    st.integers(1, 300),
    elements=st.floats(-1e4, 1e4, width=32, allow_nan=False, allow_infinity=False),
)


# ------------------------------------------------------------ round trips


@settings(max_examples=60, deadline=None)
@given(x=vectors, bits=st.sampled_from([8, 4]), bucket=st.one_of(st.none(), st.integers(1, 64)),
       seed=st.integers(0, 2**32 - 1))
def test_quantization_round_trip_is_within_one_step_of_its_bucket(
    x: np.ndarray, bits: int, bucket: int | None, seed: int
) -> None:
    p = pipe(f"q{bits}", bucket_size=bucket)
    spec = ParamsSpec.of({"w": x})
    out = p.decode(p.encode({"w": x}, rng=np.random.default_rng(seed)).tensors, spec)["w"]
    size = bucket or x.size
    x64 = x.astype(np.float64)
    for start in range(0, x.size, size):
        b = x64[start : start + size]
        step = (b.max() - b.min()) / (2**bits - 1)
        err = np.abs(out[start : start + size].astype(np.float64) - b)
        # One step, plus float32 rounding of the scale and of the output.
        assert (err <= step * (1 + 1e-5) + 1e-6 * np.abs(b).max() + 1e-30).all()


@settings(max_examples=40, deadline=None)
@given(x=hnp.arrays(F32, st.integers(1, 200),
                    elements=st.floats(-6e4, 6e4, width=32, allow_nan=False, allow_infinity=False)))
def test_fp16_round_trip_is_within_half_an_ulp(x: np.ndarray) -> None:
    p = pipe("fp16")
    out = p.decode(p.encode({"w": x}, rng=np.random.default_rng(0)).tensors, ParamsSpec.of({"w": x}))["w"]
    err = np.abs(out.astype(np.float64) - x.astype(np.float64))
    assert (err <= 2.0**-11 * np.abs(x) + 2.0**-25).all()
    assert out.dtype == F32


def test_no_compression_is_the_identity_on_the_wire() -> None:
    p = pipe("none")
    delta = {"w": np.arange(6, dtype=F32).reshape(2, 3)}
    enc = p.encode(delta, rng=np.random.default_rng(0))
    assert p.identity and p.name == "none" and enc.residual is None
    assert enc.tensors["w"] is delta["w"]
    assert p.wire_spec(ParamsSpec.of(delta)) == ParamsSpec.of(delta)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("bucket", [None, 16])
def test_stochastic_rounding_is_unbiased(bits: int, bucket: int | None) -> None:
    x = np.random.default_rng(1).normal(size=64).astype(F32)
    p = pipe(f"q{bits}", bucket_size=bucket)
    spec = ParamsSpec.of({"w": x})
    rng = np.random.default_rng(12345)
    trials = 4000
    total = np.zeros(x.size)
    for _ in range(trials):
        total += p.decode(p.encode({"w": x}, rng=rng).tensors, spec)["w"]
    mean = total / trials
    step = (x.max() - x.min()) / (2**bits - 1)
    # One rounding has variance <= step^2 / 4, so the mean of 4,000 has a
    # standard deviation <= step / 126; 6 of them is a wide margin.
    assert np.abs(mean - x).max() <= 6 * step / (2 * np.sqrt(trials))
    # Round-to-nearest would be off by up to step / 2 on some coordinates;
    # the stochastic mean is far closer on every one.
    assert np.abs(mean - x).max() < step / 10


def test_four_bit_codes_are_packed_two_per_byte() -> None:
    x = np.linspace(-1, 1, 7, dtype=F32)
    enc = pipe("q4").encode({"w": x}, rng=np.random.default_rng(0))
    assert enc.tensors["w/q"].shape == (4,) and enc.tensors["w/q"].dtype == np.uint8
    assert enc.tensors["w/q"][-1] >> 4 == 0  # the padding nibble
    # The endpoints sit exactly on the grid: codes 0 and 15.
    assert enc.tensors["w/q"][0] & 0x0F == 0 and enc.tensors["w/q"][3] & 0x0F == 15


def test_quantizing_a_constant_tensor_is_exact() -> None:
    x = np.full(10, 0.25, dtype=F32)
    p = pipe("q8")
    out = p.decode(p.encode({"w": x}, rng=np.random.default_rng(0)).tensors, ParamsSpec.of({"w": x}))
    np.testing.assert_array_equal(out["w"], x)


# ---------------------------------------------------------------- top-k


@settings(max_examples=60, deadline=None)
@given(x=vectors, fraction=st.floats(0.001, 1.0), coder=st.sampled_from(["", "+fp16", "+q8", "+q4"]),
       seed=st.integers(0, 2**32 - 1), with_prev=st.booleans())
def test_error_feedback_conserves_mass(
    x: np.ndarray, fraction: float, coder: str, seed: int, with_prev: bool
) -> None:
    """What is sent plus what is kept equals the delta plus what was kept before."""
    p = pipe(f"topk:{fraction}{coder}")
    rng = np.random.default_rng(seed)
    prev = {"w": rng.normal(size=x.shape).astype(F32)} if with_prev else None
    enc = p.encode({"w": x}, rng=rng, residual=prev)
    sent = p.decode(enc.tensors, ParamsSpec.of({"w": x}))["w"]
    assert enc.residual is not None
    total = x.astype(np.float64) + (prev["w"] if prev else 0)
    scale = np.abs(total).max() + 1.0
    np.testing.assert_allclose(sent + enc.residual["w"].astype(np.float64), total, rtol=0, atol=1e-5 * scale)
    assert np.count_nonzero(sent) <= TopK(fraction).k(x.size)


def test_top_k_sends_the_largest_magnitudes_and_keeps_the_rest() -> None:
    x = np.array([0.1, -5.0, 0.2, 3.0, -0.3, 0.0, 1.0, 0.05, -0.01, 0.4], dtype=F32)
    p = pipe("topk:0.2")
    enc = p.encode({"w": x}, rng=np.random.default_rng(0))
    sent = p.decode(enc.tensors, ParamsSpec.of({"w": x}))["w"]
    np.testing.assert_array_equal(np.flatnonzero(sent), [1, 3])
    np.testing.assert_array_equal(sent[[1, 3]], [-5.0, 3.0])
    assert enc.residual is not None
    np.testing.assert_array_equal(enc.residual["w"], np.where(sent != 0, 0, x))
    # Gap-coded positions: 1, then 3 - 1.
    np.testing.assert_array_equal(enc.tensors["w/i"], [1, 2])
    # Next round the kept residual is added: 0.4 + 0.4 now beats 0.3 + 0.
    enc2 = p.encode({"w": np.zeros_like(x)}, rng=np.random.default_rng(0), residual=enc.residual)
    sent2 = p.decode(enc2.tensors, ParamsSpec.of({"w": x}))["w"]
    np.testing.assert_array_equal(np.flatnonzero(sent2), [6, 9])


def test_top_k_index_type_is_the_smallest_that_fits() -> None:
    assert (index_dtype(256), index_dtype(257), index_dtype(65536), index_dtype(65537)) == (
        "|u1", "<u2", "<u2", "<u4",
    )
    assert (TopK(0.01).k(650), TopK(0.01).k(10), TopK(1.0).k(3), TopK(0.5).k(0)) == (7, 1, 3, 0)


def test_stage_order_is_declared_once_and_names_are_canonical() -> None:
    assert STAGE_ORDER == ("sparsify", "values")
    assert pipe("topk:0.010+q4", bucket_size=64).name == "topk:0.01+q4;bucket=64"
    assert pipe(" q8 ", shared_range=0.5).name == "q8;range=0.5"


def test_a_shared_grid_keeps_sums_meaningful() -> None:
    """On a shared grid the sum of the codes decodes to the sum of the values (what SecAgg sums)."""
    p = pipe("q8", secure_aggregation=True, shared_range=1.0)
    rng = np.random.default_rng(3)
    xs = [rng.uniform(-1, 1, size=50).astype(F32) for _ in range(5)]
    codes = [p.encode({"w": x}, rng=rng).tensors["w/q"].astype(np.int64) for x in xs]
    step = 2.0 / 255
    decoded_sum = sum(c for c in codes) * step - len(xs) * 1.0
    spec = ParamsSpec.of({"w": xs[0]})
    individual = sum(
        p.decode({"w/q": c.astype(np.uint8)}, spec)["w"].astype(np.float64) for c in codes
    )
    np.testing.assert_allclose(decoded_sum, individual, atol=1e-5)
    assert np.abs(decoded_sum - sum(x.astype(np.float64) for x in xs)).max() <= len(xs) * step


def test_shared_grid_clips_values_beyond_its_range() -> None:
    p = pipe("q4", shared_range=1.0)
    x = np.array([-3.0, 0.0, 3.0], dtype=F32)
    out = p.decode(p.encode({"w": x}, rng=np.random.default_rng(0)).tensors, ParamsSpec.of({"w": x}))["w"]
    assert out[0] == pytest.approx(-1.0) and out[2] == pytest.approx(1.0)
    assert "w/s" not in p.wire_spec(ParamsSpec.of({"w": x})).names


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("compress", "options", "message"),
    [
        ("", {}, "empty"),
        ("zip", {}, "unknown stage 'zip'"),
        ("topk", {}, "needs a fraction"),
        ("topk:", {}, "needs a fraction"),
        ("topk:abc", {}, "is not a number"),
        ("topk:0", {}, r"must be in \(0, 1\]"),
        ("topk:1.5", {}, r"must be in \(0, 1\]"),
        ("topk:nan", {}, r"must be in \(0, 1\]"),
        ("topk:-0.1", {}, r"must be in \(0, 1\]"),
        ("fp16+q8", {}, "two value coders"),
        ("q8+topk:0.1", {}, "top-k comes first"),
        ("topk:0.1+topk:0.2", {}, "top-k comes first"),
        ("q8+", {}, "unknown stage ''"),
        ("fp16", {"bucket_size": 64}, "applies only to q8 and q4"),
        ("none", {"shared_range": 1.0}, "applies only to q8 and q4"),
        ("q8", {"bucket_size": 0}, "integer >= 1"),
        ("q8", {"bucket_size": True}, "integer >= 1"),
        ("q8", {"shared_range": -1.0}, "positive finite"),
        ("q8", {"shared_range": float("inf")}, "positive finite"),
        ("q8", {"shared_range": float("nan")}, "positive finite"),
        ("q4", {"shared_range": 1.0, "bucket_size": 8}, "exclude each other"),
    ],
)
def test_malformed_specs_are_refused(compress: str, options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        pipe(compress, **options)


@pytest.mark.parametrize(
    ("compress", "options", "message"),
    [
        ("topk:0.01", {}, "per-device top-k sends different coordinates"),
        ("topk:0.1+q8", {"shared_range": 1.0}, "per-device top-k"),
        ("q8", {}, "per-device quantization scales"),
        ("q4", {"bucket_size": 128}, "per-device quantization scales"),
    ],
)
def test_combinations_that_break_secure_aggregation_are_refused(
    compress: str, options: dict[str, object], message: str
) -> None:
    pipe(compress, **options)  # fine without secure aggregation
    with pytest.raises(ConfigError, match=f"cannot be combined with secure aggregation: {message}"):
        pipe(compress, secure_aggregation=True, **options)


@pytest.mark.parametrize(("compress", "options"), [("none", {}), ("fp16", {}), ("q8", {"shared_range": 0.5}),
                                                   ("q4", {"shared_range": 2.0})])
def test_combinations_that_keep_sums_meaningful_are_allowed_with_secure_aggregation(
    compress: str, options: dict[str, object]
) -> None:
    assert pipe(compress, secure_aggregation=True, **options).name.startswith(compress)


def test_stage_constructors_refuse_bad_arguments() -> None:
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        StochasticQuantizer(bits=2)
    with pytest.raises(ValueError, match="not both"):
        StochasticQuantizer(bits=8, bucket_size=4, shared_range=1.0)
    with pytest.raises(ValueError, match="fraction"):
        TopK(0.0)


# ------------------------------------------------- malformed payloads from the network

DELTA = {
    "w": np.random.default_rng(0).normal(size=(30, 10)).astype(F32),
    "b": np.random.default_rng(1).normal(size=(10,)).astype(F32),
}
SPEC = ParamsSpec.of(DELTA)


def encoded(p: Pipeline) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in p.encode(DELTA, rng=np.random.default_rng(0)).tensors.items()}


def send(p: Pipeline, tensors: dict[str, np.ndarray], *, encoding: str | None = None) -> object:
    body = encode_update(tensors, round=1, attempt=1, num_examples=5, metrics={"train_loss": 1.0},
                         encoding=p.name if encoding is None else encoding)
    return decode_update(body, spec=SPEC, max_bytes=1 << 20, encoding=p)


@pytest.mark.parametrize("compress", ["fp16", "q8", "q4", "topk:0.05", "topk:0.05+q4"])
def test_an_honest_encoded_update_decodes_over_the_wire(compress: str) -> None:
    p = pipe(compress, **({"bucket_size": 32} if "q" in compress else {}))
    update = send(p, encoded(p))
    expected = p.decode(encoded(p), SPEC)
    for name in SPEC.names:
        np.testing.assert_array_equal(update.delta[name], expected[name])  # type: ignore[attr-defined]
        assert update.delta[name].dtype == F32  # type: ignore[attr-defined]


CASES: list[tuple[str, str, object, str]] = []


def case(compress: str, reason: str, detail: str):  # type: ignore[no-untyped-def]
    def register(fn):  # type: ignore[no-untyped-def]
        CASES.append((compress, reason, fn, detail))
        return fn
    return register


@case("q8", "shape_mismatch", "w/q")
def _short_codes(t: dict[str, np.ndarray]) -> None:
    t["w/q"] = t["w/q"][:-1]


@case("q8", "shape_mismatch", "missing")
def _missing_scales(t: dict[str, np.ndarray]) -> None:
    del t["b/s"]


@case("q8", "shape_mismatch", "unexpected")
def _extra_tensor(t: dict[str, np.ndarray]) -> None:
    t["w/x"] = np.zeros(3, dtype=np.uint8)


@case("q8", "shape_mismatch", "dtype")
def _codes_as_float(t: dict[str, np.ndarray]) -> None:
    t["w/q"] = t["w/q"].astype(F32)


@case("q8", "non_finite", "NaN or infinite")
def _nan_scale(t: dict[str, np.ndarray]) -> None:
    t["w/s"][0, 1] = np.nan


@case("q8", "non_finite", "NaN or infinite")
def _infinite_minimum(t: dict[str, np.ndarray]) -> None:
    t["b/s"][0, 0] = np.inf


@case("q4", "bad_payload", "negative")
def _negative_step(t: dict[str, np.ndarray]) -> None:
    t["w/s"][0, 1] = -0.5


@case("q8", "non_finite", "decodes to NaN or infinity")
def _overflowing_scale(t: dict[str, np.ndarray]) -> None:
    t["w/s"][0] = [3e38, 3e38]


@case("topk:0.05", "bad_payload", "out of range")
def _index_out_of_range(t: dict[str, np.ndarray]) -> None:
    t["b/i"][-1] = 200  # b has 10 values


@case("topk:0.05", "bad_payload", "out of range")
def _gaps_summing_past_the_end(t: dict[str, np.ndarray]) -> None:
    t["w/i"][:] = 100  # 15 gaps of 100 in a 300-value tensor


@case("topk:0.05", "bad_payload", "repeat")
def _repeated_index(t: dict[str, np.ndarray]) -> None:
    t["w/i"][3] = 0


@case("topk:0.05", "shape_mismatch", "w/v")
def _too_many_values(t: dict[str, np.ndarray]) -> None:
    t["w/v"] = np.append(t["w/v"], F32(1.0))


@case("topk:0.05", "shape_mismatch", "w/i")
def _wide_indices(t: dict[str, np.ndarray]) -> None:
    t["w/i"] = t["w/i"].astype(np.uint32)


@case("topk:0.05", "non_finite", "NaN")
def _nan_value(t: dict[str, np.ndarray]) -> None:
    t["w/v"][0] = np.nan


@case("fp16", "non_finite", "NaN")
def _infinite_half(t: dict[str, np.ndarray]) -> None:
    t["w/h"][5] = np.inf


@pytest.mark.parametrize(("compress", "reason", "tamper", "detail"), CASES,
                         ids=[c[2].__name__.strip("_") for c in CASES])  # type: ignore[attr-defined]
def test_malformed_encoded_updates_are_refused(
    compress: str, reason: str, tamper: object, detail: str
) -> None:
    p = pipe(compress)
    t = encoded(p)
    tamper(t)  # type: ignore[operator]
    with pytest.raises(ProtocolError, match=detail) as e:
        send(p, t)
    assert e.value.reason == reason


def test_non_finite_scales_handed_to_the_pipeline_directly_are_refused() -> None:
    p = pipe("q8")
    t = encoded(p)
    t["w/s"][0, 1] = np.nan
    with pytest.raises(ProtocolError, match="scales hold NaN or infinity") as e:
        p.decode(t, SPEC)
    assert e.value.reason == "bad_payload"
    with pytest.raises(ProtocolError, match="expected") as e:
        p.decode({**t, "w/q": list(t["w/q"])}, SPEC)  # type: ignore[dict-item]
    assert e.value.reason == "shape_mismatch"


def test_a_non_zero_padding_nibble_is_refused() -> None:
    p = pipe("q4")
    x = {"w": np.linspace(-1, 1, 5, dtype=F32)}
    t = p.encode(x, rng=np.random.default_rng(0)).tensors
    t["w/q"][-1] |= 0xF0
    with pytest.raises(ProtocolError, match="padding") as e:
        p.decode(t, ParamsSpec.of(x))
    assert e.value.reason == "bad_payload"


def test_an_update_encoded_otherwise_than_the_federation_is_refused() -> None:
    q8 = pipe("q8")
    with pytest.raises(ProtocolError, match="encoded as 'fp16'") as e:
        send(q8, encoded(q8), encoding="fp16")
    assert e.value.reason == "bad_payload"
    # A plain float update to a q8 federation, and a q8 update to a plain one.
    with pytest.raises(ProtocolError) as e:
        send(q8, dict(DELTA), encoding="none")
    assert e.value.reason == "shape_mismatch"
    none = pipe("none")
    with pytest.raises(ProtocolError) as e:
        send(none, encoded(q8), encoding="q8")
    assert e.value.reason == "shape_mismatch"
    body = encode_update(DELTA, round=1, attempt=1, num_examples=5, encoding="none")
    body_q = encode_update(DELTA, round=1, attempt=1, num_examples=5, encoding="q8")
    assert decode_update(body, spec=SPEC, max_bytes=1 << 20).num_examples == 5
    with pytest.raises(ProtocolError, match="encoded as 'q8'"):
        decode_update(body_q, spec=SPEC, max_bytes=1 << 20)


def _raw(body: bytes) -> bytes:
    with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body)) as r:
        return r.read()


@settings(max_examples=150, deadline=None)
@given(compress=st.sampled_from(["q8", "q4", "topk:0.05", "topk:0.05+q8", "fp16"]),
       flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=8))
def test_corrupted_tensor_bytes_are_decoded_or_refused_never_a_crash(
    compress: str, flips: list[tuple[int, int]]
) -> None:
    p = pipe(compress)
    body = encode_update(encoded(p), round=1, attempt=1, num_examples=5, encoding=p.name)
    raw = bytearray(_raw(body))
    (n,) = struct.unpack("<Q", raw[:8])
    data_start = 8 + n
    assert json.loads(raw[8:data_start])  # the header is left alone: the data is attacked
    for pos, xor in flips:
        raw[data_start + pos % (len(raw) - data_start)] ^= xor
    tampered = zstandard.ZstdCompressor().compress(bytes(raw))
    try:
        update = decode_update(tampered, spec=SPEC, max_bytes=1 << 20, encoding=p)
    except ProtocolError as e:
        assert e.reason in {"bad_payload", "non_finite", "shape_mismatch"}
    else:
        assert all(np.isfinite(v).all() for v in update.delta.values())


def test_values_beyond_float16_are_sent_as_infinity_and_refused_by_the_receiver() -> None:
    x = {"w": np.array([1e6, 1.0, 0.0, 0.5], dtype=F32)}
    p = pipe("topk:0.5+fp16")
    enc = p.encode(x, rng=np.random.default_rng(0))  # the device does not fail
    assert enc.residual is not None
    np.testing.assert_array_equal(enc.residual["w"], [0.0, 0.0, 0.0, 0.5])
    with pytest.raises(ProtocolError) as e:
        p.decode(enc.tensors, ParamsSpec.of(x))
    assert e.value.reason == "non_finite"
