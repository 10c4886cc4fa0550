"""TrainingLoop with a real learner on the default model and a real model store; sampling and
scoring run in process here (the integration test drives the real inference and reward services):
train -> gate -> atomic publish -> announcement (retried while it fails), refusal beyond the KL
bound, resume from a checkpoint, rollback, pause, staleness in learner steps, and the return to the
last published weights after refusals."""

from __future__ import annotations

import math
import shutil
import threading

import pytest
import torch
from prometheus_client import REGISTRY

from services.trainer.checkpoint import CheckpointStore
from services.trainer.guards import EntryPointGuard, FrozenRmGuard, floor_rule
from services.trainer.learner import PPOLearner
from services.trainer.loop import LoopSettings, LoopState, TrainingLoop, restore, rollout_ages
from services.trainer.ppo_config import PPOConfig
from services.trainer.prompts import LivePromptBuffer, PromptMixer
from services.trainer.publishing import PolicyPublisher
from services.trainer.rollout_collector import RolloutCollector, SampledCompletion
from services.trainer.user_load import UserLoad, UserLoadGovernor, YieldSettings
from shared.errors import InvalidArgument, NotFound
from shared.events import Message, PolicyCandidateEvent
from shared.model_store import ModelStore
from shared.version_line import POLICY, POLICY_CANDIDATE, REWARD_MODEL, PendingAnnouncement, VersionLine

PROMPTS = [(Message("user", f"What is {a} plus {a}?"),) for a in range(1, 13)]
HELDOUT, TRAIN = PROMPTS[:3], PROMPTS[3:]


@pytest.fixture()
def store(trainer_store, tmp_path):
    """A store of this test's own with copies of the session's policy-0001 and rm-0001, published
    as `rlhf bootstrap` does (offline: nothing owed to Kafka)."""
    store = ModelStore(tmp_path / "models")
    for kind, version in ((POLICY, trainer_store.policy), (REWARD_MODEL, trainer_store.rm)):
        src = tmp_path / f"src-{kind.name}"
        shutil.copytree(trainer_store.path(version), src, ignore=shutil.ignore_patterns("manifest.json"))
        VersionLine(store, kind).publish(src)
    return store


class LearnerSampler:
    """Samples with the learner's own policy (what vLLM does with the served version) and reports the
    version the inference service would: the one the test says is served."""

    def __init__(self, get_learner, served: list[str]):
        self.get_learner = get_learner
        self.served = served

    def sample(self, prompts, *, max_tokens, top_p, seed=None, interrupt=None, poll_s=0.25):
        learner = self.get_learner()
        ids = [
            learner.tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in p],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
            )
            for p in prompts
        ]
        out, logprobs = learner.generate(ids, max_tokens, greedy=False, seed=seed, return_logprobs=True)
        return [
            SampledCompletion(
                prompt=p,
                prompt_token_ids=list(i),
                token_ids=o,
                logprobs=lp,
                text=learner.tokenizer.decode(o, skip_special_tokens=True) or "x",
                finish_reason="stop",
                policy_version=self.served[-1],
                policy_versions=[self.served[-1]],
                response_id=f"r{n}",
            )
            for n, (p, i, o, lp) in enumerate(zip(prompts, ids, out, logprobs))
        ]


class LengthScorer:
    """A stand-in reward model: longer answers score higher."""

    def score(self, pairs):
        return [len(r) / 10.0 for _, r in pairs], "rm-0001"


class RecordingAnnouncer:
    def __init__(self, failures: int = 0):
        self.events = []
        self.failures = failures

    def announce(self, event):
        if self.failures:
            self.failures -= 1
            raise ConnectionError("broker down")
        self.events.append(event)


class SwitchingScorer:
    """A reward model replaced while the loop works: call k is scored by version ``schedule(k)``,
    each version on its own scale (100 points above the last)."""

    def __init__(self, schedule):
        self.schedule = schedule
        self.calls = []

    def score(self, pairs):
        n = self.schedule(len(self.calls))
        self.calls.append(f"rm-{n:04d}")
        return [len(r) / 10.0 + 100.0 * n for _, r in pairs], self.calls[-1]


def make_loop(
    store,
    tmp_path,
    *,
    announcer=None,
    kl_bound=1e6,
    publish_every=1,
    lr=1e-3,
    paused=False,
    gate_scorer=None,
    reward_tolerance=1e6,
    guards=(),
    kind=POLICY,
    max_staleness_steps=64,
    revert_after_refusals=0,
    average_decay=0.0,
    **loop_kwargs,
):
    cfg = PPOConfig(epochs=1, minibatch_size=4, lr=lr, forward_batch_size=4, average_decay=average_decay)
    policy, rm = store.current("policy"), store.current("rm")
    state = LoopState(lineage=[policy], reference_version=policy, value_rm_version=rm)

    def load_learner(version, st):
        return PPOLearner.from_store(store, version, st.reference_version, st.value_rm_version, cfg)

    holder = {}
    served = [policy]
    sampler = LearnerSampler(lambda: holder["loop"].learner, served)
    publisher = PolicyPublisher(
        store, announcer or RecordingAnnouncer(), gate_scorer or LengthScorer(), HELDOUT, max_tokens=8, kind=kind
    )
    settings = LoopSettings(
        rollouts_per_iteration=4,
        max_staleness_steps=max_staleness_steps,
        revert_after_refusals=revert_after_refusals,
        publish_every=publish_every,
        checkpoint_every=1,
        kl_bound=kl_bound,
        reward_tolerance=reward_tolerance,
        idle_sleep_s=0.05,
    )
    loop = TrainingLoop(
        load_learner(policy, state),
        state,
        PromptMixer(LivePromptBuffer(8), TRAIN, 0.0),
        RolloutCollector(sampler, LengthScorer(), max_tokens=8),
        publisher,
        CheckpointStore(tmp_path / "ckpt"),
        settings,
        load_learner,
        paused=paused,
        guards=guards,
        **loop_kwargs,
    )
    holder["loop"] = loop
    return loop, served, load_learner


def test_an_iteration_trains_publishes_checkpoints_and_announces(store, tmp_path, one_thread):
    announcer = RecordingAnnouncer()
    loop, _, _ = make_loop(store, tmp_path, announcer=announcer)
    assert loop.run_iteration()
    status = loop.status()
    assert status.step == 1 and status.last_gate.published and status.last_published["version"] == "policy-0002"
    manifest = store.verify("policy-0002")
    assert store.current("policy") == "policy-0002" and manifest.parent == "policy-0001"
    assert manifest.extra["rm_version"] == "rm-0001" and manifest.extra["trainer_step"] == 1
    assert {"heldout_reward", "kl_to_reference", "baseline_reward"} <= manifest.metrics.keys()
    [event] = announcer.events
    assert event.version == "policy-0002" and event.reason == "publish" and event.parent == "policy-0001"
    assert event.manifest_sha256 == store.manifest_sha256("policy-0002")
    assert loop.state.lineage == ["policy-0001", "policy-0002"] and loop.learner.weights_version == "policy-0002"
    assert loop.checkpoints.steps() == [1] and loop.publisher.pending_announcement() is None


def test_a_failed_announcement_is_owed_and_sent_on_the_next_iteration(store, tmp_path, one_thread):
    announcer = RecordingAnnouncer(failures=1)
    loop, served, _ = make_loop(store, tmp_path, announcer=announcer, publish_every=0)
    loop.run_iteration()
    result = loop.publish_now()
    assert result.published and announcer.events == []
    assert loop.publisher.pending_announcement() == PendingAnnouncement(result.version, "publish")
    # The store remembers the debt (the policy line's current vs announced): a restart pays it too.
    assert VersionLine(store, POLICY).pending_announcement() == PendingAnnouncement(result.version, "publish")
    assert result.version in CheckpointStore(tmp_path / "ckpt").load_latest().state["loop"]["lineage"]
    served.append(result.version)
    loop.run_iteration()
    assert [e.version for e in announcer.events] == [result.version] and loop.publisher.pending_announcement() is None


def test_a_version_published_but_never_checkpointed_is_withdrawn_not_announced(store, tmp_path, one_thread):
    # A trainer killed between publishing policy-0002 and the checkpoint that records it: on restart
    # its checkpoint's lineage is [policy-0001] and policy-0002's weights are gone with the process.
    orphan = tmp_path / "orphan"
    shutil.copytree(store.path("policy-0001"), orphan, ignore=shutil.ignore_patterns("manifest.json"))
    announcer = RecordingAnnouncer()
    loop, _, _ = make_loop(store, tmp_path, announcer=announcer, publish_every=0)
    loop.publisher.line.publish(orphan, parent="policy-0001")
    assert loop.publisher.pending_announcement() == PendingAnnouncement("policy-0002", "publish")
    assert loop.run_iteration()
    # Serving stays on the version the trainer builds on; the orphan is never announced.
    assert store.current("policy") == "policy-0001" and announcer.events == []
    assert loop.publisher.pending_announcement() is None and loop.state.lineage == ["policy-0001"]


def test_a_candidate_beyond_the_kl_bound_is_refused_and_nothing_is_written(store, tmp_path, one_thread):
    announcer = RecordingAnnouncer()
    loop, _, _ = make_loop(store, tmp_path, announcer=announcer, kl_bound=0.0, lr=1e-2)
    loop.run_iteration()
    gate = loop.status().last_gate
    assert not gate.published and "exceeds the bound" in gate.reason and gate.kl > 0 and gate.refused_by == "kl"
    assert store.versions("policy") == ["policy-0001"] and announcer.events == []
    assert loop.publish_now().published is False


def test_the_gate_compares_candidate_and_baseline_under_one_reward_model(store, tmp_path, one_thread):
    # Every call a new RM 100 points above the last: comparing across versions would wave any
    # candidate through (or refuse it). A tolerance of 0.5 makes the comparison count.
    always = SwitchingScorer(lambda k: k + 1)
    loop, _, _ = make_loop(store, tmp_path, gate_scorer=always, reward_tolerance=0.5)
    loop.run_iteration()
    gate = loop.status().last_gate
    assert not gate.published and "reward model changed during each of 3 evaluations" in gate.reason
    assert (
        store.versions("policy") == ["policy-0001"] and len(always.calls) == 7
    )  # baseline + 3 x (candidate, re-score)
    # Calls: baseline (rm-0001), candidate (rm-0002), baseline re-scored (rm-0003), candidate again (rm-0003).
    once = SwitchingScorer(lambda k: min(k + 1, 3))
    loop, _, _ = make_loop(store, tmp_path / "again", gate_scorer=once)
    loop.run_iteration()
    assert once.calls == ["rm-0001", "rm-0002", "rm-0003", "rm-0003"]
    assert loop.status().last_gate.published
    assert store.verify(loop.state.lineage[-1]).extra["rm_version"] == "rm-0003"


def test_publish_now_without_an_update_publishes_nothing(store, tmp_path, one_thread):
    loop, _, _ = make_loop(store, tmp_path, publish_every=0)
    result = loop.publish_now()
    assert not result.published and "no update" in result.reason and store.versions("policy") == ["policy-0001"]


def test_with_averaging_the_gate_sees_and_the_store_gets_the_average_not_the_weights_trained(
    store, tmp_path, one_thread
):
    from safetensors.torch import load_file

    loop, _, _ = make_loop(store, tmp_path, publish_every=0, average_decay=0.9)
    assert loop.run_iteration() and loop.run_iteration()
    own = {k: v.clone() for k, v in loop.learner.policy_state().items()}
    result = loop.publish_now()
    assert result.published
    files = sorted(store.path(result.version).glob("*.safetensors"))
    published = {k: v for f in files for k, v in load_file(str(f)).items()}
    average = loop.learner.average.tensors
    moved = [k for k in published if k in own and not torch.equal(own[k], published[k])]
    assert moved  # the published weights are not the weights trained...
    for k in moved:  # ...but their average, in the version's dtype
        assert torch.equal(published[k], average[k].to(published[k].dtype)), k
    # Publishing did not touch the weights being trained; nothing new to publish until a step.
    assert all(torch.equal(v, own[k]) for k, v in loop.learner.policy_state().items())
    assert loop.learner.weights_version == f"{result.version}@step2"
    again = loop.publish_now()
    assert not again.published and "no update" in again.reason


def test_resume_from_a_checkpoint_restores_weights_counters_and_lineage(store, tmp_path, one_thread):
    loop, served, load_learner = make_loop(store, tmp_path)
    loop.run_iteration()  # publishes policy-0002
    served.append(loop.state.lineage[-1])
    loop.run_iteration()  # a second publish: checkpoint at step 2
    loaded = CheckpointStore(tmp_path / "ckpt").load_latest()
    learner, state = restore(loaded, load_learner)
    assert state.step == 2 and state.lineage == loop.state.lineage and state.baseline == loop.state.baseline
    assert learner.weights_version == loop.learner.weights_version
    for (name, a), b in zip(loop.learner.policy_state().items(), learner.policy_state().values()):
        assert torch.equal(a, b), name


def test_rollback_serves_an_earlier_version_and_restarts_the_lineage(store, tmp_path, one_thread):
    announcer = RecordingAnnouncer()
    loop, served, _ = make_loop(store, tmp_path, announcer=announcer)
    loop.run_iteration()
    published = loop.state.lineage[-1]
    with pytest.raises(NotFound):
        loop.rollback("policy-0042")
    with pytest.raises(InvalidArgument):
        loop.rollback("rm-0001")
    result = loop.rollback("policy-0001")
    assert result.published and store.current("policy") == "policy-0001"
    assert announcer.events[-1].version == "policy-0001" and announcer.events[-1].reason == "rollback"
    assert loop.state.lineage == ["policy-0001"] and loop.learner.weights_version == "policy-0001"
    assert loop.state.baseline is None
    # Rollouts still sampled by the version rolled back away from are never trained on.
    served.append(published)
    assert not loop.run_iteration() and loop.state.dropped["unknown_version"] == 4


def test_a_paused_loop_does_not_train_until_resumed(store, tmp_path, one_thread):
    loop, _, _ = make_loop(store, tmp_path, paused=True, publish_every=0)
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop,), daemon=True)
    thread.start()
    try:
        stop.wait(1.0)
        assert loop.status().step == 0 and loop.status().paused
        loop.resume()
        deadline = threading.Event()
        for _ in range(600):
            if loop.status().step >= 1:
                break
            deadline.wait(0.1)
        assert loop.status().step >= 1 and not loop.status().paused
    finally:
        stop.set()
        thread.join(60)


class ShareGuard:
    """An operator's check in process: the share of answers longer than ``chars`` characters."""

    def __init__(self, chars: int, threshold: float = 0.5):
        self.name = f"entry:test:longer_than_{chars}"
        self.threshold = threshold
        self.chars = chars

    def value(self, prompts, answers):
        return sum(len(a) > self.chars for a in answers) / len(answers)

    def judge(self, value, baseline):
        return floor_rule(self.name, value, baseline, self.threshold, 0.0)


def counter(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_guard_refusal_blocks_publication(store, tmp_path, one_thread):
    def broken(prompts, answers):
        raise RuntimeError("the check cannot run")

    announcer = RecordingAnnouncer()
    guard = EntryPointGuard("test:broken", broken, threshold=0.0)  # fails closed
    refused_before = counter("rlhf_trainer_gate_refused_total", reason=guard.name)
    loop, _, _ = make_loop(store, tmp_path, announcer=announcer, guards=[guard])
    loop.run_iteration()
    gate = loop.status().last_gate
    assert not gate.published
    assert gate.reason == "guard entry:test:broken: the check raised RuntimeError: the check cannot run"
    [checked] = gate.guards
    assert checked["name"] == guard.name and checked["ok"] is False and gate.refused_by == guard.name
    assert store.versions("policy") == ["policy-0001"] and announcer.events == []
    assert counter("rlhf_trainer_gate_refused_total", reason=guard.name) == refused_before + 1


def test_guards_that_pass_are_recorded_in_the_manifest_the_status_and_the_baseline(store, tmp_path, one_thread):
    frozen = FrozenRmGuard.load(store, "rm-0001", threshold=1e6)
    share = ShareGuard(chars=0, threshold=0.0)
    compared_before = counter("rlhf_trainer_gate_compared_total")
    loop, _, _ = make_loop(store, tmp_path, guards=[frozen, share])
    loop.run_iteration()
    gate = loop.status().last_gate
    assert gate.published and "; guards: frozen_rm:rm-0001: " in gate.reason
    assert [g["name"] for g in gate.guards] == ["frozen_rm:rm-0001", share.name]
    assert all(g["ok"] and g["baseline"] is not None for g in gate.guards)
    manifest = store.verify(gate.version)
    value = manifest.metrics["guard:frozen_rm:rm-0001"]
    assert math.isfinite(value) and value == gate.guards[0]["value"] and manifest.metrics["heldout_samples"] == 4
    # The published candidate's values are the next candidate's baseline (no re-scoring of its answers).
    assert loop.state.baseline["guards"] == {"frozen_rm:rm-0001": value, share.name: gate.guards[1]["value"]}
    assert len(loop.state.baseline["answers"]) == 4 * len(HELDOUT)
    # The candidate was compared with the measured baseline under one RM (the gate's discrimination).
    assert counter("rlhf_trainer_gate_compared_total") == compared_before + 1
    assert gate.compared and gate.same_as_baseline is (gate.heldout_reward == gate.baseline_reward)


# --- rollout mode: the trainer proposes candidates, the rollout service decides ---------------------


def test_in_rollout_mode_a_gated_version_becomes_the_candidate_and_current_stays(store, tmp_path, one_thread):
    announcer = RecordingAnnouncer()
    loop, _, _ = make_loop(store, tmp_path, announcer=announcer, kind=POLICY_CANDIDATE)
    assert loop.run_iteration()
    assert store.pointer("policy", "candidate") == "policy-0002" and store.current("policy") == "policy-0001"
    [event] = announcer.events
    assert isinstance(event, PolicyCandidateEvent) and (event.version, event.reason) == ("policy-0002", "publish")
    # For the trainer it is published: the lineage and the baseline build on it.
    assert loop.state.lineage == ["policy-0001", "policy-0002"] and loop.state.last_published["reason"] == "candidate"
    assert VersionLine(store, POLICY).pending_announcement() is None  # nothing owed on current
    # A rollback only points the candidate back (the trainer rebases); what users get is the
    # rollout service's to change.
    loop.rollback("policy-0001")
    assert store.pointer("policy", "candidate") == "policy-0001" and store.current("policy") == "policy-0001"
    assert announcer.events[-1].reason == "rollback" and isinstance(announcer.events[-1], PolicyCandidateEvent)


def test_staleness_counts_learner_steps_not_published_versions(store, tmp_path, one_thread):
    """Rollout mode, three candidates in a row that users never got: inference still serves
    policy-0001, whose rollouts are as old as the learner steps taken since (3), not "3 versions"."""
    loop, served, _ = make_loop(store, tmp_path, kind=POLICY_CANDIDATE, max_staleness_steps=3)
    for _ in range(3):
        assert loop.run_iteration()
    assert loop.state.lineage == ["policy-0001", "policy-0002", "policy-0003", "policy-0004"]
    assert loop.state.version_depth == {"policy-0001": 0, "policy-0002": 1, "policy-0003": 2, "policy-0004": 3}
    assert served == ["policy-0001"] and not loop.state.dropped.get("stale")
    assert loop.run_iteration()  # policy-0001 is 3 steps old: still within the bound
    assert not loop.run_iteration() and loop.state.dropped["stale"] == 4  # 4 steps old: stale
    assert counter("rlhf_trainer_oldest_rollout_steps") == 3


def test_rollout_ages_are_learner_steps_along_the_lineage():
    lineage = ["policy-0003", "policy-0005", "policy-0006"]
    depths = {"policy-0003": 0, "policy-0005": 10, "policy-0006": 20}
    assert rollout_ages(lineage, depths, 25) == {"policy-0003": 25, "policy-0005": 15, "policy-0006": 5}
    # One version served for 100 steps without a publish: 100 steps old.
    assert rollout_ages(["policy-0001"], {"policy-0001": 0}, 100) == {"policy-0001": 100}
    assert rollout_ages(lineage, {"policy-0006": 20}, 20) == {"policy-0006": 0}  # depths unknown: not used


def test_a_checkpoint_from_before_depths_counts_every_lineage_version_fresh():
    state = LoopState.from_json(
        {"lineage": ["policy-0001", "policy-0002"], "reference_version": "policy-0001", "value_rm_version": "rm-0001"}
    )
    assert state.depth == 0 and state.version_depth == {"policy-0001": 0, "policy-0002": 0}


def always_refuses():
    def broken(prompts, answers):
        raise RuntimeError("the check cannot run")

    return EntryPointGuard("test:broken", broken, threshold=0.0)  # fails closed: every candidate refused


def test_after_k_refusals_the_learner_returns_to_the_last_published_weights(store, tmp_path, one_thread):
    loop, _, _ = make_loop(store, tmp_path, guards=[always_refuses()], revert_after_refusals=2)
    published = {k: v.clone() for k, v in loop.learner.policy_state().items()}
    reverts_before = counter("rlhf_trainer_reverts_total", reason="refusals")
    loop.run_iteration()
    assert loop.state.refusals_in_a_row == 1 and loop.state.depth == 1 and loop.state.reverts == 0
    moved = loop.learner.policy_state()
    assert any(not torch.equal(published[k], moved[k]) for k in published)
    loop.run_iteration()  # the second refusal in a row: back to policy-0001's weights
    assert loop.state.reverts == 1 and loop.state.refusals_in_a_row == 0 and loop.state.depth == 0
    assert loop.learner.weights_version == "policy-0001" and loop.state.step == 2
    for k, v in loop.learner.policy_state().items():
        assert torch.equal(published[k], v), k
    assert counter("rlhf_trainer_reverts_total", reason="refusals") == reverts_before + 1
    assert store.versions("policy") == ["policy-0001"]
    # The revert is checkpointed: a restart resumes from the published weights, not the refused ones.
    assert CheckpointStore(tmp_path / "ckpt").load_latest().state["loop"]["reverts"] == 1


def test_a_kl_refusal_reverts_at_once_and_keeps_the_kl_coefficient(store, tmp_path, one_thread):
    loop, _, _ = make_loop(store, tmp_path, kl_bound=0.0, lr=1e-2, revert_after_refusals=5)
    loop.learner.kl_controller.value = 0.37
    loop.run_iteration()
    assert loop.status().last_gate.refused_by == "kl"
    assert loop.state.reverts == 1 and loop.learner.weights_version == "policy-0001"
    assert loop.learner.kl_controller.value == 0.37  # fresh optimiser, same restraint


def test_without_reverts_a_refused_trainer_trains_on_from_the_refused_candidate(store, tmp_path, one_thread):
    loop, _, _ = make_loop(store, tmp_path, guards=[always_refuses()], revert_after_refusals=0)
    for _ in range(3):
        loop.run_iteration()
    assert loop.state.reverts == 0 and loop.state.refusals_in_a_row == 3 and loop.state.depth == 3


# --- yielding to users (user_load.py) -----------------------------------------------------------


class Loads:
    """The serving load the loop reads (inference's GetLoad in the service), set by the test."""

    def __init__(self, load: UserLoad):
        self.load = load
        self.reads = 0

    def __call__(self) -> UserLoad:
        self.reads += 1
        return self.load


class GroupRecorder:
    """Records the groups the loop sends (size, seed) and samples them with the real sampler."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.groups = []

    def sample(self, prompts, *, max_tokens, top_p, seed=None, interrupt=None, poll_s=0.25):
        self.groups.append((len(prompts), seed))
        return self.sampler.sample(prompts, max_tokens=max_tokens, top_p=top_p, seed=seed)


def by_users(in_flight_threshold=8, poll_s=0.05):
    return UserLoadGovernor(
        YieldSettings(
            user_in_flight=in_flight_threshold, user_waiting=0, user_ttft_s=0.0, poll_s=poll_s, idle_budget=1
        ),
        full=4,
    )


def wait_for(condition, timeout_s=60.0):
    ticker = threading.Event()
    for _ in range(int(timeout_s / 0.05)):
        if condition():
            return True
        ticker.wait(0.05)
    return condition()


def test_under_some_user_load_the_batch_goes_in_smaller_groups_with_the_same_seeds(store, tmp_path, one_thread):
    loads = Loads(UserLoad(user_in_flight=6))  # pressure 0.75: 2 rollouts at once (of 4)
    loop, _, _ = make_loop(store, tmp_path, publish_every=0, governor=by_users(), user_load=loads)
    recorder = GroupRecorder(loop.collector.sampler)
    loop.collector.sampler = recorder
    assert loop.run_iteration()
    assert [n for n, _ in recorder.groups] == [2, 2]
    first_seed = recorder.groups[0][1]
    assert recorder.groups[1][1] == first_seed + 2  # prompt i keeps seed + i
    assert loop.state.step == 1 and counter("rlhf_trainer_rollout_concurrency") == 2


def test_the_loop_yields_while_users_need_the_capacity_and_resumes_after(store, tmp_path, one_thread):
    waited_before = counter("rlhf_trainer_user_wait_seconds_total", reason="users") or 0.0
    loads = Loads(UserLoad(user_in_flight=9))
    loop, _, _ = make_loop(store, tmp_path, publish_every=0, governor=by_users(), user_load=loads)
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: loads.reads >= 5)
        status = loop.status()
        assert (status.step, status.state) == (0, "yielding")
        assert status.detail.startswith("yielding to users: 9 user requests in flight")
        assert counter("rlhf_trainer_user_load_state", state="yielding") == 1
        loads.load = UserLoad(user_in_flight=6)  # below the threshold, above the resume fraction
        reads = loads.reads
        assert wait_for(lambda: loads.reads >= reads + 5)
        assert loop.status().step == 0
        loads.load = UserLoad(user_in_flight=2)
        assert wait_for(lambda: loop.status().step >= 1)
        assert counter("rlhf_trainer_user_load_state", state="full") == 1
    finally:
        stop.set()
        thread.join(60)
    assert not thread.is_alive()
    assert counter("rlhf_trainer_user_wait_seconds_total", reason="users") > waited_before
    assert counter("rlhf_trainer_rollouts_per_second") > 0


class UsersArriveAfterSampling(GroupRecorder):
    """Samples as GroupRecorder does; after the last group, the users' load turns to ``then``."""

    def __init__(self, sampler, loads: Loads, then: UserLoad):
        super().__init__(sampler)
        self.loads, self.then = loads, then

    def sample(self, prompts, **kwargs):
        out = super().sample(prompts, **kwargs)
        self.loads.load = self.then
        return out


def test_users_arriving_after_sampling_hold_the_learner_step_until_they_leave(store, tmp_path, one_thread):
    """The scoring and the PPO step of rollouts already sampled wait while users' pressure is at the
    yield threshold (they cannot be cancelled half-way), and run once it is low again."""
    loads = Loads(UserLoad(user_in_flight=0, user_quiet_s=0.0))
    loop, _, _ = make_loop(store, tmp_path, publish_every=0, governor=by_users(), user_load=loads)
    loop.collector.sampler = UsersArriveAfterSampling(loop.collector.sampler, loads, UserLoad(user_in_flight=9))
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: loop.status().detail.startswith("scoring held: yielding to users"))
        reads = loads.reads
        assert wait_for(lambda: loads.reads >= reads + 5)
        assert loop.status().step == 0, "no learner step while users need the cores"
        loads.load = UserLoad(user_in_flight=1, user_quiet_s=0.0)
        assert wait_for(lambda: loop.status().step >= 1)
    finally:
        stop.set()
        thread.join(60)
    assert not thread.is_alive()


def test_a_stop_while_yielding_ends_the_thread_without_a_step(store, tmp_path, one_thread):
    loads = Loads(UserLoad(user_in_flight=50))
    loop, _, _ = make_loop(store, tmp_path, publish_every=0, governor=by_users(), user_load=loads)
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop,), daemon=True)
    thread.start()
    assert wait_for(lambda: loads.reads >= 2)
    stop.set()
    thread.join(10)
    assert not thread.is_alive() and loop.state.step == 0
