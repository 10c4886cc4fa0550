"""The publish gate: KL bound, held-out reward not below the last published version's (with
tolerance), non-finite evaluations refused; empty answers never raise the held-out mean."""

from __future__ import annotations

import math

import pytest

from services.trainer.publishing import Evaluation, PolicyPublisher, fill_empty_scores, policy_gate
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
