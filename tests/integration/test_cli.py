"""``fedge simulate`` as a user runs it: outputs, config precedence, and every refusal."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedge.cli import main


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_simulate_writes_every_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "run"
    code, out, _ = run(["simulate", "--rounds", "4", "--out", str(out_dir)], capsys)
    assert code == 0
    assert "final accuracy" in out and str(out_dir) in out
    lines = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2, 3, 4]
    assert all({"accuracy", "loss"} <= x.keys() for x in lines)
    summary = json.loads((out_dir / "summary.json").read_text())
    assert {"accuracy", "loss", "rounds", "wall_s", "config"} <= summary.keys()
    assert summary["rounds"] == 4
    assert summary["accuracy"] == lines[-1]["accuracy"]
    assert summary["config"]["rounds"] == 4 and summary["config"]["task"] == "logreg"
    assert summary["wall_s"] > 0
    model = load_file(str(out_dir / "model.safetensors"))
    assert model["weight"].shape == (64, 10) and model["bias"].shape == (10,)
    assert (out_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_default_out_dir_is_under_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert run(["simulate", "--rounds", "1", "--no-plot", "--quiet"], capsys)[0] == 0
    (made,) = (tmp_path / "runs").iterdir()
    assert (made / "summary.json").is_file() and not (made / "curves.png").exists()


def test_toml_config_then_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text('rounds = 2\ntask = "mlp:8"\nlocal-epochs = 2\n'
                   'strategy = "fedavgm"\n[strategy_options]\nmomentum = 0.5\n')
    out_dir = tmp_path / "o"
    code, _, _ = run(["simulate", "--config", str(cfg), "--rounds", "3", "--quiet", "--no-plot",
                      "--strategy-option", "server_lr=0.5", "--out", str(out_dir)], capsys)
    assert code == 0
    resolved = json.loads((out_dir / "summary.json").read_text())["config"]
    assert resolved["rounds"] == 3  # the flag wins over the file
    assert resolved["task"] == "mlp:8" and resolved["local_epochs"] == 2
    assert resolved["strategy_options"] == {"momentum": 0.5, "server_lr": 0.5}


def _npz(path: Path, x: np.ndarray, y: np.ndarray) -> str:
    np.savez(path, x=x, y=y)
    return str(path)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4))
    y = np.arange(60) % 3
    bad = x.copy()
    bad[5, 2] = np.nan
    csv_bad = tmp_path / "bad.csv"
    csv_bad.write_text("1,2,0\n3,four,1\n")
    toml_bad = tmp_path / "bad.toml"
    toml_bad.write_text("rounds = [\n")
    toml_key = tmp_path / "key.toml"
    toml_key.write_text("roundz = 3\n")
    toml_type = tmp_path / "type.toml"
    toml_type.write_text('rounds = "many"\n')
    return {
        "good": _npz(tmp_path / "good.npz", x, y),
        "nan": _npz(tmp_path / "nan.npz", bad, y),
        "csv_bad": str(csv_bad),
        "toml_bad": str(toml_bad),
        "toml_key": str(toml_key),
        "toml_type": str(toml_type),
    }


def test_a_user_data_file_trains(files: dict[str, str], tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["simulate", "--data", files["good"], "--devices", "4", "--rounds", "2",
                        "--partition", "iid", "--quiet", "--no-plot", "--out", str(tmp_path / "o")],
                       capsys)
    assert code == 0, out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--task", "nope"], "unknown task 'nope'"),
        (["--strategy", "fedsgd"], "unknown strategy 'fedsgd'"),
        (["--data", "mnist"], "unknown data 'mnist'"),
        (["--partition", "zipf:1"], "zipf"),
        (["--partition", "dirichlet:0"], "alpha must be > 0, got 0"),
        (["--partition", "dirichlet:-1"], "alpha must be > 0, got -1"),
        (["--devices", "5000"], "5000 devices"),
        (["--cohort", "50"], "--cohort 50 is larger than the 20 devices"),
        (["--data", "{nan}"], "NaN or infinity"),
        (["--data", "{csv_bad}"], "four"),
        (["--data", "{toml_bad}"], "unknown data"),
        (["--config", "{toml_bad}"], "not valid TOML"),
        (["--config", "{toml_key}"], "unknown setting 'roundz'"),
        (["--config", "{toml_type}"], "rounds must be int"),
        (["--config", "/nonexistent/run.toml"], "does not exist"),
        (["--data", "/nonexistent/data.npz"], "/nonexistent/data.npz"),
        (["--stragglers", "0.5"], "--local-epochs >= 2"),
        (["--lr", "-0.1"], "--lr must be a positive number, got -0.1"),
        (["--rounds", "0"], "--rounds must be >= 1, got 0"),
        (["--sample-rate", "2"], "--sample-rate must be in (0, 1], got 2.0"),
        (["--strategy-option", "gamma=1"], "no option 'gamma'"),
        (["--task", "torch-cnn", "--data", "synthetic:1,1"], "64 features"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    args: list[str], needle: str, files: dict[str, str], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = [a.format(**files) for a in args]
    code, out, err = run(["simulate", "--rounds", "1", *args, "--quiet", "--out",
                          str(tmp_path / "o")] if "--rounds" not in args else
                         ["simulate", *args, "--quiet", "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fedge: error: ")
    assert needle in lines[0]
    assert not (tmp_path / "o").exists()  # refused before any output is written


@pytest.mark.parametrize(
    "args",
    [
        ["--devices", "many"],
        ["--cohort", "3", "--sample-rate", "0.5"],
        ["--backend", "gpu"],
        ["--strategy-option", "momentum"],
        ["--strategy-option", "momentum=high"],
        ["--lr", "fast"],
    ],
)
def test_argparse_refusals_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["simulate", *args])
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_console_script_has_no_traceback(tmp_path: Path) -> None:
    fedge = Path(sys.executable).with_name("fedge")
    proc = subprocess.run([str(fedge), "simulate", "--partition", "dirichlet:0", "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        "fedge: error: partition 'dirichlet:0': alpha must be > 0, got 0.0"
    )


def test_task_module_in_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "my_cwd_task.py").write_text(
        "from fedge.tasks import MLP\n\ndef build(spec):\n    return MLP(spec, hidden=8)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    code, _, err = run(["simulate", "--task", "my_cwd_task:build", "--rounds", "1", "--quiet",
                          "--no-plot", "--out", "o"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["params"] == 64 * 8 + 8 + 8 * 10 + 10


def test_labels_that_are_not_class_ids_are_refused(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    y = np.zeros(50, dtype=np.int64)
    y[3] = 200_000
    path = _npz(tmp_path / "huge.npz", np.ones((50, 2)), y)
    code, _, err = run(["simulate", "--data", path, "--devices", "2", "--quiet", "--out",
                        str(tmp_path / "o")], capsys)
    assert code == 2
    assert "largest label is 200000 among only 50 examples" in err


def test_help_explains_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["simulate", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--task", "--data", "--partition", "--devices", "--cohort", "--sample-rate",
                 "--rounds", "--local-epochs", "--batch-size", "--lr", "--strategy", "--mu",
                 "--server-lr", "--stragglers", "--backend", "--seed", "--config", "--out"):
        assert flag in text


def test_closed_stdout_is_not_an_error(tmp_path: Path) -> None:
    fedge = Path(sys.executable).with_name("fedge")
    proc = subprocess.run(
        f"'{fedge}' simulate --rounds 2 --quiet --no-plot --out '{tmp_path / 'o'}' | head -c 5",
        shell=True, capture_output=True, text=True, check=False,
    )
    assert proc.stdout == "final"
    assert "Traceback" not in proc.stderr and "Broken pipe" not in proc.stderr


@pytest.mark.parametrize("backend", ["inline", "processes"])
def test_ctrl_c_keeps_metrics_and_exits_130(tmp_path: Path, backend: str) -> None:
    import signal
    import time

    fedge = Path(sys.executable).with_name("fedge")
    out_dir = tmp_path / "o"
    proc = subprocess.Popen(
        [str(fedge), "simulate", "--rounds", "100000", "--backend", backend, "--workers", "2",
         "--quiet", "--out", str(out_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    metrics = out_dir / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (
        not metrics.exists() or metrics.read_text().count("\n") < 2
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert "interrupted" in err and "Traceback" not in err
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert len(rows) >= 2 and rows[0]["round"] == 1
