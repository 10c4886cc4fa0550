"""From users' ratings to the RM's training examples (pure functions, no I/O).

Only the latest revision of each rating counts (``latest_revisions``): a user who changes a vote
replaces it. Then each kind becomes comparison groups (one group = one batch element of the loss,
its pairs averaged, see losses.py) or pointwise examples:

ranking   one group: all C(K,2) pairs of the K responses, best first; with ties (``ranks``) only
          the pairs of different ranks (all tied: no pair, skipped as "ranking_all_tied").
pairwise  one group with one pair; a tie gives no pair and is skipped (the Bradley-Terry loss has
          no term for "equally good", and InstructGPT drops ties too).
thumb     per user and prompt (same prompt_hash): every up-rated response beats every down-rated
          one, all those pairs in one group. A thumb that ends up in no pair (the only thumb of
          that user on that prompt, or all of them agree) becomes a pointwise example instead:
          a logistic term with label up = 1, down = 0 against σ(r).
likert    per user and prompt: a higher score beats a lower one, all those pairs in one group;
          equal scores give no pair. A Likert score in no pair is skipped: its absolute level is
          each user's own calibration, only differences carry a preference.

Thumbs and Likert scores are never compared with each other, nor across users (scales differ).
``join_texts`` then replaces response ids by the conversation and response text the RM reads,
from the completion events; a group with an unknown response is held back (counted as skipped).
A pair of two responses with the same text is dropped there ("identical_responses"): it can only
be a tie ranked one way by chance, and no reward model can learn it; a sampled policy often
answers the same prompt twice word for word, so these pairs would otherwise swamp the others
(counted in ``skipped["identical_response_pairs"]``, in pairs, not ratings).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shared.events import FeedbackEvent, Message

THUMB_LABELS = {"up": 1.0, "down": 0.0}


@dataclass(frozen=True)
class Sample:
    """One (conversation, response) pair for the RM to score."""

    messages: tuple[Message, ...]
    response: str
    response_id: str = ""
    policy_version: str = ""


@dataclass(frozen=True)
class ComparisonGroup:
    """Responses to one prompt and the (winner, loser) pairs among them (positions in ``responses``).

    ``responses`` holds response ids straight out of ``examples_from_feedback`` and Samples after
    ``join_texts``.
    """

    responses: tuple[Any, ...]
    pairs: tuple[tuple[int, int], ...]
    source: str
    """"ranking", "pairwise", "thumb", "likert" (live feedback) or "offline" (a rankings file)."""
    user_id: str = ""


@dataclass(frozen=True)
class PointwiseExample:
    response: Any
    """A response id, or a Sample after join_texts."""
    label: float
    """1.0 for a thumb up, 0.0 for a thumb down."""
    user_id: str = ""


@dataclass
class TrainingExamples:
    groups: list[ComparisonGroup] = field(default_factory=list)
    pointwise: list[PointwiseExample] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    """Why ratings (or groups) gave no example: reason -> count."""


def latest_revisions(events: Iterable[FeedbackEvent]) -> list[FeedbackEvent]:
    """The highest revision of each (user_id, target), in first-seen order of the targets.

    A record delivered twice (same feedback_id) counts once; of two different records with the same
    revision (should not happen) the one received later wins.
    """
    best: dict[tuple[str, str], FeedbackEvent] = {}
    for ev in events:
        key = (ev.user_id, ev.target)
        cur = best.get(key)
        if cur is None or (ev.revision, ev.received_at) > (cur.revision, cur.received_at):
            best[key] = ev
    return list(best.values())


def ranking_pairs(k: int, ranks: Sequence[int] | None = None) -> tuple[tuple[int, int], ...]:
    """(winner, loser) positions of a ranking listed best first: every pair, or with ``ranks``
    (ties) every pair of different ranks."""
    if ranks is None:
        return tuple((i, j) for i in range(k) for j in range(i + 1, k))
    return pairs_from_values([-r for r in ranks])


def pairs_from_values(values: Sequence[float]) -> tuple[tuple[int, int], ...]:
    """(winner, loser) for every two positions whose values differ; the higher value wins."""
    out = []
    for i in range(len(values)):
        for j in range(i + 1, len(values)):
            if values[i] > values[j]:
                out.append((i, j))
            elif values[j] > values[i]:
                out.append((j, i))
    return tuple(out)


def examples_from_feedback(events: Iterable[FeedbackEvent]) -> TrainingExamples:
    """Comparison groups and pointwise examples (by response id) from the latest ratings."""
    out = TrainingExamples()
    # (user, kind, prompt_hash) -> {response_id: value}, insertion-ordered.
    scalar: dict[tuple[str, str, str], dict[str, float]] = defaultdict(dict)
    for ev in latest_revisions(events):
        ids = [r.response_id for r in ev.responses]
        if ev.kind == "ranking":
            if len(ids) < 2 or len(set(ids)) != len(ids) or (ev.ranks is not None and len(ev.ranks) != len(ids)):
                out.skipped["malformed"] += 1
                continue
            pairs = ranking_pairs(len(ids), ev.ranks)
            if not pairs:
                out.skipped["ranking_all_tied"] += 1
                continue
            out.groups.append(ComparisonGroup(tuple(ids), pairs, "ranking", ev.user_id))
        elif ev.kind == "pairwise":
            if len(ids) != 2 or ids[0] == ids[1] or ev.preferred not in ("a", "b", "tie"):
                out.skipped["malformed"] += 1
            elif ev.preferred == "tie":
                out.skipped["pairwise_tie"] += 1
            else:
                pair = (0, 1) if ev.preferred == "a" else (1, 0)
                out.groups.append(ComparisonGroup(tuple(ids), (pair,), "pairwise", ev.user_id))
        elif ev.kind in ("thumb", "likert"):
            value = THUMB_LABELS.get(ev.thumb or "") if ev.kind == "thumb" else ev.score
            if len(ids) != 1 or value is None:
                out.skipped["malformed"] += 1
                continue
            scalar[(ev.user_id, ev.kind, ev.responses[0].prompt_hash)][ids[0]] = float(value)
        else:
            out.skipped["unknown_kind"] += 1
    for (user, kind, _), rated in scalar.items():
        ids, values = list(rated), list(rated.values())
        pairs = pairs_from_values(values)
        in_pairs = {i for p in pairs for i in p}
        if pairs:
            # Keep only the responses that take part in a pair; renumber the pairs accordingly.
            keep = sorted(in_pairs)
            pos = {old: new for new, old in enumerate(keep)}
            out.groups.append(
                ComparisonGroup(tuple(ids[i] for i in keep), tuple((pos[w], pos[lo]) for w, lo in pairs), kind, user)
            )
        for i, rid in enumerate(ids):
            if i in in_pairs:
                continue
            if kind == "thumb":
                out.pointwise.append(PointwiseExample(rid, values[i], user))
            else:
                out.skipped["likert_without_contrast"] += 1
    return out


def sample_key(s: Sample) -> tuple:
    """What the RM reads of a sample: the conversation and the response text (not the ids)."""
    return (tuple((m.role, m.content) for m in s.messages), s.response)


def without_identical_pairs(group: ComparisonGroup) -> ComparisonGroup | None:
    """``group`` without its pairs of two Samples with the same conversation and response text
    (None when no pair is left)."""
    pairs = tuple((w, lo) for w, lo in group.pairs if sample_key(group.responses[w]) != sample_key(group.responses[lo]))
    if len(pairs) == len(group.pairs):
        return group
    return ComparisonGroup(group.responses, pairs, group.source, group.user_id) if pairs else None


def join_texts(examples: TrainingExamples, completions: Mapping[str, Any]) -> TrainingExamples:
    """Replace response ids by Samples from ``completions`` (response_id -> CompletionEvent-like
    object with ``messages``, ``completion_text`` and ``policy_version``).

    A group or pointwise example with a response not in ``completions`` is left out and counted as
    skipped "missing_completion" (a learner can retry it once the completion has arrived).
    """
    out = TrainingExamples(skipped=Counter(examples.skipped))

    def sample(rid: str) -> Sample | None:
        c = completions.get(rid)
        if c is None:
            return None
        return Sample(
            tuple(Message(m.role, m.content) for m in c.messages),
            c.completion_text,
            rid,
            getattr(c, "policy_version", ""),
        )

    for g in examples.groups:
        samples = [sample(r) for r in g.responses]
        if any(s is None for s in samples):
            out.skipped["missing_completion"] += 1
            continue
        group = without_identical_pairs(ComparisonGroup(tuple(samples), g.pairs, g.source, g.user_id))
        if dropped := len(g.pairs) - (len(group.pairs) if group else 0):
            out.skipped["identical_response_pairs"] += dropped
        if group is not None:
            out.groups.append(group)
    for p in examples.pointwise:
        s = sample(p.response)
        if s is None:
            out.skipped["missing_completion"] += 1
            continue
        out.pointwise.append(PointwiseExample(s, p.label, p.user_id))
    return out
