"""Tests for fedge.lab.results: the report's bytes, rounds, devices and recoveries, on numbers checkable
by hand."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest

from fedge.lab.host import Counters
from fedge.lab.results import (
    HEADER_BYTES,
    Collected,
    final_wire_counts,
    kernel_view,
    ratio,
    recovery,
    rounds_and_devices,
)
from fedge.store import RoundRow

T0 = 1_700_000_000.0
DEVICE = "10.213.0.4"
COORDINATOR = "10.213.0.1"


def counters(*, rx_bytes: int = 0, rx_packets: int = 0, tx_bytes: int = 0, tx_packets: int = 0) -> Counters:
    return Counters(rx_bytes=rx_bytes, tx_bytes=tx_bytes, rx_packets=rx_packets, tx_packets=tx_packets)


def attempt(round: int, attempt: int, state: str, cohort: Sequence[str], *, opened: float,
            closed: float | None, reported: Sequence[str] = (), metrics: dict[str, float] | None = None,
            ) -> RoundRow:
    return RoundRow(round=round, attempt=attempt, state=state, cohort=tuple(cohort), min_updates=1,
                    opened_at=opened, deadline_at=opened + 60.0, closed_at=closed, reported=tuple(reported),
                    dropped=tuple(d for d in cohort if d not in reported), checkpoint=None,
                    metrics=metrics or {})


def update(device: str, received_at: float, **metrics: float) -> dict[str, object]:
    """An ``updates`` row as :meth:`fedge.store.Store.updates` returns it (metrics as JSON text)."""
    return {"device_id": device, "received_at": received_at, "metrics": json.dumps(metrics),
            "digest": "00" * 32, "size_bytes": 1000, "num_examples": 10}


def collected(attempts: Sequence[RoundRow],
              updates: dict[tuple[int, int], list[dict[str, object]]]) -> Collected:
    return Collected(counters={}, dropped={}, wires={}, attempts=list(attempts),
                     updates={(r.round, r.attempt): updates.get((r.round, r.attempt), []) for r in attempts},
                     profiles={})


# ------------------------------------------------------------------ kernel_view


def test_header_bytes_are_ethernet_ipv4_and_tcp_with_timestamps() -> None:
    assert HEADER_BYTES == 14 + 20 + 32


def test_payload_up_is_the_received_bytes_less_66_per_packet() -> None:
    view = kernel_view(DEVICE, counters(rx_bytes=1066, rx_packets=1), {}, {})
    assert view["link_payload_up"] == view["payload_up"] == 1000
    assert (view["rx_bytes"], view["rx_packets"]) == (1066, 1)


def test_payload_down_takes_out_what_the_input_rule_dropped() -> None:
    # 10 packets transmitted to the device (10_000 bytes with framing); its loss rule dropped 2 of them,
    # 1104 IP bytes, of which 2 * 52 are IP and TCP headers: 1000 payload bytes never reached it.
    view = kernel_view(DEVICE, counters(tx_bytes=10_000, tx_packets=10), {"INPUT": (2, 1104)}, {})
    assert view["link_payload_down"] == 10_000 - 66 * 10
    assert view["payload_down"] == 10_000 - 66 * 10 - (1104 - 52 * 2) == 8340
    assert (view["dropped_down_packets"], view["dropped_down_bytes"]) == (2, 1104)


def test_output_drops_are_reported_but_not_taken_out_of_payload_up() -> None:
    # Up, the rule drops before the veth counts: the link only ever saw what got through.
    view = kernel_view(DEVICE, counters(rx_bytes=2132, rx_packets=2), {"OUTPUT": (3, 1500)}, {})
    assert view["payload_up"] == 2000
    assert (view["dropped_up_packets"], view["dropped_up_bytes"]) == (3, 1500)
    assert (view["dropped_down_packets"], view["dropped_down_bytes"]) == (0, 0)


def test_no_traffic_is_all_zeros() -> None:
    view = kernel_view(DEVICE, counters(), {}, {})
    assert set(view.values()) == {0}
    assert set(view) == {
        "rx_bytes", "tx_bytes", "rx_packets", "tx_packets", "link_payload_up", "link_payload_down",
        "dropped_up_packets", "dropped_up_bytes", "dropped_down_packets", "dropped_down_bytes",
        "retransmitted_down_bytes", "payload_up", "payload_down"}


def test_retransmitted_bytes_count_only_connections_to_the_device() -> None:
    resent = {(f"{COORDINATOR}:8443", DEVICE): 300, (COORDINATOR, DEVICE): 40,
              (COORDINATOR, "10.213.0.5"): 7000, (COORDINATOR, "10.213.0.40"): 9000}
    view = kernel_view(DEVICE, counters(), {}, resent)
    assert view["retransmitted_down_bytes"] == 340
    # Reported beside the payload, never taken out of it.
    assert view["payload_down"] == 0


# ------------------------------------------------------------------ recovery

def _kill_run() -> Collected:
    rows = [
        attempt(1, 1, "complete", ["a", "b"], opened=T0, closed=T0 + 10),
        attempt(2, 1, "interrupted", ["a", "b"], opened=T0 + 11, closed=T0 + 15),
        attempt(2, 2, "abandoned", ["a", "b"], opened=T0 + 20, closed=T0 + 25),
        attempt(2, 3, "complete", ["a", "b"], opened=T0 + 26, closed=T0 + 32.5),
        attempt(3, 1, "complete", ["a", "b"], opened=T0 + 33, closed=T0 + 40),
    ]
    return collected(rows, {(1, 1): [update("a", T0 + 5), update("b", T0 + 6)],
                            (2, 1): [update("b", T0 + 13)],
                            (2, 2): [update("b", T0 + 22)],
                            (2, 3): [update("a", T0 + 28), update("b", T0 + 31.25)],
                            (3, 1): [update("b", T0 + 35)]})


def test_coordinator_recovers_when_the_first_attempt_after_completes() -> None:
    # The interrupted and abandoned attempts after the kill do not count; round 2's third does.
    assert recovery("kill-coordinator", [], T0 + 14.0, _kill_run()) == (T0 + 32.5, 18.5)


def test_coordinator_recovery_needs_a_close_strictly_after_since() -> None:
    assert recovery("kill-coordinator", [], T0 + 32.5, _kill_run()) == (T0 + 40, 7.5)


def test_device_recovers_at_its_first_update_in_a_complete_attempt() -> None:
    # b's updates at +13 and +22 were to attempts that did not complete.
    assert recovery("link-down", ["b"], T0 + 12.0, _kill_run()) == (T0 + 31.25, 19.25)


def test_device_recovery_takes_the_first_of_any_target() -> None:
    assert recovery("kill-agent", ["a", "b"], T0 + 12.0, _kill_run()) == (T0 + 28, 16.0)
    assert recovery("kill-agent", ["c"], T0 + 12.0, _kill_run()) == (None, None)


def test_nothing_after_since_is_no_recovery() -> None:
    assert recovery("kill-coordinator", [], T0 + 40, _kill_run()) == (None, None)
    assert recovery("fill-disk", ["a"], T0 + 28, _kill_run()) == (None, None)


def test_no_since_or_nothing_collected_is_no_recovery() -> None:
    assert recovery("kill-coordinator", [], None, _kill_run()) == (None, None)
    assert recovery("link-down", ["b"], None, _kill_run()) == (None, None)
    assert recovery("kill-coordinator", [], T0, None) == (None, None)


# ------------------------------------------------------------------ rounds_and_devices


def _interrupted_then_complete() -> Collected:
    rows = [
        attempt(1, 1, "interrupted", ["a", "b", "c"], opened=T0, closed=T0 + 5, reported=["a"]),
        attempt(1, 2, "complete", ["a", "b", "c"], opened=T0 + 10, closed=T0 + 22.5, reported=["a", "b"],
                metrics={"accuracy": 0.75, "loss": 0.5, "bytes_up": 2000.0, "bytes_down": 4000.0,
                         "phase_train_s": 8.0, "phase_secagg_s": 1.5, "phase_store_s": 0.25}),
        attempt(2, 1, "complete", ["a", "b"], opened=T0 + 30, closed=T0 + 40, reported=["a", "b"],
                metrics={"accuracy": 0.8}),
    ]
    return collected(rows, {(1, 1): [update("a", T0 + 4, train_s=3.0)],
                            (1, 2): [update("a", T0 + 16, train_s=4.0), update("b", T0 + 20, train_s=6.5)],
                            (2, 1): [update("a", T0 + 35, train_s=2.0), update("b", T0 + 39, train_s=1.0)]})


def test_rounds_count_their_attempts_and_show_the_last() -> None:
    rounds, _ = rounds_and_devices(_interrupted_then_complete(), ["a", "b", "c"])
    assert [r["round"] for r in rounds] == [1, 2]
    first = rounds[0]
    assert first["attempts"] == 2 and first["attempt_states"] == ["interrupted", "complete"]
    assert first["state"] == "complete"
    assert (first["participants"], first["invited"]) == (2, 3)
    assert (first["accuracy"], first["loss"]) == (0.75, 0.5)
    assert (first["bytes_up"], first["bytes_down"]) == (2000.0, 4000.0)
    assert first["duration_s"] == 12.5  # the last attempt's, not the round's
    assert (first["opened_unix"], first["closed_unix"]) == (T0, T0 + 22.5)  # the first opening
    assert first["phases"] == {"train": 8.0, "secagg": 1.5, "store": 0.25}
    second = rounds[1]
    assert second["attempts"] == 1 and second["phases"] == {} and second["loss"] is None


def test_phases_are_only_the_phase_seconds_metrics() -> None:
    row = attempt(1, 1, "complete", ["a"], opened=T0, closed=T0 + 1,
                  metrics={"phase_train_s": 1.0, "phase_count": 3.0, "train_s": 9.0, "phase_x_s": 2.0})
    rounds, _ = rounds_and_devices(collected([row], {}), ["a"])
    assert rounds[0]["phases"] == {"train": 1.0, "x": 2.0}


def test_devices_invited_completed_and_dropped_with_why() -> None:
    _, per = rounds_and_devices(_interrupted_then_complete(), ["a", "b", "c"])
    a, b, c = per["a"], per["b"], per["c"]
    assert (a["rounds_invited"], a["rounds_completed"], a["rounds_dropped"]) == (3, 2, 1)
    # a's update to the interrupted attempt did not count: the attempt did.
    assert a["drop_reasons"] == {"attempt interrupted": 1}
    assert (b["rounds_invited"], b["rounds_completed"], b["rounds_dropped"]) == (3, 2, 1)
    assert b["drop_reasons"] == {"attempt interrupted": 1}
    assert (c["rounds_invited"], c["rounds_completed"], c["rounds_dropped"]) == (2, 0, 2)
    assert c["drop_reasons"] == {"attempt interrupted": 1, "sent nothing before the deadline": 1}


def test_training_time_sums_the_updates_of_completed_rounds() -> None:
    _, per = rounds_and_devices(_interrupted_then_complete(), ["a", "b", "c"])
    assert per["a"]["train_s"] == 4.0 + 2.0  # not the 3.0 of the interrupted attempt
    assert per["b"]["train_s"] == 6.5 + 1.0
    assert per["c"]["train_s"] == 0.0


def test_transfer_time_is_the_rest_of_the_time_to_the_update() -> None:
    _, per = rounds_and_devices(_interrupted_then_complete(), ["a", "b", "c"])
    assert per["a"]["transfer_s"] == (16 - 10 - 4.0) + (35 - 30 - 2.0)
    assert per["b"]["transfer_s"] == (20 - 10 - 6.5) + (39 - 30 - 1.0)
    assert per["c"]["transfer_s"] == 0.0


def test_transfer_time_is_never_negative() -> None:
    row = attempt(1, 1, "complete", ["a"], opened=T0, closed=T0 + 5, reported=["a"])
    _, per = rounds_and_devices(collected([row], {(1, 1): [update("a", T0 + 2, train_s=3.0)]}), ["a"])
    assert (per["a"]["train_s"], per["a"]["transfer_s"]) == (3.0, 0.0)


def test_update_metrics_may_already_be_a_dict_and_train_s_may_be_missing() -> None:
    row = attempt(1, 1, "complete", ["a", "b"], opened=T0, closed=T0 + 5, reported=["a", "b"])
    ups: list[dict[str, object]] = [{**update("a", T0 + 3), "metrics": {"train_s": 1.25}},
                                    update("b", T0 + 4)]
    _, per = rounds_and_devices(collected([row], {(1, 1): ups}), ["a", "b"])
    assert (per["a"]["train_s"], per["a"]["transfer_s"]) == (1.25, 1.75)
    assert (per["b"]["train_s"], per["b"]["transfer_s"]) == (0.0, 4.0)


def test_devices_outside_the_names_are_left_out() -> None:
    row = attempt(1, 1, "complete", ["a", "ghost"], opened=T0, closed=T0 + 5, reported=["a", "ghost"])
    rounds, per = rounds_and_devices(
        collected([row], {(1, 1): [update("a", T0 + 1), update("ghost", T0 + 2)]}), ["a"])
    assert set(per) == {"a"}
    assert rounds[0]["participants"] == 2  # the round itself still counts everyone


def test_nothing_collected_gives_every_device_zeros() -> None:
    rounds, per = rounds_and_devices(None, ["a", "b"])
    assert rounds == []
    assert per["a"] == {"rounds_invited": 0, "rounds_completed": 0, "rounds_dropped": 0, "drop_reasons": {},
                        "train_s": 0.0, "transfer_s": 0.0}
    assert set(per) == {"a", "b"}


def test_an_open_attempt_has_no_duration() -> None:
    row = attempt(1, 1, "open", ["a"], opened=T0, closed=None)
    rounds, per = rounds_and_devices(collected([row], {}), ["a"])
    assert rounds[0]["duration_s"] is None and rounds[0]["closed_unix"] is None
    assert per["a"]["drop_reasons"] == {"attempt open": 1}


# ------------------------------------------------------------------ ratio


@pytest.mark.parametrize(("a", "b", "want"), [
    (1000, 1000, 1.0), (999, 1000, 0.999), (1, 3, 0.3333), (2, 3, 0.6667), (0, 5, 0.0),
    (5, 0, None), (5, -1, None),
])
def test_ratio(a: float, b: float, want: float | None) -> None:
    assert ratio(a, b) == want


def _stop_line(sent: int, received: int, connections: int) -> str:
    return json.dumps({"time": "2026-12-03T13:36:09.168Z", "level": "info", "logger": "fedge.agent.loop",
                       "message": "stopped", "event": "stop", "wire_sent": sent, "wire_received": received,
                       "wire_connections": connections})


def test_final_wire_counts_take_the_file_when_it_is_current() -> None:
    kept = {"sent": 500, "received": 900, "connections": 2, "updated_unix": T0}
    got = final_wire_counts(kept, "\n".join(["console noise", _stop_line(500, 900, 2)]))
    assert got == {"sent": 500, "received": 900, "connections": 2, "source": "wire.json"}


def test_final_wire_counts_take_the_log_when_the_file_fell_behind() -> None:
    # A disk still full when the agent stopped: its last writes failed, the log line has the totals.
    kept = {"sent": 500, "received": 900, "connections": 2}
    log = "\n".join([_stop_line(300, 400, 1), "not json {", _stop_line(1200, 2100, 3)])
    assert final_wire_counts(kept, log) == {"sent": 1200, "received": 2100, "connections": 3,
                                            "source": "agent log"}


def test_final_wire_counts_ignore_malformed_and_other_lines() -> None:
    log = "\n".join([
        '{"wire_sent": 99999}',  # no received or connections
        json.dumps({"event": "start", "wire_sent": 9, "wire_received": 9, "wire_connections": 9}) + "x",
        json.dumps({"event": "other", "wire_sent": 10**9, "wire_received": 1, "wire_connections": 1}),
        '{"event": "stop", "wire_sent": "many", "wire_received": 1, "wire_connections": 1}',
    ])
    assert final_wire_counts({}, log) == {"sent": 0, "received": 0, "connections": 0, "source": "wire.json"}
