"""The rules of caps and rater quality on hand-made examples: the cap per principal, the agreement
with peers and with the RM, and the quarantine rule."""

from __future__ import annotations

import math

import pytest

from services.reward.comparisons import ComparisonGroup, Sample
from services.reward.raters import (
    RaterScore,
    cap_per_principal,
    largest_share,
    pair_orderings,
    peer_agreements,
    principal_cap,
    quarantine_reason,
    rm_group_agreement,
    wilson_upper,
)
from shared.events import Message

# --- the cap -----------------------------------------------------------------------------------------


def kept_shares(counts: dict[str, int], cap: int) -> dict[str, float]:
    kept = {p: min(n, cap) for p, n in counts.items()}
    return {p: k / sum(kept.values()) for p, k in kept.items()}


def test_one_flooder_among_many_keeps_at_most_its_share():
    counts = {"mallory": 10_000, **{f"user{i}": 10 for i in range(50)}}
    cap = principal_cap(counts, 0.1, floor=8)
    # c <= 0.1 * (50 * 10 + c)  <=>  c <= 55.5: the largest integer is 55.
    assert cap == 55
    assert kept_shares(counts, cap)["mallory"] <= 0.1
    assert kept_shares(counts, cap + 1)["mallory"] > 0.1  # the largest cap that keeps the share


def test_with_few_principals_the_floor_keeps_the_loop_learning():
    # Four principals can never each hold at most 10%: the share alone would keep nothing.
    counts = {"mallory": 10_000, "a": 30, "b": 30, "c": 30}
    assert principal_cap(counts, 0.1, floor=8) == 8
    # A lone rater gets the floor per round: the rest of its comparisons wait.
    assert principal_cap({"alice": 100}, 0.1, floor=8) == 8
    assert principal_cap({"alice": 5}, 0.1, floor=8) == 5  # never more than the largest offer


@pytest.mark.parametrize(
    "counts, expected",
    [
        ({}, 0),
        ({"a": 3, "b": 1000}, 1000),  # max_share = 1: everything is kept
    ],
)
def test_cap_edges(counts, expected):
    assert principal_cap(counts, 1.0, floor=1) == expected


def test_equal_principals_are_not_capped_when_each_is_within_the_share():
    counts = {f"u{i}": 7 for i in range(20)}  # 20 principals, 5% each
    assert principal_cap(counts, 0.1, floor=1) == 7


def test_cap_refuses_a_share_out_of_range():
    with pytest.raises(ValueError, match="max_share"):
        principal_cap({"a": 1}, 0.0, floor=1)


def test_cap_per_principal_keeps_each_ones_first_items_in_order():
    items = [("m", 1), ("a", 2), ("m", 3), ("m", 4), ("a", 5)]
    kept, waiting = cap_per_principal(items, lambda it: it[0], cap=2)
    assert kept == [("m", 1), ("a", 2), ("m", 3), ("a", 5)] and waiting == [("m", 4)]


def test_largest_share():
    assert largest_share(["a", "a", "b", "c"]) == 0.5
    assert math.isnan(largest_share([]))


# --- agreement ---------------------------------------------------------------------------------------

Q = (Message("user", "What is 2 plus 2?"),)


def s(text: str, rid: str) -> Sample:
    return Sample(Q, text, rid)


def pairwise(user: str, winner: str, loser: str) -> ComparisonGroup:
    # Response ids differ per user (tokens bind responses to principals); the texts are what overlaps.
    return ComparisonGroup((s(winner, f"{user}-{winner}"), s(loser, f"{user}-{loser}")), ((0, 1),), "pairwise", user)


def test_pair_orderings_identify_items_by_content_not_by_response_id():
    a = pair_orderings([pairwise("alice", "4", "5")])
    b = pair_orderings([pairwise("bob", "5", "4")])
    [item_a] = a["alice"]
    [item_b] = b["bob"]
    assert item_a == item_b and a["alice"][item_a] == -b["bob"][item_b]


def test_pair_orderings_of_a_ranking_and_repeated_judgements():
    ranking = ComparisonGroup((s("4", "x"), s("5", "y"), s("6", "z")), ((0, 1), (0, 2), (1, 2)), "ranking", "carol")
    assert len(pair_orderings([ranking])["carol"]) == 3
    # The same item both ways equally often: no opinion, left out; twice one way, once the other: the majority.
    assert pair_orderings([pairwise("dan", "4", "5"), pairwise("dan", "5", "4")]) == {"dan": {}}
    twice = pair_orderings([pairwise("eve", "4", "5"), pairwise("eve", "4", "5"), pairwise("eve", "5", "4")])
    assert list(twice["eve"].values()) == [pairwise_sign("4", "5")]


def pairwise_sign(winner: str, loser: str) -> int:
    [(_, sign)] = pair_orderings([pairwise("x", winner, loser)])["x"].items()
    return sign


def test_peer_agreement_on_hand_made_votes():
    groups = [
        # item 1 (4 vs 5): three honest say 4, mallory says 5
        pairwise("a", "4", "5"),
        pairwise("b", "4", "5"),
        pairwise("c", "4", "5"),
        pairwise("mallory", "5", "4"),
        # item 2 (4 vs 3): a and mallory only, they disagree
        pairwise("a", "4", "3"),
        pairwise("mallory", "3", "4"),
        # item 3: only c rated it: no overlap
        pairwise("c", "4", "7"),
    ]
    scores = peer_agreements(pair_orderings(groups))
    # mallory: item 1: 0 of 3 agree; item 2: 0 of 1 -> 0 over 2 items.
    assert scores["mallory"] == (0.0, 2)
    # a: item 1: 2 of 3 others agree (b, c; not mallory); item 2: 0 of 1 -> (2/3 + 0) / 2.
    assert scores["a"] == (pytest.approx(1 / 3), 2)
    # b: item 1 only: 2 of 3.  c: item 1 (2 of 3); item 3 has no peer.
    assert scores["b"] == (pytest.approx(2 / 3), 1) and scores["c"] == (pytest.approx(2 / 3), 1)


def test_quarantined_principals_are_not_peers():
    groups = [pairwise("a", "4", "5"), pairwise("b", "4", "5"), pairwise("mallory", "5", "4")]
    scores = peer_agreements(pair_orderings(groups), is_peer=lambda p: p != "mallory")
    assert scores["a"] == (1.0, 1) and scores["mallory"] == (0.0, 1)
    alone = peer_agreements(pair_orderings([pairwise("a", "4", "5")]))
    assert math.isnan(alone["a"][0]) and alone["a"][1] == 0


def test_rm_group_agreement_counts_pairs_the_rm_orders_the_same_way():
    # A ranking best first (0 > 1 > 2); the RM puts 1 above 0, ties 1 and 2.
    assert rm_group_agreement([1.0, 2.0, 2.0], [(0, 1), (0, 2), (1, 2)]) == 0.5
    assert rm_group_agreement([3.0, 2.0, 1.0], [(0, 1), (0, 2), (1, 2)]) == 3.0


# --- the quarantine rule -----------------------------------------------------------------------------

NAN = math.nan


def test_wilson_upper_bound():
    assert wilson_upper(0.0, 24) == pytest.approx(0.138, abs=1e-3)
    assert wilson_upper(0.5, 20) == pytest.approx(0.701, abs=1e-3)
    assert wilson_upper(0.3, 10_000) == pytest.approx(0.309, abs=1e-3)  # many items: close to the score
    assert wilson_upper(0.0, 0) == 1.0


@pytest.mark.parametrize(
    "score, quarantined, words",
    [
        (RaterScore(0.0, 24, 0.9, 40), True, "other raters 0.00 on 24 items (at most 0.14, 95%) < 0.4"),
        (RaterScore(0.9, 25, 0.1, 40), False, None),  # peers decide when they can: humans outrank the RM
        (RaterScore(0.1, 5, 0.1, 40), True, "reward model"),  # too few overlaps: the RM judges
        (RaterScore(0.1, 5, 0.1, 10), False, None),  # too little evidence either way
        (RaterScore(NAN, 0, 0.3, 20), False, None),  # below 0.4, but not with confidence on 20 pairs
        (RaterScore(NAN, 0, 0.3, 2000), True, "0.30 on 2000 pairs"),  # the same score, certain
    ],
)
def test_quarantine_rule(score, quarantined, words):
    reason = quarantine_reason(score, below=0.4, min_items=20)
    assert (reason is not None) is quarantined, reason
    if words:
        assert words in reason


def test_quarantine_off():
    assert quarantine_reason(RaterScore(0.0, 100, 0.0, 100), below=0.0, min_items=1) is None
