"""Fault injection (issue #17): every fault against `rlhf up` under a steady load of chats and ratings.

    .venv/bin/python tests/benchmarks/bench_faults.py                       # every fault, ~45-60 min
    .venv/bin/python tests/benchmarks/bench_faults.py --faults kill-feedback,poison-completions
    .venv/bin/python tests/benchmarks/bench_faults.py --list                # the faults

Per fault (tests/faults_harness.py has the definitions): accepted ratings lost (accepted 2xx minus
distinct feedback_ids on rlhf.feedback, per phase: before the fault, until recovery, after),
completion events lost (answered chats' response_ids missing on rlhf.completions), failed chats after
the fault, seconds to recover (first answered chat sent after the fault), seconds until the killed
process is replaced and healthy, who recovered it (the launcher, a manual restart of `rlhf up` by
this script, this script restarting the broker), and whether the loop learned afterwards (a new
rm-NNNN or policy-NNNN in the store within --learn-wait-s of recovery).

Stacks: `rlhf up` with every service and progressive rollout (its defaults), the quick bootstrap on
a store prepared once (policy-0001, rm-0001), the demo's fast learning settings, Kafka from this
script's own tansu broker (the services' faults leave Kafka intact, as a real cluster would) except
for the broker fault, which kills the launcher's own embedded broker. A stack is reused for the
next fault while it is whole (same settings, every service healthy), else a fresh one starts. As
root, the store lives on a tmpfs so that "store full" is a real ENOSPC; otherwise RLIMIT_FSIZE.

Prints the table and writes bench-results/faults.json (--out).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # tests.faults_harness

from tests.faults_harness import (  # noqa: E402 - after the path
    FAULTS,
    FaultReport,
    StackOptions,
    StackRun,
    Timings,
    can_mount_tmpfs,
    log,
    options_for,
    prepare_base_store,
    run_fault,
    table,
    verdict,
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faults", default="all", help="comma-separated fault names, or all (default)")
    ap.add_argument("--list", action="store_true", help="list the faults and exit")
    ap.add_argument("--out", type=Path, default=REPO / "bench-results", help="folder for faults.json")
    ap.add_argument("--users", type=int, default=2, help="simulated users (threads), each its own principal")
    ap.add_argument("--warmup-s", type=float, default=20.0, help="load before each fault")
    ap.add_argument("--after-s", type=float, default=30.0, help="load after each fault, at least")
    ap.add_argument("--recover-timeout-s", type=float, default=150.0)
    ap.add_argument("--learn-wait-s", type=float, default=180.0, help="wait for a new version after recovery (0: skip)")
    ap.add_argument("--no-manual-restart", action="store_true", help="do not start rlhf up again when it gave up")
    ap.add_argument("--no-rollout", action="store_true", help="RLHF_UP_ROLLOUT=0 (no canary engine, no rollout)")
    ap.add_argument("--fresh", action="store_true", help="a fresh stack for every fault")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, stores) even when all is well")
    args = ap.parse_args()

    if args.list:
        for f in FAULTS.values():
            print(f"{f.name:<26} {f.description}  (Kafka intact: {f.kafka_intact}; owner: {f.owner})")
        return 0
    names = list(FAULTS) if args.faults == "all" else [n.strip() for n in args.faults.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        ap.error(f"unknown faults {unknown}; --list shows them")

    timings = Timings(
        warmup_s=args.warmup_s,
        after_s=args.after_s,
        recover_timeout_s=args.recover_timeout_s,
        learn_wait_s=args.learn_wait_s,
        manual_restart=not args.no_manual_restart,
    )
    tmpfs_ok = can_mount_tmpfs()
    base = StackOptions(users=args.users, rollout=not args.no_rollout, store_on_tmpfs=tmpfs_ok)
    work = Path(tempfile.mkdtemp(prefix="rlhf-faults-"))
    report: dict = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "machine": {"cpus": _cpus(), "platform": platform.platform(), "python": platform.python_version()},
        "timings": asdict(timings),
        "base_stack": asdict(base),
        "store_full_mode": "tmpfs ENOSPC" if tmpfs_ok else "RLIMIT_FSIZE EFBIG (no root: no tmpfs)",
        "faults": [],
    }
    reports: list[FaultReport] = []
    run: StackRun | None = None
    try:
        t0 = time.monotonic()
        log(f"preparing the base store (policy-0001, rm-0001) in {work}")
        base_store = prepare_base_store(work / "base-store", with_rm=True)
        report["base_store_s"] = round(time.monotonic() - t0, 1)
        for i, name in enumerate(names):
            fault = FAULTS[name]
            opts = options_for(fault, base, tmpfs_ok)
            started_s = 0.0
            if run is not None and (args.fresh or run.options != opts or not run.all_healthy()):
                run.close()
                run = None
            if run is None:
                run = StackRun(work / f"stack-{i:02d}-{name}", base_store, replace(opts))
                started_s = run.start()
            rep = run_fault(run, fault, timings)
            rep.stack_start_s = round(started_s, 1)
            reports.append(rep)
            report["faults"].append({**rep.as_dict(), "verdict": verdict(rep), "stack": str(run.work)})
            log(f"{name}: {verdict(rep) or 'ok'}")
            _write(args.out, report)
    finally:
        if run is not None:
            run.close()
        ok = len(reports) == len(names) and all(not verdict(r) for r in reports)
        if ok and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    path = _write(args.out, report)
    print(table(reports))
    print(f"\nJSON: {path}" + ("" if ok and not args.keep else f"; logs and stores kept in {work}"))
    return 0 if ok else 1


def _write(out: Path, report: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "faults.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    return path


def _git(*argv: str) -> str:
    try:
        return subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
    except OSError:
        return ""


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    sys.exit(main())
