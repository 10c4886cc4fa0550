"""PPOLearner on the default model: on-policy ratios, stale rollouts, PPO-ptx mixing, the KL controller,
checkpoints through safetensors + JSON, publishing, and learning a trivially learnable score."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.inference.weights import check_compatible
from services.trainer.learner import LearnerState, PPOLearner
from services.trainer.models import LoraSettings, ModelSettings
from services.trainer.ppo_config import PPOConfig
from services.trainer.rollout_batch import InvalidRollout, Rollout, collate_rollouts
from shared.model_store import CorruptVersionError

QUESTIONS = [f"What is {a} plus {b}?" for a in range(4) for b in range(4)]


def make_learner(trainer_store, **overrides) -> PPOLearner:
    cfg = dataclasses.replace(PPOConfig(lr=1e-3, minibatch_size=8, epochs=1), **overrides)
    s = trainer_store
    return PPOLearner.from_store(s.store, s.policy, s.policy, s.rm, cfg)


def prompts(learner: PPOLearner, n: int = 8) -> list[list[int]]:
    return [
        learner.tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for q in QUESTIONS[:n]
    ]


def low_half_score(response: list[int]) -> float:
    """A score the policy can learn fast: the fraction of response tokens with an id in the lower half of the vocabulary."""
    return sum(t < 1024 for t in response) / len(response)


def sample(learner: PPOLearner, n: int = 8, max_new_tokens: int = 8, seed: int = 0, score=low_half_score):
    ps = prompts(learner, n)
    responses = learner.generate(ps, max_new_tokens, greedy=False, seed=seed)
    return [Rollout([], p, r, None, learner.weights_version, "stop", score(r)) for p, r in zip(ps, responses)]


def params(learner: PPOLearner) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in learner.policy_state().items()}


def test_first_update_on_policy_has_ratio_one_and_zero_kl(trainer_store, one_thread):
    learner = make_learner(trainer_store, kl_coef=0.1)
    rollouts = sample(learner)
    before = params(learner)
    stats = learner.step(rollouts)
    # One epoch, one minibatch: the new policy equals the old one when the ratio is taken.
    assert stats.minibatch_updates == 1
    assert stats.clipfrac == 0.0
    assert stats.approx_kl == pytest.approx(0.0, abs=1e-6)
    assert stats.mean_kl == pytest.approx(0.0, abs=1e-6)  # the reference is the same weights
    assert stats.samples == 8 and stats.tokens == sum(len(r.response_token_ids) for r in rollouts)
    assert stats.stale_samples == 0
    assert math.isnan(stats.ptx_loss)
    after = params(learner)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert learner.weights_version == f"{trainer_store.policy}@step1"
    assert learner.kl_to_reference(rollouts) > 0  # it moved away from the reference


def test_stale_rollouts_need_behaviour_logprobs_and_use_them_as_old_policy(trainer_store, one_thread):
    learner = make_learner(trainer_store)
    rollouts = sample(learner)
    stale = [dataclasses.replace(r, policy_version="policy-0000") for r in rollouts]
    with pytest.raises(InvalidRollout, match="behaviour_logprobs"):
        learner.step(stale)
    # Behaviour logprobs 3 nats below the learner's: ratios exp(3) on every token, far outside the clip range.
    batch, prepared, _ = learner._prepare(rollouts)
    true_old = prepared.old_logprobs
    shifted = [
        dataclasses.replace(r, behaviour_logprobs=(true_old[i, : len(r.response_token_ids)] - 3.0).tolist())
        for i, r in enumerate(stale)
    ]
    _, prepared_stale, _ = learner._prepare(shifted)
    torch.testing.assert_close(prepared_stale.old_logprobs, (true_old - 3.0) * batch.response_mask)
    stats = learner.step(shifted)
    assert stats.stale_samples == 8
    assert stats.approx_kl > 1.0 and stats.clipfrac > 0.2


def test_the_penalty_restrains_the_learners_weights_when_the_served_version_is_the_reference(trainer_store, one_thread):
    # The learner trained on while the gate refused its candidates: the served version is still the
    # reference, so the behaviour logprobs equal the reference's and today's penalty would be 0.
    # (k3: never negative per token, so a moved learner shows a positive penalty even on 8 samples.)
    learner = make_learner(trainer_store, kl_coef=0.1, lr=1e-2, kl_estimator="k3")
    reference_rollouts = sample(learner)
    learner.step(reference_rollouts)
    learner.step(sample(learner, seed=1))
    # The reference's logprobs of those tokens: what vLLM reports when the reference is served.
    batch = collate_rollouts(reference_rollouts, learner.pad_token_id, learner.eos_token_id)
    ref_logprobs = learner._no_grad_pass(batch, torch.ones(batch.size, dtype=torch.bool))[2]
    served = [
        dataclasses.replace(r, behaviour_logprobs=ref_logprobs[i, : len(r.response_token_ids)].tolist())
        for i, r in enumerate(reference_rollouts)
    ]
    _, _, facts = learner._prepare(served)
    assert float(facts["behaviour_kl"].abs().sum()) == pytest.approx(0.0, abs=1e-5)
    assert float(facts["kl"].sum(-1).mean()) > 0.01  # the learner's own KL to the reference
    stats = learner.step(served)
    assert stats.stale_samples == 8 and stats.behaviour_kl == pytest.approx(0.0, abs=1e-5) and stats.mean_kl > 0.01


def test_on_policy_the_two_kls_are_the_same(trainer_store, one_thread):
    learner = make_learner(trainer_store, kl_coef=0.1, lr=1e-2)
    learner.step(sample(learner))
    stats = learner.step(sample(learner, seed=2))  # sampled by the learner's current weights
    assert stats.stale_samples == 0 and stats.mean_kl == pytest.approx(stats.behaviour_kl) and stats.mean_kl > 0


def test_ptx_loss_is_mixed_in_with_its_coefficient(trainer_store, one_thread):
    learner = make_learner(trainer_store, ptx_coef=0.5)
    batch, prepared, _ = learner._prepare(sample(learner))
    minibatch = torch.arange(batch.size)
    ptx_ids = learner._ptx_batch(torch.Generator().manual_seed(0))
    assert ptx_ids.shape == (4, 64)

    def grads(loss):
        return torch.autograd.grad(loss, list(learner.policy.parameters()), allow_unused=True)

    ppo_loss, _ = learner._minibatch_loss(batch, prepared, minibatch, None, 0.0)
    mixed_loss, stats = learner._minibatch_loss(batch, prepared, minibatch, ptx_ids, 0.5)
    lm_loss = learner.policy.lm(input_ids=ptx_ids, labels=ptx_ids).loss
    assert stats["ptx_loss"] == pytest.approx(lm_loss.item(), rel=1e-5)
    assert mixed_loss.item() == pytest.approx(ppo_loss.item() + 0.5 * lm_loss.item(), rel=1e-5)
    for g_mixed, g_ppo, g_lm in zip(grads(mixed_loss), grads(ppo_loss), grads(lm_loss)):
        g_ppo = torch.zeros_like(g_mixed) if g_ppo is None else g_ppo
        torch.testing.assert_close(g_mixed, g_ppo + 0.5 * g_lm, atol=1e-6, rtol=1e-4)


def test_ptx_alone_lowers_the_pretraining_loss(trainer_store, one_thread):
    learner = make_learner(trainer_store, ptx_coef=10.0, ptx_batch_size=8, epochs=2, lr=3e-3)
    zero = sample(learner, score=lambda r: 0.0)
    losses = []
    for _ in range(4):
        rollouts = [dataclasses.replace(r, policy_version=learner.weights_version) for r in zero]
        losses.append(learner.step(rollouts).ptx_loss)
    assert losses[-1] < losses[0] - 0.2, losses


def test_adaptive_kl_controller_is_updated_after_each_step(trainer_store, one_thread):
    learner = make_learner(trainer_store, adaptive_kl=True, kl_coef=0.2, target_kl=1.0, kl_horizon=100)
    stats = learner.step(sample(learner))
    # KL 0 (the reference is the initial policy): error clipped at -0.2 -> beta * (1 - 0.2 * 8 / 100)
    assert stats.kl_coef == 0.2
    assert stats.next_kl_coef == pytest.approx(0.2 * (1 - 0.2 * 8 / 100))
    assert learner.kl_controller.value == stats.next_kl_coef


def test_checkpoint_round_trip_through_safetensors_and_json_continues_identically(trainer_store, tmp_path, one_thread):
    cfg = dict(epochs=2, minibatch_size=4)
    a = make_learner(trainer_store, **cfg)
    first = sample(a, seed=1)
    a.step(first)
    state = a.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.tensors.values())
    save_file(state.tensors, str(tmp_path / "state.safetensors"))
    (tmp_path / "state.json").write_text(json.dumps(state.meta))

    b = make_learner(trainer_store, **cfg)
    b.load_state_dict(
        LearnerState(load_file(str(tmp_path / "state.safetensors")), json.loads((tmp_path / "state.json").read_text()))
    )
    assert (b.steps_done, b.samples_seen, b.weights_version) == (1, 8, a.weights_version)
    label = a.weights_version
    second = [dataclasses.replace(r, policy_version=label) for r in sample(a, seed=2)]
    a.step(second)
    b.step(second)
    pa, pb = params(a), params(b)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    for (name, va), vb in zip(a.value.state_dict().items(), b.value.state_dict().values()):
        assert torch.equal(va, vb), name

    # Without the optimiser state (fresh Adam moments) the same step gives other weights.
    c = make_learner(trainer_store, **cfg)
    c.policy.lm.load_state_dict({k[len("policy.") :]: v for k, v in state.tensors.items() if k.startswith("policy.")})
    c.mark_published(label)
    c.step(second)
    assert any(not torch.equal(pa[k], v) for k, v in params(c).items())


def test_save_policy_publishes_a_hot_swappable_version_and_marks_it(trainer_store, tmp_path, one_thread):
    learner = make_learner(trainer_store)
    learner.step(sample(learner))
    out = tmp_path / "out"
    learner.save_policy(out)
    check_compatible(trainer_store.path(trainer_store.policy), out)
    manifest = trainer_store.store.publish("policy", out, parent=trainer_store.policy, make_current=False)
    learner.mark_published(manifest.version)
    assert learner.weights_version == manifest.version
    on_policy = sample(learner)
    assert all(r.policy_version == manifest.version for r in on_policy)
    assert learner.step(on_policy).stale_samples == 0


def test_from_store_refuses_a_corrupt_version(trainer_store, tmp_path):
    import shutil

    from shared.model_store import MANIFEST_NAME, ModelStore

    def copy(version):
        return shutil.copytree(
            trainer_store.path(version), tmp_path / version, ignore=shutil.ignore_patterns(MANIFEST_NAME)
        )

    store = ModelStore(tmp_path / "models")
    version = store.publish("policy", copy(trainer_store.policy)).version
    rm = store.publish("rm", copy(trainer_store.rm)).version
    weights = store.path(version) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptVersionError, match="does not match its blake3 digest"):
        PPOLearner.from_store(store, version, version, rm, PPOConfig())


def test_generate_cuts_after_eos(trainer_store, one_thread):
    learner = make_learner(trainer_store)
    out = learner.generate(prompts(learner, 4), 12, greedy=False, seed=3)
    eos = learner.tokenizer.eos_token_id
    for response in out:
        assert 1 <= len(response) <= 12
        assert eos not in response[:-1]


@pytest.mark.slow
def test_learns_a_trivially_learnable_score(trainer_store, one_thread):
    learner = make_learner(trainer_store, lr=3e-3, epochs=2, minibatch_size=8, kl_coef=0.01)
    scores = []
    for step in range(10):
        scores.append(learner.step(sample(learner, n=16, seed=step)).mean_score)
    early, late = sum(scores[:2]) / 2, sum(scores[-3:]) / 3
    assert late > early + 0.08, scores


def test_generated_logprobs_match_the_learner_and_can_replace_the_recomputation(trainer_store, one_thread):
    learner = make_learner(trainer_store, recompute_logprobs=False)
    ps = prompts(learner, 6)
    responses, logprobs = learner.generate(ps, 10, greedy=False, seed=5, return_logprobs=True)
    rollouts = [
        Rollout([], p, r, lp, learner.weights_version, "stop", 0.0) for p, r, lp in zip(ps, responses, logprobs)
    ]
    batch, prepared, _ = learner._prepare(rollouts)
    # recompute_logprobs=False: the sampler's numbers are pi_old as they are ...
    torch.testing.assert_close(prepared.old_logprobs, batch.behaviour_logprobs * batch.response_mask)
    # ... and they agree with the learner's own forward pass (generation with a KV cache vs one pass).
    exact = make_learner(trainer_store)
    _, recomputed, _ = exact._prepare(rollouts)
    torch.testing.assert_close(recomputed.old_logprobs, prepared.old_logprobs, atol=1e-4, rtol=1e-4)


def test_score_shaping_clip_and_missing_eos_penalty(trainer_store, one_thread):
    learner = make_learner(trainer_store, score_clip=2.0, missing_eos_penalty=1.5)
    eos = learner.tokenizer.eos_token_id
    p = prompts(learner, 1)[0]
    rollouts = [
        Rollout([], p, [40, 41, eos], None, learner.weights_version, "stop", 5.0),  # clipped to 2
        Rollout([], p, [40, 41, 42], None, learner.weights_version, "length", 0.5),  # no EOS: 0.5 - 1.5
        Rollout([], p, [40, eos], None, learner.weights_version, "stop", -0.5),
    ]
    batch, _, facts = learner._prepare(rollouts)
    assert facts["scores"].tolist() == pytest.approx([2.0, -1.0, -0.5])
    assert batch.ended_with_eos.tolist() == [True, False, True]


def test_single_process_distributed_helpers_are_identity():
    from services.trainer import distributed

    ctx = distributed.context()
    assert (ctx.rank, ctx.world_size, ctx.enabled) == (0, 1, False)
    rows = torch.arange(10).reshape(5, 2)
    assert distributed.shard_rows(5, ctx) == [0, 1, 2, 3, 4]
    assert torch.equal(distributed.all_gather_rows(rows, 5, ctx), rows)
    assert distributed.shard_rows(5, distributed.DistContext(1, 2)) == [1, 3]
    module = torch.nn.Linear(2, 2)
    assert distributed.wrap_for_ddp(module, ctx) is module and distributed.unwrap(module) is module


# --- LoRA (PEFT): adapters on a frozen base, the reference is the base with the adapter off ----------

LORA = ModelSettings(policy_mode="lora", lora=LoraSettings(rank=4, alpha=8.0))


def make_lora_learner(trainer_store, models: ModelSettings = LORA, **overrides) -> PPOLearner:
    cfg = dataclasses.replace(PPOConfig(lr=1e-3, minibatch_size=8, epochs=1), **overrides)
    s = trainer_store
    return PPOLearner.from_store(s.store, s.policy, s.policy, s.rm, cfg, models)


def named_params(learner: PPOLearner) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in learner.policy.lm.named_parameters()}


def response_logprobs(learner: PPOLearner, rollouts) -> torch.Tensor:
    """(B,) summed log-probability of each rollout's response under the learner's policy now."""
    batch = collate_rollouts(rollouts, learner.pad_token_id, learner.eos_token_id)
    with torch.no_grad():
        logprobs = learner.policy(batch.input_ids, batch.attention_mask, batch.response_positions, batch.response_ids)[
            0
        ]
    return (logprobs * batch.response_mask).sum(-1)


def test_lora_kl_to_the_reference_is_exactly_zero_before_the_first_step(trainer_store, one_thread):
    learner = make_lora_learner(trainer_store, kl_coef=0.1)
    # No second copy: the reference is the policy's own modules, run with the adapter switched off.
    assert learner.reference.lm is learner.policy.lm
    assert learner.peft_model is not None
    rollouts = sample(learner)
    batch, _, facts = learner._prepare(rollouts)
    assert torch.equal(facts["kl"], torch.zeros_like(facts["kl"]))  # exactly, not approximately
    assert learner.kl_to_reference(rollouts) == 0.0
    with torch.no_grad():
        args = (batch.input_ids, batch.attention_mask, batch.response_positions)
        assert torch.equal(learner.policy.response_logits(*args), learner.reference.response_logits(*args))
    stats = learner.step(rollouts)
    assert stats.mean_kl == 0.0
    assert learner.kl_to_reference(rollouts) > 0  # the adapter moved the policy; the reference did not


def test_a_lora_step_changes_only_the_adapter_and_moves_the_reward_up(trainer_store, one_thread):
    learner = make_lora_learner(trainer_store, lr=1e-2, kl_coef=0.0, ent_coef=0.0)
    trainable = {n for n, p in learner.policy.lm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    total = sum(p.numel() for p in learner.policy.lm.parameters())
    assert learner.trainable_parameters == sum(
        p.numel() for n, p in learner.policy.lm.named_parameters() if n in trainable
    )
    assert learner.trainable_parameters < total / 10
    # A toy batch: the first half of the answers scored 1, the second half -1.
    toy = [dataclasses.replace(r, score=1.0 if i < 4 else -1.0) for i, r in enumerate(sample(learner))]
    before, logp_before = named_params(learner), response_logprobs(learner, toy)
    for _ in range(3):
        learner.step([dataclasses.replace(r, policy_version=learner.weights_version) for r in toy])
    after, logp_after = named_params(learner), response_logprobs(learner, toy)
    for name, value in before.items():
        if name in trainable:
            continue
        assert torch.equal(value, after[name]), f"{name} is not an adapter parameter but changed"
    assert any(not torch.equal(before[n], after[n]) for n in trainable)
    # The expected reward over the batch, sum_i score_i * log pi(answer_i), went up: the policy moved
    # towards the answers scored 1 and away from those scored -1.
    scores = torch.tensor([r.score for r in toy])
    delta = logp_after - logp_before
    assert float((scores * delta).sum()) > 2.0, delta
    assert float(delta[:4].min()) > float(delta[4:].max()), delta


def test_lora_checkpoint_holds_the_adapter_only_and_resumes_identically(trainer_store, tmp_path, one_thread):
    from services.trainer.checkpoint import CheckpointStore
    from services.trainer.loop import LoopState, checkpoint_payload, restore

    cfg = dict(epochs=2, minibatch_size=4, lr=1e-2)
    a = make_lora_learner(trainer_store, **cfg)
    a.step(sample(a, seed=1))
    state = a.state_dict()
    policy_keys = [k for k in state.tensors if k.startswith("policy.")]
    assert policy_keys and all("lora_" in k for k in policy_keys)  # the base is the store's version
    assert state.meta["policy_mode"] == "lora" and state.meta["model_base_version"] == trainer_store.policy

    checkpoints = CheckpointStore(tmp_path / "checkpoints")
    loop_state = LoopState(
        lineage=[trainer_store.policy], reference_version=trainer_store.policy, value_rm_version=trainer_store.rm
    )
    checkpoints.save(1, checkpoint_payload(a, loop_state))
    b, restored = restore(
        checkpoints.load_latest(),
        lambda version, st: PPOLearner.from_store(
            trainer_store.store,
            version,
            st.reference_version,
            st.value_rm_version,
            dataclasses.replace(PPOConfig(), **cfg),
            LORA,
        ),
    )
    assert restored.lineage == [trainer_store.policy]
    assert (b.steps_done, b.weights_version) == (1, a.weights_version)
    second = [dataclasses.replace(r, policy_version=a.weights_version) for r in sample(a, seed=2)]
    a.step(second)
    b.step(second)
    pa, pb = named_params(a), named_params(b)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)

    # A trainer in the other mode refuses the checkpoint with the variable to change.
    full = make_learner(trainer_store)
    with pytest.raises(ValueError, match="RLHF_TRAINER_POLICY_MODE=lora"):
        full.load_state_dict(state)
    with pytest.raises(ValueError, match="RLHF_TRAINER_POLICY_MODE=full"):
        make_lora_learner(trainer_store).load_state_dict(full.state_dict())


def test_policy_head_value_model_trains_its_head_alone(trainer_store, one_thread):
    models = dataclasses.replace(LORA, value_model="policy_head")
    learner = make_lora_learner(trainer_store, models=models, lr=1e-2, vf_coef=1.0)
    head = dict(learner.value.named_parameters())
    assert set(head) == {"head.weight", "head.bias"}  # the policy is not a submodule of the value
    rollouts = sample(learner)
    _, prepared, _ = learner._prepare(rollouts)
    assert torch.equal(prepared.old_values, torch.zeros_like(prepared.old_values))  # a zero head
    before = named_params(learner)
    stats = learner.step(rollouts)
    assert stats.value_grad_norm > 0
    assert not torch.equal(head["head.weight"], torch.zeros_like(head["head.weight"]))
    after = named_params(learner)
    assert all(torch.equal(before[n], after[n]) for n, p in learner.policy.lm.named_parameters() if not p.requires_grad)
    assert "value.head.weight" in learner.state_dict().tensors


@pytest.mark.parametrize(
    "meta, mode, value, base, words",
    [
        ({}, "full", "reward_model", "policy-0001", None),  # a checkpoint from before these fields
        ({}, "lora", "reward_model", "policy-0001", "RLHF_TRAINER_POLICY_MODE=full, this trainer runs lora"),
        ({"policy_mode": "lora"}, "full", "reward_model", "policy-0001", "POLICY_MODE=lora, this trainer runs full"),
        ({"value_model": "policy_head"}, "full", "reward_model", "policy-0001", "VALUE_MODEL=policy_head"),
        (
            {"policy_mode": "lora", "model_base_version": "policy-0002"},
            "lora",
            "reward_model",
            "policy-0001",
            "on policy-0002",
        ),
        ({"policy_mode": "lora", "model_base_version": "policy-0001"}, "lora", "reward_model", "policy-0001", None),
    ],
)
def test_checkpoint_mismatch(meta, mode, value, base, words):
    from services.trainer.learner import checkpoint_mismatch

    problem = checkpoint_mismatch(meta, mode, value, base)
    assert problem is None if words is None else words in problem


def test_bf16_autocast_and_gradient_checkpointing_train_in_mixed_precision(trainer_store, one_thread):
    models = dataclasses.replace(LORA, precision="bf16", gradient_checkpointing=True)
    learner = make_lora_learner(trainer_store, models=models, lr=1e-2)
    assert learner.policy.lm.is_gradient_checkpointing
    rollouts = sample(learner)
    batch, prepared, _ = learner._prepare(rollouts)
    assert prepared.old_logprobs.dtype == torch.float32 and prepared.old_values.dtype == torch.float32
    # The forward passes ran in bf16: the log-probabilities differ from float32's, a little.
    exact = make_lora_learner(trainer_store)
    _, exact_prepared, _ = exact._prepare(rollouts)
    diff = (prepared.old_logprobs - exact_prepared.old_logprobs).abs() * batch.response_mask
    assert 0 < float(diff.max()) < 0.5
    before = named_params(learner)
    stats = learner.step(rollouts)
    assert math.isfinite(stats.policy_loss) and math.isfinite(stats.value_loss) and stats.policy_grad_norm > 0
    after = named_params(learner)
    assert all(p.dtype == torch.float32 for p in after.values())  # weights stay float32
    assert any(not torch.equal(before[n], after[n]) for n in after if "lora_" in n)


def test_with_averaging_the_candidate_is_the_average_and_training_resumes_from_its_own_weights(
    trainer_store, tmp_path, one_thread
):
    learner = make_learner(trainer_store, average_decay=0.9)
    start = params(learner)
    for seed in range(3):
        learner.step(
            [dataclasses.replace(r, policy_version=learner.weights_version) for r in sample(learner, seed=seed)]
        )
    own = params(learner)
    assert learner.average is not None and learner.average.updates == 3
    with learner.candidate_weights():
        candidate = params(learner)
        out = tmp_path / "avg"
        learner.save_policy(out)
    assert all(torch.equal(own[k], v) for k, v in params(learner).items())  # its own weights back
    moved = [k for k in own if not torch.equal(start[k], own[k])]
    assert moved
    for k in moved:  # the average lies between the start and the weights trained, at neither
        assert not torch.equal(candidate[k], own[k]) and not torch.equal(candidate[k], start[k])
    assert torch.allclose(candidate[moved[0]], learner.average.tensors[moved[0]].to(candidate[moved[0]].dtype))
    manifest = trainer_store.store.publish("policy", out, parent=trainer_store.policy, make_current=False)
    assert learner.updated_since_publish
    learner.mark_published(manifest.version)
    assert not learner.updated_since_publish
    # The served average's rollouts are off-policy for the learner: behaviour logprobs needed.
    assert learner.weights_version == f"{manifest.version}@step3"
    served = [dataclasses.replace(r, policy_version=manifest.version) for r in sample(learner, seed=9)]
    with pytest.raises(InvalidRollout, match="behaviour_logprobs"):
        learner.step(served)


def test_the_average_survives_a_checkpoint_and_starts_at_the_weights_without_one(trainer_store, one_thread):
    a = make_learner(trainer_store, average_decay=0.9)
    for seed in range(2):
        a.step([dataclasses.replace(r, policy_version=a.weights_version) for r in sample(a, seed=seed)])
    state = a.state_dict()
    assert state.meta["average_updates"] == 2 and any(k.startswith("average.") for k in state.tensors)
    b = make_learner(trainer_store, average_decay=0.9)
    b.load_state_dict(state)
    assert b.average is not None and b.average.updates == 2
    assert all(torch.equal(v, b.average.tensors[k]) for k, v in a.average.tensors.items())
    # A checkpoint written with averaging off: the average starts at the restored weights.
    plain = make_learner(trainer_store)
    plain.step(sample(plain))
    c = make_learner(trainer_store, average_decay=0.9)
    c.load_state_dict(plain.state_dict())
    assert c.average is not None and c.average.updates == 0
    restored = params(c)
    assert all(torch.equal(restored[k], v.to(restored[k].dtype)) for k, v in c.average.tensors.items())
