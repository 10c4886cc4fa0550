"""A model store with the default policy (policy-0001) and a reward model made from it (rm-0001: the
policy's backbone with a fresh random scalar head), built once per session: enough for the learner's
unit tests, which supply their own scores."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch


@dataclass
class TrainerStore:
    store: object
    policy: str
    rm: str

    def path(self, version: str) -> Path:
        return self.store.path(version)


def publish_random_rm(store, policy_version: str, seed: int = 0) -> str:
    from transformers import AutoTokenizer

    from shared.models.reward_model import RewardModel

    policy_dir = store.path(policy_version)
    model = RewardModel.from_policy_dir(policy_dir, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        model.save(Path(tmp), AutoTokenizer.from_pretrained(str(policy_dir)))
        return store.publish("rm", Path(tmp), parent=policy_version).version


@pytest.fixture(scope="session")
def trainer_store(tmp_path_factory) -> TrainerStore:
    from shared.model_store import ModelStore
    from shared.models.default_model import ensure_default_policy

    store = ModelStore(tmp_path_factory.mktemp("trainer-models"))
    policy = ensure_default_policy(store)
    return TrainerStore(store, policy, publish_random_rm(store, policy))


@pytest.fixture()
def one_thread():
    """Keep the unit tests to one core (the machine is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
