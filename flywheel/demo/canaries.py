"""What the demo's canaries did, from the rollout topic and the users' records (plain data in, plain
data out, so a report can be rebuilt from a finished run's files).

    events = read_rollout_events(kafka)                   # every RolloutEvent on rlhf.rollout, as dicts
    verdicts = canary_verdicts(events, interactions)      # per version: outcome, reason, evidence, answers
    steps = share_steps(events)                           # the canary share over time (a step function)
    outcome = sabotage_outcome(interactions, events, "policy-0012")   # the sabotage run's figures
    gate = gate_discrimination(gates, metrics_text)       # the trainer's gate: did it see a difference?

Inputs: ``events`` are RolloutEvents as dicts (``at`` in Unix seconds); ``interactions`` are
users.Interaction records as dicts (``at`` Unix seconds, ``choice_versions`` per response,
``principal``, ``conversation_id``); ``gates`` are the trainer's gate decisions as the demo's
TrainerWatcher saw them (PublishResult as dicts).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from shared.config import KafkaConfig

ENDED = ("promoted", "rolled_back")
"""Stages that end a canary."""


def read_rollout_events(kafka: KafkaConfig, *, idle_s: float = 2.0, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """Every RolloutEvent on rlhf.rollout from the beginning, in topic order, as dicts (stops once the
    reader has caught up and nothing arrived for ``idle_s``, or after ``timeout_s``)."""
    import dataclasses
    import time

    from shared.events import RolloutEvent
    from shared.kafka.readers import AssignedReader, decode_or_skip
    from shared.kafka.topics import ROLLOUT

    reader = AssignedReader(kafka, "demo-report", [ROLLOUT], start="beginning")
    out: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + timeout_s
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            records = reader.poll()
            for record in records:
                env = decode_or_skip(record, RolloutEvent)
                if env is not None:
                    out.append(dataclasses.asdict(env.payload))
            if records:
                quiet_since = time.monotonic()
            elif not any(reader.lag().values()) and time.monotonic() - quiet_since >= idle_s:
                break
    finally:
        reader.close()
    return out


def answers_by_version(interactions: list[dict[str, Any]]) -> list[tuple[float, str]]:
    """(Unix time, version) of every served answer, in time order (a record without per-choice
    versions counts each answer for its response's version)."""
    out = []
    for r in interactions:
        if r.get("kind") == "error":
            continue
        versions = r.get("choice_versions") or [r.get("policy_version", "")] * len(r.get("responses", []))
        out += [(float(r.get("at", 0.0)), v) for v in versions if v]
    return sorted(out)


def canary_periods(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each canary: {version, start, end (None while running), outcome ("running" until it ends),
    reason, evidence (of the step that ended it)}, in start order."""
    periods: list[dict[str, Any]] = []
    open_: dict[str, dict[str, Any]] = {}
    for ev in events:
        v = ev["version"]
        if ev["stage"] == "canary" and v not in open_:
            open_[v] = {
                "version": v,
                "start": ev["at"],
                "end": None,
                "outcome": "running",
                "reason": "",
                "evidence": {},
            }
            periods.append(open_[v])
        elif ev["stage"] in ENDED and v in open_:
            p = open_.pop(v)
            p.update(end=ev["at"], outcome=ev["stage"], reason=ev["reason"], evidence=dict(ev.get("evidence") or {}))
    return periods


def _signal(evidence: dict[str, Any], name: str) -> dict[str, Any] | None:
    sig = evidence.get(name)
    return sig if isinstance(sig, dict) else None


def canary_verdicts(events: list[dict[str, Any]], interactions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per canary: outcome and reason, how long it ran, the answers it served (from the users'
    records) and its share of all answers in its period, and the evidence the decision was taken on
    (thumbs-up rate canary vs stable with counts, side-by-side win rate)."""
    answers = answers_by_version(interactions)
    last = answers[-1][0] if answers else 0.0
    out = []
    for p in canary_periods(events):
        end = p["end"] if p["end"] is not None else max(last, p["start"])
        in_period = [v for t, v in answers if p["start"] <= t <= end]
        served = sum(v == p["version"] for v in in_period)
        ev = p["evidence"]
        thumbs, sxs = _signal(ev, "thumbs"), _signal(ev, "side_by_side")
        out.append(
            {
                "version": p["version"],
                "started_at": p["start"],
                "ended_at": p["end"],
                "outcome": p["outcome"],
                "reason": p["reason"],
                "duration_s": round(end - p["start"], 1),
                "answers": served,
                "answers_in_period": len(in_period),
                "share_of_answers": served / len(in_period) if in_period else None,
                "thumbs_canary": (thumbs["canary_n"], thumbs["canary_mean"]) if thumbs else None,
                "thumbs_stable": (thumbs["stable_n"], thumbs["stable_mean"]) if thumbs else None,
                "side_by_side": (sxs["canary_n"], sxs["canary_mean"]) if sxs else None,
                "verdicts": {k: s["verdict"] for k, s in ev.items() if isinstance(s, dict) and "verdict" in s},
            }
        )
    return out


def share_steps(events: list[dict[str, Any]]) -> list[tuple[float, str, float]]:
    """(Unix time, canary version or "", canary share) after each event that changed the routing."""
    out: list[tuple[float, str, float]] = []
    for ev in events:
        step = (
            float(ev["at"]),
            ev.get("canary") or "",
            float(ev.get("canary_share") or 0.0) if ev.get("canary") else 0.0,
        )
        if not out or out[-1][1:] != step[1:]:
            out.append(step)
    return out


def served_canary_share(
    interactions: list[dict[str, Any]], steps: list[tuple[float, str, float]], window_s: float = 60.0
) -> list[tuple[float, float]]:
    """(Unix time, share of the answers in the trailing ``window_s`` that the canary of that moment
    served) at every answer: the share users actually got, to set against the configured one."""
    answers = answers_by_version(interactions)
    out, start, hits = [], 0, []
    for t, v in answers:
        canary = _canary_at(steps, t)
        hits.append((t, bool(canary) and v == canary))
        while hits[start][0] <= t - window_s:
            start += 1
        window = hits[start:]
        out.append((t, sum(h for _, h in window) / len(window)))
    return out


def _canary_at(steps: list[tuple[float, str, float]], t: float) -> str:
    canary = ""
    for at, version, _share in steps:
        if at > t:
            break
        canary = version
    return canary


def sabotage_outcome(
    interactions: list[dict[str, Any]], events: list[dict[str, Any]], version: str, injected_at: float | None = None
) -> dict[str, Any]:
    """The sabotage run's figures for the bad ``version``: whether it was rolled back automatically
    (by the live gate, not an operator), when its canary started and ended, the answers it served,
    their share of every answer in its period (canary start to rollback), and the answers it gave
    to conversations the routing rule did not assign to it (users outside the canary share)."""
    from services.gateway.rollout.routing import in_canary

    period = next((p for p in canary_periods(events) if p["version"] == version), None)
    stages = [ev for ev in events if ev["version"] == version]
    answers = answers_by_version(interactions)
    served = [t for t, v in answers if v == version]
    out: dict[str, Any] = {
        "version": version,
        "injected_at": injected_at,
        "stages": [(ev["stage"], ev["reason"]) for ev in stages],
        "canary_started": period is not None,
        "rolled_back": bool(period and period["outcome"] == "rolled_back"),
        "automatic": bool(period and period["outcome"] == "rolled_back" and "operator" not in period["reason"]),
        "reason": period["reason"] if period else "",
        "answers_served": len(served),
    }
    if period is None:
        return out
    end = period["end"] if period["end"] is not None else (answers[-1][0] if answers else period["start"])
    in_period = [v for t, v in answers if period["start"] <= t <= end]
    share = next((ev["canary_share"] for ev in stages if ev["stage"] == "canary"), 0.0)
    outside = [
        r
        for r in interactions
        if version in (r.get("choice_versions") or [r.get("policy_version")])
        and not in_canary(version, share, r.get("principal", ""), r.get("conversation_id") or None)
    ]
    out.update(
        canary_share=share,
        canary_start=period["start"],
        canary_end=period["end"],
        seconds_to_rollback=None if period["end"] is None else round(period["end"] - period["start"], 1),
        seconds_from_injection=None
        if period["end"] is None or injected_at is None
        else round(period["end"] - injected_at, 1),
        answers_in_period=len(in_period),
        share_of_answers=len(served) / len(in_period) if in_period else None,
        served_outside_share=len(outside),
        principals_outside_share=sorted({r.get("principal", "") for r in outside}),
    )
    return out


# --- the trainer's gate ---------------------------------------------------------------------------


def gate_discrimination(gates: list[dict[str, Any]], trainer_metrics: str | None = None) -> dict[str, Any]:
    """How often the trainer's gate could tell a candidate from its baseline, and what refused.

    From the gate decisions the demo saw (``gates``, PublishResult dicts): candidates evaluated,
    compared with a baseline under one RM, how many of those had a *different* held-out figure
    (``differed_share``: a gate that always sees the same figure cannot discriminate), published,
    and refusals by the check that refused (KL, reward, a guard's name). From the trainer's
    /metrics text when given (exact, no polling gaps): the same counts as the trainer kept them.
    """
    decisions = [g for g in gates if not g.get("rollback")]
    compared = [g for g in decisions if g.get("compared")]
    same = sum(bool(g.get("same_as_baseline")) for g in compared)
    out: dict[str, Any] = {
        "candidates": len(decisions),
        "published": sum(bool(g.get("published")) for g in decisions),
        "compared": len(compared),
        "same_as_baseline": same,
        "differed_share": (len(compared) - same) / len(compared) if compared else None,
        "refused_by": dict(Counter(g.get("refused_by") or "other" for g in decisions if not g.get("published"))),
        "guards": sorted({c["name"] for g in decisions for c in g.get("guards") or []}),
    }
    if trainer_metrics:
        out["metrics"] = gate_counts_from_metrics(trainer_metrics)
    return out


def gate_counts_from_metrics(text: str) -> dict[str, Any]:
    """The trainer's own gate counters: compared, same_as_baseline, published, refused by reason,
    and its returns to the last published weights by reason."""
    from prometheus_client.parser import text_string_to_metric_families

    refused: dict[str, float] = {}
    reverts: dict[str, float] = {}
    totals = {"compared": 0.0, "same_as_baseline": 0.0, "published": 0.0}
    names = {
        "rlhf_trainer_gate_compared_total": "compared",
        "rlhf_trainer_gate_same_as_baseline_total": "same_as_baseline",
        "rlhf_trainer_published_total": "published",
    }
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "rlhf_trainer_gate_refused_total":
                refused[s.labels["reason"]] = refused.get(s.labels["reason"], 0.0) + s.value
            elif s.name == "rlhf_trainer_reverts_total":
                reverts[s.labels["reason"]] = reverts.get(s.labels["reason"], 0.0) + s.value
            elif s.name in names:
                totals[names[s.name]] += s.value
    compared = totals["compared"]
    return {
        **{k: int(v) for k, v in totals.items()},
        "differed_share": (compared - totals["same_as_baseline"]) / compared if compared else None,
        "refused_by": {k: int(v) for k, v in sorted(refused.items())},
        "reverts": {k: int(v) for k, v in sorted(reverts.items())},
    }


def fmt_share(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1%}"
