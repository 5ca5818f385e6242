"""What a lab run measured, turned into the report's figures: bytes, rounds, devices, recoveries.

The runner hands over what it collected at the end of a run (:class:`Collected`:
the kernel's counters of every host veth end, the loss rules' drop counters, the
agents' own byte counts, the store's rounds and updates, the devices' profiles);
the functions here turn it into the report's per-device, per-round and per-fault
entries, and say how each figure was derived, since several are not read off
one counter.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedge.lab.host import Counters
from fedge.store import RoundRow

__all__ = ["HEADER_BYTES", "Collected", "final_wire_counts", "kernel_view", "ratio", "recovery",
           "rounds_and_devices"]

#: Bytes of framing the kernel counts per packet on a veth and the agent does not: Ethernet (14),
#: IPv4 (20) and TCP with the timestamp option Linux uses by default (32).
HEADER_BYTES = 66
_IP_TCP_BYTES = 52  # iptables counts IP packets: IPv4 (20) and TCP with timestamps (32) headers


@dataclass(frozen=True)
class Collected:
    """Everything read at the end of a run, by device name where it is per device."""

    counters: Mapping[str, Counters]
    dropped: Mapping[str, Mapping[str, tuple[int, int]]]  # chain -> (packets, IP bytes)
    wires: Mapping[str, Mapping[str, Any]]  # the agents' counts (final_wire_counts)
    attempts: Sequence[RoundRow]
    updates: Mapping[tuple[int, int], list[dict[str, object]]]
    profiles: Mapping[str, Mapping[str, object]]


def final_wire_counts(kept: Mapping[str, Any], log: str) -> dict[str, Any]:
    """An agent's own byte counts: its ``wire.json``, or its last "stopped" log line if that is further.

    The agent rewrites ``wire.json`` once a second and at exit, and logs the
    same totals when it stops. The file can fall behind: a full disk (the
    fill-disk fault, while still in force when the run ends) fails every
    write, the last one included. Counts only grow (a restarted agent counts
    on from the file), so whichever of the two holds more is the later. The
    result says which it was under ``source``.
    """
    best: dict[str, Any] = {"sent": int(kept.get("sent", 0)), "received": int(kept.get("received", 0)),
                            "connections": int(kept.get("connections", 0)), "source": "wire.json"}
    for line in log.splitlines():
        if '"wire_sent"' not in line:
            continue
        try:
            entry = json.loads(line)
            logged: dict[str, Any] = {
                "sent": int(entry["wire_sent"]), "received": int(entry["wire_received"]),
                "connections": int(entry["wire_connections"]), "source": "agent log",
            }
        except (ValueError, KeyError, TypeError):
            continue  # not one of the agent's JSON lines, or not a stop line
        if entry.get("event") == "stop" and (
                logged["sent"] + logged["received"] > best["sent"] + best["received"]):
            best = logged
    return best


def kernel_view(address: str, c: Counters, dropped: Mapping[str, tuple[int, int]],
                retransmitted: Mapping[tuple[str, str], int]) -> dict[str, int]:
    """The kernel's view of the device's link (the device at ``address``), and from it the payload
    the agent should have counted.

    The host end receives what the device sends (up) and transmits what it receives (down).
    Payload is the link's bytes less 66 bytes of Ethernet, IPv4 and TCP header per packet,
    counted as what reached the other end. Down, the device's loss rule drops after the veth
    counted a packet, so what it dropped (iptables counts it exactly) is taken out; up, the
    rule drops before the veth, so the link only ever saw what got through. What remains on a
    lossy link is TCP's spurious resends (a segment sent again after its ACK was lost), which
    arrive twice and are read once. The coordinator's retransmitted bytes are reported beside
    it (sampled every second, so a lower bound; resends during an outage never reach the link).
    """
    resent = sum(n for (_, peer), n in retransmitted.items() if peer.rsplit(":", 1)[0] == address)
    in_packets, in_ip_bytes = dropped.get("INPUT", (0, 0))
    out_packets, out_ip_bytes = dropped.get("OUTPUT", (0, 0))
    link_up = c.rx_bytes - HEADER_BYTES * c.rx_packets
    link_down = c.tx_bytes - HEADER_BYTES * c.tx_packets
    return {
        "rx_bytes": c.rx_bytes, "tx_bytes": c.tx_bytes, "rx_packets": c.rx_packets,
        "tx_packets": c.tx_packets, "link_payload_up": link_up, "link_payload_down": link_down,
        "dropped_up_packets": out_packets, "dropped_up_bytes": out_ip_bytes,
        "dropped_down_packets": in_packets, "dropped_down_bytes": in_ip_bytes,
        "retransmitted_down_bytes": resent,
        "payload_up": link_up,
        "payload_down": link_down - (in_ip_bytes - _IP_TCP_BYTES * in_packets),
    }


def recovery(action: str, targets: Sequence[str], since: float | None,
             collected: Collected | None) -> tuple[float | None, float | None]:
    """When the federation got over a fault (``action`` on ``targets``, ended at ``since``), and how
    long after the fault ended that was.

    A fault on devices is over once one of them has an update in a completed round again; a
    coordinator kill once a round completes after it. The clock starts when the fault ends
    (link up, agent or coordinator restarted, disk or memory freed), or fires if it never ends.
    """
    if collected is None or since is None:
        return None, None
    complete = [r for r in collected.attempts if r.state == "complete"]
    if action == "kill-coordinator":
        times = [r.closed_at for r in complete if r.closed_at is not None and r.closed_at > since]
    else:
        times = [float(str(u["received_at"])) for r in complete
                 for u in collected.updates[(r.round, r.attempt)]
                 if u["device_id"] in targets and float(str(u["received_at"])) > since]
    if not times:
        return None, None
    return min(times), round(min(times) - since, 3)


def rounds_and_devices(
    collected: Collected | None, names: Sequence[str]
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """The report's rounds (the last attempt of each, with how many there were) and, per device,
    rounds invited, completed and dropped (with why), training time and the rest of its time in
    the rounds it completed (download, upload, waiting)."""
    per: dict[str, dict[str, Any]] = {
        name: {"rounds_invited": 0, "rounds_completed": 0, "rounds_dropped": 0, "drop_reasons": {},
               "train_s": 0.0, "transfer_s": 0.0} for name in names}
    rounds: list[dict[str, Any]] = []
    if collected is None:
        return rounds, per
    by_round: dict[int, list[Any]] = {}
    for row in collected.attempts:
        by_round.setdefault(row.round, []).append(row)
        ups = {str(u["device_id"]): u for u in collected.updates[(row.round, row.attempt)]}
        for name in row.cohort:
            if name not in per:
                continue
            p = per[name]
            p["rounds_invited"] += 1
            if name in ups and row.state == "complete":
                p["rounds_completed"] += 1
                raw = ups[name]["metrics"]
                metrics = raw if isinstance(raw, dict) else json.loads(str(raw))
                train_s = float(metrics.get("train_s", 0.0))
                p["train_s"] += train_s
                p["transfer_s"] += max(0.0, float(str(ups[name]["received_at"])) - row.opened_at - train_s)
            else:
                p["rounds_dropped"] += 1
                reason = (f"attempt {row.state}" if row.state != "complete"
                          else "sent nothing before the deadline" if name not in ups else "update not used")
                p["drop_reasons"][reason] = p["drop_reasons"].get(reason, 0) + 1
    for r, rows in sorted(by_round.items()):
        last = rows[-1]
        m = last.metrics
        rounds.append({
            "round": r, "attempts": len(rows), "state": last.state, "participants": len(last.reported),
            "invited": len(last.cohort), "accuracy": m.get("accuracy"), "loss": m.get("loss"),
            "duration_s": None if last.closed_at is None else round(last.closed_at - last.opened_at, 3),
            "phases": {k[len("phase_"):-2]: v for k, v in m.items()
                       if k.startswith("phase_") and k.endswith("_s")},
            "bytes_up": m.get("bytes_up"), "bytes_down": m.get("bytes_down"),
            "attempt_states": [a.state for a in rows],
            "opened_unix": rows[0].opened_at, "closed_unix": last.closed_at,
        })
    for p in per.values():
        p["train_s"] = round(p["train_s"], 3)
        p["transfer_s"] = round(p["transfer_s"], 3)
    return rounds, per


def ratio(a: float, b: float) -> float | None:
    return None if b <= 0 else round(a / b, 4)
