"""The figures of a lab run's report page, drawn by matplotlib as inline SVG.

Four figures, each from the report dict that :mod:`fedge.lab.report` has
checked: test accuracy per round beside the plain simulation's, round
duration by phase, bytes per device (the kernel's count beside the agent's
own) and the faults over the run. They are drawn with matplotlib's
object-oriented API on the Agg backend (no pyplot, no GUI, no global state),
imported only when a page is rendered, so the agent never loads it; without
matplotlib the page says so and keeps its tables. Each SVG is stripped of
anything that names a URL and its ids are prefixed per figure, so the page
stays self-contained and the same run renders the same bytes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from fedge.lab.report import _e, _is_num, _map, _maps, _num, _opt, _phase_names

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["render_figures"]


def render_figures(report: Mapping[str, object]) -> str:
    """The report's figures as HTML: one ``<figure>`` of inline SVG each, or a note why not."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return '<p class="note">The figures need matplotlib, which is not installed.</p>'
    out = []
    for name, caption, draw in _FIGURES:
        # The object-oriented API (no pyplot): no GUI backend discovery, no global figure state.
        fig = Figure(figsize=(9, 3.6), dpi=100)
        FigureCanvasAgg(fig)
        if not draw(fig, report):
            out.append(f'<p class="note">{_e(caption)}: nothing to draw.</p>')
            continue
        fig.tight_layout()
        out.append(f'<figure id="fig-{name}">{_svg(fig, salt=name)}'
                   f"<figcaption>{_e(caption)}</figcaption></figure>")
    return "\n".join(out)


def _label(value: object) -> str:
    # A "$" would start mathtext in matplotlib (and a malformed one raises).
    return str(value).replace("$", r"\$")


def _plot_accuracy(fig: Figure, report: Mapping[str, object]) -> bool:
    points = [(int(_num(r["round"])), a) for r in _maps(report["rounds"])
              if (a := _opt(r["accuracy"])) is not None]
    if not points:
        return False
    from matplotlib.ticker import MaxNLocator

    ax = fig.add_subplot(1, 1, 1)
    ax.plot([n for n, _ in points], [a for _, a in points], marker="o", label="lab")
    sim = _opt(_map(report["comparison"])["simulated_accuracy"])
    if sim is not None:
        ax.axhline(sim, linestyle="--", color="gray", label=f"simulation ({sim:.4f})")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return True


def _plot_phases(fig: Figure, report: Mapping[str, object]) -> bool:
    rounds = [r for r in _maps(report["rounds"]) if _opt(r["duration_s"]) is not None]
    if not rounds:
        return False
    ax = fig.add_subplot(1, 1, 1)
    # Numeric positions, labelled with the round numbers: string categories that look like
    # numbers make matplotlib log a notice for every call.
    x = list(range(len(rounds)))
    bottom = [0.0] * len(rounds)
    phases = _phase_names(rounds)
    for p in phases:
        h = [_opt(_map(r["phases"]).get(p)) or 0.0 for r in rounds]
        ax.bar(x, h, bottom=bottom, label=_label(p))
        bottom = [b + v for b, v in zip(bottom, h, strict=True)]
    # What the phases do not cover (waiting for the cohort, restarts) is drawn, not hidden. The
    # coordinator's phases are not disjoint (download, training and upload are each the slowest
    # device's), so a stack can also be taller than the round: the black mark is the round itself.
    durations = [_opt(r["duration_s"]) or 0.0 for r in rounds]
    rest = [max(0.0, d - b) for d, b in zip(durations, bottom, strict=True)]
    if any(v > 1e-3 for v in rest):
        ax.bar(x, rest, bottom=bottom, label="other", color="lightgray")
    ax.plot(x, durations, linestyle="none", marker="_", markersize=24, markeredgewidth=2, color="black",
            label="round")
    ax.set_xticks(x, [str(r["round"]) for r in rounds])
    ax.set_xlabel("round")
    ax.set_ylabel("seconds")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return True


def _plot_bytes(fig: Figure, report: Mapping[str, object]) -> bool:
    devices = _maps(report["devices"])
    if not devices:
        return False
    names = [_label(d["name"]) for d in devices]
    width, pos = 0.4, list(range(len(devices)))
    for i, (direction, kkey, fkey) in enumerate((("up", "payload_up", "sent"),
                                                  ("down", "payload_down", "received"))):
        kernel = [_opt(_map(d["kernel"] or {}).get(kkey)) or 0.0 for d in devices]
        own = [_opt(_map(d["fedge"])[fkey]) or 0.0 for d in devices]
        top = max(kernel + own)
        unit, size = ("MiB", 2**20) if top >= 2**20 else ("KiB", 2**10)
        ax = fig.add_subplot(1, 2, i + 1)
        ax.bar([p - width / 2 for p in pos], [v / size for v in kernel], width, label="kernel payload")
        ax.bar([p + width / 2 for p in pos], [v / size for v in own], width, label="fedge")
        ax.set_xticks(pos, names, rotation=60 if len(devices) > 6 else 0, fontsize=8)
        ax.set_ylim(0, top / size * 1.3 or 1.0)  # headroom for the legend
        ax.set_ylabel(unit)
        ax.set_title(f"bytes {direction}", fontsize=10)
        ax.legend(fontsize=8, ncols=2, loc="upper right")
    return True


def _plot_faults(fig: Figure, report: Mapping[str, object]) -> bool:
    faults = _maps(report["faults"])
    if not faults:
        return False
    lab = _map(report["lab"])
    t0, end = _num(lab["started_unix"]), _num(lab["wall_s"])
    ax = fig.add_subplot(1, 1, 1)
    for i, r in enumerate(_maps(report["rounds"])):  # the rounds, when the runner recorded their times
        opened, closed = r.get("opened_unix"), r.get("closed_unix")
        if _is_num(opened) and _is_num(closed):
            ax.axvspan(_num(opened) - t0, _num(closed) - t0, color="tab:blue", alpha=0.06 + 0.06 * (i % 2))
        if _is_num(closed):
            ax.axvline(_num(closed) - t0, color="gray", linewidth=0.8, linestyle=":")
            ax.text(_num(closed) - t0, len(faults) - 0.4, f" r{r['round']}", fontsize=7, color="gray",
                    ha="right")
    for y, f in enumerate(faults):
        fired, rec = _opt(f["fired_unix"]), _opt(f["recovered_unix"])
        if fired is None:
            continue
        start = fired - t0
        if rec is not None:
            ax.barh(y, max(rec - fired, end * 0.003), left=start, height=0.5, color="tab:orange")
        else:
            ax.barh(y, max(end - start, 0.0), left=start, height=0.5, color="tab:red", alpha=0.35)
            ax.plot([start], [y], marker="x", color="tab:red")
        if f["round_at_fire"] is not None:
            ax.text(start, y + 0.3, f"round {f['round_at_fire']}", fontsize=7)
    ax.set_yticks(range(len(faults)), [
        _label(f"{f['action']} {f['target'] or ''}".strip()
               + (" (not fired)" if _opt(f["fired_unix"]) is None else "")) for f in faults],
        fontsize=8)
    ax.set_ylim(-0.6, len(faults) - 0.2)
    ax.set_xlim(0, max(end, 1.0))
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the lab started")
    return True


_FIGURES: tuple[tuple[str, str, Callable[[Figure, Mapping[str, object]], bool]], ...] = (
    ("accuracy", "Test accuracy per round; the dashed line is a plain simulation of the same partitions.",
     _plot_accuracy),
    ("phases", "Round duration by phase; 'other' is time no phase accounts for. Phases measured on "
     "different devices overlap, so a stack can pass the round's duration (the black mark).", _plot_phases),
    ("bytes", "Bytes per device: the kernel's count on the host veth end (payload) beside the agent's own.",
     _plot_bytes),
    ("faults", "Faults over the run: a bar from firing to recovery; red: not recovered by the end; "
     "shaded bands and dotted lines: rounds open and their ends.", _plot_faults),
)


_SVG_HEAD = re.compile(r"\A.*?(?=<svg\b)", re.S)
_SVG_METADATA = re.compile(r"<metadata>.*?</metadata>\s*", re.S)
_SVG_XMLNS = re.compile(r'\s+xmlns(?::\w+)?="[^"]*"')


def _svg(fig: Figure, *, salt: str) -> str:
    """``fig`` as SVG text for inlining into HTML5.

    The XML prologue, the DOCTYPE, the RDF metadata and the namespace
    declarations go (an HTML parser puts ``<svg>`` in the SVG namespace by
    itself), so the page names no URL at all. A fixed ``svg.hashsalt`` makes
    the ids matplotlib hashes (clip paths, markers) the same on every run.
    """
    import io

    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"fedge-lab-{salt}"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = _SVG_HEAD.sub("", buf.getvalue(), count=1)
    text = _SVG_METADATA.sub("", text)
    text = _SVG_XMLNS.sub("", text).replace("xlink:href=", "href=")
    # matplotlib numbers its groups per figure ("figure_1", "axes_1"): prefix every id,
    # and every reference to one, so two figures on a page never share an id.
    text = text.replace(' id="', f' id="{salt}-').replace('href="#', f'href="#{salt}-')
    return text.replace("url(#", f"url(#{salt}-").strip()
