"""Held-out gold figures of a demo store's policy versions, and of weight averages of them, offline.

    .venv/bin/python tests/benchmarks/bench_version_average.py --store bench-results/demo-store
    .venv/bin/python tests/benchmarks/bench_version_average.py --store S --every 10 --last 2,4,8,16,32 \
        --windows 50,70,90,110 --window-size 16 --samples 16

For a store a `bench_demo.py` run left behind (its policy versions in order), samples ``--samples``
answers per held-out prompt (temperature 1, as `rlhf eval`) from:

- every ``--every``-th version and the last one;
- the uniform weight average of the last k versions, for each k in ``--last``;
- for each index i in ``--windows``: version i and the average of the ``--window-size`` versions
  ending at it (is the average better wherever the run is, not only at its end?).

Each row: gold thumbs-up, correct / polite / concise shares, and the win rate over policy-0001's
answers (ties half; policy-0001 sampled once with another seed, so its own row is about 50%). This
is the evidence behind RLHF_PPO_AVERAGE_DECAY (docs/benchmarks.md, "Publishing an average of the
weights"). Prints a table, writes ``--out`` (JSON) and a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from flywheel.demo import gold_rater
from flywheel.demo.evaluate import sample_responses, version_report, win_outcome
from flywheel.demo.task import split_problems
from shared.model_store import ModelStore
from shared.models.loading import load_verified_policy

REPO = Path(__file__).resolve().parents[2]


def averaged(store: ModelStore, versions: list[str]) -> torch.nn.Module:
    """The policy whose floating tensors are the mean of ``versions``' (each verified as loaded)."""
    total: dict[str, torch.Tensor] = {}
    model = None
    for version in versions:
        _, model = load_verified_policy(store, version)
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                total[name] = total[name] + t.double() if name in total else t.double()
    assert model is not None
    own = model.state_dict()
    model.load_state_dict({n: (total[n] / len(versions)).to(own[n].dtype) if n in total else own[n] for n in own})
    return model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, required=True, help="a model store a demo run left (policy-0001 ...)")
    ap.add_argument("--samples", type=int, default=16, help="answers per held-out prompt and row")
    ap.add_argument("--every", type=int, default=10, help="evaluate every N-th version (and the last)")
    ap.add_argument("--last", default="2,4,8,16,32", help="k of the averages of the last k versions")
    ap.add_argument("--windows", default="", help="indices i: version i and the average of the window ending there")
    ap.add_argument("--window-size", type=int, default=16)
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "version-average.json")
    args = ap.parse_args()
    store = ModelStore(args.store)
    versions = store.versions("policy")
    if len(versions) < 2:
        ap.error(f"{args.store}: {len(versions)} policy versions; a demo run's store has many")
    _, held = split_problems()
    prompts = [p.prompt for p in held]
    tokenizer, first = load_verified_policy(store, versions[0])
    baseline = [
        [gold_rater.judge(p, r).score for r in rs]
        for p, rs in zip(prompts, sample_responses(tokenizer, first, prompts, args.samples, seed=1))
    ]
    rows: list[dict] = []

    def score(model: torch.nn.Module, name: str, kind: str) -> None:
        started = time.monotonic()
        answers = sample_responses(tokenizer, model, prompts, args.samples, seed=0)
        report = version_report(name, held, answers, math.nan)  # rlhf eval's own figures
        wins = [
            win_outcome(a, gold_rater.judge(p, r).score)
            for p, sa, rs in zip(prompts, baseline, answers)
            for a, r in zip(sa, rs)
        ]
        row = {
            "name": name,
            "kind": kind,
            "thumbs_up": report.thumbs_up_rate,
            "correct": report.correct_rate,
            "polite": report.polite_rate,
            "concise": report.concise_rate,
            "win_over_first": sum(wins) / len(wins),
            "answers": report.responses,
            "seconds": round(time.monotonic() - started, 1),
        }
        rows.append(row)
        print(
            f"{name:<34} thumbs-up {row['thumbs_up']:6.1%}  correct {row['correct']:6.1%}  polite "
            f"{row['polite']:6.1%}  concise {row['concise']:6.1%}  win over {versions[0]} "
            f"{row['win_over_first']:6.1%}",
            flush=True,
        )

    picks = sorted({*range(0, len(versions), args.every), len(versions) - 1})
    for i in picks:
        score(load_verified_policy(store, versions[i])[1], versions[i], "version")
    for k in (int(x) for x in args.last.split(",") if x):
        if k <= len(versions):
            score(averaged(store, versions[-k:]), f"average of the last {k}", "average_last")
    for i in (int(x) for x in args.windows.split(",") if x):
        if args.window_size <= i + 1 <= len(versions):
            score(load_verified_policy(store, versions[i])[1], versions[i], "window_end")
            window = versions[i + 1 - args.window_size : i + 1]
            score(averaged(store, window), f"average of {window[0]}..{window[-1]}", "window_average")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"store": str(args.store), "samples": args.samples, "rows": rows}, indent=1))
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


def plot(rows: list[dict], png: Path) -> None:
    """Left: each version's held-out thumbs-up along the run, and the averages of the windows ending
    at some of them. Right: the last version against the averages of the last k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def number(name: str) -> int:
        return int(name.rsplit("-", 1)[-1])

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    versions = sorted(
        {r["name"]: r for r in rows if r["kind"] in ("version", "window_end")}.values(), key=lambda r: number(r["name"])
    )
    left.plot([number(r["name"]) for r in versions], [100 * r["thumbs_up"] for r in versions], "o-", label="a version")
    windows = [r for r in rows if r["kind"] == "window_average"]
    if windows:
        left.plot(
            [number(r["name"].split("..")[-1]) for r in windows],
            [100 * r["thumbs_up"] for r in windows],
            "s",
            color="tab:green",
            label="average of the window ending there",
        )
    left.set_xlabel("policy version")
    left.set_ylabel("held-out gold thumbs-up (%)")
    left.set_title("Along the run")
    left.legend(loc="lower right")
    averages = [r for r in rows if r["kind"] == "average_last"]
    bars = [versions[-1], *averages] if versions else averages
    labels = [versions[-1]["name"] if versions else "", *(r["name"].removeprefix("average of the ") for r in averages)]
    right.bar(
        range(len(bars)), [100 * r["thumbs_up"] for r in bars], color=["tab:blue"] + ["tab:green"] * len(averages)
    )
    right.set_xticks(range(len(bars)), labels, rotation=30, ha="right")
    low = min(100 * r["thumbs_up"] for r in bars) if bars else 0
    right.set_ylim(max(0, low - 10), 100)
    right.set_title("At the end: the last version and averages")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
