"""TrainerApp's choice of checkpoint (services/trainer/app.py ``_usable_here``): one naming versions the
store lacks, or written in another policy mode or with another value model, is not resumed from. The
app is built (not started) on a temp store holding the default policy and a reward model."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from services.trainer.app import TrainerApp
from services.trainer.checkpoint import LoadedCheckpoint
from services.trainer.config import TrainerConfig
from shared.config import ModelStoreConfig, load_config


def built(cfg: TrainerConfig) -> TrainerApp:
    """The app constructed (never started) inside an event loop of its own: its gRPC server is
    asyncio's, and earlier tests may have left the thread without a current loop."""

    async def build() -> TrainerApp:
        return TrainerApp(cfg)

    return asyncio.run(build())


def checkpoint(policy: str, rm: str, **meta: str) -> LoadedCheckpoint:
    loop = {"lineage": [policy], "reference_version": policy, "value_rm_version": rm}
    return LoadedCheckpoint(1, Path("ckpt-00000001"), {"loop": loop, "learner": {"tensors": {}, "meta": meta}})


@pytest.mark.parametrize(
    "env, meta, words",
    [
        ({}, {}, None),  # a checkpoint from before the modes: full, RM value model
        ({}, {"policy_mode": "lora"}, "RLHF_TRAINER_POLICY_MODE=lora, this trainer runs full"),
        ({"RLHF_TRAINER_POLICY_MODE": "lora"}, {}, "RLHF_TRAINER_POLICY_MODE=full, this trainer runs lora"),
        ({"RLHF_TRAINER_POLICY_MODE": "lora"}, {"policy_mode": "lora", "model_base_version": "policy-0001"}, None),
        ({"RLHF_TRAINER_VALUE_MODEL": "policy_head"}, {}, "RLHF_TRAINER_VALUE_MODEL=reward_model"),
    ],
)
def test_a_checkpoint_of_another_mode_is_not_resumed_from(trainer_store, tmp_path, env, meta, words):
    store = trainer_store.store
    cfg = load_config(
        TrainerConfig,
        env,
        model_store=ModelStoreConfig(store.root),
        checkpoint_dir=tmp_path / "checkpoints",
        metrics_port=0,
    )
    app = built(cfg)
    problem = app._usable_here(checkpoint(trainer_store.policy, trainer_store.rm, **meta))
    assert problem is None if words is None else words in problem
    assert "policy-0042" in app._usable_here(checkpoint("policy-0042", trainer_store.rm, **meta))
