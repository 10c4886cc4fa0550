"""The loop with a LoRA policy, end to end with real parts: an embedded broker of its own, a real vLLM
inference service serving adapters from its LoRA slots (RLHF_INFERENCE_LORA_ADAPTERS), a real reward
service, the trainer in RLHF_TRAINER_POLICY_MODE=lora with RLHF_TRAINER_VALUE_MODEL=policy_head.

Proves what `RLHF_TRAINER_POLICY_MODE=lora ./rlhf up` relies on: the trainer publishes an adapter
version (only PEFT's two files, the manifest naming the base it was trained on), inference serves it
and answers with its version, and a restarted trainer resumes from its LoRA checkpoint (the adapter
version on its base) and publishes the next adapter of the same base."""

from __future__ import annotations

import shutil
import time

import pytest

from services.reward.offline import EXAMPLE_RANKINGS, OFFLINE_SETTINGS, train_first_rm
from services.trainer.ppo_config import PPOConfig
from shared.config import ModelStoreConfig, load_config
from shared.model_store import ModelStore
from shared.models.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_info, adapter_problem
from shared.pb import trainer_pb2
from tests.conftest import LoopThread, start_broker, start_inference, test_auth, wait_until
from tests.integration.test_trainer_service import USER_QUESTION, Trainer, generate, served_version

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def own_broker():
    """A broker of this module's own: its policy announcements must not reach other tests' engines."""
    b = start_broker()
    yield b
    b.broker.stop()


@pytest.fixture(scope="module")
def store(policy_store, tmp_path_factory):
    """A copy of the default policy-0001, then rm-0001 trained from it."""
    store = ModelStore(tmp_path_factory.mktemp("lora-models"))
    copy = tmp_path_factory.mktemp("lora-policy-copy") / "policy"
    shutil.copytree(policy_store.store.path(policy_store.first), copy, ignore=shutil.ignore_patterns("manifest.*"))
    store.publish("policy", copy, extra={"copied_from": policy_store.first})
    train_first_rm(store, EXAMPLE_RANKINGS, epochs=1, settings=OFFLINE_SETTINGS)
    return store


@pytest.fixture(scope="module")
def services(own_broker, store):
    from services.reward.app import RewardApp
    from services.reward.config import RewardConfig

    loop = LoopThread()
    inference = start_inference(loop, own_broker.kafka, store.root, lora_adapters=True)
    reward_cfg = load_config(
        RewardConfig,
        {},
        grpc_port=0,
        metrics_port=0,
        kafka=own_broker.kafka,
        model_store=ModelStoreConfig(root=store.root),
        torch_threads=1,
        auth=test_auth(),
        learner=False,
    )

    async def make_reward():
        app = RewardApp(reward_cfg)
        await app.start()
        return app

    reward = loop.run(make_reward(), timeout=120)
    yield loop, inference, reward
    loop.run(reward.stop())
    loop.run(inference.stop())
    loop.close()


def lora_trainer_config(own_broker, store, services, checkpoint_dir):
    from services.trainer.config import TrainerConfig

    _, inference, reward = services
    return load_config(
        TrainerConfig,
        {"RLHF_TRAINER_POLICY_MODE": "lora", "RLHF_TRAINER_VALUE_MODEL": "policy_head"},
        grpc_port=0,
        metrics_port=0,
        kafka=own_broker.kafka,
        model_store=ModelStoreConfig(root=store.root),
        inference_address=inference.address,
        reward_address=reward.address,
        checkpoint_dir=checkpoint_dir,
        rollouts_per_iteration=4,
        max_tokens=16,
        heldout_prompts=4,
        heldout_max_tokens=16,
        publish_every=1,
        checkpoint_every=1,
        idle_sleep_s=0.5,
        idle_budget=1.0,
        torch_threads=1,
        kl_bound=1e6,
        reward_tolerance=1e6,
        ppo=PPOConfig(epochs=2, minibatch_size=4, lr=1e-2, forward_batch_size=4),
        consumer_group=f"lora-trainer-test-{time.monotonic_ns()}",
        auth=test_auth("trainer"),
    )


def run_until_published(trainer: Trainer, after: str) -> str:
    """Let the trainer run until it has published a version other than ``after``; pause and stop it."""
    try:
        wait_until(lambda: trainer.status().last_published.version not in ("", after), 240, "nothing new was published")
        trainer.stub.Pause(trainer_pb2.PauseRequest(), timeout=10)
    finally:
        trainer.stop()
    return str(trainer.app.loop.state.last_published["version"])


def test_a_lora_trainer_publishes_adapters_inference_serves_and_resumes_from_its_checkpoint(
    own_broker, store, services, tmp_path
):
    loop, inference, _ = services
    base = store.current("policy")
    assert generate(inference.address, USER_QUESTION).policy_version == base
    cfg = lora_trainer_config(own_broker, store, services, tmp_path / "ckpt")

    first = run_until_published(Trainer(loop, cfg), after="")
    # The trainer may publish again before it is paused: the first adapter is the one after the base.
    versions = store.versions("policy")
    # An adapter version of the base: PEFT's two files only, the manifest naming its base, loadable.
    manifest = store.verify(versions[versions.index(base) + 1])
    assert set(manifest.files) == {ADAPTER_WEIGHTS, ADAPTER_CONFIG}
    info = adapter_info(manifest)
    assert info is not None and info.base_version == base and info.rank == 8
    assert adapter_problem(manifest, store=store, version_dir=store.path(manifest.version)) is None
    assert adapter_problem(store.verify(first), store=store, version_dir=store.path(first)) is None
    assert manifest.parent == base and manifest.extra["reference_version"] == base
    # Inference loads it into a LoRA slot and answers with its version.
    wait_until(lambda: served_version(inference.address) == first, 120, "inference did not serve the adapter")
    assert generate(inference.address, USER_QUESTION).policy_version == first

    # A new trainer resumes from the LoRA checkpoint: the adapter version on its base, same lineage.
    again = Trainer(loop, cfg)
    resumed = again.app.loop
    assert resumed.state.lineage[-1] == first and resumed.state.step >= 1
    assert resumed.learner.peft_model is not None and resumed.learner.model_base_version == base
    assert resumed.learner.reference.lm is resumed.learner.policy.lm  # the base, adapter off: no copy
    second = run_until_published(again, after=first)
    versions = store.versions("policy")
    manifest = store.verify(versions[versions.index(first) + 1])  # the resumed trainer's first publish
    assert adapter_info(manifest).base_version == base and manifest.parent == first
    assert adapter_info(store.verify(second)).base_version == base
    wait_until(lambda: served_version(inference.address) == second, 120, "inference did not serve the next adapter")
