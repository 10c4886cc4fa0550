"""The continual learner without Kafka: its pure rules, its SQLite state, and whole rounds on the tiny
backbone (train, gate, publish or refuse, pending votes, restart)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from services.reward.comparisons import ComparisonGroup, PointwiseExample, Sample
from services.reward.config import RewardConfig
from services.reward.retraining import (
    RetrainingLoop,
    comparison_key,
    is_heldout,
    replay_sample,
    rm_gate,
    round_due,
)
from services.reward.retraining_state import RetrainingState
from shared.config import ModelStoreConfig, load_config
from shared.events import CompletionEvent, FeedbackEvent, Message, RatedResponse, Timings
from shared.feedback_token import prompt_hash

torch.set_num_threads(1)


# --- pure rules ------------------------------------------------------------------------------------


def test_heldout_split_is_stable_and_close_to_the_fraction():
    keys = [f"prompt-{i}" for i in range(4000)]
    held = [is_heldout(k, 0.2) for k in keys]
    assert held == [is_heldout(k, 0.2) for k in keys]  # same answer every time, no seed involved
    assert 0.17 < sum(held) / len(keys) < 0.23
    # A larger fraction only adds prompts to the held-out side, it never moves one out of it.
    assert all(is_heldout(k, 0.5) for k, h in zip(keys, held) if h)


def test_comparison_key_identifies_who_compared_what_how():
    a = ComparisonGroup(("r1", "r2"), ((0, 1),), "pairwise", "u1")
    assert comparison_key(a) == comparison_key(ComparisonGroup(("r1", "r2"), ((0, 1),), "pairwise", "u1"))
    assert comparison_key(a) != comparison_key(ComparisonGroup(("r1", "r2"), ((1, 0),), "pairwise", "u1"))
    assert comparison_key(a) != comparison_key(ComparisonGroup(("r1", "r2"), ((0, 1),), "pairwise", "u2"))
    # Texts joined or not, the key is the same: it is built from response ids.
    s = Sample((Message("user", "q"),), "t", "r1")
    assert comparison_key(PointwiseExample(s, 1.0, "u1")) == comparison_key(PointwiseExample("r1", 1.0, "u1"))
    assert comparison_key(PointwiseExample("r1", 1.0, "u1")) != comparison_key(PointwiseExample("r1", 0.0, "u1"))


@pytest.mark.parametrize(
    "candidate, current, tolerance, publish",
    [
        (0.80, 0.70, 0.02, True),
        (0.69, 0.70, 0.02, True),  # within the tolerance
        (0.67, 0.70, 0.02, False),  # dropped by more than the tolerance
        (0.70, math.nan, 0.02, True),  # nothing to compare with (the first RM)
        (math.nan, 0.70, 0.02, False),  # no held-out slice: cannot judge, do not publish
    ],
)
def test_gate(candidate, current, tolerance, publish):
    assert rm_gate(candidate, current, tolerance).publish is publish


def test_replay_sample_takes_ratio_times_new_without_repeats():
    old = list(range(100))
    got = replay_sample(old, 10, 1.5, random.Random(0))
    assert len(got) == 15 and len(set(got)) == 15 and set(got) <= set(old)
    assert len(replay_sample(old[:4], 10, 1.0, random.Random(0))) == 4
    assert replay_sample(old, 10, 0.0, random.Random(0)) == []


@pytest.mark.parametrize("unseen, since, due", [(8, 0, True), (7, 0, False), (1, 60, True), (0, 600, False)])
def test_round_due_every_n_or_every_t_with_something_new(unseen, since, due):
    assert round_due(unseen, since, every_n=8, every_s=60) is due


# --- events of a learnable task ------------------------------------------------------------------

ANSWER, EVASIVE = "{a} plus 3 is {s}.", "I am not sure, sorry."
_ids = iter(range(10**6))


def completion(rid: str, question: str, text: str, source: str = "user") -> CompletionEvent:
    return CompletionEvent(
        request_id=f"q-{rid}",
        response_id=rid,
        index=0,
        n=1,
        policy_version="policy-0001",
        model="m",
        source=source,
        messages=[Message("user", question)],
        prompt_token_ids=[],
        completion_text=text,
        token_ids=[],
        logprobs=None,
        finish_reason="stop",
        sampling={},
        timings=Timings(0, 0, 0),
        created_at=0.0,
    )


def ranking(
    ids: list[str], question: str, user: str = "u1", revision: int = 1, received_at: float = 1.0
) -> FeedbackEvent:
    ph = prompt_hash([("user", question)])
    return FeedbackEvent(
        feedback_id=f"f{next(_ids)}",
        kind="ranking",
        user_id=user,
        target="ranking:" + ",".join(sorted(ids)),
        revision=revision,
        supersedes=None,
        responses=[RatedResponse(i, "policy-0001", ph) for i in ids],
        received_at=received_at,
    )


def task(prompts, user="u1", reverse=False, received_at=1.0):
    """Per prompt: an answer and an evasive reply (two completions), ranked answer first."""
    completions, votes = [], []
    for a in prompts:
        q = f"What is {a} plus 3?"
        good, bad = f"r{a}-good-{user}", f"r{a}-bad-{user}"
        completions += [completion(good, q, ANSWER.format(a=a, s=a + 3)), completion(bad, q, EVASIVE)]
        votes.append(ranking([bad, good] if reverse else [good, bad], q, user, received_at=received_at))
    return completions, votes


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def learner_config(store, tmp_path, **overrides) -> RewardConfig:
    values = dict(
        model_store=ModelStoreConfig(store.root),
        max_tokens=96,
        max_response_tokens=32,
        state_dir=tmp_path / "learner",
        learn_every_comparisons=8,
        learn_every_s=3600,
        heldout_fraction=0.3,
        learner_epochs=6,
        learner_lr=3e-3,
        learner_batch_size=4,
        gate_tolerance=0.0,
        pending_timeout_s=60,
        max_principal_share=1.0,  # one rater in most of these tests: no cap (the cap's own tests set it)
    )
    values.update(overrides)
    return load_config(RewardConfig, {}, **values)


@pytest.fixture()
def learner(tiny_store, tmp_path):
    state = RetrainingState(tmp_path / "learner" / "learner.sqlite3")
    published: list[str] = []
    learn = RetrainingLoop(
        learner_config(tiny_store, tmp_path), tiny_store, state, on_published=published.append, clock=Clock()
    )
    learn.published = published
    yield learn
    state.close()


# --- state ----------------------------------------------------------------------------------------


def test_state_keeps_the_live_vote_and_survives_reopening(tmp_path):
    path = tmp_path / "s.sqlite3"
    state = RetrainingState(path)
    first = ranking(["x", "y"], "What is 1 plus 3?", revision=1, received_at=1.0)
    second = ranking(["y", "x"], "What is 1 plus 3?", revision=2, received_at=2.0)
    state.ingest([second], [completion("x", "What is 1 plus 3?", "4")], {("rlhf.feedback", 0): 7}, now=10.0)
    state.ingest([first, second], [], {("rlhf.feedback", 0): 9}, now=11.0)  # an older revision, a redelivery
    state.close()
    state = RetrainingState(path)
    [vote] = state.live_votes()
    assert vote.event == second and vote.arrived_at == 10.0
    assert state.offsets() == {("rlhf.feedback", 0): 9}
    assert set(state.completions(["x", "nope"])) == {"x"}
    state.close()


def test_only_user_completions_are_kept(learner):
    learner.ingest([completion("u", "q?", "a", source="user"), completion("t", "q?", "a", source="trainer")], {})
    assert set(learner.state.completions(["u", "t"])) == {"u"}


# --- rounds ---------------------------------------------------------------------------------------


def held_and_train_prompts(fraction=0.3):
    held = [a for a in range(1, 200) if is_heldout(prompt_hash([("user", f"What is {a} plus 3?")]), fraction)]
    train = [a for a in range(1, 200) if a not in held]
    return held, train


def test_a_round_learns_the_preference_gates_publishes_and_records_what_it_trained(learner, tiny_store):
    held, train = held_and_train_prompts()
    completions, votes = task(held[:6] + train[:16])
    learner.ingest(completions + votes, {("rlhf.feedback", 0): len(votes)})
    comps = learner.comparisons()
    assert len(comps.heldout) == 6 and len(comps.train) == 16 and comps.pending == 0
    assert learner.due(comps)
    result = learner.run_round(comps)
    # The first RM starts from the policy with a fresh head (no rm yet) and learns the preference.
    assert result.outcome == "published" and result.version == "rm-0001" and result.base == "policy-0001"
    assert result.candidate_accuracy >= 0.8 and result.train_loss < math.log(2), result
    assert learner.published == ["rm-0001"]
    manifest = tiny_store.verify("rm-0001")
    assert manifest.metrics["new_comparisons"] == 16 and manifest.metrics["heldout_pairs"] == 6
    assert set(learner.state.trained_keys().values()) == {"rm-0001"}
    assert len(learner.state.trained_keys()) == 16
    assert not learner.due(learner.comparisons())  # nothing new since

    # More ratings: the next round starts from rm-0001 and replays older comparisons.
    completions, votes = task(train[16:26])
    learner.ingest(completions + votes, {})
    result = learner.run_round()
    assert result.base == "rm-0001" and result.new == 10 and result.replayed == 10
    assert result.outcome == "published" and tiny_store.manifest(result.version).parent == "rm-0001"


def test_a_degraded_candidate_is_refused_and_its_comparisons_stay_new(learner, tiny_store):
    held, train = held_and_train_prompts()
    completions, votes = task(held[:6] + train[:12])
    learner.ingest(completions + votes, {})
    assert learner.run_round().outcome == "published"
    completions, votes = task(train[12:24])
    learner.ingest(completions + votes, {})

    def flip_the_head(model):  # the deliberate degradation: every preference reversed
        with torch.no_grad():
            model.score_head.weight.neg_()

    result = learner.run_round(tamper=flip_the_head)
    assert result.outcome == "refused" and result.version is None
    assert result.candidate_accuracy < result.current_accuracy
    assert tiny_store.versions("rm") == ["rm-0001"] and tiny_store.current("rm") == "rm-0001"
    assert learner.published == ["rm-0001"]
    assert sum(1 for v in learner.state.trained_keys().values()) == 12  # the refused round recorded nothing
    assert learner.run_round().outcome == "published"  # an honest retry on the same data passes


def test_a_vote_without_its_completion_waits_then_is_dropped(learner):
    _, train = held_and_train_prompts()
    completions, votes = task(train[:2])
    learner.ingest(votes + completions[:1], {})  # the votes arrive before (most of) their completions
    comps = learner.comparisons()
    assert comps.pending == 2 and len(comps.train) == 0
    learner.clock.t += 30
    assert learner.comparisons().pending == 2  # still within the timeout
    learner.ingest(completions[2:], {})  # the second prompt's completions arrive, the first's do not
    comps = learner.comparisons()
    assert comps.pending == 1 and len(comps.train) == 1
    learner.clock.t += 31  # past pending_timeout_s=60
    comps = learner.comparisons()
    assert comps.pending == 0 and len(comps.train) == 1
    assert learner.state.counts()["dropped_votes"] == 1
    learner.ingest(completions[1:2], {})  # too late: a dropped vote stays dropped
    assert len(learner.comparisons().train) == 1


def test_after_a_restart_nothing_is_lost_and_nothing_retrained(tiny_store, tmp_path):
    held, train = held_and_train_prompts()
    path = tmp_path / "learner" / "learner.sqlite3"
    cfg = learner_config(tiny_store, tmp_path)
    state = RetrainingState(path)
    first = RetrainingLoop(cfg, tiny_store, state, clock=Clock())
    completions, votes = task(held[:4] + train[:10])
    first.ingest(completions + votes, {("rlhf.feedback", 0): 14})
    assert first.run_round().outcome == "published"
    completions, votes = task(train[10:14])
    first.ingest(completions + votes, {("rlhf.feedback", 0): 18})
    state.close()

    state = RetrainingState(path)
    second = RetrainingLoop(cfg, tiny_store, state, clock=Clock())
    assert state.offsets() == {("rlhf.feedback", 0): 18}
    comps = second.comparisons()
    assert len(comps.train) == 14 and len(comps.heldout) == 4
    result = second.run_round(comps)
    assert result.new == 4 and result.base == "rm-0001"  # the 10 trained before are replay, not new
    state.close()


def test_the_time_trigger_trains_on_fewer_than_n_new_comparisons(tiny_store, tmp_path):
    held, train = held_and_train_prompts()
    state = RetrainingState(tmp_path / "learner" / "learner.sqlite3")
    clock = Clock()
    learner = RetrainingLoop(learner_config(tiny_store, tmp_path, learn_every_s=60), tiny_store, state, clock=clock)
    completions, votes = task(held[:3] + train[:3])  # 3 new: below learn_every_comparisons=8
    learner.ingest(completions + votes, {})
    assert learner.maybe_run_round() is None
    clock.t += 30
    assert learner.maybe_run_round() is None
    clock.t += 31
    result = learner.maybe_run_round()
    assert result is not None and result.new == 3
    clock.t += 600  # time alone never triggers a round: something new must have arrived
    assert learner.maybe_run_round() is None
    state.close()


def test_votes_that_give_no_example_are_shown_not_trained(learner):
    from dataclasses import replace

    from prometheus_client import REGISTRY

    _, train = held_and_train_prompts()
    completions, votes = task(train[:2])
    tie = replace(votes[0], kind="pairwise", target="pairwise:" + votes[0].target.split(":")[1], preferred="tie")
    learner.ingest(completions + [tie, votes[1]], {})
    comps = learner.comparisons()
    assert len(comps.train) == 1 and comps.pending == 0
    assert REGISTRY.get_sample_value("rlhf_reward_learner_votes_unused", {"reason": "pairwise_tie"}) == 1


# --- caps per principal and rater quality ----------------------------------------------------------


def test_ten_thousand_ratings_from_one_principal_fill_at_most_its_share_of_a_round(tiny_store, tmp_path):
    from prometheus_client import REGISTRY

    held, train = held_and_train_prompts()
    state = RetrainingState(tmp_path / "learner" / "learner.sqlite3")
    cfg = learner_config(
        tiny_store, tmp_path, max_principal_share=0.1, min_principal_cap=8, learner_epochs=1, learn_every_comparisons=32
    )
    learner = RetrainingLoop(cfg, tiny_store, state, clock=Clock())
    # 50 honest principals with two training comparisons each (and one held out), and mallory with
    # 10,000 rankings of her own (about 30% held out by prompt), all before one round.
    events: list = []
    for i in range(50):
        completions, votes = task([train[i % len(train)], train[(i + 1) % len(train)], held[i % len(held)]], f"user{i}")
        events += completions + votes
    completions, votes = task(range(1000, 11_000), "mallory")
    events += completions + votes
    learner.ingest(events, {})
    comps = learner.comparisons()
    flood = sum(1 for c in comps.train if c.principal == "mallory")
    assert flood > 6000  # the rest of her 10,000 are held out by prompt
    result = learner.run_round(comps)
    # c <= 0.1 * (100 + c): mallory keeps 11 of her comparisons, 9.9% of the round.
    assert result.new_by_principal["mallory"] == 11 and result.new == 111, result.new_by_principal
    assert result.largest_share <= 0.1
    assert result.held_back["capped"] == flood - 11
    # The held-out slice is capped the same way, so the gate is not hers either: 50 honest groups,
    # c <= 0.1 * (50 + c) gives 5, below the floor, so she keeps the floor's 8 of her ~3000.
    assert result.heldout_by_principal["mallory"] == 8 and sum(result.heldout_by_principal.values()) == 58
    assert result.outcome == "published"
    m = tiny_store.verify(result.version).metrics
    assert m["largest_principal_share"] <= 0.1 and m["capped_comparisons"] == flood - 11
    assert (
        REGISTRY.get_sample_value("rlhf_reward_learner_comparisons_held_back", {"reason": "capped", "slice": "train"})
        == flood - 11
    )
    # Her backlog waits, oldest first, but cannot trigger rounds on its own: only what the cap admits
    # counts towards learn_every_comparisons.
    comps = learner.comparisons()
    assert learner.unseen(comps) == 8  # alone now: the floor
    assert not learner.due(comps)
    waiting = [c for c in comps.train if c.principal == "mallory" and c.key not in learner.state.trained_keys()]
    assert len(waiting) == flood - 11
    assert [c.key for c in learner.select(comps).new] == [c.key for c in sorted(waiting, key=lambda c: c.order)[:8]]
    state.close()


def overlapping_raters(prompts, reverse_user="mallory"):
    """Three honest principals and one who always ranks in reverse, on the same answers."""
    events = []
    for user in ("alice", "bob", "carol", reverse_user):
        completions, votes = task(prompts, user, reverse=user == reverse_user)
        events += completions + votes
    return events


def test_a_reverse_rater_is_quarantined_by_its_peers_and_stays_out_across_restarts(tiny_store, tmp_path):
    from shared.errors import FailedPrecondition, NotFound

    held, train = held_and_train_prompts()
    path = tmp_path / "learner" / "learner.sqlite3"
    cfg = learner_config(tiny_store, tmp_path, quarantine_below=0.4, quarantine_min_items=10)
    state = RetrainingState(path)
    learner = RetrainingLoop(cfg, tiny_store, state, clock=Clock())
    learner.ingest(overlapping_raters(held[:4] + train[:12]), {})
    result = learner.run_round()
    # Judged before training: mallory agrees with no peer on 16 overlapping items; the others with 2 of 3.
    mallory = state.rater("mallory")
    assert mallory.status == "quarantined" and mallory.peer_agreement == 0.0 and mallory.peer_items == 16
    assert "other raters" in mallory.reason
    assert {state.rater(u).status for u in ("alice", "bob", "carol")} == {"ok"}
    assert state.rater("alice").peer_agreement == pytest.approx(2 / 3)
    # Her comparisons are neither trained on nor in the held-out slice; they stay in the state.
    assert "mallory" not in result.new_by_principal and "mallory" not in result.heldout_by_principal
    assert result.held_back["quarantined"] == 12 and result.held_back["heldout_quarantined"] == 4
    assert result.outcome == "published" and result.candidate_accuracy == 1.0
    assert state.counts()["votes"] == 64
    listed = learner.list_raters(quarantined_only=True)
    assert [r.principal for r in listed.raters] == ["mallory"] and listed.quarantined == 1 and listed.total == 4
    state.close()

    # After a restart she is still out; an operator releases her and her ratings count again.
    state = RetrainingState(path)
    learner = RetrainingLoop(cfg, tiny_store, state, clock=Clock())
    assert state.rater("mallory").status == "quarantined"
    assert all(c.principal != "mallory" for c in learner.select(learner.comparisons()).new)
    with pytest.raises(NotFound):
        learner.release_rater("nobody")
    with pytest.raises(FailedPrecondition, match="ok, not quarantined"):
        learner.release_rater("alice")
    released = learner.release_rater("mallory")
    assert released.status == "released" and released.status_at > 0
    assert len([c for c in learner.select(learner.comparisons()).new if c.principal == "mallory"]) == 12
    learner.run_round()  # a released principal is never quarantined again by the rule
    assert state.rater("mallory").status == "released"
    state.close()


def test_a_lone_reverse_rater_is_judged_by_the_reward_model(tiny_store, tmp_path):
    held, train = held_and_train_prompts()
    state = RetrainingState(tmp_path / "learner" / "learner.sqlite3")
    cfg = learner_config(tiny_store, tmp_path, quarantine_min_items=8)
    learner = RetrainingLoop(cfg, tiny_store, state, clock=Clock())
    completions, votes = task(held[:6] + train[:16], "alice")
    learner.ingest(completions + votes, {})
    assert learner.run_round().version == "rm-0001"
    # On prompts nobody else rated: no peer can judge her, rm-0001 can (it learnt alice's preference).
    completions, votes = task(train[16:28], "mallory", reverse=True)
    learner.ingest(completions + votes, {})
    result = learner.run_round()
    mallory = state.rater("mallory")
    assert mallory.status == "quarantined" and mallory.peer_items == 0 and mallory.rm_items >= 8
    assert mallory.rm_agreement < 0.4 and "reward model" in mallory.reason
    assert state.rater("alice").status == "ok" and state.rater("alice").rm_agreement > 0.6
    # Nothing of hers was left to train on: the round is skipped, nothing published.
    assert result.outcome == "skipped" and result.held_back["quarantined"] == 12
    assert tiny_store.versions("rm") == ["rm-0001"]
    assert not learner.due(learner.comparisons())
    state.close()
