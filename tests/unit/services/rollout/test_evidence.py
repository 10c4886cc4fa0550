"""Evidence per version from ratings and completions, and the live gate's decision."""

from __future__ import annotations

import random

import pytest

from services.rollout.evidence import (
    EvidenceBook,
    GateSettings,
    SignalCount,
    VersionEvidence,
    decide,
    likert_value,
    pairwise_value,
    ranking_outcome,
    thumb_value,
    time_per_output_token,
)
from shared.events import CompletionEvent, FeedbackEvent, Message, RatedResponse, Timings

STABLE, CANARY = "policy-0007", "policy-0008"


def vote(user, kind, versions, revision=1, **fields) -> FeedbackEvent:
    rids = [f"r-{user}-{i}" for i in range(len(versions))]
    return FeedbackEvent(
        feedback_id=f"f-{user}-{revision}-{kind}",
        kind=kind,
        user_id=user,
        target=f"{kind}:{','.join(rids)}",
        revision=revision,
        supersedes=None,
        responses=[RatedResponse(r, v, "p") for r, v in zip(rids, versions)],
        **fields,
    )


def completion(version, total_s=0.5, finish="stop", tokens=5, source="user") -> CompletionEvent:
    return CompletionEvent(
        request_id="q", response_id="r", index=0, n=1, policy_version=version, model="m", source=source,
        messages=[Message("user", "hi")], prompt_token_ids=[1], completion_text="x", token_ids=[0] * tokens,
        logprobs=None, finish_reason=finish, sampling={}, timings=Timings(0.0, 0.1, total_s), created_at=0.0,
        policy_versions=[version],
    )  # fmt: skip


def test_signal_values():
    assert (thumb_value("up"), thumb_value("down"), thumb_value("meh")) == (1.0, 0.0, None)
    assert (likert_value(1), likert_value(7), likert_value(4), likert_value(8)) == (0.0, 1.0, 0.5, None)
    assert (pairwise_value("a"), pairwise_value("b"), pairwise_value("tie")) == (1.0, 0.0, 0.5)
    assert (ranking_outcome(1, 2), ranking_outcome(3, 2), ranking_outcome(2, 2)) == (1.0, 0.0, 0.5)


def test_thumbs_and_likert_count_per_version_and_a_revision_replaces_the_vote():
    book = EvidenceBook({STABLE, CANARY})
    book.observe_feedback(vote("u1", "thumb", [CANARY], thumb="down"))
    book.observe_feedback(vote("u2", "thumb", [CANARY], thumb="up"))
    book.observe_feedback(vote("u3", "likert", [STABLE], score=7))
    book.observe_feedback(vote("u1", "thumb", [CANARY], revision=2, thumb="up"))  # u1 changed their mind
    book.observe_feedback(vote("u1", "thumb", [CANARY], revision=1, thumb="down"))  # a stale copy: ignored
    assert (book.of(CANARY).thumbs.total, book.of(CANARY).thumbs.n) == (2.0, 2)
    assert (book.of(STABLE).likert.total, book.of(STABLE).likert.n) == (1.0, 1)


def test_side_by_side_pairs_and_rankings_count_for_both_orders():
    book = EvidenceBook({STABLE, CANARY})
    book.observe_feedback(vote("u1", "pairwise", [CANARY, STABLE], preferred="a"))
    book.observe_feedback(vote("u2", "pairwise", [STABLE, CANARY], preferred="a"))
    book.observe_feedback(vote("u3", "ranking", [CANARY, STABLE], ranks=[1, 1]))
    book.observe_feedback(vote("u4", "pairwise", [CANARY, CANARY], preferred="a"))  # same version: no evidence
    sxs = book.side_by_side(CANARY, STABLE)
    assert (sxs.total, sxs.n) == (1.5, 3)
    assert book.side_by_side(STABLE, CANARY).total == 1.5


def test_unwatched_versions_and_trainer_rollouts_are_ignored():
    book = EvidenceBook({STABLE, CANARY})
    book.observe_feedback(vote("u1", "thumb", ["policy-0001"], thumb="up"))
    book.observe_completion(completion(CANARY, source="trainer"))
    book.observe_completion(completion("policy-0001"))
    assert book.of(CANARY).ok.n == 0 and "policy-0001" not in book._evidence


def test_completions_give_errors_latency_and_length():
    book = EvidenceBook({CANARY})
    for finish in ("stop", "length", "error"):
        book.observe_completion(completion(CANARY, total_s=1.0, finish=finish, tokens=4))
    s = book.of(CANARY).summary()
    assert s["completions"] == 3 and s["error_rate"] == pytest.approx(1 / 3)
    assert s["latency_p50_s"] == 1.0 and s["mean_tokens"] == 4.0
    assert s["ttft_p50_s"] == 0.1 and s["tpot_p50_s"] == pytest.approx(0.3)  # (1.0 - 0.1) / 3


def test_the_vote_map_is_bounded():
    book = EvidenceBook({CANARY}, max_votes=10)
    for i in range(25):
        book.observe_feedback(vote(f"u{i}", "thumb", [CANARY], thumb="up"))
    assert len(book._votes) == 10 and book.forgotten_votes == 15 and book.of(CANARY).thumbs.n == 25


def thumbs(ups: int, n: int) -> VersionEvidence:
    e = VersionEvidence()
    e.thumbs.add(1.0, ups)
    e.thumbs.add(0.0, n - ups)
    return e


SETTINGS = GateSettings(min_ratings=30, timeout_s=600, min_latency_samples=50)


def test_a_clearly_worse_canary_is_rolled_back_with_its_evidence():
    d = decide(thumbs(20, 100), thumbs(700, 1000), SignalCount(), SETTINGS, age_s=60)
    assert d.action == "rollback" and "thumbs" in d.reason
    assert d.evidence["thumbs"]["verdict"] == "rollback" and d.evidence["thumbs"]["difference"][1] < 0


def test_a_non_inferior_canary_is_promoted_once_it_has_enough_ratings():
    d = decide(thumbs(900, 1000), thumbs(700, 1000), SignalCount(), SETTINGS, age_s=60)
    assert d.action == "promote" and "thumbs" in d.reason
    few = decide(thumbs(20, 20), thumbs(700, 1000), SignalCount(), GateSettings(min_ratings=100), age_s=60)
    assert few.action == "continue"


def test_without_a_conclusion_the_canary_times_out():
    assert decide(thumbs(5, 10), thumbs(5, 10), SignalCount(), SETTINGS, age_s=60).action == "continue"
    d = decide(thumbs(5, 10), thumbs(5, 10), SignalCount(), SETTINGS, age_s=601)
    assert d.action == "rollback" and "no conclusion" in d.reason


def test_errors_and_latency_can_roll_back_a_well_rated_canary():
    canary, stable = thumbs(900, 1000), thumbs(700, 1000)
    canary.ok.add(0.0, 300)
    canary.ok.add(1.0, 700)
    stable.ok.add(1.0, 1000)
    assert decide(canary, stable, SignalCount(), SETTINGS, age_s=60).reason.endswith("no_error")
    slow, fast = thumbs(900, 1000), thumbs(700, 1000)
    slow.tpot_s.extend([0.2] * 49)
    fast.tpot_s.extend([0.1] * 50)
    assert decide(slow, fast, SignalCount(), SETTINGS, age_s=60).action == "promote"  # 49 < 50: not judged
    slow.tpot_s.append(0.2)
    reason = decide(slow, fast, SignalCount(), SETTINGS, age_s=60).reason
    assert "median time per output token 200.0 ms > 1.5 x 100.0 ms" in reason
    late, prompt = thumbs(900, 1000), thumbs(700, 1000)
    late.ttft_s.extend([0.5] * 50)
    prompt.ttft_s.extend([0.1] * 50)
    assert "median time to first token 500.0 ms" in decide(late, prompt, SignalCount(), SETTINGS, age_s=60).reason


def test_time_per_output_token():
    assert time_per_output_token(0.1, 1.0, 4) == pytest.approx(0.3)
    assert time_per_output_token(0.5, 0.4, 2) == 0.0  # clock noise never gives a negative time


def test_a_canary_with_longer_or_shorter_answers_is_not_slower_for_it():
    book = EvidenceBook({CANARY, "policy-0001"})
    for _ in range(60):
        book.observe_completion(completion(CANARY, total_s=2.1, tokens=41))  # twice the length, twice the time
        book.observe_completion(completion("policy-0001", total_s=1.1, tokens=21))
        book.observe_completion(completion("policy-0001", total_s=0.2, tokens=3))  # short answers
    canary, stable = book.of(CANARY), book.of("policy-0001")
    canary.thumbs.add(1.0, 900)
    canary.thumbs.add(0.0, 100)
    stable.thumbs.add(1.0, 700)
    stable.thumbs.add(0.0, 300)
    assert decide(canary, stable, SignalCount(), SETTINGS, age_s=60).action == "promote"


def test_alpha_is_split_across_the_signals_with_data():
    canary, stable = thumbs(50, 100), thumbs(50, 100)
    canary.likert.add(0.5, 10)
    stable.likert.add(0.5, 10)
    d = decide(canary, stable, SignalCount(), GateSettings(alpha=0.06), age_s=1)
    assert d.evidence["alpha_per_signal"] == pytest.approx(0.03)


def test_equal_versions_are_rarely_rolled_back_when_watched_after_every_rating():
    rng = random.Random(5)
    rollbacks = 0
    for _ in range(100):
        canary, stable = VersionEvidence(), VersionEvidence()
        for _ in range(1500):
            arm = canary if rng.random() < 0.2 else stable
            arm.thumbs.add(float(rng.random() < 0.6))
            d = decide(canary, stable, SignalCount(), SETTINGS, age_s=0)
            if d.action != "continue":
                rollbacks += d.action == "rollback"
                break
    assert rollbacks <= 5  # alpha = 0.05


def test_reset_forgets_observations_and_votes_but_keeps_the_watched_versions():
    book = EvidenceBook({STABLE, CANARY}, max_votes=10)
    book.observe_feedback(vote("u1", "thumb", [CANARY], thumb="down"))
    book.observe_feedback(vote("u2", "likert", [STABLE], score=3))
    assert book.votes_held == 2
    book.reset()
    assert book.votes_held == 0 and book.of(CANARY).thumbs.n == 0 and book.of(STABLE).likert.n == 0
    assert book.watched == {STABLE, CANARY}
    # A revision of a vote from before the reset counts as the principal's live vote from now on.
    book.observe_feedback(vote("u1", "thumb", [CANARY], revision=2, thumb="up"))
    assert (book.of(CANARY).thumbs.total, book.of(CANARY).thumbs.n) == (1.0, 1)
