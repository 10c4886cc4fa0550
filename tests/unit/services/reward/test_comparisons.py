"""Ratings -> RM training examples, on small tables."""

from dataclasses import replace

import pytest

from services.reward.comparisons import (
    ComparisonGroup,
    PointwiseExample,
    Sample,
    examples_from_feedback,
    join_texts,
    latest_revisions,
)
from shared.events import CompletionEvent, FeedbackEvent, Message, RatedResponse, Timings

_n = 0


def fb(kind, ids, user="u1", prompt="p1", revision=1, **verdict) -> FeedbackEvent:
    global _n
    _n += 1
    target = f"{kind}:{','.join(sorted(ids))}"
    return FeedbackEvent(
        feedback_id=f"f{_n}",
        kind=kind,
        user_id=user,
        target=target,
        revision=revision,
        supersedes=None,
        responses=[RatedResponse(i, "policy-0001", prompt) for i in ids],
        received_at=float(_n),
        **verdict,
    )


def thumb(rid, verdict, **kw):
    return fb("thumb", [rid], thumb=verdict, **kw)


def likert(rid, score, **kw):
    return fb("likert", [rid], score=score, **kw)


def pairs_by_id(group: ComparisonGroup) -> set[tuple[str, str]]:
    return {(group.responses[w], group.responses[lo]) for w, lo in group.pairs}


def test_latest_revisions_keeps_the_highest_revision_per_user_and_target():
    first = thumb("r1", "up")
    changed = replace(first, feedback_id="f-new", revision=2, thumb="down", supersedes=first.feedback_id)
    other_user = thumb("r1", "up", user="u2")
    out = latest_revisions([changed, first, other_user, first])  # out of order, first delivered twice
    assert [(e.user_id, e.thumb, e.revision) for e in out] == [("u1", "down", 2), ("u2", "up", 1)]


def test_a_ranking_is_one_group_with_all_k_choose_2_pairs():
    ex = examples_from_feedback([fb("ranking", ["a", "b", "c", "d"])])
    [g] = ex.groups
    assert g.source == "ranking" and g.responses == ("a", "b", "c", "d")
    assert len(g.pairs) == 6
    assert pairs_by_id(g) == {("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d")}


@pytest.mark.parametrize(
    "ranks, expected",
    [
        ([1, 2, 2], {("a", "b"), ("a", "c")}),
        ([1, 1, 3], {("a", "c"), ("b", "c")}),
        ([1, 2, 3], {("a", "b"), ("a", "c"), ("b", "c")}),
    ],
)
def test_a_ranking_with_ties_compares_only_different_ranks(ranks, expected):
    [g] = examples_from_feedback([fb("ranking", ["a", "b", "c"], ranks=ranks)]).groups
    assert pairs_by_id(g) == expected


def test_a_ranking_of_all_ties_gives_no_group_and_is_counted():
    ex = examples_from_feedback([fb("ranking", ["a", "b", "c"], ranks=[1, 1, 1])])
    assert ex.groups == [] and ex.skipped["ranking_all_tied"] == 1


def test_pairs_of_word_for_word_equal_answers_are_dropped_when_texts_are_joined():
    # A ranking of [same, same, other]: the "same" > "same" pair carries no preference.
    ex = examples_from_feedback([fb("ranking", ["a", "b", "c"]), fb("pairwise", ["d", "e"], preferred="a")])
    texts = {"a": "7. I hope this helps.", "b": "7. I hope this helps.", "c": "8.", "d": "7.", "e": "7."}
    completions = {rid: completion(rid, text) for rid, text in texts.items()}
    joined = join_texts(ex, completions)
    [g] = joined.groups  # the pairwise vote between two equal answers is gone entirely
    assert {(g.responses[w].response, g.responses[lo].response) for w, lo in g.pairs} == {
        ("7. I hope this helps.", "8."),
        ("7. I hope this helps.", "8."),
    }
    assert len(g.pairs) == 2 and joined.skipped["identical_response_pairs"] == 2


@pytest.mark.parametrize("preferred, expected", [("a", {("x", "y")}), ("b", {("y", "x")})])
def test_pairwise_gives_one_pair(preferred, expected):
    [g] = examples_from_feedback([fb("pairwise", ["x", "y"], preferred=preferred)]).groups
    assert pairs_by_id(g) == expected and g.source == "pairwise"


def test_pairwise_tie_is_skipped_and_counted():
    ex = examples_from_feedback([fb("pairwise", ["x", "y"], preferred="tie")])
    assert ex.groups == [] and ex.skipped["pairwise_tie"] == 1


# Thumbs of one user on the responses to one prompt; expected pairs and pointwise labels.
THUMB_TABLES = [
    # (ratings as (response, thumb, user, prompt), expected pairs, expected pointwise (response, label))
    ([("r1", "up", "u1", "p1"), ("r2", "down", "u1", "p1")], {("r1", "r2")}, set()),
    (
        [("r1", "up", "u1", "p1"), ("r2", "down", "u1", "p1"), ("r3", "up", "u1", "p1")],
        {("r1", "r2"), ("r3", "r2")},
        set(),
    ),
    ([("r1", "up", "u1", "p1")], set(), {("r1", 1.0)}),  # lone thumb
    ([("r1", "down", "u1", "p1")], set(), {("r1", 0.0)}),
    ([("r1", "up", "u1", "p1"), ("r2", "up", "u1", "p1")], set(), {("r1", 1.0), ("r2", 1.0)}),  # all agree
    ([("r1", "up", "u1", "p1"), ("r2", "down", "u2", "p1")], set(), {("r1", 1.0), ("r2", 0.0)}),  # two users
    ([("r1", "up", "u1", "p1"), ("r2", "down", "u1", "p2")], set(), {("r1", 1.0), ("r2", 0.0)}),  # two prompts
]


@pytest.mark.parametrize("ratings, pairs, pointwise", THUMB_TABLES)
def test_thumbs_to_pairs_and_lone_thumbs(ratings, pairs, pointwise):
    ex = examples_from_feedback([thumb(r, v, user=u, prompt=p) for r, v, u, p in ratings])
    got_pairs = set().union(*(pairs_by_id(g) for g in ex.groups)) if ex.groups else set()
    assert got_pairs == pairs
    assert {(p.response, p.label) for p in ex.pointwise} == pointwise
    assert len(ex.groups) == (1 if pairs else 0), "one prompt's pairs form one group (one batch element)"


LIKERT_TABLES = [
    ({"a": 7, "b": 2}, {("a", "b")}, 0),
    ({"a": 7, "b": 5, "c": 5, "d": 2}, {("a", "b"), ("a", "c"), ("a", "d"), ("b", "d"), ("c", "d")}, 0),
    ({"a": 4, "b": 4}, set(), 2),  # equal scores: no pair, both skipped
    ({"a": 6}, set(), 1),  # a lone Likert score carries no preference
    ({"a": 1, "b": 3, "c": 3}, {("b", "a"), ("c", "a")}, 0),
]


@pytest.mark.parametrize("scores, pairs, skipped", LIKERT_TABLES)
def test_likert_scores_to_pairs(scores, pairs, skipped):
    ex = examples_from_feedback([likert(r, s) for r, s in scores.items()])
    got = set().union(*(pairs_by_id(g) for g in ex.groups)) if ex.groups else set()
    assert got == pairs
    assert ex.pointwise == []
    assert ex.skipped["likert_without_contrast"] == skipped


def test_thumbs_and_likert_are_not_compared_with_each_other():
    ex = examples_from_feedback([thumb("r1", "up"), likert("r2", 1)])
    assert ex.groups == []
    assert [(p.response, p.label) for p in ex.pointwise] == [("r1", 1.0)]
    assert ex.skipped["likert_without_contrast"] == 1


def test_a_changed_vote_replaces_the_old_one_before_pairing():
    up, down = thumb("r1", "up"), thumb("r2", "down")
    flipped = replace(down, feedback_id="f-flip", revision=2, thumb="up", supersedes=down.feedback_id)
    ex = examples_from_feedback([up, down, flipped])
    assert ex.groups == []  # both up now: no pair
    assert {(p.response, p.label) for p in ex.pointwise} == {("r1", 1.0), ("r2", 1.0)}


def completion(rid, text):
    return CompletionEvent(
        request_id="q",
        response_id=rid,
        index=0,
        n=1,
        policy_version="policy-0001",
        model="m",
        source="user",
        messages=[Message("user", "What is 2 plus 2?")],
        prompt_token_ids=[],
        completion_text=text,
        token_ids=[],
        logprobs=None,
        finish_reason="stop",
        sampling={},
        timings=Timings(0, 0, 0),
        created_at=0,
    )


def test_join_texts_attaches_conversations_and_holds_back_unknown_responses():
    ex = examples_from_feedback(
        [fb("ranking", ["a", "b"]), fb("ranking", ["a", "zz"]), thumb("b", "down", prompt="p9")]
    )
    joined = join_texts(ex, {"a": completion("a", "4"), "b": completion("b", "5")})
    [g] = joined.groups
    assert g.responses == (
        Sample((Message("user", "What is 2 plus 2?"),), "4", "a", "policy-0001"),
        Sample((Message("user", "What is 2 plus 2?"),), "5", "b", "policy-0001"),
    )
    assert joined.pointwise == [PointwiseExample(g.responses[1], 0.0, "u1")]
    assert joined.skipped["missing_completion"] == 1
