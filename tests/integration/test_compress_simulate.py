"""Compression in the simulator: measured bytes, per-device residuals, backends, CLI and refusals."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest

from fedge.cli import main
from fedge.encoding import EncodingConfig
from fedge.errors import ConfigError
from fedge.params import ParamsSpec
from fedge.sim import SimConfig, Simulation, simulate
from fedge.sim.backends import merge_partials
from fedge.sim.devices import DeviceJob, DeviceRunner, PartialRound, device_rng
from fedge.sim.traffic import UpdateEncoder, params_payload_size
from fedge.strategies import build_strategy
from fedge.wire import decode_update, encode_update

SMALL = dict(rounds=3, devices=6, task="mlp:32", eval_every=1)


def test_bytes_are_counted_per_round_and_totalled_in_the_summary() -> None:
    result = simulate(**SMALL)  # type: ignore[arg-type]
    summary = result.summary()
    assert summary["bytes_up"] == sum(r.bytes_up for r in result.history) > 0
    assert summary["bytes_down"] == sum(r.bytes_down for r in result.history) > 0
    rec = result.history[0]
    assert rec.to_json()["bytes_up"] == rec.bytes_up
    # Down: every invited device downloads the round's params payload once.
    sim = Simulation(SimConfig(**SMALL))  # type: ignore[arg-type]
    first = sim._init_params()
    # safetensors writes its metadata keys in no fixed order, so zstd's output
    # can differ by a few bytes from one serialization of the same params to the next.
    assert abs(rec.bytes_down - params_payload_size(first, 1) * rec.invited) <= 16 * rec.invited


def test_bytes_up_is_the_real_wire_payload_of_each_device() -> None:
    """Every device's upload is what encode_update makes of its (encoded) delta."""
    sim = Simulation(SimConfig(compress="q8", **SMALL))  # type: ignore[arg-type]
    params = sim._init_params()
    encoding = EncodingConfig("q8")
    runner = DeviceRunner(task=sim.task, strategy=sim.strategy, datasets=dict(enumerate(sim.data.devices)),
                          base_config=sim.train_config, seed=0, encoding=encoding)
    part = runner.run(1, params, [DeviceJob(2, 1)])
    # Re-do device 2's round by hand: same training, same encoding draws.
    rng = device_rng(0, 1, 2)
    result = sim.task.train(params, sim.data.devices[2], sim.train_config, rng)
    delta = {k: result.params[k] - params[k] for k in params}
    enc = UpdateEncoder(encoding).pipeline.encode(delta, rng=rng)
    body = encode_update(enc.tensors, round=1, attempt=1, num_examples=result.num_examples,
                         metrics={**result.metrics, "train_s": 0.0}, encoding="q8")
    # Only the train_s metric differs (a measured time: up to ~20 more digits of JSON,
    # and zstd's output by a few bytes with it); the tensors are the same. Exact sizes
    # are checked by test_the_simulators_payload_sizes_are_the_wire_codecs.
    assert abs(part.bytes_up - len(body)) <= 40
    update = decode_update(body, spec=ParamsSpec.of(params), max_bytes=1 << 24,
                           encoding=UpdateEncoder(encoding).pipeline)
    aggregate = part.accumulator.result()
    for k in params:
        np.testing.assert_allclose(aggregate.delta[k], update.delta[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("compress", ["fp16", "q8", "q4", "topk:0.05", "topk:0.05+fp16"])
def test_compression_sends_fewer_bytes_and_still_learns(compress: str) -> None:
    base = simulate(**SMALL)  # type: ignore[arg-type]
    run = simulate(compress=compress, **SMALL)  # type: ignore[arg-type]
    assert run.summary()["bytes_up"] < 0.6 * base.summary()["bytes_up"]
    first, last = run.history[0].metrics, run.history[-1].metrics
    assert first is not None and last is not None and last["loss"] < first["loss"]
    assert run.summary()["config"]["compress"] == compress


def test_top_k_residuals_stay_with_each_device_across_rounds() -> None:
    sim = Simulation(SimConfig(compress="topk:0.01", **SMALL))  # type: ignore[arg-type]
    params = sim._init_params()
    runner = DeviceRunner(task=sim.task, strategy=sim.strategy, datasets=dict(enumerate(sim.data.devices)),
                          base_config=sim.train_config, seed=0, encoding=EncodingConfig("topk:0.01"))
    runner.run(1, params, [DeviceJob(0, 1), DeviceJob(3, 1)])
    kept = runner._encoder._residuals
    assert set(kept) == {0, 3}
    assert not np.array_equal(kept[0]["w1"], kept[3]["w1"])
    before = {k: v.copy() for k, v in kept[0].items()}
    runner.run(2, params, [DeviceJob(3, 1)])
    assert all(np.array_equal(before[k], kept[0][k]) for k in before)  # device 0 did not train


def test_processes_backend_counts_bytes_like_inline() -> None:
    inline = simulate(compress="topk:0.05", **SMALL)  # type: ignore[arg-type]
    procs = simulate(compress="topk:0.05", backend="processes", workers=2, **SMALL)  # type: ignore[arg-type]
    a, b = inline.summary()["bytes_up"], procs.summary()["bytes_up"]
    # Equal up to the digits of each update's train_s metric.
    assert abs(a - b) <= 0.02 * a
    # The params differ in the last bits (summation order), so their zstd size by a few bytes.
    assert inline.summary()["bytes_down"] == pytest.approx(procs.summary()["bytes_down"], rel=0.01)
    assert inline.metrics["accuracy"] == pytest.approx(procs.metrics["accuracy"], abs=0.02)


def test_merge_partials_sums_bytes_up() -> None:
    strategy = build_strategy("fedavg", {})
    params = {"w": np.zeros(3, dtype=np.float32)}
    parts = [PartialRound(strategy.accumulator(params), bytes_up=n) for n in (10, 0, 32)]
    assert merge_partials(parts).bytes_up == 42


def test_fp16_overflow_is_refused_like_the_coordinator_would() -> None:
    enc = UpdateEncoder(EncodingConfig("fp16"))
    sent, nbytes = enc.encode(0, 1, {"w": np.array([1e6, 1.0], dtype=np.float32)}, num_examples=3,
                              metrics={}, rng=np.random.default_rng(0))
    assert sent is None and nbytes > 0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"compress": "zip"}, "unknown stage"),
        ({"compress": "topk:0"}, r"\(0, 1\]"),
        ({"compress": "fp16", "compress_bucket": 8}, "only to q8 and q4"),
        ({"compress": "q8", "compress_bucket": 0}, ">= 1"),
        ({"compress": "q8", "compress_range": -2.0}, "positive finite"),
        ({"compress": 8}, "compress must be str"),
    ],
)
def test_bad_compression_settings_are_refused_when_the_config_is_built(
    fields: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        SimConfig(**fields)  # type: ignore[arg-type]


def test_cli_flags_and_toml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text('compress = "q4"\ncompress-bucket = 64\nrounds = 2\n')
    out = tmp_path / "o"
    assert main(["simulate", "--config", str(cfg), "--compress", "q8", "--quiet", "--no-plot",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["compress"] == "q8" and summary["config"]["compress_bucket"] == 64
    assert summary["bytes_up"] > 0 and summary["bytes_down"] > 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(x["bytes_up"] for x in lines) == summary["bytes_up"]
    assert sum(x["bytes_down"] for x in lines) == summary["bytes_down"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--compress", "topk:2"], "top-k fraction must be in (0, 1]"),
        (["--compress", "gzip"], "unknown stage 'gzip'"),
        (["--compress", "q8", "--compress-bucket", "0"], "--compress-bucket must be an integer >= 1"),
        (["--compress", "q8", "--compress-range", "inf"], "--compress-range must be a positive finite"),
        (["--compress-range", "1"], "--compress-range applies only to q8 and q4"),
    ],
)
def test_bad_compress_flags_are_one_line_and_exit_2(
    args: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["simulate", *args, "--quiet", "--out", str(tmp_path / "o")])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedge: error: ") and needle in lines[0], err
    assert not (tmp_path / "o").exists()


def test_count_bytes_raw_and_off() -> None:
    from fedge.sim import config as sim_config
    from fedge.sim import traffic

    assert sim_config.COUNT_BYTES == traffic.COUNT_BYTES
    wire = simulate(**SMALL).summary()  # type: ignore[arg-type]
    raw = simulate(count_bytes="raw", **SMALL).summary()  # type: ignore[arg-type]
    off = simulate(count_bytes="off", **SMALL).summary()  # type: ignore[arg-type]
    assert (wire["bytes_counted"], raw["bytes_counted"], off["bytes_counted"]) == ("wire", "raw", "off")
    # float32 deltas compress a little: before zstd is more, but not by much.
    assert wire["bytes_up"] < raw["bytes_up"] < 1.3 * wire["bytes_up"]
    assert wire["bytes_down"] < raw["bytes_down"]
    assert off["bytes_up"] == off["bytes_down"] == 0
    # Counting changes nothing else.
    assert wire["accuracy"] == raw["accuracy"] == off["accuracy"]
    with pytest.raises(ConfigError, match="--count-bytes must be one of wire, raw, off"):
        SimConfig(count_bytes="zstd")
    with pytest.raises(ValueError, match="count must be one of"):
        UpdateEncoder(EncodingConfig(), count="some")


@pytest.mark.parametrize("compress", ["none", "q4", "topk:0.1+fp16"])
def test_the_simulators_payload_sizes_are_the_wire_codecs(compress: str) -> None:
    """The simulator frames payloads itself (no pydantic import); the sizes must be fedge.wire's."""
    from fedge.sim.traffic import update_payload_size
    from fedge.wire import PROTOCOL_VERSION, encode_params

    assert str(PROTOCOL_VERSION) == "1"
    rng = np.random.default_rng(0)
    delta = {"w": rng.normal(size=(20, 7)).astype(np.float32), "b": np.zeros(7, np.float32)}
    tensors = UpdateEncoder(EncodingConfig(compress)).pipeline.encode(delta, rng=rng).tensors
    name = UpdateEncoder(EncodingConfig(compress)).pipeline.name
    metrics = {"train_loss": 0.25, "train_s": 0.0123}
    wire_level = inspect.signature(encode_update).parameters["level"].default  # what agents send
    for level, count in ((None, "raw"), (wire_level, "wire")):
        body = encode_update(tensors, round=4, attempt=1, num_examples=9, metrics=metrics, encoding=name,
                             level=level)
        size = update_payload_size(tensors, round_id=4, num_examples=9, metrics=metrics, encoding=name,
                                   count=count)
        # Exact before zstd; after it, within the few bytes the header's key order can move it.
        assert abs(size - len(body)) <= (0 if level is None else 16)
        down = encode_params(delta, {"fedge.kind": "params", "fedge.round": "2"}, level=level)
        assert abs(params_payload_size(delta, 2, count=count) - len(down)) <= (0 if level is None else 16)


def test_the_simulator_does_not_import_pydantic() -> None:
    import subprocess
    import sys

    code = ("import sys; from fedge.sim import simulate; simulate(rounds=1, devices=3); "
            "print('pydantic' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def _header(raw: bytes) -> tuple[dict[str, object], bytes]:
    import json
    import struct

    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


@pytest.mark.parametrize(
    "tensors",
    [
        {"w": np.arange(640, dtype=np.float32).reshape(64, 10), "b": np.ones(10, np.float32)},
        # Every wire dtype, names out of order, an empty tensor, a non-ASCII name.
        {"z": np.arange(4.0).reshape(2, 2), "a": np.arange(3, dtype=np.uint8), "h": np.ones(5, np.float16),
         "u": np.arange(4, dtype=np.uint32), "q": np.arange(3, dtype=np.uint16),
         "é": np.zeros(0, np.float32)},
        {"t": np.arange(12, dtype=np.float32).reshape(4, 3).T},  # not contiguous
        {"big": np.arange(3, dtype=">f4")},  # another byte order: the library frames it
        {},
    ],
)
def test_the_simulators_safetensors_framing_is_the_librarys(tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save

    from fedge.sim.traffic import _safetensors_bytes

    contiguous = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    one_key = {"fedge.protocol": "1"}
    assert _safetensors_bytes(tensors, one_key) == save(contiguous, metadata=one_key)
    # safetensors keeps metadata in a hash map, so with several keys their order (only) may
    # differ between processes: the same length, header and tensor bytes otherwise.
    meta = {"fedge.protocol": "1", "fedge.metrics": '{"loss": 0.5}', "x": 'a"b\\c é\n\x01\x7f'}
    mine, theirs = _safetensors_bytes(tensors, meta), save(contiguous, metadata=meta)
    assert len(mine) == len(theirs)
    assert _header(mine) == _header(theirs)
