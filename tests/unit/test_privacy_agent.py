"""Local DP on the agent: the train plan's clip and noise are applied before the update leaves."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from test_agent import FakeCoordinator, make_agent, make_config

from fedge.params import l2_norm
from fedge.wire import TrainPlan


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "local.npz"
    np.savez(path, x=rng.normal(size=(30, 4)), y=np.arange(30) % 3)
    return path


def test_the_agent_clips_its_update_when_the_plan_says_so(tmp_path: Path, data_file: Path) -> None:
    fake = FakeCoordinator([])
    fake.checkins.append(fake.plan(clip_norm=1e-3, evaluate=False))
    agent, _ = make_agent(make_config(tmp_path, data_file), fake)
    assert agent.run() == 0
    (update,) = fake.updates
    assert 0 < l2_norm(update.delta) <= 1e-3


def test_the_agent_adds_local_noise(tmp_path: Path, data_file: Path) -> None:
    fake = FakeCoordinator([])
    fake.checkins.append(fake.plan(clip_norm=1e-6, noise_stddev=0.5, evaluate=False))
    agent, _ = make_agent(make_config(tmp_path, data_file), fake)
    assert agent.run() == 0
    (update,) = fake.updates
    values = np.concatenate([v.ravel() for v in update.delta.values()])
    # 15 values of N(0, 0.25) on top of a delta of norm 1e-6: a wide margin for the sample stddev.
    assert 0.2 < float(np.std(values)) < 1.0


def test_without_privacy_in_the_plan_nothing_is_clipped(tmp_path: Path, data_file: Path) -> None:
    fake = FakeCoordinator([])
    fake.checkins.append(fake.plan(evaluate=False))
    agent, _ = make_agent(make_config(tmp_path, data_file), fake)
    assert agent.run() == 0
    assert l2_norm(fake.updates[0].delta) > 1e-3


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(noise_stddev=0.5), "noise_stddev needs clip_norm"),
        (dict(clip_norm=0.0), "greater than 0"),
        (dict(clip_norm=-1.0), "greater than 0"),
        (dict(clip_norm=math.inf), "finite"),
        (dict(clip_norm=1.0, noise_stddev=-1.0), "greater than or equal to 0"),
        (dict(clip_norm=1.0, noise_stddev=math.nan), "finite"),
    ],
)
def test_bad_privacy_fields_in_a_plan_are_refused(fields: dict[str, object], message: str) -> None:
    values: dict[str, object] = dict(round=1, attempt=1, params_etag="x", deadline_s=1.0, local_epochs=1,
                                     batch_size=1, lr=0.1)
    values.update(fields)
    with pytest.raises(ValidationError, match=message):
        TrainPlan.model_validate(values)
