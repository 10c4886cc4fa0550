"""The feedback ledger's memory: bytes per rating held, and that it stays flat at its cap.

    .venv/bin/python tests/benchmarks/bench_feedback_ledger.py                 # 200,000 ratings, cap 50,000
    .venv/bin/python tests/benchmarks/bench_feedback_ledger.py --ratings 400000 --cap 200000

Applies synthetic ratings (thumbs with 2,000-character comments, idempotency keys, as the service
applies its own acknowledged writes) to a ``FeedbackLedger`` and measures the Python heap it holds
(tracemalloc) after each ``cap`` ratings (past the first, each evicts the oldest): the figure must
level off, not grow with the ratings. Then the same ratings with their whole ``FeedbackEvent``
kept, as a reference for what the ledger would hold without its digest-only comments and its
bound. No broker, no network: seconds on one core. Prints a table, writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import tracemalloc
from pathlib import Path

from services.feedback.ledger import FeedbackLedger
from shared.events import FeedbackEvent, RatedResponse


def rating(n: int, now: float) -> FeedbackEvent:
    rid = f"chatcmpl-{n:012d}"
    return FeedbackEvent(
        feedback_id=f"{n:032x}",
        kind="thumb",
        user_id=f"user-{n % 5000}",
        target=f"thumb:{rid}",
        revision=1,
        supersedes=None,
        responses=[RatedResponse(rid, "policy-0007", f"{n:016x}")],
        thumb="up",
        comment=f"{n:08d} " + "a comment of two thousand characters " * 54,  # distinct: not one shared string
        tags=["unhelpful"],
        idempotency_key=f"key-{n}",
        received_at=now,
    )


def heap_of(build) -> tuple[object, int]:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    held = build()
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return held, after - before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratings", type=int, default=200_000)
    ap.add_argument("--cap", type=int, default=50_000)
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    args = ap.parse_args()
    now = time.time()
    events = [rating(n, now) for n in range(args.ratings)]

    ledger = FeedbackLedger(max_votes=args.cap)
    tracemalloc.start()
    gc.collect()
    base = tracemalloc.get_traced_memory()[0]
    held = {}  # ratings applied -> bytes the ledger holds
    for start in range(0, args.ratings, args.cap):
        for ev in events[start : start + args.cap]:
            ledger.apply(ev, now=now)
        gc.collect()
        held[min(start + args.cap, args.ratings)] = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    del events

    _, whole = heap_of(lambda: {ev.feedback_id: ev for ev in [rating(n, now) for n in range(args.cap)]})

    rows: dict[str, object] = {"ratings applied": args.ratings, "cap (max_votes)": args.cap}
    for applied, held_bytes in held.items():
        rows[f"held after {applied:,} ratings (MB)"] = round(held_bytes / 1e6, 1)
    rows["bytes per rating held (at the cap)"] = round(held[min(args.cap, args.ratings)] / args.cap)
    rows["whole FeedbackEvents, cap of them (MB)"] = round(whole / 1e6, 1)
    rows["bytes per whole FeedbackEvent"] = round(whole / args.cap)
    rows["ratings in the ledger at the end"] = len(ledger)
    width = max(map(len, rows))
    for k, v in rows.items():
        print(f"{k:<{width}}  {v}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "feedback_ledger.json"
    path.write_text(json.dumps(rows, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
