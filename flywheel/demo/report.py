"""The demo's report folder: report.md and PNG plots, from the run's records.

Inputs (all plain data, so a report can be rebuilt from a finished run's files):
    interactions   users.Interaction records (as dicts): what each policy version served, gold verdicts
    policies, rms  model store manifests of the policy and rm versions (version, created_at, metrics)
    ppo            trainer status samples: {"t", "step", "mean_reward", "kl", "entropy"}
    started_at     Unix time the users started (to put versions' publication on the run's clock)
    metrics        the services' /metrics texts at the end of the run ({"reward": ..., "trainer": ...,
                   "gateway": ...}; any may be missing): what the limits per principal held back
    gates          the trainer's gate decisions the demo saw (run.gate_record): the gate's discrimination
    rollout        the RolloutEvents of rlhf.rollout as dicts (None: canaries off): each canary's verdict

Plots:
    thumbs_up_by_policy.png   gold thumbs-up rate of every response each policy version served (95% Wilson)
    rm_accuracy.png           held-out pairwise accuracy of each RM version (from its manifest)
    ppo_reward_kl.png         mean RM reward and KL to the reference per PPO step
    serving_timeline.png      which policy version served each response over time, with the rolling
                              gold thumbs-up rate
    traffic_share.png         the canary's configured share of conversations over time, and the share
                              of answers it actually served (with canaries)
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flywheel.demo.canaries import (
    answers_by_version,
    canary_verdicts,
    fmt_share,
    gate_discrimination,
    served_canary_share,
    share_steps,
)
from flywheel.demo.evaluate import wilson_interval


@dataclass(frozen=True)
class VersionRate:
    version: str
    responses: int
    thumbs_up: int
    rate: float
    low: float
    high: float


def thumbs_up_by_version(interactions: list[dict]) -> list[VersionRate]:
    """Gold thumbs-up rate of every served response, grouped by the policy version that served it,
    in version order."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for _rec, version, thumb_up in served_verdicts(interactions):
        c = counts[version]
        c[0] += 1
        c[1] += thumb_up
    out = []
    for version in sorted(counts, key=_version_number):
        n, up = counts[version]
        low, high = wilson_interval(up, n)
        out.append(VersionRate(version, n, up, up / n if n else math.nan, low, high))
    return out


def served_verdicts(interactions: list[dict]) -> list[tuple[dict, str, bool]]:
    """(record, version, gold thumb) of every served response: each response counts for the version
    that wrote it (``choice_versions``; side by side during a canary the two differ), or for the
    record's ``policy_version`` in records without them."""
    out = []
    for rec in interactions:
        ups = rec.get("gold_thumbs_up") or []
        versions = rec.get("choice_versions") or [rec.get("policy_version") or ""] * len(ups)
        out += [(rec, v, bool(up)) for v, up in zip(versions, ups) if v]
    return out


def rolling_rate(points: list[tuple[float, bool]], window_s: float) -> list[tuple[float, float]]:
    """(t, share of True among the points in (t - window_s, t]) at every point; points sorted by t."""
    out, start, ups = [], 0, 0
    for i, (t, up) in enumerate(points):
        ups += up
        while points[start][0] <= t - window_s:
            ups -= points[start][1]
            start += 1
        out.append((t, ups / (i - start + 1)))
    return out


# What the limits per principal did (docs/security.md), read from the services' own metrics:
# summary key -> (service, sample name, labels the sample must carry); matching samples are summed.
TRUST_METRICS: dict[str, tuple[str, str, dict[str, str]]] = {
    "quarantined_principals": ("reward", "rlhf_reward_learner_raters", {"status": "quarantined"}),
    "comparisons_held_back_quarantined": (
        "reward",
        "rlhf_reward_learner_comparisons_held_back",
        {"reason": "quarantined"},
    ),
    "comparisons_held_back_capped": ("reward", "rlhf_reward_learner_comparisons_held_back", {"reason": "capped"}),
    "live_prompts_capped": ("trainer", "rlhf_trainer_live_prompts_left_out_total", {"reason": "principal_cap"}),
    "requests_rate_limited": ("gateway", "rlhf_gateway_rate_limit_total", {"outcome": "refused"}),
}


def trust_counts(interactions: list[dict], metrics: dict[str, str]) -> dict[str, float | int | None]:
    """The report's counts of what was limited per principal.

    From the users' own records: ``ratings_rate_limited`` (ratings answered 429) and
    ``chats_rate_limited`` (chats that failed with a 429). From the services' /metrics texts, each
    TRUST_METRICS key: the sum of the samples with that name carrying those labels (None when that
    service's metrics were not read; 0 when read and absent).
    """
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float | int | None] = {
        "ratings_rate_limited": sum(r.get("feedback_status") == 429 for r in interactions),
        "chats_rate_limited": sum(
            r["kind"] == "error" and ("429" in r.get("error", "") or "RateLimit" in r.get("error", ""))
            for r in interactions
        ),
    }
    samples: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for service, text in metrics.items():
        samples[service] = [
            (s.name, dict(s.labels), float(s.value))
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        ]
    for key, (service, name, labels) in TRUST_METRICS.items():
        if service not in samples:
            out[key] = None
            continue
        out[key] = sum(
            v for n, lab, v in samples[service] if n == name and all(lab.get(k) == x for k, x in labels.items())
        )
    return out


def _version_number(version: str) -> int:
    try:
        return int(version.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return 0


def _plt() -> Any:  # matplotlib.pyplot
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_thumbs_up(rates: list[VersionRate], png: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(min(12.0, max(5.0, 1.0 + 0.8 * len(rates))), 4.0))
    xs = range(len(rates))
    ax.bar(xs, [r.rate for r in rates], color="#4c72b0", alpha=0.8)
    ax.errorbar(
        xs,
        [r.rate for r in rates],
        yerr=[[r.rate - r.low for r in rates], [r.high - r.rate for r in rates]],
        fmt="none",
        ecolor="black",
        capsize=4,
    )
    if len(rates) <= 12:
        for x, r in zip(xs, rates):
            ax.text(x, min(0.98, r.high + 0.02), f"n={r.responses}", ha="center", fontsize=8)
    ax.set_xticks(
        list(xs),
        [r.version for r in rates],
        rotation=30 if len(rates) <= 12 else 90,
        ha="right",
        fontsize=8 if len(rates) > 12 else None,
    )
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("gold thumbs-up rate (95% CI)")
    ax.set_title("Gold thumbs-up rate of served responses per policy version")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def plot_rm_accuracy(rms: list[dict], png: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(min(12.0, max(5.0, 1.0 + 0.8 * len(rms))), 4.0))
    names = [m["version"] for m in rms]
    acc = [m["metrics"].get("heldout_accuracy", math.nan) for m in rms]
    ax.plot(range(len(rms)), acc, marker="o")
    ax.set_xticks(range(len(rms)), names, rotation=30 if len(rms) <= 12 else 90, ha="right")
    ax.axhline(0.5, color="grey", linestyle=":", label="chance")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("held-out pairwise accuracy")
    ax.set_title("Reward model held-out accuracy per version")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def plot_ppo(ppo: list[dict], png: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    steps = [p["step"] for p in ppo]
    ax.plot(steps, [p["mean_reward"] for p in ppo], color="#4c72b0", marker=".", label="mean RM reward")
    ax.set_xlabel("PPO step")
    ax.set_ylabel("mean reward", color="#4c72b0")
    ax2 = ax.twinx()
    ax2.plot(steps, [p["kl"] for p in ppo], color="#dd8452", marker=".", label="KL to reference")
    ax2.set_ylabel("KL to reference (nats / response)", color="#dd8452")
    ax.set_title("PPO: mean reward and KL per step")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def plot_timeline(
    interactions: list[dict], policies: list[dict], started_at: float, png: Path, window_s: float = 60.0
) -> None:
    plt = _plt()
    served = sorted((r["t"], v, up) for r, v, up in served_verdicts(interactions))
    fig, ax = plt.subplots(figsize=(8.0, 4.2))
    if served:
        versions = sorted({v for _, v, _ in served}, key=_version_number)
        level = {v: i for i, v in enumerate(versions)}
        ax.scatter(
            [t for t, _, _ in served],
            [level[v] for _, v, _ in served],
            s=6,
            alpha=0.4,
            color="#4c72b0",
            label="served response",
        )
        ax.set_yticks(range(len(versions)), versions)
        for p in policies:
            if p["version"] in level and p["created_at"] >= started_at:
                ax.axvline(p["created_at"] - started_at, color="grey", linestyle=":", linewidth=0.8)
        ax2 = ax.twinx()
        rate = rolling_rate([(t, up) for t, _, up in served], window_s)
        ax2.plot([t for t, _ in rate], [r for _, r in rate], color="#55a868", label=f"thumbs-up, last {window_s:.0f} s")
        ax2.set_ylim(0, 1.05)
        ax2.set_ylabel("rolling gold thumbs-up rate", color="#55a868")
    ax.set_xlabel("seconds since the users started (dotted: a policy version published)")
    ax.set_ylabel("policy version serving")
    ax.set_title("Serving timeline")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def plot_traffic_share(
    interactions: list[dict],
    steps: list[tuple[float, str, float]],
    started_at: float,
    png: Path,
    window_s: float = 60.0,
) -> None:
    """The configured canary share (a step line, the canary named at each change) and the share of the
    answers in the last ``window_s`` that the canary served, against seconds into the run."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.0, 4.0))
    if steps:
        end = max([started_at, *[t for t, _ in answers_by_version(interactions)], *[t for t, _, _ in steps]])
        xs = [t - started_at for t, _, _ in steps] + [end - started_at]
        ys = [share for _, _, share in steps] + [steps[-1][2]]
        ax.step(xs, ys, where="post", color="#dd8452", label="configured canary share")
        for t, version, share in steps:
            if version:
                ax.annotate(version, (t - started_at, share), fontsize=7, rotation=45, xytext=(2, 4),
                            textcoords="offset points")  # fmt: skip
    served = served_canary_share(interactions, steps, window_s)
    if served:
        ax.plot(
            [t - started_at for t, _ in served],
            [x for _, x in served],
            color="#4c72b0",
            alpha=0.8,
            label=f"answers served by the canary, last {window_s:.0f} s",
        )
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("seconds since the users started")
    ax.set_ylabel("share")
    ax.set_title("Canary traffic share over time")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def write_report(
    out_dir: Path,
    interactions: list[dict],
    policies: list[dict],
    rms: list[dict],
    ppo: list[dict],
    started_at: float,
    duration_s: float,
    evaluation: dict | None = None,
    metrics: dict[str, str] | None = None,
    *,
    gates: list[dict] | None = None,
    rollout: list[dict] | None = None,
) -> dict:
    """Write report.md, the plots and data.json to ``out_dir``; returns the summary numbers."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rates = thumbs_up_by_version(interactions)
    ok = [r for r in interactions if r["kind"] != "error"]
    accepted = sum(200 <= r["feedback_status"] < 300 for r in ok)
    kinds: defaultdict[str, int] = defaultdict(int)
    for r in ok:
        kinds[r["kind"]] += 1
    first, last = (rates[0], rates[-1]) if rates else (None, None)
    summary = {
        "started_at": started_at,
        "duration_s": round(duration_s, 1),
        "interactions": len(ok),
        "errors": len(interactions) - len(ok),
        "ratings_accepted": accepted,
        "ratings_refused": len(ok) - accepted,
        "ratings_by_kind": dict(kinds),
        "policy_versions_served": [r.version for r in rates],
        "policy_versions_published": [p["version"] for p in policies if p["created_at"] >= started_at],
        "rm_versions_published": [m["version"] for m in rms if m["created_at"] >= started_at],
        "thumbs_up_by_version": [r.__dict__ for r in rates],
        "thumbs_up_first": first.rate if first else None,
        "thumbs_up_last": last.rate if last else None,
        "thumbs_up_rise_pp": round(100 * (last.rate - first.rate), 1) if first and last else None,
        "ppo_steps": ppo[-1]["step"] if ppo else 0,
        "max_kl": max((p["kl"] for p in ppo), default=None),
        "evaluation": evaluation,
        "limits_per_principal": trust_counts(interactions, metrics or {}),
        "gate": gate_discrimination(gates or [], (metrics or {}).get("trainer")),
        "heldout_samples": sorted(
            {int(p["metrics"]["heldout_samples"]) for p in policies if "heldout_samples" in p["metrics"]}
        ),
        "canaries": canary_verdicts(rollout, interactions) if rollout is not None else None,
    }
    figures = []
    if rates:
        plot_thumbs_up(rates, out_dir / "thumbs_up_by_policy.png")
        figures.append(("Gold thumbs-up rate per policy version", "thumbs_up_by_policy.png"))
    if rms:
        plot_rm_accuracy(rms, out_dir / "rm_accuracy.png")
        figures.append(("Reward model held-out accuracy per version", "rm_accuracy.png"))
    if ppo:
        plot_ppo(ppo, out_dir / "ppo_reward_kl.png")
        figures.append(("PPO mean reward and KL per step", "ppo_reward_kl.png"))
    plot_timeline(interactions, policies, started_at, out_dir / "serving_timeline.png")
    figures.append(("Serving timeline", "serving_timeline.png"))
    if rollout is not None:
        plot_traffic_share(interactions, share_steps(rollout), started_at, out_dir / "traffic_share.png")
        figures.append(("Canary traffic share over time", "traffic_share.png"))
    data = {"summary": summary, "policies": policies, "rms": rms, "ppo": ppo, "gates": gates or [], "rollout": rollout}
    (out_dir / "data.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    with open(out_dir / "interactions.jsonl", "w", encoding="utf-8") as f:
        for rec in interactions:
            f.write(json.dumps(rec) + "\n")
    (out_dir / "report.md").write_text(_markdown(summary, rates, policies, rms, ppo, started_at, figures))
    return summary


def _gate_lines(g: dict, heldout_samples: list[int]) -> list[str]:
    """The trainer's publish gate: how often it saw a difference, what refused."""
    k = ", ".join(str(x) for x in heldout_samples) or "n/a"
    lines = [
        "",
        "## The trainer's publish gate",
        "",
        f"Held-out answers sampled per prompt: {k} (0 = greedy). Of {g['candidates']} candidate evaluations "
        f"seen, {g['published']} were published; {g['compared']} were compared with their baseline under one "
        f"reward model, and the held-out figure **differed from the baseline's in "
        f"{fmt_share(g['differed_share'])}** of them ({g['same_as_baseline']} the same: a gate that always sees "
        "the same figure cannot tell a candidate from its baseline).",
    ]
    if g["refused_by"]:
        lines.append("Refused by: " + ", ".join(f"{reason} {n}" for reason, n in sorted(g["refused_by"].items())) + ".")
    if g["guards"]:
        lines.append("Guards configured: " + ", ".join(g["guards"]) + ".")
    m = g.get("metrics")
    if m:
        refused = ", ".join(f"{reason} {n}" for reason, n in m["refused_by"].items()) or "none"
        lines.append(
            f"The trainer's own counters: {m['compared']} compared, differed in {fmt_share(m['differed_share'])}, "
            f"{m['published']} published; refusals by check: {refused}."
        )
    return lines


def _canary_lines(canaries: list[dict]) -> list[str]:
    """Each canary's verdict and the evidence it was taken on."""
    lines = ["", "## Canaries", ""]
    if not canaries:
        return [*lines, "No version reached the canary stage."]

    def rate(pair: list | tuple | None) -> str:
        if not pair or pair[1] is None:
            return "n/a"
        return f"{pair[1]:.0%} of {pair[0]}"

    lines += [
        "| version | verdict | reason | canary for (s) | answers served | share of answers | "
        "thumbs-up canary | thumbs-up stable | side by side won |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in canaries:
        lines.append(
            f"| {c['version']} | {c['outcome']} | {c['reason']} | {c['duration_s']:.0f} | {c['answers']} | "
            f"{fmt_share(c['share_of_answers'])} | {rate(c['thumbs_canary'])} | {rate(c['thumbs_stable'])} | "
            f"{rate(c['side_by_side'])} |"
        )
    outcomes: defaultdict[str, int] = defaultdict(int)
    for c in canaries:
        outcomes[c["outcome"]] += 1
    lines += [
        "",
        "Verdicts: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())) + ". The evidence is what the "
        "live gate decided on (services/rollout): gold-blind user ratings of the canary against the stable "
        "version over the same period.",
    ]
    return lines


def sabotage_lines(o: dict) -> list[str]:
    """The sabotage run's section (canaries.sabotage_outcome's figures)."""

    def pct(x: float | None) -> str:
        return fmt_share(x)

    lines = ["", "## Sabotage: a bad candidate through the normal publish path", ""]
    if not o.get("version"):
        return [*lines, f"No bad candidate was published: {o.get('error') or 'unknown error'}."]
    if not o["canary_started"]:
        return [*lines, f"{o['version']} never became the canary (stages: {o['stages']})."]
    ended = o["canary_end"] is not None
    lines += [
        "| figure | value |",
        "|---|---|",
        f"| bad version | {o['version']} |",
        f"| canary share (of conversations) | {o['canary_share']:.0%} |",
        f"| verdict | {'rolled back' if o['rolled_back'] else 'promoted' if ended else 'still running at the end'} "
        f"({'automatically' if o['automatic'] else 'not automatically'}): {o['reason'] or '-'} |",
        f"| canary start to rollback | {o['seconds_to_rollback']} s |",
        f"| publication to rollback | {o['seconds_from_injection']} s |",
        f"| answers it served | {o['answers_served']} |",
        f"| its share of all answers in its period | {pct(o['share_of_answers'])} of {o['answers_in_period']} |",
        f"| answers to conversations outside the canary share | {o['served_outside_share']} |",
        f"| gold thumbs-up rate: bad version / stable | {pct(o.get('gold_thumbs_up_bad'))} / "
        f"{pct(o.get('gold_thumbs_up_stable'))} |",
    ]
    return lines


def append_to_report(out_dir: Path, lines: list[str]) -> None:
    """Add a section at the end of an existing report.md (e.g. a benchmark's own figures)."""
    path = Path(out_dir) / "report.md"
    path.write_text(path.read_text() + "\n".join(lines) + "\n")


def _limits_lines(t: dict) -> list[str]:
    def n(key: str) -> str:
        return "n/a" if t.get(key) is None else f"{t[key]:.0f}"

    return [
        "",
        "## Limits per principal",
        "",
        f"- Rate-limited: {n('ratings_rate_limited')} ratings and {n('chats_rate_limited')} chats answered 429 "
        f"(the gateway refused {n('requests_rate_limited')} requests over a principal's rate).",
        f"- Quarantined raters: {n('quarantined_principals')}; their comparisons left out of the last reward "
        f"model round: {n('comparisons_held_back_quarantined')}.",
        f"- Capped: {n('comparisons_held_back_capped')} comparisons waiting over a principal's cap in the last "
        f"round; {n('live_prompts_capped')} live prompts evicted from the trainer's buffer by the cap.",
        "",
        "(docs/security.md; `rlhf raters list` shows each rater's agreement scores.)",
    ]


def _markdown(
    summary: dict,
    rates: list[VersionRate],
    policies: list[dict],
    rms: list[dict],
    ppo: list[dict],
    started_at: float,
    figures: list[tuple[str, str]],
) -> str:
    lines = [
        "# RLHF Flywheel demo report",
        "",
        f"{summary['interactions']} chats by simulated users in {summary['duration_s']:.0f} s; "
        f"{summary['ratings_accepted']} ratings accepted, {summary['ratings_refused']} refused, "
        f"{summary['errors']} failed chats. Ratings by kind: "
        + ", ".join(f"{k} {v}" for k, v in sorted(summary["ratings_by_kind"].items()))
        + ".",
        "",
        'The users rate with a hidden gold rule (flywheel/demo/gold_rater.py: correct sum, "I hope this helps", '
        "at most 14 words); the services only ever see the ratings.",
        "",
        "## Gold thumbs-up rate per policy version",
        "",
        "| policy version | responses | thumbs-up rate | 95% interval |",
        "|---|---|---|---|",
    ]
    for r in rates:
        lines.append(f"| {r.version} | {r.responses} | {r.rate:.1%} | [{r.low:.1%}, {r.high:.1%}] |")
    if summary["thumbs_up_rise_pp"] is not None:
        lines += [
            "",
            f"Rise from the first to the last version served: **{summary['thumbs_up_rise_pp']:+.1f} "
            "percentage points**.",
        ]
    lines += [
        "",
        "## Published versions",
        "",
        "| version | parent | published (s into the run) | metrics |",
        "|---|---|---|---|",
    ]
    for m in [*policies, *rms]:
        when = m["created_at"] - started_at
        shown = ", ".join(f"{k}={v:.3g}" for k, v in sorted(m["metrics"].items())[:8])
        lines.append(f"| {m['version']} | {m.get('parent') or ''} | {when:.0f} | {shown} |")
    if ppo:
        lines += [
            "",
            "## PPO",
            "",
            f"{summary['ppo_steps']} PPO steps observed; last mean reward "
            f"{ppo[-1]['mean_reward']:.3f}, last KL {ppo[-1]['kl']:.3f}, largest KL {summary['max_kl']:.3f} nats.",
        ]
    ev = summary.get("evaluation")
    if ev:
        lines += [
            "",
            "## Held-out evaluation (gold rater)",
            "",
            f"Win rate of {ev['b']['version']} over {ev['a']['version']}: **{ev['win_rate']:.1%}** "
            f"[{ev['win_low']:.1%}, {ev['win_high']:.1%}] on {ev['prompts']} held-out prompts x "
            f"{ev['samples_per_prompt']} samples (a perfect policy would reach "
            f"{ev.get('win_ceiling', float('nan')):.1%}: ties count half, and {ev['a']['version']}'s answers "
            f"were already perfect {ev['a']['thumbs_up_rate']:.1%} of the time). Held-out corpus perplexity (alignment tax): "
            f"{ev['a']['heldout_perplexity']:.2f} -> {ev['b']['heldout_perplexity']:.2f}.",
        ]
    lines += _gate_lines(summary["gate"], summary["heldout_samples"])
    if summary["canaries"] is not None:
        lines += _canary_lines(summary["canaries"])
    lines += _limits_lines(summary["limits_per_principal"])
    lines += [
        "",
        "RM held-out accuracy: rm-0001 is measured on held-out offline rankings, later versions on "
        "the reward learner's held-out slice of live comparisons (harder: similar responses), so the "
        "first point is not directly comparable with the rest.",
        "",
        "## Figures",
        "",
    ]
    for title, name in figures:
        lines += [f"### {title}", "", f"![{title}]({name})", ""]
    return "\n".join(lines) + "\n"
