"""A simulation's output folder: metrics as they happen, then model, summary and curves.

``metrics.jsonl`` gets one line per evaluated round (under DP, per round, with
its epsilon), flushed as the round ends, so an interrupted run keeps
everything it measured. The final files are
written to a temporary name, fsynced and renamed, so a reader never sees a
half-written ``summary.json`` or model.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import IO, Any

import numpy as np

from fedge.errors import ConfigError
from fedge.params import Params
from fedge.sim.engine import RoundRecord, SimResult
from fedge.store import atomic_write

__all__ = ["RunWriter", "atomic_write", "default_out_dir", "plot_curves"]


def default_out_dir(base: Path, label: str) -> Path:
    """A fresh folder ``base/YYYYmmdd-HHMMSS-label`` (suffixed ``-2``, ``-3``... if taken)."""
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{label}"
    candidate = base / stem
    i = 2
    while candidate.exists():
        candidate = base / f"{stem}-{i}"
        i += 1
    return candidate


class RunWriter:
    """Writes one run's files into ``out_dir`` (created if missing)."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            self._metrics: IO[str] = (out_dir / "metrics.jsonl").open("w", encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"--out {str(out_dir)!r} cannot be written: {e.strerror}") from e

    def on_round(self, record: RoundRecord) -> None:
        if record.metrics is None and record.epsilon is None:
            return
        self._metrics.write(json.dumps(record.to_json()) + "\n")
        self._metrics.flush()

    def close(self) -> None:
        self._metrics.close()

    def finish(
        self, result: SimResult, *, plot: bool = True, started_at: float | None = None
    ) -> dict[str, Path]:
        """Write model, curves and summary; return their paths by name.

        ``started_at`` (a ``time.perf_counter()`` reading) makes the summary's
        ``wall_s`` cover everything from then until the summary is written.
        """
        self.close()
        paths = {
            "metrics": self.out_dir / "metrics.jsonl",
            "model": self.out_dir / "model.safetensors",
            "summary": self.out_dir / "summary.json",
        }
        atomic_write(paths["model"], _safetensors_bytes(result.params))
        if plot:
            paths["curves"] = self.out_dir / "curves.png"
            c = result.config
            plot_curves(result.history, paths["curves"],
                        title=f"{c.task} on {c.data}, {result.num_devices} devices, {c.strategy}")
        if started_at is not None:
            result.timing["wall_s"] = time.perf_counter() - started_at
        summary = result.summary()
        summary["files"] = {k: p.name for k, p in paths.items()}
        atomic_write(paths["summary"], (json.dumps(summary, indent=2) + "\n").encode())
        return paths


def _safetensors_bytes(params: Params) -> bytes:
    from safetensors.numpy import save

    return bytes(save({k: np.ascontiguousarray(v) for k, v in params.items()}))


def plot_curves(history: list[RoundRecord], path: Path, *, title: str = "") -> None:
    """Accuracy and loss per evaluated round, side by side, as a PNG."""
    # The object-oriented API (no pyplot) skips GUI backend discovery: faster
    # to import and safe on a headless device.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rounds = [r.round for r in history if r.metrics is not None]
    series: dict[str, list[Any]] = {
        "accuracy": [r.metrics["accuracy"] for r in history if r.metrics is not None],
        "loss": [r.metrics["loss"] for r in history if r.metrics is not None],
    }
    fig = Figure(figsize=(9, 3.4), dpi=100)
    FigureCanvasAgg(fig)
    for i, (name, values) in enumerate(series.items()):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.plot(rounds, values, marker="o" if len(rounds) <= 40 else None, markersize=3)
        ax.set_xlabel("round")
        ax.set_ylabel(f"test {name}")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
