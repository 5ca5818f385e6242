"""SecAgg+ state machines: exact sums under dropouts, aborts, and refusals naming the device."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge.errors import ConfigError
from fedge.secagg.primitives import SecAggError
from fedge.secagg.protocol import (
    AdvertiseKeys,
    MaskedInput,
    RoundSetup,
    SecAggClient,
    SecAggServer,
    ShareKeys,
    UnmaskRequest,
    UnmaskShares,
    apply_masks,
    default_parameters,
    neighbour_graph,
)

L = 50


def _setup(n: int, k: int, t: int, *, round_id: int = 1, length: int = L) -> RoundSetup:
    return RoundSetup(round_id, tuple(f"d{i}" for i in range(n)), k, t, bytes(range(32)), length)


def _clients(setup: RoundSetup, seed: int = 0) -> dict[str, SecAggClient]:
    rng = np.random.default_rng(seed)
    return {d: SecAggClient(setup, d, random_bytes=rng.bytes) for d in setup.cohort}


def _inputs(setup: RoundSetup, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {d: rng.integers(0, 2**32, setup.vector_length, dtype=np.uint32) for d in setup.cohort}


def _round(
    setup: RoundSetup,
    *,
    drop: tuple[set[str], set[str], set[str], set[str]] = (set(), set(), set(), set()),
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Run a round; drop[i] leave before phase i. Returns (unmasked sum, plaintext sum)."""
    clients, inputs = _clients(setup, seed), _inputs(setup, seed + 1)
    server = SecAggServer(setup)
    alive = set(setup.cohort) - drop[0]
    for d in sorted(alive):
        server.receive_keys(d, clients[d].advertise_keys())
    directory = server.close_keys()
    alive -= drop[1]
    for d in sorted(alive):
        server.receive_shares(d, clients[d].share_keys(directory))
    inbox = server.close_shares()
    alive -= drop[2]
    uploaded = set()
    for d in sorted(alive):
        clients[d].receive_shares(inbox[d])
        server.receive_masked(d, clients[d].masked_input(inputs[d].copy()))
        uploaded.add(d)
    request = server.close_masked()
    alive -= drop[3]
    for d in sorted(alive):
        server.receive_unmask(d, clients[d].unmask(request))
    expected = np.zeros(setup.vector_length, dtype=np.uint32)
    for d in uploaded:
        expected += inputs[d]
    return server.unmask(), expected


@pytest.mark.parametrize("n,k,t", [(3, 2, 2), (8, 4, 3), (12, 6, 4), (20, 8, 5), (9, 8, 5)])
def test_no_dropouts_sum_is_exact(n: int, k: int, t: int) -> None:
    got, want = _round(_setup(n, k, t))
    assert np.array_equal(got, want)


@pytest.mark.parametrize("phase", [0, 1, 2, 3])
def test_dropouts_at_each_phase_recover_survivors_sum(phase: int) -> None:
    setup = _setup(16, 8, 5)
    drops: list[set[str]] = [set(), set(), set(), set()]
    drops[phase] = {"d1", "d6", "d11"}
    got, want = _round(setup, drop=(drops[0], drops[1], drops[2], drops[3]))
    assert np.array_equal(got, want)


def test_dropouts_at_every_phase_together() -> None:
    setup = _setup(30, 20, 11)  # 7 of 30 drop: every device keeps >= 13 of 20 neighbours
    got, want = _round(setup, drop=({"d0"}, {"d5", "d9"}, {"d13", "d20"}, {"d25", "d3"}))
    assert np.array_equal(got, want)


def test_masked_inputs_hide_the_input() -> None:
    setup = _setup(5, 4, 3)
    clients, inputs = _clients(setup), _inputs(setup)
    server = SecAggServer(setup)
    for d in setup.cohort:
        server.receive_keys(d, clients[d].advertise_keys())
    directory = server.close_keys()
    for d in setup.cohort:
        server.receive_shares(d, clients[d].share_keys(directory))
    inbox = server.close_shares()
    clients["d0"].receive_shares(inbox["d0"])
    y = clients["d0"].masked_input(inputs["d0"].copy()).vector
    assert np.mean(y == inputs["d0"]) < 0.1


@settings(max_examples=25, deadline=None)
@given(n=st.integers(3, 14), seed=st.integers(0, 2**16), data=st.data())
def test_masks_cancel_property(n: int, seed: int, data: st.DataObject) -> None:
    k = n - 1 if n < 6 else data.draw(st.sampled_from([2, 4])) if n < 8 else 6
    degree = min(k, n - 1)
    t = data.draw(st.integers(degree // 2 + 1, degree))
    got, want = _round(_setup(n, k, t, length=7), seed=seed)
    assert np.array_equal(got, want)


def test_below_threshold_aborts_and_reveals_nothing() -> None:
    setup = _setup(6, 5, 4)
    with pytest.raises(SecAggError, match="below_threshold"):
        _round(setup, drop=(set(), set(), {"d0", "d1", "d2"}, set()))
    with pytest.raises(SecAggError, match="below_threshold"):
        _round(setup, drop=({"d0", "d1", "d2"}, set(), set(), set()))
    with pytest.raises(SecAggError, match="below_threshold"):
        _round(setup, drop=(set(), set(), set(), {"d0", "d1", "d2"}))


def test_unmask_fails_when_a_dropped_device_has_too_few_share_holders() -> None:
    # Graph 8/4, t=3: drop d-x after upload (its b must be rebuilt) and most of its neighbours.
    setup = _setup(10, 4, 3)
    nbrs = setup.neighbours()[0]
    quiet = {setup.cohort[v - 1] for v in nbrs[:2]}
    with pytest.raises(SecAggError, match="cannot be rebuilt") as e:
        _round(setup, drop=(set(), set(), set(), quiet | {"d0"}))
    assert e.value.device is not None


def test_client_refuses_to_reveal_both_shares_of_a_device() -> None:
    setup = _setup(5, 4, 3)
    clients = _clients(setup)
    server = SecAggServer(setup)
    for d in setup.cohort:
        server.receive_keys(d, clients[d].advertise_keys())
    directory = server.close_keys()
    for d in setup.cohort:
        server.receive_shares(d, clients[d].share_keys(directory))
    inbox = server.close_shares()
    for d in setup.cohort:
        clients[d].receive_shares(inbox[d])
        clients[d].mark_uploaded()
    evil = UnmaskRequest(survivors=setup.cohort, dropped=("d2",))
    with pytest.raises(SecAggError, match="both") as e:
        clients["d0"].unmask(evil)
    assert e.value.device == "d2"
    honest = clients["d1"].unmask(UnmaskRequest(survivors=setup.cohort[:4], dropped=("d4",)))
    assert not set(honest.self_shares) & set(honest.key_shares)


def _to_phase(setup: RoundSetup, phase: int) -> tuple[SecAggServer, dict[str, SecAggClient], dict]:
    clients = _clients(setup)
    server = SecAggServer(setup)
    ctx: dict = {}
    if phase >= 1:
        for d in setup.cohort:
            server.receive_keys(d, clients[d].advertise_keys())
        ctx["directory"] = server.close_keys()
    if phase >= 2:
        for d in setup.cohort:
            server.receive_shares(d, clients[d].share_keys(ctx["directory"]))
        ctx["inbox"] = server.close_shares()
    return server, clients, ctx


def test_server_refusals_name_the_device() -> None:
    setup = _setup(5, 4, 3)
    server, clients, _ = _to_phase(setup, 0)
    keys = clients["d0"].advertise_keys()
    server.receive_keys("d0", keys)
    with pytest.raises(SecAggError, match="twice") as e:
        server.receive_keys("d0", keys)
    assert e.value.device == "d0"
    with pytest.raises(SecAggError, match="not_invited") as e:
        server.receive_keys("mallory", keys)
    assert e.value.device == "mallory"
    for bad in (AdvertiseKeys(b"x", keys.s_pk), AdvertiseKeys(keys.c_pk, keys.c_pk),
                AdvertiseKeys("s" * 32, keys.s_pk), "junk"):  # type: ignore[arg-type]
        with pytest.raises(SecAggError, match="malformed") as e:
            server.receive_keys("d1", bad)  # type: ignore[arg-type]
        assert e.value.device == "d1"
    with pytest.raises(SecAggError, match="out_of_phase") as e:
        server.receive_shares("d0", ShareKeys({}))
    assert e.value.device == "d0"
    with pytest.raises(SecAggError, match="out_of_phase"):
        server.unmask()


def test_server_refuses_bad_shares_and_uploads() -> None:
    setup = _setup(5, 4, 3)
    server, clients, ctx = _to_phase(setup, 1)
    good = clients["d0"].share_keys(ctx["directory"])
    with pytest.raises(SecAggError, match="malformed") as e:
        server.receive_shares("d0", ShareKeys({k: b"short" for k in good.ciphertexts}))
    assert e.value.device == "d0"
    with pytest.raises(SecAggError, match="not_neighbour"):
        server.receive_shares("d0", ShareKeys({"d0": next(iter(good.ciphertexts.values()))}))
    with pytest.raises(SecAggError, match="fewer than the threshold"):
        server.receive_shares("d0", ShareKeys(dict(list(good.ciphertexts.items())[:1])))
    server.receive_shares("d0", good)
    with pytest.raises(SecAggError, match="twice"):
        server.receive_shares("d0", good)
    for d in setup.cohort[1:]:
        server.receive_shares(d, clients[d].share_keys(ctx["directory"]))
    inbox = server.close_shares()
    clients["d1"].receive_shares(inbox["d1"])
    with pytest.raises(SecAggError, match="wrong_length") as e:
        server.receive_masked("d1", MaskedInput(np.zeros(L + 1, dtype=np.uint32)))
    assert e.value.device == "d1"
    with pytest.raises(SecAggError, match="wrong_length"):
        server.receive_masked("d1", MaskedInput(np.zeros(L, dtype=np.int64)))
    masked = clients["d1"].masked_input(np.zeros(L, dtype=np.uint32))
    server.receive_masked("d1", masked)
    with pytest.raises(SecAggError, match="twice") as e:
        server.receive_masked("d1", masked)
    assert e.value.device == "d1"
    with pytest.raises(SecAggError, match="out_of_phase") as e:
        server.receive_unmask("d1", UnmaskShares({}, {}))


def test_server_refuses_unrequested_unmask_shares() -> None:
    setup = _setup(5, 4, 3)
    server, clients, ctx = _to_phase(setup, 2)
    for d in setup.cohort[:4]:
        clients[d].receive_shares(ctx["inbox"][d])
        server.receive_masked(d, clients[d].masked_input(np.zeros(L, dtype=np.uint32)))
    request = server.close_masked()
    assert request.dropped == ("d4",)
    resp = clients["d0"].unmask(request)
    # The key share of a survivor is never accepted (it would unmask that survivor).
    evil = UnmaskShares(resp.self_shares, {"d1": next(iter(resp.self_shares.values()))})
    with pytest.raises(SecAggError, match="unrequested") as e:
        server.receive_unmask("d0", evil)
    assert e.value.device == "d0"
    with pytest.raises(SecAggError, match="wrong size"):
        server.receive_unmask("d0", UnmaskShares({"d1": b"x"}, {}))
    server.receive_unmask("d0", resp)
    with pytest.raises(SecAggError, match="twice"):
        server.receive_unmask("d0", resp)


def test_client_refusals() -> None:
    setup = _setup(5, 4, 3)
    _server, clients, ctx = _to_phase(setup, 2)
    c = clients["d0"]
    with pytest.raises(SecAggError, match="out_of_phase") as e:
        c.advertise_keys()
    assert e.value.device == "d0"
    with pytest.raises(SecAggError, match="out_of_phase"):
        c.unmask(UnmaskRequest(setup.cohort, ()))
    inbox = dict(ctx["inbox"]["d0"])
    sender = next(iter(inbox))
    tampered = dict(inbox)
    tampered[sender] = inbox[sender][:-1] + bytes([inbox[sender][-1] ^ 1])
    with pytest.raises(SecAggError, match="authentication") as e:
        c.receive_shares(tampered)
    assert e.value.device == sender
    # A share another device received, replayed as if for d0, fails authentication too.
    other = next(d for d in ctx["inbox"] if d != "d0" and sender in ctx["inbox"][d])
    with pytest.raises(SecAggError, match="authentication"):
        c.receive_shares({**inbox, sender: ctx["inbox"][other][sender]})
    with pytest.raises(SecAggError, match="not_neighbour"):
        c.receive_shares({**inbox, "d0": inbox[sender]})
    with pytest.raises(SecAggError, match="below_threshold"):
        c.receive_shares(dict(list(inbox.items())[:2]))
    material = c.receive_shares(inbox)
    with pytest.raises(SecAggError, match="wrong_length"):
        c.masked_input(np.zeros(L - 1, dtype=np.uint32))
    with pytest.raises(SecAggError, match="wrong_length"):
        apply_masks(material, np.zeros(L, dtype=np.float32))
    with pytest.raises(SecAggError, match="not_invited"):
        SecAggClient(setup, "mallory", random_bytes=np.random.default_rng(0).bytes)


def test_client_refuses_a_directory_that_alters_its_keys() -> None:
    setup = _setup(5, 4, 3)
    _server, clients, ctx = _to_phase(setup, 1)
    directory = dict(ctx["directory"])
    directory["d0"] = directory["d1"]
    with pytest.raises(SecAggError, match="alters") as e:
        clients["d0"].share_keys(directory)
    assert e.value.device == "d0"
    small = {d: ctx["directory"][d] for d in ("d0", "d1")}
    with pytest.raises(SecAggError, match="below_threshold"):
        clients["d0"].share_keys(small)


def test_setup_and_parameter_refusals() -> None:
    with pytest.raises(ConfigError, match="at least 3"):
        _setup(2, 1, 1)
    with pytest.raises(ConfigError, match="threshold"):
        _setup(10, 4, 2)
    with pytest.raises(ConfigError, match="threshold"):
        _setup(10, 4, 5)
    with pytest.raises(ConfigError, match="k must"):
        _setup(10, 12, 7)
    with pytest.raises(ConfigError, match="even"):
        _setup(10, 5, 3)
    with pytest.raises(ConfigError, match="graph_seed"):
        dataclasses.replace(_setup(5, 4, 3), graph_seed=b"x")
    with pytest.raises(ConfigError, match="even"):
        neighbour_graph(10, 3, bytes(32))
    with pytest.raises(ConfigError, match="at least 3"):
        default_parameters(2)
    with pytest.raises(ConfigError, match="dropout_rate"):
        default_parameters(100, dropout_rate=1.0)


def test_neighbour_graph_is_k_regular_and_symmetric() -> None:
    g = neighbour_graph(50, 8, bytes(range(32)))
    assert all(len(nb) == 8 for nb in g)
    assert all(i + 1 in g[j - 1] for i, nb in enumerate(g) for j in nb)
    assert neighbour_graph(50, 8, bytes(32)) != g


@pytest.mark.parametrize("n", [10, 100, 1000, 10000])
def test_default_parameters_meet_the_conditions(n: int) -> None:
    k, t = default_parameters(n)
    assert k % 2 == 0 or k == n - 1
    assert min(k, n - 1) // 2 < t <= min(k, n - 1)
    if n >= 100:
        assert k < n - 1  # SecAgg+ is sparser than the complete graph
        assert n * 0.1 ** (k // 2) <= 2.0**-40


def test_min_survivors_above_the_threshold_is_enforced_by_server_and_clients() -> None:
    """Distributed DP's minimum: fewer uploads than min_survivors are never unmasked."""
    setup = dataclasses.replace(_setup(10, 8, 5), min_survivors=8)
    assert setup.required_survivors == 8
    got, want = _round(setup, drop=(set(), set(), {"d0", "d1"}, set()))  # 8 upload: enough
    assert np.array_equal(got, want)
    with pytest.raises(SecAggError, match="below_threshold"):  # 7 upload: the server aborts
        _round(setup, drop=(set(), set(), {"d0", "d1", "d2"}, set()))
    # A server that asks anyway meets honest clients that refuse.
    clients = _clients(setup)
    server = SecAggServer(setup)
    for d in setup.cohort:
        server.receive_keys(d, clients[d].advertise_keys())
    directory = server.close_keys()
    for d in setup.cohort:
        server.receive_shares(d, clients[d].share_keys(directory))
    inbox = server.close_shares()
    clients["d5"].receive_shares(inbox["d5"])
    clients["d5"].masked_input(np.zeros(L, dtype=np.uint32))
    few = UnmaskRequest(tuple(f"d{i}" for i in range(3, 10)), ())
    with pytest.raises(SecAggError, match="at least 8") as info:
        clients["d5"].unmask(few)
    assert info.value.device == "d5"


@pytest.mark.parametrize("bad", [-1, 11, True, 2.0])
def test_setup_refuses_a_bad_min_survivors(bad: object) -> None:
    with pytest.raises(ConfigError, match="min_survivors"):
        dataclasses.replace(_setup(10, 4, 3), min_survivors=bad)


def test_setup_index_and_neighbour_sets_agree_with_the_cohort_and_graph() -> None:
    setup = _setup(12, 6, 4)
    assert [setup.index[d] for d in setup.cohort] == list(range(1, 13))
    assert [sorted(s) for s in setup.neighbour_sets] == [list(v) for v in setup.neighbours()]
