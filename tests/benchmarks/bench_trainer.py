"""Policy optimisation: our PPO learner vs TRL, side by side in one run, on the demo task.

    .venv/bin/python tests/benchmarks/bench_trainer.py            # default settings (see --help)
    .venv/bin/python tests/benchmarks/bench_trainer.py --quick    # smoke run: few steps, QUICK bootstrap

Contenders (each a subprocess with one torch thread, started one after another, each loading its
models before its clock starts):

  ours       services/trainer PPOLearner: generate -> RM score -> step (old logprobs recomputed)
  ours-fast  the same with the sampler's logprobs as pi_old (recompute_logprobs=False), as TRL's PPO does
  trl-grpo   TRL 1.16 GRPOTrainer (the newest TRL; it ships no PPOTrainer any more)
  trl-ppo    TRL 1.12 trl.experimental.ppo.PPOTrainer (the newest release that still ships one)

All use the same policy version (the SFT model of `rlhf bootstrap`), the same reward model
version (the value model of both PPOs starts from it too), the same training prompts (the demo
task's, flywheel/demo/data/prompts.jsonl), batch size, minibatch size, epochs per batch (GRPO:
num_iterations), response length, learning rate, KL coefficient (GRPO: beta) and sampling
(temperature 1, no top-k/top-p). Rollouts are generated with transformers ``generate`` everywhere
(the trainer service samples with vLLM instead; that speed belongs to the serving benchmark).

Measured per contender: PPO samples/s (scored responses consumed per second of training, wall and
per CPU-second: on a shared machine the CPU figure is the steadier one), rollout tokens/s
(response tokens / time inside ``generate``), and the reward gained: the mean RM score of sampled
responses to the demo task's held-out prompts, before and after training (same prompts, same seed
for every policy), per wall-clock minute of training. Target: ours >= 1.5x TRL's samples/s at an
equal or better reward gain.

TRL runs in its own virtual environments (never in the project's .venv, whose torch/transformers it
might move): ``bench-results/trl-venvs/trl-<version>``, made on first use by this script as
``python -m venv`` + a .pth file that adds the project's site-packages with its own .pth files (so
torch, transformers and the editable install of this project are shared, not downloaded again) +
``pip install trl==<version>`` (which adds accelerate, datasets, pandas, pyarrow there). Delete the
directory to rebuild it.

Prints a table, writes bench-results/trainer/bench_trainer.json and bench_trainer.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1].parent
HERE = Path(__file__).resolve().parent / "trainer_bench"

TRL_VERSIONS = {"trl-grpo": "1.16.0", "trl-ppo": "1.12.0"}
RUNNERS = {
    "ours": ("run_ours.py", []),
    "ours-fast": ("run_ours.py", ["--sampler-logprobs"]),
    "trl-grpo": ("run_trl_grpo.py", []),
    "trl-ppo": ("run_trl_ppo.py", []),
}
TARGET_SPEEDUP = 1.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--contenders", default="ours,ours-fast,trl-grpo,trl-ppo", help="comma-separated, run in this order")
    p.add_argument("--steps", type=int, default=12, help="PPO batches per contender")
    p.add_argument("--batch-size", type=int, default=16, help="responses per PPO batch (GRPO: generation batch)")
    p.add_argument("--minibatch-size", type=int, default=8, help="responses per optimiser step")
    p.add_argument("--epochs", type=int, default=4, help="passes over each batch (GRPO: num_iterations)")
    p.add_argument("--response-length", type=int, default=24, help="max new tokens per response")
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--kl-coef", type=float, default=0.05, help="PPO's beta (GRPO: beta)")
    p.add_argument("--num-generations", type=int, default=4, help="GRPO group size (completions per prompt)")
    p.add_argument("--eval-prompts", type=int, default=80, help="held-out demo prompts for the reward before/after")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the contenders this many times, interleaved (ours, trl, ours, trl...); speeds are the "
        "median over rounds, the reward gain is the last round's (every round trains the same way)",
    )
    p.add_argument(
        "--store",
        type=Path,
        default=REPO / "bench-results" / "trainer" / "models",
        help="model store with the SFT policy and RM (made by `rlhf bootstrap`'s pipeline if empty)",
    )
    p.add_argument("--out", type=Path, default=REPO / "bench-results" / "trainer")
    p.add_argument("--venvs", type=Path, default=REPO / "bench-results" / "trl-venvs")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 steps of batch 8, QUICK bootstrap if needed")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.minibatch_size, args.epochs, args.eval_prompts = 3, 8, 4, 2, 16
    if args.batch_size % args.minibatch_size or args.batch_size % args.num_generations:
        p.error("--batch-size must be a multiple of --minibatch-size and of --num-generations")
    return args


# --- setup -----------------------------------------------------------------------------------------


def ensure_models(store_root: Path, quick: bool) -> tuple[str, str]:
    """(policy, rm) of the store; runs the bootstrap pipeline (pretrain, SFT, first RM) when it has none."""
    from shared.model_store import ModelStore

    store = ModelStore(store_root)
    if not (store.current("policy") and store.current("rm")):
        from flywheel.bootstrap.pipeline import QUICK, BootstrapSettings, run_bootstrap

        print(f"no policy/RM in {store_root}: running the bootstrap pipeline{' (quick)' if quick else ''}", flush=True)
        run_bootstrap(
            store, report_dir=store_root.parent / "bootstrap", settings=QUICK if quick else BootstrapSettings()
        )
    return store.current("policy"), store.current("rm")


def ensure_trl_venv(venvs: Path, version: str) -> Path:
    """The python of a venv with trl==version that shares the project's site-packages (see the module docstring)."""
    venv = venvs / f"trl-{version}"
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating {venv}", flush=True)
        subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)], check=True)
    # addsitedir, not a bare path line: it also runs the .pth files there, among them the one that
    # installs the editable project's import finder (`import shared` in the runners). Written every
    # time, so that venvs made with a bare path line get it too.
    site = next((venv / "lib").glob("python*/site-packages"))
    project_site = sysconfig.get_path("purelib")
    (site / "rlhf-main-venv.pth").write_text(f"import site; site.addsitedir({project_site!r})\n")
    probe = [str(python), "-c", "import trl, sys; sys.exit(trl.__version__ != sys.argv[1])", version]
    if subprocess.run(probe, capture_output=True).returncode != 0:
        print(f"installing trl=={version} into {venv}", flush=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"trl=={version}"], check=True)
    return python


def load_prompts(path: Path) -> list[list[dict]]:
    return [json.loads(line)["messages"] for line in path.read_text().splitlines() if line.strip()]


# --- running and evaluating ------------------------------------------------------------------------


def run_contender(name: str, python: Path, spec_path: Path, out_dir: Path) -> dict:
    script, extra = RUNNERS[name]
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    }
    started = time.monotonic()
    with open(out_dir / "log.txt", "w") as log:
        proc = subprocess.Popen(
            [str(python), str(HERE / script), str(spec_path), str(out_dir), *extra],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for line in proc.stdout:  # progress: each runner prints a line per batch
            log.write(line)
            if " step " in line or " batch " in line:
                print(f"  {line.rstrip()}", flush=True)
        proc.wait()
    if proc.returncode != 0:
        tail = (out_dir / "log.txt").read_text()[-3000:]
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); end of {out_dir / 'log.txt'}:\n{tail}")
    result = json.loads((out_dir / "result.json").read_text())
    result["process_s"] = time.monotonic() - started
    return result


def median_run(runs: list[dict]) -> dict:
    """The last run, with wall and CPU seconds replaced by their medians over the runs (same work each run)."""
    import statistics

    out = dict(runs[-1])
    for key in ("wall_s", "cpu_s", "generate_s"):
        out[key] = statistics.median(r[key] for r in runs)
    out["rounds"] = [{k: r[k] for k in ("wall_s", "cpu_s", "generate_s", "samples")} for r in runs]
    return out


def evaluate(
    policy_dirs: dict[str, Path], store_root: str, rm: str, prompts: list[list[dict]], max_new_tokens: int, seed: int
) -> dict[str, dict]:
    """Mean RM score of responses sampled (temperature 1) and greedy, for every policy on the same prompts."""
    import torch
    from trainer_bench.common import RMScorer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    scorer = RMScorer(store_root, rm)
    out = {}
    for name, policy_dir in policy_dirs.items():
        tok = AutoTokenizer.from_pretrained(str(policy_dir))
        model = AutoModelForCausalLM.from_pretrained(str(policy_dir), dtype=torch.float32).eval()
        ids = [
            tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False) for c in prompts
        ]
        width = max(map(len, ids))
        input_ids = torch.tensor([[tok.pad_token_id] * (width - len(i)) + list(i) for i in ids])
        attention = (
            torch.arange(width).expand(len(ids), -1) >= torch.tensor([width - len(i) for i in ids])[:, None]
        ).long()
        row = {}
        for mode in ("sampled", "greedy"):
            torch.manual_seed(seed)
            with torch.no_grad():
                gen = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention,
                    max_new_tokens=max_new_tokens,
                    do_sample=mode == "sampled",
                    top_k=0 if mode == "sampled" else None,
                    top_p=1.0 if mode == "sampled" else None,
                    temperature=1.0 if mode == "sampled" else None,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                )
            texts = tok.batch_decode(gen[:, width:], skip_special_tokens=True)
            scores = scorer.score(prompts, texts)
            row[mode] = sum(scores) / len(scores)
            if mode == "greedy":
                row["example"] = texts[0]
        out[name] = row
        print(
            f"  eval {name}: sampled {row['sampled']:+.3f} greedy {row['greedy']:+.3f}  e.g. {row['example']!r}",
            flush=True,
        )
    return out


# --- report ----------------------------------------------------------------------------------------


def summarise(results: dict[str, dict], evals: dict[str, dict]) -> list[dict]:
    rows = []
    before = evals["initial"]["sampled"]
    for name, r in results.items():
        gain = evals[name]["sampled"] - before
        rows.append(
            {
                "contender": name,
                "trl": r["versions"].get("trl", "-"),
                "samples": r["samples"],
                "wall_s": r["wall_s"],
                "cpu_s": r["cpu_s"],
                "samples_per_s": r["samples"] / r["wall_s"],
                "samples_per_cpu_s": r["samples"] / r["cpu_s"],
                "rollout_tokens_per_s": r["rollout_tokens"] / r["generate_s"] if r["generate_s"] else float("nan"),
                "generate_share": r["generate_s"] / r["wall_s"],
                "reward_before": before,
                "reward_after": evals[name]["sampled"],
                "reward_gain": gain,
                "greedy_after": evals[name]["greedy"],
                "gain_per_min": gain / (r["wall_s"] / 60),
            }
        )
    return rows


def print_table(rows: list[dict]) -> None:
    head = (
        f"{'contender':<10} {'trl':>7} {'samples':>7} {'wall s':>7} {'samp/s':>7} {'samp/cpu-s':>10} "
        f"{'rollout tok/s':>13} {'gen %':>5} {'reward before->after':>21} {'gain':>7} {'gain/min':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['contender']:<10} {r['trl']:>7} {r['samples']:>7} {r['wall_s']:>7.1f} {r['samples_per_s']:>7.2f} "
            f"{r['samples_per_cpu_s']:>10.2f} {r['rollout_tokens_per_s']:>13.1f} {100 * r['generate_share']:>5.0f} "
            f"{r['reward_before']:>+9.3f} -> {r['reward_after']:>+8.3f} {r['reward_gain']:>+7.3f} {r['gain_per_min']:>+8.3f}"
        )


def compare(rows: list[dict]) -> list[str]:
    by = {r["contender"]: r for r in rows}
    lines = []
    for ours in ("ours", "ours-fast"):
        for trl in ("trl-grpo", "trl-ppo"):
            if ours in by and trl in by:
                a, b = by[ours], by[trl]
                speed, cpu = a["samples_per_s"] / b["samples_per_s"], a["samples_per_cpu_s"] / b["samples_per_cpu_s"]
                ok = speed >= TARGET_SPEEDUP and a["reward_gain"] >= b["reward_gain"]
                lines.append(
                    f"{ours} vs {trl}: {speed:.2f}x samples/s ({cpu:.2f}x per CPU-second), reward gain "
                    f"{a['reward_gain']:+.3f} vs {b['reward_gain']:+.3f} -> target (>= {TARGET_SPEEDUP}x at equal "
                    f"or better gain) {'MET' if ok else 'NOT MET'}"
                )
    return lines


def plot(results: dict[str, dict], rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in results.items():
        ax1.plot(
            [0] + [c["t"] for c in r["curve"]],
            [float("nan")] + [c["reward"] for c in r["curve"]],
            marker="o",
            ms=3,
            label=name,
        )
    ax1.set_xlabel("training wall-clock (s)")
    ax1.set_ylabel("mean RM score of the training batch")
    ax1.set_title("reward during training")
    ax1.legend()
    names = [r["contender"] for r in rows]
    ax2.bar(names, [r["samples_per_s"] for r in rows], color="tab:blue", alpha=0.8, label="samples/s")
    ax2.set_ylabel("PPO samples/s (wall)")
    ax3 = ax2.twinx()
    ax3.plot(names, [r["reward_gain"] for r in rows], "o", color="tab:red", label="reward gain (held-out)")
    ax3.set_ylabel("reward gain on held-out prompts", color="tab:red")
    ax2.set_title("throughput and reward gain")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    from trainer_bench.common import BenchSpec

    args = parse_args(argv)
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = set(contenders) - RUNNERS.keys()
    if unknown:
        raise SystemExit(f"unknown contenders {sorted(unknown)}; known: {', '.join(RUNNERS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    policy, rm = ensure_models(args.store, args.quick)
    pythons = {
        c: ensure_trl_venv(args.venvs, TRL_VERSIONS[c]) if c in TRL_VERSIONS else Path(sys.executable)
        for c in contenders
    }
    spec = BenchSpec(
        store=str(args.store),
        policy=policy,
        rm=rm,
        prompts=load_prompts(REPO / "flywheel/demo/data/prompts.jsonl"),
        batch_size=args.batch_size,
        minibatch_size=args.minibatch_size,
        epochs=args.epochs,
        response_length=args.response_length,
        steps=args.steps,
        lr=args.lr,
        kl_coef=args.kl_coef,
        seed=args.seed,
        num_generations=args.num_generations,
    )
    spec_path = args.out / "spec.json"
    spec.write(spec_path)
    print(
        f"policy {policy}, rm {rm}; {args.steps} batches of {args.batch_size}, minibatch {args.minibatch_size}, "
        f"{args.epochs} epochs, {args.response_length} tokens, lr {args.lr}, beta {args.kl_coef}",
        flush=True,
    )

    rounds: dict[str, list[dict]] = {name: [] for name in contenders}
    for round_no in range(args.rounds):
        for name in contenders:
            print(f"[{name}{f' round {round_no + 1}/{args.rounds}' if args.rounds > 1 else ''}]", flush=True)
            rounds[name].append(run_contender(name, pythons[name], spec_path, args.out / name))
    results = {name: median_run(runs) for name, runs in rounds.items()}

    from shared.model_store import ModelStore

    heldout = load_prompts(REPO / "flywheel/demo/data/heldout_prompts.jsonl")[: args.eval_prompts]
    policy_dirs = {"initial": ModelStore(args.store).path(policy)}
    policy_dirs.update({name: Path(r["policy_dir"]) for name, r in results.items()})
    print("[evaluation]", flush=True)
    evals = evaluate(policy_dirs, str(args.store), rm, heldout, args.response_length, args.seed)
    rows = summarise(results, evals)
    print()
    print_table(rows)
    verdicts = compare(rows)
    for line in verdicts:
        print(line)
    report = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "policy": policy,
        "rm": rm,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg_end": os.getloadavg()},
        "rows": rows,
        "evaluation": evals,
        "verdicts": verdicts,
        "runs": {k: {kk: vv for kk, vv in v.items()} for k, v in results.items()},
    }
    (args.out / "bench_trainer.json").write_text(json.dumps(report, indent=1))
    plot(results, rows, args.out / "bench_trainer.png")
    print(f"\nwrote {args.out / 'bench_trainer.json'} and {args.out / 'bench_trainer.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
