"""Secure aggregation over the coordinator's HTTP routes: every phase, every refusal, dropouts.

The coordinator app runs in-process with a settable clock (so a phase's
deadline passes when a test says so); the cohort members are scripted: each
holds a real :class:`~fedge.secagg.protocol.SecAggClient` (real X25519,
AES-GCM, Shamir, AES-CTR masks) and speaks the ``/v1/rounds/{r}/secagg/``
routes by hand, so a test can make any of them drop out at any phase or
misbehave. The unmasked sum is compared bit for bit with the plaintext sum of
the survivors' quantized vectors.
"""

from __future__ import annotations

import base64
import struct
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from fedge.coordinator.app import create_app
from fedge.coordinator.config import CoordinatorConfig, load_coordinator_config
from fedge.coordinator.secagg import SecureRound, widen
from fedge.coordinator.service import Coordinator
from fedge.encoding.fixedpoint import FixedPoint, pack
from fedge.errors import ConfigError
from fedge.secagg.primitives import SecAggError
from fedge.secagg.protocol import AdvertiseKeys, RoundSetup, SecAggClient, UnmaskRequest
from fedge.wire import DEVICE_HEADER, REFUSALS, encode_masked, encode_update, secagg_setup_id


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def wait_until(cond: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError("condition not reached in time")


def secure_config(tmp_path: Path, **overrides: object) -> CoordinatorConfig:
    values: dict[str, object] = dict(
        task="logreg", num_features=4, num_classes=3, rounds=1, cohort_size=7, min_updates=5, min_devices=7,
        deadline_s=60.0, wait_s=0.2, data_dir=str(tmp_path / "store"), seed=0,
        secagg=True, secagg_k=6, secagg_threshold=4, secagg_advertise_s=10.0, secagg_share_s=10.0,
        secagg_unmask_s=10.0, secagg_poll_s=0.05,
    )
    values.update(overrides)
    return CoordinatorConfig(**values)  # type: ignore[arg-type]


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


class Member:
    """A scripted cohort member: a real SecAgg+ client and its quantized input."""

    def __init__(self, net: Net, name: str, plan: dict[str, Any], weight: int) -> None:
        self.net, self.name, self.plan = net, name, plan
        self.round, self.attempt = int(plan["round"]), int(plan["attempt"])
        sa = plan["secagg"]
        self.setup = RoundSetup(secagg_setup_id(self.round, self.attempt), tuple(sa["cohort"]), sa["k"],
                                sa["threshold"], base64.b64decode(sa["graph_seed"]), sa["vector_length"])
        self.grid = FixedPoint(clip=sa["clip"], bits=sa["bits"], max_weight=sa["max_weight"],
                               cohort_size=len(sa["cohort"]))
        self.wire_bits = int(sa["wire_bits"])
        rng = np.random.default_rng(sum(map(ord, name)))
        self.client = SecAggClient(self.setup, name, random_bytes=rng.bytes)
        self.values = rng.uniform(-0.5, 0.5, size=sa["vector_length"] - 1)
        self.quantized = self.grid.encode(self.values, weight, rng)  # what the plaintext sum adds up
        self.weight = weight
        self._made: dict[str, Any] = {}  # each message is made once: the client moves on when it is

    def post(self, step: str, body: dict[str, Any]) -> Any:
        return post_step(self.net, self.name, self.round, step, body)

    def get(self, step: str) -> Any:
        return get_step(self.net, self.name, self.round, step, self.attempt)

    def _once(self, what: str, make: Callable[[], Any]) -> Any:
        if what not in self._made:
            self._made[what] = make()
        return self._made[what]

    def head(self) -> dict[str, Any]:
        return {"protocol": 1, "round": self.round, "attempt": self.attempt}

    def keys_message(self) -> dict[str, Any]:
        def make() -> dict[str, Any]:
            mine = self.client.advertise_keys()
            return {**self.head(), "c_pk": b64(mine.c_pk), "s_pk": b64(mine.s_pk)}
        return self._once("keys", make)  # type: ignore[no-any-return]

    def advertise(self) -> None:
        ok(self.post("keys", self.keys_message()))

    def directory(self) -> dict[str, AdvertiseKeys]:
        reply = self.get("keys").json()
        assert reply["ready"], reply
        return {n: AdvertiseKeys(base64.b64decode(k["c_pk"]), base64.b64decode(k["s_pk"]))
                for n, k in reply["keys"].items()}

    def shares_message(self) -> dict[str, Any]:
        def make() -> dict[str, Any]:
            shares = self.client.share_keys(self.directory())
            return {**self.head(), "shares": {n: b64(ct) for n, ct in shares.ciphertexts.items()}}
        return self._once("shares", make)  # type: ignore[no-any-return]

    def share(self) -> None:
        ok(self.post("shares", self.shares_message()))

    def receive(self) -> None:
        def make() -> None:
            reply = self.get("shares").json()
            assert reply["ready"], reply
            self.client.receive_shares({n: base64.b64decode(ct) for n, ct in reply["shares"].items()})
        self._once("inbox", make)

    def masked_frame(self) -> bytes:
        def make() -> bytes:
            masked = self.client.masked_input(self.quantized.copy()).vector
            return encode_masked(pack(masked, self.wire_bits), round=self.round, attempt=self.attempt,
                                 length=int(masked.size), bits=self.wire_bits, train_s=0.25)
        return self._once("masked", make)  # type: ignore[no-any-return]

    def send_masked(self, frame: bytes) -> Any:
        return send_masked(self.net, self.name, self.round, frame)

    def upload(self) -> None:
        self.receive()
        ok(self.send_masked(self.masked_frame()))

    def request(self) -> UnmaskRequest:
        reply = self.get("unmask").json()
        assert reply["ready"], reply
        return UnmaskRequest(tuple(reply["survivors"]), tuple(reply["dropped"]))

    def unmask_message(self) -> dict[str, Any]:
        def make() -> dict[str, Any]:
            shares = self.client.unmask(self.request())
            return {**self.head(), "self_shares": {n: b64(s) for n, s in shares.self_shares.items()},
                    "key_shares": {n: b64(s) for n, s in shares.key_shares.items()}}
        return self._once("unmask", make)  # type: ignore[no-any-return]

    def unmask(self) -> None:
        ok(self.post("unmask", self.unmask_message()))


def post_step(net: Net, device: str, round_id: int, step: str, body: dict[str, Any]) -> Any:
    return net.client.post(f"/v1/rounds/{round_id}/secagg/{step}", json=body, headers={DEVICE_HEADER: device})


def get_step(net: Net, device: str, round_id: int, step: str, attempt: int | None) -> Any:
    params = {} if attempt is None else {"attempt": attempt}
    return net.client.get(f"/v1/rounds/{round_id}/secagg/{step}", params=params,
                          headers={DEVICE_HEADER: device})


def send_masked(net: Net, device: str, round_id: int, frame: bytes) -> Any:
    return net.client.post(f"/v1/rounds/{round_id}/secagg/masked", content=frame,
                           headers={DEVICE_HEADER: device, "content-type": "application/octet-stream"})


def ok(response: Any) -> None:
    assert response.status_code == 200, response.text


def refused(code: str, response: Any, device: str | None = None) -> None:
    assert response.status_code == REFUSALS[code], (code, response.status_code, response.text)
    body = response.json()
    assert body["error"] == code, body
    if device is not None:
        assert repr(device) in body["detail"], body  # the refusal names the device at fault


class Net:
    """The coordinator app, its clock, and the scripted cohort of one secure round."""

    def __init__(self, client: TestClient, coordinator: Coordinator, clock: Clock) -> None:
        self.client, self.coordinator, self.clock = client, coordinator, clock
        self.members: dict[str, Member] = {}
        self.secure: SecureRound | None = None

    def check_in(self, device: str, num_examples: int) -> dict[str, Any]:
        r = self.client.post("/v1/check-in", json={"protocol": 1, "num_examples": num_examples},
                             headers={DEVICE_HEADER: device})
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def join(self, n: int) -> dict[str, Member]:
        """``n`` devices check in until each is invited; the round's SecureRound is kept."""
        names = [f"d{i}" for i in range(n)]
        weights = {name: 10 * (i + 1) for i, name in enumerate(names)}
        plans: dict[str, dict[str, Any]] = {}
        for _ in range(500):
            for name in names:
                if name not in plans:
                    reply = self.check_in(name, weights[name])
                    if reply["action"] == "train":
                        plans[name] = reply["plan"]
            if len(plans) == n:
                break
            time.sleep(0.01)
        assert len(plans) == n, plans
        rnd = self.coordinator.open
        assert rnd is not None and rnd.secagg is not None
        self.secure = rnd.secagg
        self.members = {name: Member(self, name, plans[name], weights[name]) for name in names}
        return self.members

    def settle(self, phase: str, *, everyone: bool) -> None:
        """Let the ``phase`` close: at once if everyone answered, else at its deadline."""
        secure = self.secure
        assert secure is not None
        if not everyone and secure.phase == phase:
            self.clock.now = secure.next_deadline() + 0.01
        wait_until(lambda: secure.phase != phase)

    def finished(self) -> None:
        """Wait until the attempt has been closed (a retry may open at once after it)."""
        secure = self.secure
        assert secure is not None

        def ended() -> bool:
            rnd = self.coordinator.open
            return rnd is None or rnd.secagg is not secure
        wait_until(ended)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_net(tmp_path: Path, clock: Clock) -> Iterator[Callable[..., Net]]:
    opened: list[tuple[Coordinator, Any]] = []

    def make(**overrides: object) -> Net:
        coordinator = Coordinator(secure_config(tmp_path, **overrides), clock=clock)
        client = TestClient(create_app(coordinator))
        client.__enter__()
        opened.append((coordinator, client))
        return Net(client, coordinator, clock)

    yield make
    for coordinator, client in opened:
        client.__exit__(None, None, None)
        coordinator.close()


PHASES = ("advertise", "share", "upload", "unmask")
_ACT = {"advertise": Member.advertise, "share": Member.share, "upload": Member.upload,
        "unmask": Member.unmask}


def play(net: Net, n: int, drop: Mapping[str, int]) -> tuple[SecureRound, list[str]]:
    """One secure round in which ``drop[phase]`` of the devices still in it vanish before ``phase``.

    Honest devices that cannot go on (too few neighbours left) stop, as an agent does.
    Returns the round and the devices whose masked vectors went into the sum.
    """
    net.join(n)
    secure = net.secure
    assert secure is not None
    alive = sorted(net.members)
    uploaded: list[str] = []
    for phase in PHASES:
        if secure.over:
            break
        gone = set(alive[: drop.get(phase, 0)])
        went_on = []
        for name in alive:
            if name in gone:
                continue
            try:
                _ACT[phase](net.members[name])
            except SecAggError as e:
                assert e.reason == "below_threshold", e
                continue
            went_on.append(name)
        if phase == "upload":
            uploaded = list(went_on)
        net.settle(phase, everyone=went_on == alive)
        alive = went_on
    net.finished()
    return secure, uploaded


def plaintext_sum(members: list[Member]) -> np.ndarray:
    total = np.zeros_like(members[0].quantized)
    for m in members:
        np.add(total, m.quantized, out=total)  # mod 2^32: the two's complement of the true sum
    return total


# ------------------------------------------------------------------ dropouts


@pytest.mark.parametrize("phase", PHASES)
def test_dropouts_at_each_phase_up_to_the_threshold_recover_exactly_the_survivors_sum(
    make_net: Callable[..., Net], phase: str
) -> None:
    net = make_net()
    secure, uploaded = play(net, 7, {phase: 2})
    assert secure.total is not None and secure.abort_reason is None
    expected_survivors = 5 if phase != "unmask" else 7  # unmask dropouts' vectors are in the sum
    assert len(uploaded) == expected_survivors
    expected = plaintext_sum([net.members[d] for d in uploaded])
    np.testing.assert_array_equal(secure.total, expected)
    (row,) = net.coordinator.store.rounds()
    assert row.state == "complete" and sorted(row.reported) == uploaded
    assert row.metrics[f"secagg_dropped_{phase}"] == 2
    assert sum(row.metrics[f"secagg_dropped_{p}"] for p in PHASES) == 2
    assert row.metrics["secagg_survivors"] == len(uploaded)
    assert row.metrics["phase_unmask_s"] >= 0 and row.metrics["phase_keys_s"] >= 0
    # The decoded mean is the plaintext FedAvg mean of the survivors, within the grid's rounding.
    members = [net.members[d] for d in uploaded]
    weights = np.array([m.weight for m in members], dtype=np.float64)
    mean = sum(w * m.values for w, m in zip(weights, members, strict=True)) / weights.sum()
    grid = secure.grid
    decoded, weight = grid.decode(secure.total)
    assert weight == weights.sum()
    # Each device's rounding moves the mean by less than step * max_weight / W: n of them, W >= n.
    assert np.max(np.abs(decoded - mean)) <= grid.step * grid.max_weight
    assert net.coordinator.state.round == 1


def test_dropouts_at_every_phase_together(make_net: Callable[..., Net]) -> None:
    # Ten devices, complete graph (k 9), threshold 5, at least 6 updates: one lost in each phase.
    net = make_net(cohort_size=10, min_devices=10, min_updates=6, secagg_k=9, secagg_threshold=5)
    secure, uploaded = play(net, 10, dict.fromkeys(PHASES, 1))
    assert secure.total is not None
    assert len(uploaded) == 7
    np.testing.assert_array_equal(secure.total, plaintext_sum([net.members[d] for d in uploaded]))
    (row,) = net.coordinator.store.rounds()
    assert [row.metrics[f"secagg_dropped_{p}"] for p in PHASES] == [1, 1, 1, 1]
    assert len(row.dropped) == 3  # the unmask dropout's vector is in the sum: it reported


@pytest.mark.parametrize(("phase", "aborted_in"), [
    ("advertise", "share"),  # 4 keys: every device then has 3 neighbours, below the threshold of 4
    ("share", "upload"),  # 4 sharers: each receives 3 shares and cannot mask
    ("upload", "upload"),  # 4 masked vectors, the round needs 5
    ("unmask", "unmask"),  # 2 answers: no secret can be rebuilt
])
def test_below_the_threshold_the_attempt_is_abandoned_and_nothing_is_revealed(
    make_net: Callable[..., Net], phase: str, aborted_in: str
) -> None:
    net = make_net()
    drop = 3 if phase != "unmask" else 5
    secure, _ = play(net, 7, {phase: drop})
    assert secure.total is None and secure.aborted_in == aborted_in
    (row,) = net.coordinator.store.rounds()
    assert row.state == "abandoned" and row.metrics[f"secagg_aborted_{aborted_in}"] == 1
    assert net.coordinator.state.round == 0  # the model is kept
    if phase != "unmask":  # abandoned before any unmask request existed: none was ever sent
        assert not secure.answered
    metrics = net.client.get("/metrics/").text
    assert f'fedge_secagg_aborted_rounds_total{{phase="{aborted_in}"}} 1.0' in metrics
    # The round is retried with a fresh cohort, as a plaintext round is.
    for i in range(7):
        net.check_in(f"d{i}", 10)
    wait_until(lambda: net.coordinator.open is not None)
    retry = net.coordinator.open
    assert retry is not None and retry.attempt == 2 and retry.secagg is not None
    assert retry.secagg.setup.graph_seed != secure.setup.graph_seed
    assert retry.secagg.setup.round_id != secure.setup.round_id


def test_the_unmask_request_names_no_device_both_survivor_and_dropped(make_net: Callable[..., Net]) -> None:
    net = make_net()
    members = net.join(7)
    for m in members.values():
        m.advertise()
    net.settle("advertise", everyone=True)
    for m in members.values():
        m.share()
    net.settle("share", everyone=True)
    for name in ("d0", "d1", "d2", "d3", "d4"):
        members[name].upload()
    net.settle("upload", everyone=False)  # d5 and d6 shared keys and never uploaded
    for name in ("d0", "d1", "d2", "d3", "d4"):
        request = members[name].request()
        assert set(request.survivors) == {"d0", "d1", "d2", "d3", "d4"}
        assert set(request.dropped) == {"d5", "d6"}
        assert not set(request.survivors) & set(request.dropped)
    # The dropped devices are not asked: they did not upload.
    refused("out_of_phase", members["d5"].get("unmask"), "d5")
    for name in ("d0", "d1", "d2", "d3", "d4"):
        members[name].unmask()
    net.finished()
    assert net.secure is not None and net.secure.total is not None


# ------------------------------------------------------------------ refusals


def test_every_refusal_names_the_device_and_the_round_goes_on(make_net: Callable[..., Net]) -> None:
    net = make_net()
    members = net.join(7)
    a, b = members["d0"], members["d1"]
    # A device outside the cohort, at every route.
    net.check_in("stranger", 10)
    fake = {**a.head(), "c_pk": b64(b"c" * 32), "s_pk": b64(b"s" * 32)}
    refused("not_invited", post_step(net, "stranger", a.round, "keys", fake))
    for step in ("keys", "shares", "unmask"):
        refused("not_invited", get_step(net, "stranger", a.round, step, a.attempt))
    refused("not_invited", post_step(net, "stranger", a.round, "unmask",
                                     {**a.head(), "self_shares": {}, "key_shares": {}}))
    refused("not_invited", send_masked(net, "stranger", a.round, b"x"))
    # Out of phase: shares, a masked vector and unmask shares while keys are being advertised.
    refused("out_of_phase", b.post("shares", {**b.head(), "shares": {"d2": b64(bytes(196))}}), "d1")
    refused("out_of_phase", b.send_masked(encode_masked(bytes(8), round=b.round, attempt=b.attempt,
                                                        length=2, bits=32, train_s=0.0)))
    refused("out_of_phase", b.post("unmask", {**b.head(), "self_shares": {}, "key_shares": {}}), "d1")
    # Malformed keys: not base64, the wrong size, the same key twice; another round in the body.
    refused("bad_request", b.post("keys", {**b.head(), "c_pk": "!!", "s_pk": b64(bytes(32))}))
    refused("bad_request", b.post("keys", {**b.head(), "c_pk": b64(bytes(31)), "s_pk": b64(bytes(32))}))
    refused("malformed", b.post("keys", {**b.head(), "c_pk": b64(b"k" * 32), "s_pk": b64(b"k" * 32)}), "d1")
    refused("bad_request", b.post("keys", {**b.keys_message(), "round": 9}))
    refused("closed", b.post("keys", {**b.keys_message(), "attempt": 5}))
    refused("bad_request", get_step(net, "d1", b.round, "keys", None))  # which attempt?
    refused("closed", get_step(net, "d1", b.round, "keys", b.attempt + 1))
    # Before the phase closed, a result is "not ready yet", never an error.
    pending = a.get("keys").json()
    assert pending["ready"] is False and pending["retry_s"] > 0 and pending["keys"] == {}
    everyone = list(members.values())
    for m in everyone[:-1]:
        m.advertise()
    refused("duplicate", a.post("keys", a.keys_message()), "d0")  # the phase is still open
    everyone[-1].advertise()
    net.settle("advertise", everyone=True)
    refused("out_of_phase", a.post("keys", a.keys_message()), "d0")  # phase 0 is over
    # Sharing: twice, to a non-existent device, too few shares, a ciphertext of the wrong size.
    good = a.shares_message()
    few = {**good, "shares": dict(list(good["shares"].items())[:2])}
    refused("malformed", a.post("shares", few), "d0")
    bad_size = {**good, "shares": {n: b64(bytes(20)) for n in good["shares"]}}
    refused("malformed", a.post("shares", bad_size), "d0")
    stranger = {**good, "shares": {**good["shares"], "nobody": next(iter(good["shares"].values()))}}
    refused("not_neighbour", a.post("shares", stranger), "d0")
    ok(a.post("shares", good))
    refused("duplicate", a.post("shares", good), "d0")
    for m in everyone[1:]:
        m.share()
    net.settle("share", everyone=True)
    # Masked vectors: the wrong length, width or size, not a frame, a plaintext update, twice.
    a.receive()
    frame = a.masked_frame()
    length, bits = a.setup.vector_length, a.wire_bits
    header = struct.Struct(">3sBIIIBd")
    refused("wrong_length", a.send_masked(header.pack(b"FSM", 1, a.round, a.attempt, length - 1, bits, 0.0)
                                          + frame[header.size:]))
    refused("wrong_length", a.send_masked(header.pack(b"FSM", 1, a.round, a.attempt, length, bits - 1, 0.0)
                                          + frame[header.size:]))
    refused("wrong_length", a.send_masked(frame[:-1]))
    refused("bad_payload", a.send_masked(b"PK" + frame[2:]))
    refused("bad_version", a.send_masked(frame[:3] + b"\x07" + frame[4:]))
    refused("non_finite", a.send_masked(frame[:header.size - 8] + struct.pack(">d", float("nan"))
                                        + frame[header.size:]))
    plain = encode_update({"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}, round=a.round,
                          attempt=a.attempt, num_examples=10)
    refused("out_of_phase", net.client.post(f"/v1/rounds/{a.round}/update", content=plain,
                                            headers={DEVICE_HEADER: "d0"}))
    ok(a.send_masked(frame))
    refused("duplicate", a.send_masked(frame), "d0")
    for m in everyone[1:]:
        m.upload()
    net.settle("upload", everyone=True)
    # Unmask shares: a share the request did not ask for (a key share of a survivor), twice.
    good_unmask = a.unmask_message()
    some = next(iter(good_unmask["self_shares"]))
    unrequested = {**good_unmask, "key_shares": {some: good_unmask["self_shares"][some]}}
    refused("malformed", a.post("unmask", unrequested), "d0")
    ok(a.post("unmask", good_unmask))
    refused("duplicate", a.post("unmask", good_unmask), "d0")
    for m in everyone[1:]:
        m.unmask()
    net.finished()
    secure = net.secure
    assert secure is not None and secure.total is not None
    np.testing.assert_array_equal(secure.total, plaintext_sum(list(members.values())))
    counts = net.coordinator.status()["refusals"]
    assert counts["out_of_phase"] >= 4 and counts["not_neighbour"] == 1 and counts["wrong_length"] == 3


def test_shares_for_a_device_that_is_no_neighbour_are_refused(make_net: Callable[..., Net]) -> None:
    # k 4 of 6 possible neighbours: each device has two non-neighbours.
    net = make_net(secagg_k=4, secagg_threshold=3)
    members = net.join(7)
    for m in members.values():
        m.advertise()
    net.settle("advertise", everyone=True)
    a = members["d0"]
    neighbours = {a.setup.cohort[v - 1] for v in a.setup.neighbours()[a.setup.cohort.index("d0")]}
    outside = sorted(set(members) - neighbours - {"d0"})
    assert len(outside) == 2
    good = a.shares_message()
    assert set(good["shares"]) == neighbours
    # A real ciphertext, re-addressed to a device that is not a neighbour.
    victim = next(iter(good["shares"]))
    readdressed = {**good, "shares": {**{k: v for k, v in good["shares"].items() if k != victim},
                                      outside[0]: good["shares"][victim]}}
    refused("not_neighbour", a.post("shares", readdressed), "d0")
    ok(a.post("shares", good))


def test_unmask_shares_of_a_dropped_device_are_asked_for_and_a_self_share_of_it_refused(
    make_net: Callable[..., Net]
) -> None:
    net = make_net()
    secure_members = net.join(7)
    for m in secure_members.values():
        m.advertise()
    net.settle("advertise", everyone=True)
    for m in secure_members.values():
        m.share()
    net.settle("share", everyone=True)
    for name in ("d0", "d1", "d2", "d3", "d4", "d5"):
        secure_members[name].upload()
    net.settle("upload", everyone=False)
    a = secure_members["d0"]
    message = a.unmask_message()
    assert set(message["key_shares"]) == {"d6"}  # the dropped device's mask key, not its self-mask
    tampered = {**message, "self_shares": {**message["self_shares"], "d6": message["key_shares"]["d6"]}}
    refused("malformed", a.post("unmask", tampered), "d0")
    ok(a.post("unmask", message))
    for name in ("d1", "d2", "d3", "d4", "d5"):
        secure_members[name].unmask()
    net.finished()
    assert net.secure is not None and net.secure.total is not None
    survivors = [secure_members[f"d{i}"] for i in range(6)]
    np.testing.assert_array_equal(net.secure.total, plaintext_sum(survivors))


def test_a_late_masked_vector_is_refused(make_net: Callable[..., Net]) -> None:
    net = make_net()
    members = net.join(7)
    for m in members.values():
        m.advertise()
    net.settle("advertise", everyone=True)
    for m in members.values():
        m.share()
    net.settle("share", everyone=True)
    late = members["d6"]
    late.receive()
    frame = late.masked_frame()
    for name in ("d0", "d1", "d2", "d3", "d4", "d5"):
        members[name].upload()
    assert net.secure is not None
    net.clock.now = net.secure.next_deadline() + 0.5  # past the upload deadline, before the driver closes it
    response = late.send_masked(frame)
    assert response.status_code in (REFUSALS["late"], REFUSALS["out_of_phase"]), response.text
    assert response.json()["error"] in ("late", "out_of_phase")
    wait_until(lambda: net.secure is not None and net.secure.phase != "upload")


# ------------------------------------------------------------------ restart


def test_a_restarted_coordinator_restarts_the_secure_round_with_fresh_keys(
    tmp_path: Path, clock: Clock
) -> None:
    config = secure_config(tmp_path)
    coordinator = Coordinator(config, clock=clock)
    with TestClient(create_app(coordinator)) as client:
        net = Net(client, coordinator, clock)
        members = net.join(7)
        for m in members.values():
            m.advertise()
        net.settle("advertise", everyone=True)
        first = net.secure
        assert first is not None
    coordinator.close()  # as a crash would leave it: the attempt open in the store
    coordinator = Coordinator(config, clock=clock)
    with TestClient(create_app(coordinator)) as client:
        net = Net(client, coordinator, clock)
        old = members["d0"]
        stale = {**old.head(), "c_pk": b64(b"c" * 32), "s_pk": b64(b"s" * 32)}
        # The interrupted attempt is gone: its messages are refused.
        refused("unknown_round", post_step(net, "d0", 1, "keys", stale))
        members = net.join(7)
        second = net.secure
        assert second is not None
        assert second.attempt == 2 and second.setup.graph_seed != first.setup.graph_seed
        assert second.setup.round_id != first.setup.round_id
        refused("closed", post_step(net, "d0", 1, "keys", stale))
        for m in members.values():
            m.advertise()
        net.settle("advertise", everyone=True)
        for m in members.values():
            m.share()
        net.settle("share", everyone=True)
        for m in members.values():
            m.upload()
        net.settle("upload", everyone=True)
        for m in members.values():
            m.unmask()
        net.finished()
        assert second.total is not None
    rows = coordinator.store.rounds()
    assert [(r.round, r.attempt, r.state) for r in rows] == [(1, 1, "interrupted"), (1, 2, "complete")]
    coordinator.close()


# ------------------------------------------------------------------ configuration


def test_the_secagg_table_loads_and_its_defaults_follow_the_cohort(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.toml"
    path.write_text("[task]\nnum_features = 4\nnum_classes = 3\n[rounds]\ncohort_size = 8\nmin_updates = 6\n"
                    "deadline_s = 60\n[secagg]\nenabled = true\nbits = 16\nadvertise_s = 5\npoll_s = 0.5\n")
    cfg = load_coordinator_config(path)
    assert cfg.secagg and cfg.secagg_bits == 16 and cfg.secagg_poll_value == 0.5
    assert cfg.secagg_phases_s == (5.0, 10.0, 10.0)
    assert cfg.secagg_clip_value == 1.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"strategy": "median"}, "cannot be combined with secure aggregation"),
        ({"strategy": "krum", "strategy_options": {"f": 1}}, "cannot be combined with secure aggregation"),
        ({"compress": "topk:0.1"}, "per-device top-k"),
        ({"compress": "q8"}, "per-device quantization scales"),
        ({"compress": "q8", "compress_range": 0.5}, "shared fixed-point grid"),
        ({"compress": "fp16"}, "shared fixed-point grid"),
        ({"dp": "central", "clip_norm": "adaptive", "noise_multiplier": 1.0}, "adaptive"),
        ({"dp": "distributed", "clip_norm": "adaptive", "noise_multiplier": 1.0}, "adaptive"),
        ({"min_updates": 2}, "at least 3 updates"),
        ({"cohort_size": 2, "min_updates": 2, "min_devices": 2}, "at least 3 updates"),
        ({"secagg_bits": 32}, "could wrap around 2\\^32"),
        ({"secagg_max_weight": 2**30}, "wrap the weight sum"),
        ({"secagg_k": 5}, "even number"),
        ({"secagg_threshold": 1}, "threshold must be >= 2"),
        ({"secagg_threshold": 3}, r"must be in 4\.\.6"),
        ({"secagg_k": 2, "secagg_threshold": 5}, r"must be in 2\.\.2"),
        ({"secagg_clip": -1.0}, "clip must be a positive"),
        ({"secagg_dropout_rate": 1.5}, r"dropout_rate must be in \[0, 1\)"),
        ({"secagg_advertise_s": 40.0, "secagg_share_s": 30.0}, "must end before the upload deadline"),
        ({"secagg_poll_s": 0.0}, "poll_s must be a positive"),
        ({"secagg": False}, "need secagg.enabled = true"),
    ],
)
def test_federation_settings_that_cannot_work_with_secagg_are_refused_at_load(
    tmp_path: Path, overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        secure_config(tmp_path, **overrides)


def test_widen_sign_extends_values_and_keeps_the_weight() -> None:
    rng = np.random.default_rng(3)
    for bits in (20, 26, 31, 32):
        true = rng.integers(-(2 ** (bits - 2)), 2 ** (bits - 2), size=50).astype(np.int32)
        weight = np.uint32(2 ** (bits - 1) + 5 if bits < 32 else 7)
        exact = np.append(true.view(np.uint32), weight)
        # What the coordinator holds: the right value mod 2^bits, anything above.
        noise = rng.integers(0, 2**32, size=51, dtype=np.uint64).astype(np.uint32)
        held = exact if bits == 32 else (exact & np.uint32((1 << bits) - 1)) | (
            noise & ~np.uint32((1 << bits) - 1))
        np.testing.assert_array_equal(widen(held, bits), exact)


def test_a_long_poll_answers_as_soon_as_the_phase_closes(make_net: Callable[..., Net]) -> None:
    import threading

    net = make_net()
    members = net.join(7)
    everyone = list(members.values())
    for m in everyone[:-1]:
        m.advertise()
    got: list[tuple[float, dict[str, Any]]] = []

    def wait() -> None:
        t0 = time.monotonic()
        r = net.client.get("/v1/rounds/1/secagg/keys", params={"attempt": 1, "wait_s": 8},
                           headers={DEVICE_HEADER: "d0"})
        got.append((time.monotonic() - t0, r.json()))

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.3)
    assert not got  # held open: the phase has not closed
    everyone[-1].advertise()
    waiter.join(timeout=10)
    (took, reply), = got
    assert reply["ready"] and set(reply["keys"]) == set(members) and took < 5
    # Held at most wait_s, and only for a result that is not ready.
    t0 = time.monotonic()
    pending = net.client.get("/v1/rounds/1/secagg/shares", params={"attempt": 1, "wait_s": 0.3},
                             headers={DEVICE_HEADER: "d0"}).json()
    assert pending["ready"] is False and 0.25 < time.monotonic() - t0 < 5
    for bad in ("-1", "nan", "inf", "soon"):
        refused("bad_request", net.client.get("/v1/rounds/1/secagg/shares",
                                              params={"attempt": 1, "wait_s": bad},
                                              headers={DEVICE_HEADER: "d0"}))


def test_a_vector_off_the_grid_makes_the_attempt_abandoned_never_a_wrong_model(
    make_net: Callable[..., Net]
) -> None:
    net = make_net()
    members = net.join(7)
    cheat = members["d3"]
    cheat.quantized = cheat.quantized.copy()
    cheat.quantized[-1] = np.uint32(10**6)  # a weight no device may claim (max_weight is 70)
    for phase in PHASES:
        for m in members.values():
            _ACT[phase](m)
        net.settle(phase, everyone=True)
    net.finished()
    assert net.secure is not None and net.secure.total is None
    assert net.secure.aborted_in == "unmask" and "total weight" in (net.secure.abort_reason or "")
    row = net.coordinator.store.round_row(1, 1)
    assert row is not None and row.state == "abandoned" and net.coordinator.state.round == 0


def test_the_secure_demo_needs_three_agents(tmp_path: Path) -> None:
    from fedge.demo import run_demo

    with pytest.raises(ConfigError, match="at least 3 agents"):
        run_demo(agents=2, rounds=1, out_dir=tmp_path / "demo", secagg=True)
    assert not (tmp_path / "demo").exists()  # refused before anything was written
