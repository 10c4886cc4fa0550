"""No one can stuff the ballot: the rules by which the retraining loop limits each principal and
judges its raters (pure functions; retraining.py applies them, retraining_state.py keeps what they
decided, the servicer shows it to operators).

A principal is whoever ``FeedbackEvent.user_id`` names (the authenticated caller, once the gateway
establishes it); any string works.

Caps (``principal_cap``). In every round, the new comparisons it trains on and, separately, the
held-out slice the gate judges it on, each principal keeps at most ``c`` comparisons, where ``c``
is the largest cap under which no principal's share of what is kept exceeds ``max_share``, but
never below ``floor``: with fewer than 1 / max_share principals a share alone would keep nothing,
and a loop with three raters must still learn. Comparisons above the cap WAIT (they are neither
dropped nor trained; the oldest go first, so a backlog drains ``c`` per round) rather than being
sampled down: an honest rater's burst is delayed, never lost, and a flood cannot trigger rounds
(the round trigger counts only what the caps admit).

Agreement. Two scores per principal, each with the number of items behind it:

- with its peers (``peer_agreements``): on the pairs of responses (same conversation, same two
  response texts: principals never share response ids, the feedback token binds a response to the
  principal it was served to) that other principals ordered too, the share of those others who
  ordered it the same way, averaged over such items;
- with the current reward model (``rm_group_agreement``): the share of the principal's pairs the
  RM current at the time scores in the same order.

Quarantine (``quarantine_reason``): humans first. A principal with at least ``min_items``
overlapping items is judged by its peers; one without, by the RM once it has scored ``min_items``
of its pairs; confidently below ``below`` (the 95% Wilson upper bound of its agreement is below
it) it is quarantined. The RM only judges principals no one else can
vouch for or against: the RM learns from these very raters, and a rule that quarantined everyone
the RM disagrees with would stop the loop from ever learning anything new.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from services.reward.comparisons import ComparisonGroup, Sample, sample_key

T = TypeVar("T")

QUARANTINED = "quarantined"
RELEASED = "released"
OK = "ok"
STATUSES = (OK, QUARANTINED, RELEASED)
"""A rater's status: judged or not yet judged and trained on (ok), quarantined by the rule, or
released by an operator (exempt from the rule from then on)."""


# --- caps --------------------------------------------------------------------------------------------


def principal_cap(counts: Mapping[str, int], max_share: float, floor: int) -> int:
    """The most comparisons one principal may keep in a round (or a held-out slice).

    With n_p the comparisons principal p offers, kept k_p(c) = min(n_p, c) under a cap c, the cap is

        c = max(floor, c*),   c* = the largest integer c >= 0 with  c <= max_share * sum_p k_p(c)

    so every principal keeping more than ``floor`` holds at most ``max_share`` of everything kept.
    (c - max_share * sum_p k_p(c) is convex and 0 at c = 0, so the c that satisfy it form an
    interval [0, c*] and a bisection finds c*.) The result is at most max_p n_p (0 when nothing is
    offered); max_share = 1 keeps everything.
    """
    if not 0 < max_share <= 1:
        raise ValueError("max_share must be in (0, 1]")
    if floor < 0:
        raise ValueError("floor must not be negative")
    largest = max(counts.values(), default=0)

    def fits(c: int) -> bool:
        return c <= max_share * sum(min(n, c) for n in counts.values()) + 1e-9

    lo, hi = 0, largest  # fits(lo) always holds
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return min(largest, max(floor, lo))


def cap_per_principal(items: Sequence[T], principal: Callable[[T], str], cap: int) -> tuple[list[T], list[T]]:
    """(kept, waiting): the first ``cap`` items of each principal in the given order, and the rest."""
    taken: dict[str, int] = defaultdict(int)
    kept, waiting = [], []
    for it in items:
        p = principal(it)
        if taken[p] < cap:
            taken[p] += 1
            kept.append(it)
        else:
            waiting.append(it)
    return kept, waiting


def largest_share(principals: Iterable[str]) -> float:
    """The largest fraction of ``principals`` (one entry per comparison) that one principal holds;
    NaN for none."""
    counts: dict[str, int] = defaultdict(int)
    for p in principals:
        counts[p] += 1
    total = sum(counts.values())
    return max(counts.values()) / total if total else math.nan


# --- agreement ---------------------------------------------------------------------------------------

Item = tuple[tuple, tuple]
"""One pair of responses to one conversation, by content: the two samples' keys, sorted."""


def pair_orderings(groups: Iterable[ComparisonGroup]) -> dict[str, dict[Item, int]]:
    """principal -> {item: +1 when the first of the item's two samples won, -1 when the second}.

    Each (winner, loser) pair of each group (with Samples, after join_texts) is one judgement. A
    principal who ordered one item several times counts with the sign of the sum of its judgements;
    an item it ordered both ways equally often is left out (it has no opinion on it).
    """
    sums: dict[str, dict[Item, int]] = defaultdict(lambda: defaultdict(int))
    for g in groups:
        for w, lo in g.pairs:
            kw, kl = _key(g.responses[w]), _key(g.responses[lo])
            if kw == kl:
                continue
            item, sign = ((kw, kl), 1) if kw < kl else ((kl, kw), -1)
            sums[g.user_id][item] += sign
    return {p: {i: (1 if s > 0 else -1) for i, s in items.items() if s != 0} for p, items in sums.items()}


def _key(response: object) -> tuple:
    """What identifies a response across principals: its conversation and text (a bare id for
    groups not joined to their texts)."""
    return sample_key(response) if isinstance(response, Sample) else (str(response),)


def peer_agreements(
    orderings: Mapping[str, Mapping[Item, int]], is_peer: Callable[[str], bool] = lambda _: True
) -> dict[str, tuple[float, int]]:
    """principal -> (agreement with its peers, overlapping items), for every principal in ``orderings``.

        I_p = { items i ordered by p and by at least one peer q != p }
        A_peer(p) = 1/|I_p| * sum_{i in I_p} ( |{q in O_i : o_q(i) = o_p(i)}| / |O_i| )

    with O_i the peers (``is_peer``: e.g. not quarantined) other than p who ordered i, and o the
    orderings. Each item weighs the same however many peers ordered it. (NaN, 0) without overlap.
    """
    by_item: dict[Item, list[tuple[str, int]]] = defaultdict(list)
    for p, items in orderings.items():
        if is_peer(p):
            for i, o in items.items():
                by_item[i].append((p, o))
    out: dict[str, tuple[float, int]] = {}
    for p, items in orderings.items():
        total, n = 0.0, 0
        for i, o in items.items():
            others = [oq for q, oq in by_item.get(i, ()) if q != p]
            if others:
                total += sum(1 for oq in others if oq == o) / len(others)
                n += 1
        out[p] = (total / n if n else math.nan, n)
    return out


def rm_group_agreement(rewards: Sequence[float], pairs: Sequence[tuple[int, int]]) -> float:
    """How many of a group's (winner, loser) pairs the RM orders the same way: the sum over pairs of
    1[r_w > r_l] + 0.5 * 1[r_w = r_l]. A principal's RM agreement is the sum of this over its scored
    groups divided by their number of pairs."""
    return sum(1.0 if rewards[w] > rewards[lo] else 0.5 if rewards[w] == rewards[lo] else 0.0 for w, lo in pairs)


# --- quarantine --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RaterScore:
    peer_agreement: float
    """Agreement with the other (not quarantined) principals on overlapping items; NaN without."""
    peer_items: int
    rm_agreement: float
    """Share of the principal's scored pairs the RM ordered the same way; NaN when none was scored."""
    rm_items: int
    """Pairs of the principal's comparisons the RM has scored."""


def wilson_upper(p: float, n: int, z: float = 1.96) -> float:
    """The upper end of the Wilson score interval of a proportion ``p`` observed over ``n`` items:

        (p + z^2/2n + z * sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)

    (z = 1.96: 95%). 1 for n = 0."""
    if n <= 0:
        return 1.0
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre + spread) / (1 + z * z / n)


def quarantine_reason(score: RaterScore, below: float, min_items: int) -> str | None:
    """Why a principal is quarantined, or None.

    Peers first: with peer_items >= min_items the peer agreement judges, otherwise (too few
    overlapping items) the RM agreement does once rm_items >= min_items; otherwise there is too
    little evidence to judge. The judging score quarantines when it is below ``below`` with 95%
    confidence: wilson_upper(score, items) < below, so that an honest rater's bad luck on a few
    items does not, and a rater who disagrees on almost everything does. ``below`` = 0 turns
    quarantine off.
    """
    if below <= 0:
        return None
    if score.peer_items >= min_items:
        judge, agreement, items, unit = "other raters", score.peer_agreement, score.peer_items, "items"
    elif score.rm_items >= min_items:
        judge, agreement, items, unit = "the reward model", score.rm_agreement, score.rm_items, "pairs"
    else:
        return None
    upper = wilson_upper(agreement, items)
    if upper < below:
        return f"agreement with {judge} {agreement:.2f} on {items} {unit} (at most {upper:.2f}, 95%) < {below}"
    return None
