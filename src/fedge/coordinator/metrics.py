"""Prometheus metrics of a coordinator, computed when ``/metrics`` is scraped.

A collector reads the coordinator's state and its store at scrape time
instead of counters threaded through every code path: the figures are the
store's (so they survive restarts) and the round logic stays free of
metrics calls. Each scrape costs a few indexed SQL aggregates; with 1,000
devices and 1,000 rounds it answers in a few milliseconds
(docs/benchmarks.md).

Names follow Prometheus' conventions: ``_total`` for counters, base units
(seconds, bytes).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from fedge.store import SECAGG_PHASES

if TYPE_CHECKING:
    from fedge.coordinator.service import Coordinator

__all__ = ["CoordinatorCollector"]

#: Upper bounds of the round-duration histogram, seconds.
DURATION_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class CoordinatorCollector(Collector):
    """Every fedge metric of one coordinator (see the module docstring)."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        c = self.coordinator
        store = c.store
        stats = store.round_stats()

        rounds = CounterMetricFamily("fedge_rounds", "Round attempts that ended, by how", labels=["state"])
        for state in ("complete", "abandoned", "interrupted"):
            rounds.add_metric([state], float(stats.by_state.get(state, 0)))
        yield rounds
        yield GaugeMetricFamily("fedge_rounds_complete", "Rounds completed so far",
                                value=float(c.state.round))
        yield GaugeMetricFamily("fedge_rounds_target", "Rounds to complete", value=float(c.config.rounds))

        durations = HistogramMetricFamily(
            "fedge_round_duration_seconds", "Duration of complete rounds, from opening to the checkpoint"
        )
        counts = [0] * len(DURATION_BUCKETS)
        for d in stats.durations:
            for i, bound in enumerate(DURATION_BUCKETS):
                if d <= bound:
                    counts[i] += 1
        buckets = [(f"{b:g}", float(n)) for b, n in zip(DURATION_BUCKETS, counts, strict=True)]
        buckets.append(("+Inf", float(len(stats.durations))))
        durations.add_metric([], buckets, sum_value=float(sum(stats.durations)))
        yield durations

        phases = CounterMetricFamily("fedge_round_phase_seconds", "Time complete rounds spent in each phase "
                                     "(docs/observability.md)", labels=["phase"])
        for name, seconds in stats.phases.items():
            phases.add_metric([name], seconds)
        yield phases
        yield CounterMetricFamily("fedge_received_bytes", "Update bytes received from devices "
                                  "(request bodies, refused ones included), every ended attempt",
                                  value=stats.bytes_up)
        yield CounterMetricFamily("fedge_sent_bytes", "Params bytes sent to devices, every ended attempt",
                                  value=stats.bytes_down)
        yield CounterMetricFamily("fedge_updates_received", "Updates accepted into rounds",
                                  value=float(stats.updates))
        refused = CounterMetricFamily("fedge_refusals", "Requests refused, by error code", labels=["code"])
        for code, n in sorted(c.refusals.items()):
            if n:
                refused.add_metric([code], float(n))
        yield refused
        yield CounterMetricFamily("fedge_device_events", "Events devices reported", value=float(stats.events))
        dropouts = CounterMetricFamily("fedge_secagg_dropouts", "Devices that dropped out of secure rounds, "
                                       "by the phase they missed (docs/secagg.md)", labels=["phase"])
        aborted = CounterMetricFamily("fedge_secagg_aborted_rounds", "Secure round attempts abandoned below "
                                      "the threshold, nothing revealed, by phase", labels=["phase"])
        for phase in SECAGG_PHASES:
            dropouts.add_metric([phase], stats.secagg_dropped.get(phase, 0.0))
            aborted.add_metric([phase], stats.secagg_aborted.get(phase, 0.0))
        yield dropouts
        yield aborted

        now = c.clock()
        devices = GaugeMetricFamily("fedge_devices", "Devices: heard from since the start, online "
                                    "(checked in recently), eligible (online and allowed to train)",
                                    labels=["state"])
        devices.add_metric(["known"], float(len(c.devices)))
        devices.add_metric(["online"], float(len(c.online(now))))
        devices.add_metric(["eligible"], float(len(c.available(now))))
        yield devices

        rnd = c.open
        yield GaugeMetricFamily("fedge_round_open", "1 while a round is open",
                                value=0.0 if rnd is None else 1.0)
        if rnd is not None:
            yield GaugeMetricFamily("fedge_round_invited", "Devices invited to the open round",
                                    value=float(len(rnd.round.cohort)))
            yield GaugeMetricFamily("fedge_round_reported", "Updates received in the open round",
                                    value=float(len(rnd.round.reported)))
        if c.privacy is not None:
            yield GaugeMetricFamily("fedge_privacy_epsilon", "Epsilon spent so far, at fedge_privacy_delta",
                                    value=float(c.privacy.epsilon))
            yield GaugeMetricFamily("fedge_privacy_delta", "Delta of the reported epsilon",
                                    value=float(c.privacy.config.delta))
            budget = c.privacy.config.effective_budget
            if budget is not None:
                yield GaugeMetricFamily("fedge_privacy_budget", "The epsilon no round may take the run past",
                                        value=float(budget))
