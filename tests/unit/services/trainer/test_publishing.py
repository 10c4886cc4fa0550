"""The publish gate: KL bound, held-out reward not below the last published version's (with
tolerance), non-finite evaluations refused, guards after them; empty answers never raise the held-out
mean; the k-sample evaluation gives the same figure for the same weights and another one for a
policy whose sampling distribution moved while its greedy answers did not."""

from __future__ import annotations

import dataclasses
import math
import zlib

import pytest
import torch

from services.trainer.publishing import (
    Evaluation,
    PolicyGateDecision,
    PolicyPublisher,
    answers_changed,
    expand_prompts,
    fill_empty_scores,
    paired_difference,
    policy_gate,
    reward_fell,
    same_figure,
    with_guards,
)
from services.trainer.rollout_batch import Rollout
from shared.events import Message


def ev(reward: float, kl: float) -> Evaluation:
    return Evaluation(heldout_reward=reward, kl=kl, rm_version="rm-0001")


@pytest.mark.parametrize(
    "reward, kl, baseline, ok, words",
    [
        (1.0, 0.5, 0.9, True, "KL 0.5000 <= 2.0000"),
        (1.0, 2.0, 0.9, True, "baseline 0.9000"),  # exactly at the bound passes
        (1.0, 2.01, 0.9, False, "exceeds the bound"),
        (0.8, 0.5, 0.9, False, "held-out reward fell"),
        (0.85, 0.5, 0.9, True, ""),  # within the tolerance of 0.05
        (0.849, 0.5, 0.9, False, "fell"),
        (0.1, 0.5, None, True, "no baseline"),  # the first candidate has nothing to beat
        (math.nan, 0.5, 0.0, False, "not finite"),
        (1.0, math.inf, 0.0, False, "not finite"),
    ],
)
def test_gate(reward, kl, baseline, ok, words):
    decision = policy_gate(ev(reward, kl), baseline, kl_bound=2.0, reward_tolerance=0.05)
    assert decision.ok is ok and words in decision.reason


def test_kl_is_checked_before_reward_so_a_gaming_policy_is_refused_for_its_drift():
    decision = policy_gate(ev(100.0, 50.0), 0.0, kl_bound=10.0, reward_tolerance=0.0)
    assert not decision.ok and "KL" in decision.reason


def test_paired_difference_by_prompt():
    # Two prompts, two answers each: per-prompt means candidate (1.5, 0.5), baseline (1.0, 1.0).
    m, se = paired_difference([1.0, 2.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], 2)
    # d = (0.5, -0.5): mean 0, sd = sqrt(((0.5)^2 + (0.5)^2) / 1) = 0.7071, se = 0.7071 / sqrt(2) = 0.5
    assert m == pytest.approx(0.0) and se == pytest.approx(0.5)
    # Pairing removes the prompts' own spread: every prompt 0.1 better, whatever its level.
    m, se = paired_difference([5.1, -3.9, 0.1], [5.0, -4.0, 0.0], 3)
    assert m == pytest.approx(0.1) and se == pytest.approx(0.0, abs=1e-12)
    assert paired_difference([2.0], [1.0], 1) == (1.0, 0.0)


def test_reward_fell_only_with_confidence():
    noisy_cand, noisy_base = [0.9, 1.3, 0.2, 0.8], [1.0, 1.0, 1.0, 1.0]  # d = (0.1, -0.6, ...): mean -0.2
    fell, m, se = reward_fell(noisy_cand, noisy_base, 4, tolerance=0.0, z=1.64)
    assert m == pytest.approx(-0.2) and se > 0.15 and not fell  # within its noise
    assert reward_fell(noisy_cand, noisy_base, 4, tolerance=0.0, z=0.0)[0]  # the plain comparison refuses
    clearly_worse = [b - 1.0 + 0.01 * i for i, b in enumerate(noisy_base)]
    assert reward_fell(clearly_worse, noisy_base, 4, tolerance=0.0, z=1.64)[0]


def test_the_gate_uses_the_paired_test_with_the_baselines_scores():
    candidate = dataclasses.replace(ev(0.8, 0.5), scores=[0.9, 1.3, 0.2, 0.8])
    baseline_scores = [1.0, 1.0, 1.0, 1.0]
    plain = policy_gate(candidate, 1.0, kl_bound=2.0, reward_tolerance=0.0)
    assert not plain.ok and plain.check == "reward"
    paired = policy_gate(candidate, 1.0, 2.0, 0.0, baseline_scores, reward_z=1.64, n_prompts=4)
    assert paired.ok, paired.reason
    worse = dataclasses.replace(candidate, heldout_reward=0.0, scores=[0.0, 0.01, 0.02, 0.0])
    refused = policy_gate(worse, 1.0, 2.0, 0.0, baseline_scores, reward_z=1.64, n_prompts=4)
    assert not refused.ok and refused.check == "reward" and "+ 1.64 x" in refused.reason
    # Scores that cannot be paired (another layout): the plain comparison.
    odd = policy_gate(candidate, 1.0, 2.0, 0.0, [1.0, 1.0, 1.0], reward_z=1.64, n_prompts=4)
    assert not odd.ok


def test_empty_answers_score_as_the_worst_scored_answer():
    assert fill_empty_scores([0.5, None, -1.0, None]) == [0.5, -1.0, -1.0, -1.0]
    assert fill_empty_scores([None, None]) == [0.0, 0.0]


class TableScorer:
    """Scores answers from a fixed table, in process (what the reward service does over gRPC)."""

    def __init__(self, table: dict[str, float], rm_version: str = "rm-0007"):
        self.table = table
        self.rm_version = rm_version
        self.calls: list[list[str]] = []

    def score(self, pairs):
        self.calls.append([r for _, r in pairs])
        return [self.table[r] for _, r in pairs], self.rm_version


def test_score_answers_sends_only_non_empty_answers():
    prompts = [(Message("user", f"q{i}"),) for i in range(3)]
    scorer = TableScorer({"good": 2.0, "bad": -1.0})
    publisher = PolicyPublisher(store=None, announcer=None, scorer=scorer, heldout=prompts, max_tokens=8)
    scores, rm_version, empty = publisher.score_answers(["good", "  ", "bad"])
    assert scores == [2.0, -1.0, -1.0] and rm_version == "rm-0007" and empty == 1
    assert scorer.calls == [["good", "bad"]]
    with pytest.raises(ValueError, match="held-out"):
        PolicyPublisher(store=None, announcer=None, scorer=scorer, heldout=[], max_tokens=8)


def test_answers_lay_out_prompt_major_with_any_number_per_prompt():
    a, b = (Message("user", "a"),), (Message("user", "b"),)
    assert expand_prompts([a, b], 2) == [a, b]
    assert expand_prompts([a, b], 6) == [a, a, a, b, b, b]
    with pytest.raises(ValueError, match="5 answers do not divide among 2"):
        expand_prompts([a, b], 5)


def test_rescoring_maps_each_answer_to_its_prompt():
    prompts = [(Message("user", f"q{i}"),) for i in range(2)]

    class PromptEcho:
        def score(self, pairs):
            return [float(p[0].content[1:]) for p, _ in pairs], "rm-0003"

    publisher = PolicyPublisher(store=None, announcer=None, scorer=PromptEcho(), heldout=prompts, max_tokens=8)
    assert publisher.score_answers(["x", "y", "z", "w"])[0] == [0.0, 0.0, 1.0, 1.0]
    assert publisher.rescore(["x", "y"]) == ([0.0, 1.0], "rm-0003")


def test_same_figure_and_changed_answers():
    assert same_figure(1.0, 1.0 + 1e-9) and same_figure(-0.5, -0.5001) is False
    assert same_figure(1000.0, 1000.0005)  # relative to the figure's size
    assert answers_changed(["a", "b", "c"], ["a", "x", "c"]) == 1
    assert answers_changed(["a", "b"], ["a"]) == 2  # another layout: every answer counts as changed


def test_guards_refuse_only_what_the_gate_passed_and_are_named():
    @dataclasses.dataclass
    class R:
        name: str
        ok: bool
        reason: str

    passed = PolicyGateDecision(True, "held-out reward 1.0000")
    assert with_guards(passed, []) == passed
    both = with_guards(passed, [R("frozen_rm:rm-0001", True, "f ok"), R("entry:c:f", True, "e ok")])
    assert both.ok and both.reason == "held-out reward 1.0000; guards: f ok; e ok"
    refused = with_guards(passed, [R("frozen_rm:rm-0001", True, "f ok"), R("entry:c:f", False, "e fell")])
    assert not refused.ok and refused.check == "entry:c:f" and refused.reason == "guard e fell"
    kl = PolicyGateDecision(False, "KL too far", "kl")
    assert with_guards(kl, [R("entry:c:f", False, "e fell")]) == kl


class CrcScorer:
    """A stand-in reward model on which any two different answers score differently (almost surely)."""

    def score(self, pairs):
        return [zlib.crc32(r.encode()) / 2**32 for _, r in pairs], "rm-0001"


def test_k_samples_see_a_changed_sampling_distribution_where_greedy_answers_do_not(trainer_store, one_thread):
    from services.trainer.learner import PPOLearner
    from services.trainer.ppo_config import PPOConfig

    s = trainer_store
    learner = PPOLearner.from_store(s.store, s.policy, s.policy, s.rm, PPOConfig(forward_batch_size=16))
    heldout = [(Message("user", f"What is {a} plus {a}?"),) for a in range(1, 5)]
    sampled = PolicyPublisher(store=None, announcer=None, scorer=CrcScorer(), heldout=heldout, max_tokens=10)
    greedy = PolicyPublisher(store=None, announcer=None, scorer=CrcScorer(), heldout=heldout, max_tokens=10, samples=0)
    base, base_greedy = sampled.evaluate(learner), greedy.evaluate(learner)
    assert (base.samples, len(base.answers), base_greedy.samples, len(base_greedy.answers)) == (4, 16, 1, 4)
    # The same weights: the same draws, the same answers, the same figure.
    again = sampled.evaluate(learner)
    assert again.answers == base.answers and again.heldout_reward == base.heldout_reward and again.kl == base.kl
    # Halve every logit (the final norm's scale): the most likely token never changes, the sampling
    # distribution does (flatter), and it moves away from the reference.
    with torch.no_grad():
        learner.policy.lm.model.norm.weight.mul_(0.5)
    moved, moved_greedy = sampled.evaluate(learner), greedy.evaluate(learner)
    assert moved_greedy.answers == base_greedy.answers
    assert same_figure(moved_greedy.heldout_reward, base_greedy.heldout_reward)
    assert answers_changed(moved.answers, base.answers) > 0
    assert not same_figure(moved.heldout_reward, base.heldout_reward)
    assert moved.kl > base.kl + 1e-3


class Announcements:
    """Collects what the policy line announces (the Kafka announcer's place)."""

    def __init__(self) -> None:
        self.events: list = []

    def announce(self, event) -> None:
        self.events.append(event)


def test_a_lora_candidate_is_published_as_an_adapter_version_of_its_base(trainer_store, tmp_path, one_thread):
    import shutil

    from services.trainer.learner import PPOLearner
    from services.trainer.models import LoraSettings, ModelSettings
    from services.trainer.ppo_config import PPOConfig
    from shared.model_store import MANIFEST_NAME, ModelStore
    from shared.models.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_info, adapter_problem
    from shared.models.loading import load_verified_policy, resolve_verified

    def copy(version):
        return shutil.copytree(
            trainer_store.path(version), tmp_path / version, ignore=shutil.ignore_patterns(MANIFEST_NAME)
        )

    store = ModelStore(tmp_path / "models")
    base = store.publish("policy", copy(trainer_store.policy)).version
    rm = store.publish("rm", copy(trainer_store.rm)).version
    lora = ModelSettings(policy_mode="lora", lora=LoraSettings(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj")))
    learner = PPOLearner.from_store(store, base, base, rm, PPOConfig(lr=1e-2, minibatch_size=8, epochs=1), lora)
    ps = [learner.tokenizer.encode(f"What is {a} plus 2?") for a in range(8)]
    learner.step(
        [
            Rollout([], p, r, None, learner.weights_version, "stop", float(i % 2))
            for i, (p, r) in enumerate(zip(ps, learner.generate(ps, 6, greedy=False, seed=0)))
        ]
    )
    heldout = [(Message("user", "What is 1 plus 1?"),)]
    publisher = PolicyPublisher(store, Announcements(), CrcScorer(), heldout, max_tokens=8)
    manifest = publisher.publish(
        learner, parent=base, evaluation=Evaluation(0.5, 0.1, rm), baseline_reward=None, extra={}
    )

    # Only PEFT's two adapter files, MBs (here KBs) instead of the model's weights.
    assert set(manifest.files) == {ADAPTER_WEIGHTS, ADAPTER_CONFIG}
    assert manifest.files[ADAPTER_WEIGHTS].bytes < store.manifest(base).files["model.safetensors"].bytes / 20
    assert manifest.extra["adapter"] == {
        "kind": "lora",
        "base_version": base,
        "rank": 4,
        "alpha": 8.0,
        "target_modules": ["q_proj", "v_proj"],
    }
    assert manifest.extra["rm_version"] == rm and manifest.parent == base
    assert adapter_info(manifest).base_version == base
    assert adapter_problem(manifest, store=store, version_dir=store.path(manifest.version)) is None
    assert store.current("policy") == manifest.version
    resolved = resolve_verified(store, manifest.version)
    assert (resolved.weights_version, resolved.adapter_dir) == (base, store.path(manifest.version))

    # Loaded back (LoRA on its base; or merged into full weights) it is the policy that was published.
    prompt = torch.tensor([ps[0] + [40, 41, 42]])
    with torch.no_grad():
        want = learner.policy.lm(input_ids=prompt).logits
        again = PPOLearner.from_store(store, manifest.version, base, rm, PPOConfig(), lora)
        torch.testing.assert_close(again.policy.lm(input_ids=prompt).logits, want)
        _, merged = load_verified_policy(store, manifest.version)
        torch.testing.assert_close(merged(input_ids=prompt).logits, want, atol=1e-5, rtol=1e-4)
        full = PPOLearner.from_store(store, manifest.version, base, rm, PPOConfig())  # full mode: merged
        assert full.peft_model is None and full.model_base_version == base
        torch.testing.assert_close(full.policy.lm(input_ids=prompt).logits, want, atol=1e-5, rtol=1e-4)
        assert again.reference.lm is again.policy.lm  # the base is the reference: no copy
        assert again.model_base_version == base and again.weights_version == manifest.version
