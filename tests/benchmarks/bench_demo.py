"""Learning benchmark: a full `rlhf demo` on this machine, checked against the issue's targets.

    .venv/bin/python tests/benchmarks/bench_demo.py                    # bootstrap + 20 min demo + eval
    .venv/bin/python tests/benchmarks/bench_demo.py --store S --skip-bootstrap   # reuse a bootstrapped store
    .venv/bin/python tests/benchmarks/bench_demo.py --ptx 0.5          # PPO-ptx instead of PPO
    .venv/bin/python tests/benchmarks/bench_demo.py --store S --skip-bootstrap --sabotage   # a bad candidate
    .venv/bin/python tests/benchmarks/bench_demo.py --store S --skip-bootstrap --side-by-side   # PPO vs PPO-ptx

1. `rlhf bootstrap` on a fresh store with the shipped data (timed: wall and CPU seconds; target
   under 15 minutes);
2. the whole stack as `rlhf up` starts it, and the demo's simulated users for ``--duration`` seconds
   (default 1200), rating with the hidden gold rater;
3. `rlhf eval`: the final policy against policy-0001 on the held-out prompts.

Targets (issue #6): the gold thumbs-up rate of the served policy rises by at least 20 percentage
points over policy-0001's within 20 minutes, with KL to the reference bounded (the trainer's
``kl_bound`` gate); the final policy's win rate over policy-0001 is at least 70% on held-out prompts.
The held-out corpus perplexity of both is printed (the alignment tax; compare --ptx runs on it).

Prints a table and writes bench-results/demo.json; the demo's report folder goes to
bench-results/demo-report/ (report.md, plots).

**Sabotage** (``--sabotage``): the same demo with progressive rollout, and partway through
(``--sabotage-at`` seconds after the users start) a deliberately bad candidate arrives through the
normal publish path: the stable version fine-tuned for a few steps to answer sums wrongly but
politely (flywheel/demo/sabotage.py), published as a candidate with the trainer's signing key and
announced on rlhf.policy-candidates, exactly as the trainer publishes. The trainer starts paused and
resumes once the bad version is the canary (so that the canary slot is free when it arrives and
the trainer's own candidates queue behind it). Reported: whether it was rolled back automatically
(by the live gate, not an operator), the time from its canary start to the rollback, the answers it
served, their share of all answers in that period, and whether any conversation outside the canary
share got it (the gateway's routing rule). Targets: rolled back automatically, under 5% of the
answers in its period, nobody outside the canary share. The canary share defaults to 4% here
(``--canary-share``); the users stop ``--after-verdict`` seconds after the verdict, or at
``--duration``. Writes bench-results/sabotage.json and a "Sabotage" section in the report.

**Side by side** (``--side-by-side``): plain PPO and PPO-ptx (``--ptx``, default
``SIDE_BY_SIDE_PTX``), one after the other, each for ``--duration`` on its own copy of the same
bootstrapped store (so both start from the same policy-0001 and rm-0001), then one table: minutes
to the first published version, the served thumbs-up rise, the win rate over policy-0001, the
largest KL of a published version, refusals and reverts by reason, and the held-out pretraining
perplexity of policy-0001 (the SFT policy) and of the final policy (the alignment tax). Targets
(issue #19): both publish within 2 minutes; PPO-ptx's perplexity at most the SFT policy's, with a
win rate within 2 points of plain PPO's. Writes bench-results/side-by-side.json (and each arm's
demo JSON and report beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time
from pathlib import Path

from stack_settings import parse_settings  # tests/benchmarks/stack_settings.py

REPO = Path(__file__).resolve().parents[2]

TARGET_RISE_PP = 20.0
TARGET_WIN_RATE = 0.70
TARGET_BOOTSTRAP_S = 15 * 60
TARGET_SABOTAGE_SHARE = 0.05
TARGET_FIRST_PUBLISH_MIN = 2.0
TARGET_PTX_WIN_GAP_PP = 2.0
SIDE_BY_SIDE_PTX = 0.002
"""gamma_ptx of the side-by-side's PPO-ptx arm (docs/benchmarks.md, "PPO against PPO-ptx", says why:
0.1 and 0.02 pulled the policy back to the pretrained model and lost the task)."""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=1200.0, help="seconds of simulated users")
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--store", type=Path, default=REPO / "bench-results" / "demo-store")
    ap.add_argument("--skip-bootstrap", action="store_true", help="reuse the store's policy-0001 and rm-0001")
    ap.add_argument("--ptx", type=float, default=0.0, help="RLHF_PPO_PTX_COEF (0: plain PPO)")
    ap.add_argument("--eval-samples", type=int, default=4)
    ap.add_argument("--ppo-lr", type=float, default=None, help="RLHF_DEMO_PPO_LR (default: the demo's)")
    ap.add_argument("--kl-coef", type=float, default=None, help="RLHF_DEMO_KL_COEF (default: the demo's)")
    ap.add_argument("--out", type=Path, default=None, help="default bench-results/demo.json (sabotage.json)")
    ap.add_argument("--no-canaries", action="store_true", help="every gated version to every user at once")
    ap.add_argument("--canary-share", type=float, default=None, help="RLHF_DEMO_CANARY_SHARE (sabotage: 0.04)")
    ap.add_argument("--canary-timeout", type=float, default=None, help="RLHF_DEMO_CANARY_TIMEOUT_S (sabotage: 1200)")
    ap.add_argument("--sabotage", action="store_true", help="inject a bad candidate partway (see above)")
    ap.add_argument("--sabotage-at", type=float, default=30.0, help="seconds after the users start")
    ap.add_argument("--after-verdict", type=float, default=60.0, help="sabotage: users stop this long after it")
    ap.add_argument("--side-by-side", action="store_true", help="plain PPO, then PPO-ptx (--ptx), same store")
    ap.add_argument(
        "--stack-env",
        action="append",
        default=[],
        metavar="RLHF_X=VALUE",
        help="an extra setting of the stack (repeatable; the stack does not inherit RLHF_* variables), "
        "e.g. RLHF_TRAINER_CPU_NICE=0",
    )
    args = ap.parse_args()
    try:
        args.stack_settings = parse_settings(args.stack_env)
    except ValueError as exc:
        ap.error(f"--stack-env {exc}")
    if args.out is not None and args.out.is_dir():
        # Checked now, not after the run: the JSON is written at the end, 25 minutes later.
        ap.error(f"--out {args.out} is a directory; it names the JSON file (its report goes beside it)")
    if args.side_by_side:
        if args.sabotage:
            ap.error("--side-by-side and --sabotage are separate runs")
        args.out = args.out or REPO / "bench-results" / "side-by-side.json"
        return side_by_side(args)
    if args.sabotage and args.no_canaries:
        ap.error("--sabotage needs canaries")
    args.out = args.out or REPO / "bench-results" / ("sabotage.json" if args.sabotage else "demo.json")
    if args.sabotage:
        args.canary_share = 0.04 if args.canary_share is None else args.canary_share
        args.canary_timeout = 1200.0 if args.canary_timeout is None else args.canary_timeout
    report_dir = args.out.parent / ("sabotage-report" if args.sabotage else "demo-report")
    results = prepare_store(args)
    env = stack_env(args, report_dir)
    if args.sabotage:
        return sabotage_run(args, env, report_dir, results)
    return learning_run(args, env, report_dir, results)


def prepare_store(args: argparse.Namespace) -> dict:
    """Bootstrap the store (timed) unless --skip-bootstrap; the results so far."""
    from flywheel.bootstrap.pipeline import run_bootstrap
    from shared.logging import setup_logging
    from shared.model_store import ModelStore

    setup_logging("bench-demo")
    results: dict = {
        "duration_s": args.duration,
        "users": args.users,
        "ptx_coef": args.ptx,
        "ppo_lr": args.ppo_lr,
        "kl_coef": args.kl_coef,
        "canaries": not args.no_canaries,
        "canary_share": args.canary_share,
        "stack_env": args.stack_settings,
    }
    boot_dir = args.out.parent / "demo-report" / "bootstrap"
    if not args.skip_bootstrap:
        shutil.rmtree(args.store, ignore_errors=True)
        store = ModelStore(args.store)
        t0, c0 = time.monotonic(), time.process_time()
        boot = run_bootstrap(store, report_dir=boot_dir)
        results["bootstrap"] = {
            "wall_s": round(time.monotonic() - t0, 1),
            "cpu_s": round(time.process_time() - c0, 1),
            "steps_s": boot.summary["seconds"],
            "rm_heldout_accuracy": boot.summary["rm"].get("heldout_accuracy"),
            "load_average_1m": os.getloadavg()[0],
        }
    elif (boot_dir / "summary.json").is_file():
        # the store was bootstrapped earlier (e.g. `rlhf bootstrap --report-dir bench-results/demo-report/bootstrap`)
        boot_summary = json.loads((boot_dir / "summary.json").read_text())
        results["bootstrap"] = {
            "wall_s": boot_summary["seconds"]["total"],
            "cpu_s": boot_summary.get("cpu_seconds"),
            "steps_s": boot_summary["seconds"],
            "rm_heldout_accuracy": boot_summary["rm"].get("heldout_accuracy"),
            "reused": True,
        }
    return results


def stack_env(args: argparse.Namespace, report_dir: Path) -> dict[str, str]:
    """The environment of the stack and the demo: this machine's free ports, the run's settings."""
    import torch

    from shared.kafka.embedded import free_ports

    torch.set_num_threads(1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLHF_")}
    # eight different ports (one port given to two services: both bind it and share its calls)
    gateway, inference, feedback, reward, trainer, rollout, canary, trainer_metrics = free_ports(8)
    env.update(
        {
            "RLHF_MODEL_STORE_ROOT": str(args.store),
            "RLHF_UP_BROKER_PORT": "0",
            "RLHF_GATEWAY_PORT": str(gateway),
            "RLHF_INFERENCE_GRPC_PORT": str(inference),
            "RLHF_FEEDBACK_GRPC_PORT": str(feedback),
            "RLHF_REWARD_GRPC_PORT": str(reward),
            "RLHF_TRAINER_GRPC_PORT": str(trainer),
            "RLHF_ROLLOUT_GRPC_PORT": str(rollout),
            "RLHF_UP_CANARY_GRPC_PORT": str(canary),
            "RLHF_UP_CANARY_METRICS_PORT": "0",
            # the trainer's counters go into the report (the gate's discrimination); the rest off
            "RLHF_TRAINER_METRICS_PORT": str(trainer_metrics),
            **{f"RLHF_{s}_METRICS_PORT": "0" for s in ("INFERENCE", "FEEDBACK", "REWARD", "ROLLOUT")},
            "RLHF_REWARD_STATE_DIR": str(args.store.parent / "demo-reward-state"),
            "RLHF_TRAINER_CHECKPOINT_DIR": str(args.store.parent / "demo-checkpoints"),
            "RLHF_PPO_PTX_COEF": str(args.ptx),
            "RLHF_DEMO_DURATION_S": str(args.duration),
            "RLHF_DEMO_USERS": str(args.users),
            "RLHF_DEMO_EVALUATE": "0",
            "RLHF_DEMO_REPORT_DIR": str(report_dir),
            "RLHF_DEMO_CANARIES": "0" if args.no_canaries else "1",
        }
    )
    if args.ppo_lr is not None:
        env["RLHF_DEMO_PPO_LR"] = str(args.ppo_lr)
    if args.kl_coef is not None:
        env["RLHF_DEMO_KL_COEF"] = str(args.kl_coef)
    if args.canary_share is not None:
        env["RLHF_DEMO_CANARY_SHARE"] = str(args.canary_share)
    if args.canary_timeout is not None:
        env["RLHF_DEMO_CANARY_TIMEOUT_S"] = str(args.canary_timeout)
    env.update(args.stack_settings)  # --stack-env, last: it overrides the run's own settings
    for d in ("demo-reward-state", "demo-checkpoints"):
        shutil.rmtree(args.store.parent / d, ignore_errors=True)
    return env


def learning_run(args: argparse.Namespace, env: dict[str, str], report_dir: Path, results: dict) -> int:
    """The demo for --duration, then `rlhf eval`; the learning targets."""
    from flywheel.demo.evaluate import compare
    from flywheel.demo.run import DemoConfig, run_demo, start_stack
    from shared.config import load_config
    from shared.model_store import ModelStore

    store = ModelStore(args.store)
    cfg = load_config(DemoConfig, env)
    stack = start_stack(cfg, env)
    try:
        demo = run_demo(cfg, stack=stack)
    finally:
        stack.stop()
    summary = demo.summary
    rates = {r["version"]: r for r in summary["thumbs_up_by_version"]}
    first = rates.get("policy-0001")
    # "the served policy": the last version that served at least 30 responses (fewer is noise)
    served = [r for r in summary["thumbs_up_by_version"] if r["responses"] >= 30] or summary["thumbs_up_by_version"]
    last = served[-1]
    final = store.current("policy")
    evaluation = compare(store, "policy-0001", final, samples=args.eval_samples)
    print(evaluation.table())
    rise = 100 * (last["rate"] - first["rate"]) if first else float("nan")
    kl_bound = float(env.get("RLHF_TRAINER_KL_BOUND", 10.0))
    results.update(
        {
            "thumbs_up_by_version": summary["thumbs_up_by_version"],
            "thumbs_up_first": first,
            "thumbs_up_last_served": last,
            "rise_pp": round(rise, 1),
            "max_kl_iteration": summary["max_kl"],
            "max_kl_published": max(
                (store.manifest(v).metrics.get("kl_to_reference", 0.0) for v in summary["policy_versions_published"]),
                default=None,
            ),
            "ppo_steps": summary["ppo_steps"],
            "final_policy": final,
            "rm_versions": summary["rm_versions_published"],
            "policy_versions": summary["policy_versions_published"],
            "ratings_accepted": summary["ratings_accepted"],
            "win_rate": evaluation.win_rate,
            "win_interval": [evaluation.win_low, evaluation.win_high],
            "win_ceiling": evaluation.win_ceiling,
            "heldout_perplexity": {
                "policy-0001": evaluation.a.heldout_perplexity,
                final: evaluation.b.heldout_perplexity,
            },
            "eval_thumbs_up": {"policy-0001": evaluation.a.thumbs_up_rate, final: evaluation.b.thumbs_up_rate},
            "minutes_to_first_publish": minutes_to_first_publish(store, summary),
            "gate": summary.get("gate"),
        }
    )
    checks = {
        f"bootstrap under {TARGET_BOOTSTRAP_S // 60} min": (
            results.get("bootstrap", {}).get("wall_s"),
            lambda v: v is not None and v < TARGET_BOOTSTRAP_S,
        ),
        f"thumbs-up rise >= {TARGET_RISE_PP:.0f} pp": (results["rise_pp"], lambda v: v >= TARGET_RISE_PP),
        f"win rate >= {TARGET_WIN_RATE:.0%}": (round(evaluation.win_rate, 3), lambda v: v >= TARGET_WIN_RATE),
        # the served policies' KL: the trainer's gate measures it on held-out prompts before publishing
        # (kl_to_reference); the per-iteration rollout KL (max_kl_iteration) is noisy at 16 samples
        f"KL bounded (<= {kl_bound:g})": (results["max_kl_published"], lambda v: v is not None and v <= kl_bound),
    }
    if "bootstrap" not in results:  # --skip-bootstrap: not measured in this run, neither passed nor failed
        del checks[f"bootstrap under {TARGET_BOOTSTRAP_S // 60} min"]
    results["checks"] = {
        name: {"value": v, "pass": bool(ok(v)) if v is not None else False} for name, (v, ok) in checks.items()
    }
    print()
    print(f"{'check':<28} {'value':>10}  result")
    for name, c in results["checks"].items():
        print(f"{name:<28} {c['value']!s:>10}  {'PASS' if c['pass'] else 'FAIL'}")
    print(
        f"thumbs-up policy-0001 {first['rate'] if first else float('nan'):.1%} -> {last['version']} "
        f"{last['rate']:.1%}; perplexity {evaluation.a.heldout_perplexity:.2f} -> {evaluation.b.heldout_perplexity:.2f}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {args.out} and {report_dir / 'report.md'}")
    return 0


class Saboteur:
    """The sabotage run's injector, on a thread: at ``at_s`` publishes the bad candidate as the trainer
    would, waits until it is the canary, resumes the trainer, and notes when the canary was decided
    (the canary pointer moved off it)."""

    def __init__(self, stack, store, work: Path, base: str, at_s: float):
        self.stack, self.store, self.work, self.base, self.at_s = stack, store, work, base, at_s
        self.version = ""
        self.injected_at: float | None = None
        self.canary_at: float | None = None
        self.decided_at: float | None = None
        self.error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="saboteur", daemon=True)

    def start(self) -> Saboteur:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        try:
            self._inject_and_watch()
        except Exception as exc:  # noqa: BLE001 - reported with the results
            self.error = f"{type(exc).__name__}: {exc}"
            print(f"sabotage failed: {self.error}", flush=True)

    def _inject_and_watch(self) -> None:
        from flywheel.demo.run import trainer_address_of
        from flywheel.demo.sabotage import publish_candidate
        from shared.config import KafkaConfig, load_config
        from shared.grpc_channels import sync_channel
        from shared.kafka.publishers import KafkaPublisher
        from shared.pb import trainer_pb2, trainer_pb2_grpc

        if self._stop.wait(self.at_s):
            return
        publisher = KafkaPublisher(load_config(KafkaConfig, self.stack.environ), "bench-sabotage").connect()
        try:
            manifest = publish_candidate(
                self.store, self.work, self.base, self.stack.signers["policy"], publisher, {"base": self.base}
            )
        finally:
            publisher.close()
        self.version, self.injected_at = manifest.version, time.time()
        print(f"sabotage: published {self.version} (bad) as a candidate", flush=True)
        while not self._stop.wait(0.5) and self.canary_at is None:
            if self.store.pointer("policy", "canary") == self.version:
                self.canary_at = time.time()
        print(f"sabotage: {self.version} is the canary; resuming the trainer", flush=True)
        with sync_channel(trainer_address_of(self.stack), self.stack.credentials("operator")) as channel:
            trainer_pb2_grpc.TrainerServiceStub(channel).Resume(trainer_pb2.ResumeRequest(), timeout=30)
        while not self._stop.wait(0.5):
            if self.store.pointer("policy", "canary") != self.version:
                self.decided_at = time.time()
                print(f"sabotage: the canary of {self.version} ended", flush=True)
                return


def minutes_to_first_publish(store, summary: dict) -> float | None:
    """Minutes from the users' start to the trainer's first published version (a candidate, with
    canaries); None when it published nothing."""
    published = summary["policy_versions_published"]
    if not published:
        return None
    return round((store.manifest(published[0]).created_at - summary["started_at"]) / 60.0, 2)


def side_by_side(args: argparse.Namespace) -> int:
    """Plain PPO, then PPO-ptx, each on a fresh copy of the bootstrapped store; one table."""
    base = prepare_store(args)
    ptx = args.ptx or SIDE_BY_SIDE_PTX
    root = args.out.parent / "side-by-side"
    arms: dict[str, dict] = {}
    for name, coef in (("ppo", 0.0), ("ppo-ptx", ptx)):
        arm_dir = root / name
        shutil.rmtree(arm_dir, ignore_errors=True)
        arm_dir.mkdir(parents=True)
        shutil.copytree(args.store, arm_dir / "store")
        arm = argparse.Namespace(
            **{**vars(args), "store": arm_dir / "store", "ptx": coef, "out": arm_dir / "demo.json"}
        )
        print(f"--- {name} (ptx {coef:g}) ---", flush=True)
        learning_run(arm, stack_env(arm, arm_dir / "report"), arm_dir / "report", dict(base, ptx_coef=coef))
        arms[name] = json.loads(arm.out.read_text())
    table = side_by_side_table(arms)
    print(table)
    out = args.out
    out.write_text(json.dumps({"ptx_coef": ptx, "arms": arms, "table": table}, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return 0


def side_by_side_table(arms: dict[str, dict]) -> str:
    """The markdown table of the side-by-side run (one column per arm) and the issue's checks."""

    def row(label: str, f) -> str:
        return f"| {label} | " + " | ".join(f(a) for a in arms.values()) + " |"

    def perplexity(a: dict) -> str:
        first, final = a["heldout_perplexity"]["policy-0001"], a["heldout_perplexity"][a["final_policy"]]
        return f"{first:.1f} -> {final:.1f}"

    def counts(d: dict | None) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted((d or {}).items())) or "none"

    def gate_metrics(a: dict) -> dict:
        return (a.get("gate") or {}).get("metrics") or {}

    lines = [
        "| | " + " | ".join(f"{k} (ptx {a['ptx_coef']:g})" for k, a in arms.items()) + " |",
        "|---|" + "---|" * len(arms),
        row("minutes to the first published version", lambda a: str(a["minutes_to_first_publish"])),
        row("versions published", lambda a: str(len(a["policy_versions"]))),
        row(
            "served thumbs-up (gold rater)",
            lambda a: (
                f"{a['thumbs_up_first']['rate']:.1%} -> {a['thumbs_up_last_served']['rate']:.1%} "
                f"({a['rise_pp']:+.1f} pp)"
            ),
        ),
        row(
            "win rate over policy-0001",
            lambda a: (
                f"{a['win_rate']:.1%} [{a['win_interval'][0]:.1%}, {a['win_interval'][1]:.1%}]"
                f" (a perfect policy: {a.get('win_ceiling', float('nan')):.1%})"
            ),
        ),
        row("largest KL of a published version", lambda a: f"{a['max_kl_published']:.2f}"),
        row("refusals by reason", lambda a: counts(gate_metrics(a).get("refused_by"))),
        row("reverts by reason", lambda a: counts(gate_metrics(a).get("reverts"))),
        row("held-out pretraining perplexity (SFT -> final)", perplexity),
    ]
    ppo, ptx = arms.get("ppo"), arms.get("ppo-ptx")
    if ppo and ptx:
        ptx_ppl = ptx["heldout_perplexity"][ptx["final_policy"]]
        checks = {
            f"both publish within {TARGET_FIRST_PUBLISH_MIN:g} min": all(
                a["minutes_to_first_publish"] is not None and a["minutes_to_first_publish"] <= TARGET_FIRST_PUBLISH_MIN
                for a in arms.values()
            ),
            "PPO-ptx perplexity <= SFT's": ptx_ppl <= ptx["heldout_perplexity"]["policy-0001"],
            f"PPO-ptx win rate within {TARGET_PTX_WIN_GAP_PP:g} pp of PPO's": (
                100 * (ppo["win_rate"] - ptx["win_rate"]) <= TARGET_PTX_WIN_GAP_PP
            ),
            f"PPO win rate >= {TARGET_WIN_RATE:.0%}": ppo["win_rate"] >= TARGET_WIN_RATE,
        }
        lines += ["", *(f"- {name}: {'PASS' if ok else 'FAIL'}" for name, ok in checks.items())]
    return "\n".join(lines)


def sabotage_run(args: argparse.Namespace, env: dict[str, str], report_dir: Path, results: dict) -> int:
    """The demo with a bad candidate injected partway; its figures against the targets."""
    import dataclasses
    import tempfile

    from flywheel.demo.canaries import read_rollout_events, sabotage_outcome
    from flywheel.demo.report import append_to_report, sabotage_lines, thumbs_up_by_version
    from flywheel.demo.run import DemoConfig, run_demo, start_stack
    from flywheel.demo.sabotage import make_bad_policy
    from shared.config import KafkaConfig, load_config
    from shared.model_store import ModelStore

    store = ModelStore(args.store)
    env["RLHF_TRAINER_START_PAUSED"] = "1"  # resumed once the bad version is the canary
    cfg = load_config(DemoConfig, env)
    stack = start_stack(cfg, env)
    saboteur = None
    try:
        with tempfile.TemporaryDirectory(prefix="sabotage-") as tmp:
            base = store.current("policy")
            t0 = time.monotonic()
            work = make_bad_policy(store, base, Path(tmp))
            results["bad_policy_seconds"] = round(time.monotonic() - t0, 1)
            saboteur = Saboteur(stack, store, work, base, args.sabotage_at).start()

            def verdict_in(_progress) -> bool:
                return saboteur.decided_at is not None and time.time() > saboteur.decided_at + args.after_verdict

            demo = run_demo(cfg, stop_when=verdict_in, stack=stack)
            saboteur.stop()
        events = read_rollout_events(load_config(KafkaConfig, stack.environ))
    finally:
        if saboteur is not None:
            saboteur.stop()
        stack.stop()
    interactions = [dataclasses.asdict(r) for r in demo.interactions]
    outcome = sabotage_outcome(interactions, events, saboteur.version, saboteur.injected_at)
    rates = {r.version: r for r in thumbs_up_by_version(interactions)}
    bad = rates.get(saboteur.version)
    outcome["gold_thumbs_up_bad"] = None if bad is None else bad.rate
    outcome["gold_thumbs_up_stable"] = None if base not in rates else rates[base].rate
    outcome["error"] = saboteur.error
    results.update({"sabotage": outcome, "base": base, "interactions": len(interactions)})
    share = outcome.get("share_of_answers")
    checks = {
        "rolled back automatically": (outcome["automatic"], bool),
        f"share of answers < {TARGET_SABOTAGE_SHARE:.0%}": (
            None if share is None else round(share, 4),
            lambda v: v is not None and v < TARGET_SABOTAGE_SHARE,
        ),
        "nobody outside the canary share": (outcome.get("served_outside_share"), lambda v: v == 0),
    }
    results["checks"] = {
        name: {"value": v, "pass": bool(ok(v)) if v is not None else False} for name, (v, ok) in checks.items()
    }
    lines = sabotage_lines(outcome)
    append_to_report(report_dir, lines)
    print("\n".join(lines))
    print()
    print(f"{'check':<34} {'value':>10}  result")
    for name, c in results["checks"].items():
        print(f"{name:<34} {c['value']!s:>10}  {'PASS' if c['pass'] else 'FAIL'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {args.out} and {report_dir / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
