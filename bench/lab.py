"""fedge lab figures: a 20-device lab's start-up and overhead, and the CI lab's rounds, bytes, faults.

Targets (issue 12): a 20-device lab (4 arm64) is up and training within 60 s once images are
cached; the lab's own overhead (everything but the agents and coordinator) under 5% of one core
during rounds. And, for the 4-device CI lab (deploy/lab/ci.toml): time per round by phase,
bytes per device from the kernel and from fedge, and how long each fault took to recover from.

    .venv/bin/python bench/lab.py --part start      # bench/lab20.toml, twice: images then cached
    .venv/bin/python bench/lab.py --part ci         # deploy/lab/ci.toml
    .venv/bin/python bench/lab.py --report DIR/report.json   # the tables of a report already made

"Up and training" is the report's ``timeline_s.first_round_open`` (every agent started, enrolled
over mutual TLS and checked in; the first round's cohort invited), measured from the start of
``fedge lab run``; ``first_round_complete`` is also shown. Needs root (see docs/lab.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import FEDGE, ROOT, machine


def run_lab(spec: Path, *, compare: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fedge-bench-lab-") as tmp:
        t0 = time.perf_counter()
        done = subprocess.run([FEDGE, "lab", "run", str(spec), "--out", tmp,
                               *([] if compare else ["--no-compare"])], capture_output=True, text=True,
                              check=False)
        wall = time.perf_counter() - t0
        path = Path(tmp) / "report.json"
        if not path.exists():
            raise SystemExit(f"fedge lab run {spec} failed:\n{done.stderr[-3000:]}")
        report: dict[str, Any] = json.loads(path.read_text())
    if done.returncode != 0:
        raise SystemExit(f"fedge lab run {spec} failed: {report['lab']['error']}\n{done.stderr[-2000:]}")
    report["bench_wall_s"] = wall
    return report


def show_start(report: dict[str, Any], label: str) -> None:
    t = report["lab"]["timeline_s"]
    o = report["overhead"]
    arches = sorted({d["arch"] for d in report["devices"]})
    nan = float("nan")
    print(f"{label}: {len(report['devices'])} devices ({', '.join(arches)}); "
          f"images ready {t.get('images_ready', nan):.1f} s, network {t.get('network_up', nan):.1f} s, "
          f"coordinator {t.get('coordinator_up', nan):.1f} s, "
          f"agents started {t.get('agents_started', nan):.1f} s, "
          f"all checked in {t.get('all_enrolled', nan):.1f} s, "
          f"first round open {t.get('first_round_open', nan):.1f} s, "
          f"first round complete {t.get('first_round_complete', nan):.1f} s")
    print(f"  lab overhead during rounds: {o['lab_cpu_s']:.2f} CPU-s over {o['wall_s']:.1f} s = "
          f"{100 * (o['share_of_one_core'] or 0):.1f}% of one core ({o['status_polls']} status polls)")


def show_ci(report: dict[str, Any]) -> None:
    print("| round | attempts | participants | duration s | download | keys | training | upload | unmask "
          "| accuracy |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in report["rounds"]:
        p = r["phases"]
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
        print(f"| {r['round']} | {' then '.join(r['attempt_states'])} | {r['participants']}/{r['invited']} | "
              f"{r['duration_s']} | " + " | ".join(f"{p.get(k, 0):.2f}" for k in
                                                   ("download", "keys", "training", "upload", "unmask"))
              + f" | {acc} |")
    print()
    print("| device | arch | link | kernel up | fedge up | ratio | kernel down | fedge down | ratio "
          "| dropped down pkts |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for d in report["devices"]:
        k, f, a = d["kernel"], d["fedge"], d["agreement"]
        link = "clean" if d["rate_bps"] is None and not d["loss"] else \
            f"{(d['rate_bps'] or 0) / 1e6:g} Mbit/s, {100 * d['loss']:g}% loss"
        print(f"| {d['name']} | {d['arch']} | {link} | {k['payload_up']} | {f['sent']} | {a['up']:.4f} | "
              f"{k['payload_down']} | {f['received']} | {a['down']:.4f} | {k['dropped_down_packets']} |")
    print()
    print("| fault | fired in round | recovery s | outcome |")
    print("|---|---|---|---|")
    for f in report["faults"]:
        target = f" {f['target']}" if f["target"] else ""
        print(f"| {f['action']}{target} | {f['round_at_fire']} | {f['recovery_s']} | {f['outcome']} |")
    c = report["comparison"]
    share = 100 * (report["overhead"]["share_of_one_core"] or 0)
    print(f"\naccuracy: lab {c['lab_accuracy']}, plain simulation {c['simulated_accuracy']}; "
          f"wall {report['lab']['wall_s']:.1f} s; overhead {share:.1f}% of one core; "
          f"left behind: {report['lab']['leftovers'] or 'nothing'}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["start", "ci"], default="ci")
    p.add_argument("--report", type=Path, help="print the CI tables of this report.json instead of running")
    args = p.parse_args()
    print(f"machine: {machine()}")
    if args.report is not None:
        show_ci(json.loads(args.report.read_text()))
        return 0
    if args.part == "start":
        spec = ROOT / "bench" / "lab20.toml"
        first = run_lab(spec, compare=False)
        show_start(first, "first run")
        cached = run_lab(spec, compare=False)
        show_start(cached, "images cached")
    else:
        show_ci(run_lab(ROOT / "deploy" / "lab" / "ci.toml", compare=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
