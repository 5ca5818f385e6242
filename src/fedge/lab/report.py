"""A lab run's report: ``report.json`` and a self-contained ``report.html``.

The runner builds one dict (the schema is ``_SCHEMA`` below, documented in
docs/lab.md); :func:`write_report` checks that every key is there, writes it
as JSON, then renders the same data as one HTML file that opens anywhere
without a network: CSS inline, figures as inline SVG (:mod:`fedge.lab.figures`
draws them; matplotlib is imported only there, lazily: the agent never loads
it), no script. Every string that came from the run (device names, errors,
fault outcomes) is escaped with :func:`html.escape`, in the tables and in the
figures.
"""

from __future__ import annotations

import html
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import cast

from fedge.errors import ConfigError
from fedge.store import atomic_write

__all__ = ["render_html", "validate_report", "write_report"]

# Leaf kinds: "str", "num" (int or float, not bool), "int", "bool", "any", a
# trailing "?" allows null, "map" is {name: number}. A nested dict is a
# sub-mapping (null too where its key ends in "?": a run that failed before
# the counters were read); a one-element list is a list of such mappings.
# Extra keys are allowed and kept in the JSON; a few optional ones are shown
# when present (lab.leftovers, lab.timeline_s, rounds[].invited,
# rounds[].opened_unix / closed_unix).
_Schema = Mapping[str, "str | _Schema | list[_Schema]"]
_SCHEMA: _Schema = {
    "lab": {
        "name": "str", "spec": "str", "started_unix": "num", "wall_s": "num",
        "ok": "bool", "error": "str?",
        "coordinator": {"address": "str", "restarts": "int"},
    },
    "devices": [{
        "name": "str", "group": "str", "arch": "str", "cpus": "num",
        "memory_bytes": "int", "disk_bytes": "int", "rate_bps": "num?", "loss": "num",
        "rounds_invited": "int", "rounds_completed": "int", "rounds_dropped": "int",
        "drop_reasons": "map", "train_s": "num?", "transfer_s": "num?",
        "kernel?": {"rx_bytes": "int", "tx_bytes": "int", "rx_packets": "int",
                   "tx_packets": "int", "payload_up": "int", "payload_down": "int"},
        "fedge": {"sent": "int?", "received": "int?", "connections": "int?"},
        "agreement?": {"up": "num?", "down": "num?"},
        "restarts": "int",
    }],
    "rounds": [{
        "round": "int", "attempts": "int", "state": "str", "participants": "any",
        "accuracy": "num?", "loss": "num?", "duration_s": "num?", "phases": "map",
        "bytes_up": "num?", "bytes_down": "num?",
    }],
    "faults": [{
        "at": "any", "action": "str", "target": "str?", "fired_unix": "num?",
        "round_at_fire": "int?", "recovered_unix": "num?", "recovery_s": "num?",
        "outcome": "str",
    }],
    "comparison": {"simulated_accuracy": "num?", "lab_accuracy": "num?", "difference": "num?"},
    "overhead": {"lab_cpu_s": "num", "wall_s": "num", "share_of_one_core": "num?"},
}

# The CI lab's bound on kernel vs fedge byte counts (issue 12): ratios outside it are flagged.
_AGREEMENT_TOLERANCE = 0.05


def write_report(out_dir: Path, report: Mapping[str, object]) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.html`` into ``out_dir`` (created if missing).

    The JSON is written first (atomically, sorted keys, indent 2), so a
    failure while drawing leaves the data on disk. Non-finite floats become
    ``null``: strict JSON has no NaN, and a report must still be written.

    Returns:
        The paths of ``report.json`` and ``report.html``.

    Raises:
        ConfigError: (a ``ValueError``) a key is missing or has the wrong type,
            naming it; ``out_dir`` cannot be written.
    """
    validate_report(report)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"lab report folder {str(out_dir)!r} cannot be made: {e.strerror}") from e
    json_path, html_path = out_dir / "report.json", out_dir / "report.html"
    text = json.dumps(_finite(report), sort_keys=True, indent=2, allow_nan=False, default=_json_default)
    atomic_write(json_path, (text + "\n").encode())
    atomic_write(html_path, render_html(report).encode())
    return json_path, html_path


def validate_report(report: Mapping[str, object]) -> None:
    """Check that ``report`` has every key of the schema, with the right kind of value.

    Raises:
        ConfigError: naming the first bad key path, e.g. ``devices[2].kernel.rx_bytes``.
    """
    _check(report, _SCHEMA, "report")


def _check(value: object, schema: _Schema, path: str) -> None:
    if not isinstance(value, Mapping):
        raise ConfigError(f"lab report: {path}: must be a mapping, got {type(value).__name__}")
    for name, kind in schema.items():
        key = name.rstrip("?")
        where = f"{path}.{key}" if path != "report" else key
        if key not in value:
            raise ConfigError(f"lab report: {where}: missing")
        item = value[key]
        if item is None and name.endswith("?"):
            continue
        if isinstance(kind, list):
            if not isinstance(item, Sequence) or isinstance(item, (str, bytes)):
                raise ConfigError(f"lab report: {where}: must be a list, got {type(item).__name__}")
            for i, element in enumerate(item):
                _check(element, kind[0], f"{where}[{i}]")
        elif isinstance(kind, str):
            _check_leaf(item, kind, where)
        else:
            _check(item, kind, where)


def _is_num(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


_LEAF_TESTS: dict[str, Callable[[object], bool]] = {
    "str": lambda x: isinstance(x, str),
    "num": _is_num,
    "int": lambda x: isinstance(x, int) and not isinstance(x, bool),
    "bool": lambda x: isinstance(x, bool),
    "any": lambda x: True,
    "map": lambda x: isinstance(x, Mapping) and all(
        isinstance(k, str) and _is_num(v) for k, v in x.items()),
}


def _check_leaf(item: object, kind: str, where: str) -> None:
    base, nullable = kind.rstrip("?"), kind.endswith("?")
    if item is None and nullable:
        return
    if not _LEAF_TESTS[base](item):
        want = {"num": "a number", "int": "an integer", "str": "a string", "bool": "true or false",
                "map": "a mapping of names to numbers"}[base] + (" or null" if nullable else "")
        raise ConfigError(f"lab report: {where}: must be {want}, got {item!r:.80}")


def _finite(value: object) -> object:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json_default(value: object) -> object:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise ConfigError(f"lab report: a value of type {type(value).__name__} cannot be written as JSON")


# --- HTML -------------------------------------------------------------------------------------

_CSS = (
    'body{font:14px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:78em;padding:0 1em;color:#1b1b1b}'
    "h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.15em;margin:1.6em 0 .4em;border-bottom:1px solid #ddd}"
    ".badge{padding:.1em .6em;border-radius:.3em;color:#fff;font-weight:600}"
    ".ok{background:#2e7d32}.failed{background:#c62828}"
    ".error{background:#fdecea;border-left:4px solid #c62828;padding:.4em .8em;white-space:pre-wrap}"
    "dl{display:grid;grid-template-columns:max-content auto;gap:.15em 1.2em}dt{color:#555}dd{margin:0}"
    ".scroll{overflow-x:auto}table{border-collapse:collapse;font-size:.92em;font-variant-numeric:tabular-nums}"
    "th,td{border:1px solid #ddd;padding:.25em .5em;text-align:right;vertical-align:top;white-space:nowrap}"
    "th{background:#f4f4f4}th,td.t{white-space:normal}td.t,th.t{text-align:left}td.off{background:#fff3cd}"
    "figure{margin:1em 0}svg{max-width:100%;height:auto}figcaption,.note{color:#555;font-size:.9em}"
)


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def render_html(report: Mapping[str, object]) -> str:
    """The report as one self-contained HTML page (no script, no external file)."""
    from fedge.lab.figures import render_figures  # it reads the report with this module's helpers

    validate_report(report)
    lab = _map(report["lab"])
    status = "ok" if lab["ok"] else "failed"
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>fedge lab {_e(lab['name'])}: {status}</title>",
        f"<style>{_CSS}</style></head><body>",
        _header(report),
        "<h2>Devices</h2>", _devices_table(_maps(report["devices"])),
        "<h2>Rounds</h2>", _rounds_table(_maps(report["rounds"])),
        "<h2>Faults</h2>", _faults_table(_maps(report["faults"]), _num(lab["started_unix"])),
        "<h2>Figures</h2>", render_figures(report),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


# validate_report has checked every value's kind; these only tell mypy so.
def _map(value: object) -> Mapping[str, object]:
    return cast("Mapping[str, object]", value)


def _maps(value: object) -> list[Mapping[str, object]]:
    return [_map(v) for v in cast("Sequence[object]", value)]


def _num(value: object) -> float:
    return float(cast("float", value))


def _opt(value: object) -> float | None:
    """A number, or None for null and non-finite values (shown as a dash, never drawn)."""
    return None if value is None or not math.isfinite(_num(value)) else _num(value)


def _header(report: Mapping[str, object]) -> str:
    lab, cmp, over = _map(report["lab"]), _map(report["comparison"]), _map(report["overhead"])
    coord = _map(lab["coordinator"])
    status = "ok" if lab["ok"] else "failed"
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(_num(lab["started_unix"])))
    rows = [
        ("spec", lab["spec"]), ("started", started), ("wall time", _seconds(lab["wall_s"])),
        ("accuracy (lab)", _fixed(cmp["lab_accuracy"])),
        ("accuracy (simulation)", _fixed(cmp["simulated_accuracy"])),
        ("difference", _fixed(cmp["difference"], signed=True)),
        ("coordinator", f"{coord['address']}, restarted {coord['restarts']} time(s)"),
        ("lab overhead", f"{_fixed(over['lab_cpu_s'], 1)} CPU s over {_seconds(over['wall_s'])}"
                         f" = {_percent(over['share_of_one_core'])} of one core"),
    ]
    timeline = lab.get("timeline_s")
    if isinstance(timeline, Mapping) and timeline:
        rows.append(("milestones", ", ".join(f"{k} +{v} s" for k, v in timeline.items())))
    out = [f'<h1>fedge lab {_e(lab["name"])} <span class="badge {status}">{status}</span></h1>']
    if lab["error"] is not None:
        out.append(f'<p class="error">{_e(lab["error"])}</p>')
    left = lab.get("leftovers")
    if isinstance(left, Sequence) and not isinstance(left, str) and left:
        out.append(f'<p class="error">teardown left behind: {_e(", ".join(map(str, left)))}</p>')
    out += ["<dl>", *(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in rows), "</dl>"]
    return "\n".join(out)


def _table(head: Sequence[str], rows: Iterable[Sequence[str]], *, text_cols: int = 1) -> str:
    """``rows`` hold HTML cells already escaped (``<td ...>...</td>``); ``head`` plain text."""
    ths = "".join(f'<th{" class=t" if i < text_cols else ""}>{_e(h)}</th>' for i, h in enumerate(head))
    body = "\n".join("<tr>" + "".join(r) + "</tr>" for r in rows)
    return f'<div class="scroll"><table><thead><tr>{ths}</tr></thead><tbody>\n{body}\n</tbody></table></div>'


def _td(value: object, *, text: bool = False, off: bool = False, title: str | None = None) -> str:
    cls = " ".join(c for c, on in (("t", text), ("off", off)) if on)
    attrs = (f' class="{cls}"' if cls else "") + (f' title="{_e(title)}"' if title else "")
    return f"<td{attrs}>{_e(value)}</td>"


def _devices_table(devices: list[Mapping[str, object]]) -> str:
    if not devices:
        return '<p class="note">No device was started.</p>'
    head = ["device", "group", "arch", "cpus", "memory", "disk", "rate", "loss", "invited",
            "completed", "dropped", "drop reasons", "train", "transfer", "kernel up", "fedge up",
            "agree up", "kernel down", "fedge down", "agree down", "connections", "restarts"]
    # The agent's own capability benchmark (its profile, when the runner passes it on): the figure
    # to compare with a real board's, since emulated speed is not a board's speed.
    bench = [_map(d.get("profile") or {}).get("examples_per_s") for d in devices]
    with_bench = any(_is_num(b) for b in bench)
    if with_bench:
        head.append("examples/s")
    rows = []
    for d, b in zip(devices, bench, strict=True):
        # kernel and agreement are null when the run ended before the counters were read
        k, f, a = _map(d["kernel"] or {}), _map(d["fedge"]), _map(d["agreement"] or {})
        reasons = _map(d["drop_reasons"])
        rows.append([
            _td(d["name"], text=True), _td(d["group"], text=True), _td(d["arch"], text=True),
            _td(_fixed(d["cpus"], 2)), _td(_bytes(d["memory_bytes"])), _td(_bytes(d["disk_bytes"])),
            _td(_rate(d["rate_bps"])), _td(_percent(d["loss"])),
            _td(d["rounds_invited"]), _td(d["rounds_completed"]), _td(d["rounds_dropped"]),
            _td(", ".join(f"{r} \u00d7{n}" for r, n in sorted(reasons.items())) or "\u2013", text=True),
            _td(_seconds(d["train_s"])), _td(_seconds(d["transfer_s"])),
            _bytes_td(k.get("payload_up")), _bytes_td(f["sent"]), _agree_td(a.get("up")),
            _bytes_td(k.get("payload_down")), _bytes_td(f["received"]), _agree_td(a.get("down")),
            _td(_count(f["connections"])), _td(d["restarts"]),
            *([_td(f"{_num(b):.4g}" if _is_num(b) else "\u2013")] if with_bench else []),
        ])
    note = ('<p class="note">kernel: payload bytes on the device\'s host veth end (frame bytes minus '
            "66 bytes of Ethernet, IPv4 and TCP header per packet); fedge: what the agent's sockets sent "
            "and received, TLS included, from its wire.json or, where that fell behind (a disk still "
            "full when the agent stopped), from its last log line. Agreement is fedge / kernel; outside "
            f"1 \u00b1 {_AGREEMENT_TOLERANCE:.0%} it is marked.</p>")
    return _table(head, rows, text_cols=3) + note


def _bytes_td(value: object) -> str:
    return _td(_bytes(value), title=None if value is None else f"{value} bytes")


def _agree_td(value: object) -> str:
    ratio = _opt(value)
    off = ratio is not None and abs(ratio - 1.0) > _AGREEMENT_TOLERANCE
    return _td(_fixed(ratio, 3), off=off or ratio is None)


def _rounds_table(rounds: list[Mapping[str, object]]) -> str:
    if not rounds:
        return '<p class="note">No round ran.</p>'
    phases = _phase_names(rounds)
    head = ["round", "state", "attempts", "participants", "accuracy", "loss", "duration",
            *phases, "bytes up", "bytes down"]
    rows = []
    for r in rounds:
        ph = _map(r["phases"])
        part = r["participants"]  # a count, or the device names
        listed = isinstance(part, Sequence) and not isinstance(part, str)
        shown: object = len(cast("Sequence[object]", part)) if listed else part
        if "invited" in r:
            shown = f"{shown}/{r['invited']}"
        title = ", ".join(map(str, cast("Sequence[object]", part))) if listed else None
        rows.append([
            _td(r["round"], text=True), _td(r["state"], text=True), _td(r["attempts"]),
            _td(shown, title=title), _td(_fixed(r["accuracy"])), _td(_fixed(r["loss"])),
            _td(_seconds(r["duration_s"])), *(_td(_seconds(ph.get(p))) for p in phases),
            _bytes_td(r["bytes_up"]), _bytes_td(r["bytes_down"]),
        ])
    return _table(head, rows, text_cols=2)


def _phase_names(rounds: list[Mapping[str, object]]) -> list[str]:
    names: dict[str, None] = {}  # first-seen order, which is the protocol's order
    for r in rounds:
        names.update(dict.fromkeys(_map(r["phases"])))
    return list(names)


def _faults_table(faults: list[Mapping[str, object]], started_unix: float) -> str:
    if not faults:
        return '<p class="note">No fault was scheduled.</p>'
    head = ["at", "action", "target", "fired", "round then", "recovered", "recovery", "outcome"]
    rows = []
    for f in faults:
        fired, rec = _opt(f["fired_unix"]), _opt(f["recovered_unix"])
        rows.append([
            _td(_at(f["at"]), text=True), _td(f["action"], text=True),
            _td("\u2013" if f["target"] is None else f["target"], text=True),
            _td("not fired" if fired is None else f"+{fired - started_unix:.1f} s"),
            _td(_count(f["round_at_fire"])),
            _td("no" if rec is None else f"+{rec - started_unix:.1f} s",
                off=fired is not None and rec is None),
            _td(_seconds(f["recovery_s"])), _td(f["outcome"], text=True),
        ])
    return _table(head, rows, text_cols=3)


def _at(value: object) -> str:
    if isinstance(value, Mapping):  # the runner's {"round": 3} or {"s": 30.0}
        return ", ".join(f"{v} s" if k == "s" else f"{k} {v}" for k, v in value.items())
    return str(value)


# --- value formatting -------------------------------------------------------------------------

def _fixed(value: object, digits: int = 4, *, signed: bool = False) -> str:
    x = _opt(value)
    if x is None:
        return "\u2013"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _seconds(value: object) -> str:
    x = _opt(value)
    return "\u2013" if x is None else f"{x:.1f} s" if x < 600 else f"{x / 60:.1f} min"


def _percent(value: object) -> str:
    x = _opt(value)
    return "\u2013" if x is None else f"{x * 100:.3g}%"


def _count(value: object) -> str:
    return "\u2013" if value is None else str(value)


_BYTE_UNITS = (("GiB", 2.0**30), ("MiB", 2.0**20), ("KiB", 2.0**10), ("B", 1.0))
_RATE_UNITS = (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3), ("bit/s", 1.0))


def _scaled(value: object, units: tuple[tuple[str, float], ...], *, none: str = "\u2013") -> str:
    x = _opt(value)
    if x is None:
        return none
    unit, size = next(((u, n) for u, n in units if abs(x) >= n), units[-1])
    text = f"{x / size:.3g}"
    return f"{x / size:.0f} {unit}" if "e" in text else f"{text} {unit}"  # never "1e+03"


def _bytes(value: object) -> str:
    return _scaled(value, _BYTE_UNITS)


def _rate(value: object) -> str:
    return _scaled(value, _RATE_UNITS, none="unshaped")
