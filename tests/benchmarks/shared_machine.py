"""The benchmarks' shared-machine guard: on 2 cores, CPU burnt by other processes decides the
figures, so a measurement starts in a quiet moment and is run again when it was disturbed.

    guard = QuietGuard.from_args(args)                 # after QuietGuard.add_arguments(ap, ...)
    before = guard.wait(measure_external, log)         # measure_external(seconds) -> other cores
    ...                                                # the run; then, if disturbed:
    if external > guard.max_external: run again (at most guard.retries times), keep the least disturbed
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

QUIET_SAMPLE_S = 2.0
"""How long one look at the rest of the machine lasts."""


@dataclass(frozen=True)
class QuietGuard:
    threshold: float
    """Start once the rest of the machine used fewer cores than this for QUIET_SAMPLE_S ..."""
    max_wait_s: float
    """... or after this long."""
    max_external: float
    """Run again when the rest of the machine used more cores than this during the run ..."""
    retries: int
    """... at most this many times; the least disturbed run is kept."""

    @staticmethod
    def add_arguments(ap: argparse.ArgumentParser, unit: str, max_wait_s: float) -> None:
        """--quiet-threshold, --quiet-max-wait-s, --max-external, --retries (``unit``: "run", "level")."""
        ap.add_argument(
            "--quiet-threshold",
            type=float,
            default=0.15,
            help=f"start a {unit} when other processes use fewer cores than this (shared machines)",
        )
        ap.add_argument("--quiet-max-wait-s", type=float, default=max_wait_s)
        ap.add_argument(
            "--max-external",
            type=float,
            default=0.25,
            help=f"run a {unit} again when other processes used more cores than this during it",
        )
        ap.add_argument(
            "--retries", type=int, default=2, help=f"runs again of a disturbed {unit} (least disturbed kept)"
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> QuietGuard:
        return cls(args.quiet_threshold, args.quiet_max_wait_s, args.max_external, args.retries)

    def wait(self, measure_external: Callable[[float], float], log: Callable[[str], None]) -> float:
        """Wait for a quiet moment; returns the cores the rest of the machine used in the last look.
        ``measure_external(seconds)`` watches the machine that long and returns the others' cores."""
        deadline = time.monotonic() + self.max_wait_s
        warned = False
        while True:
            external = measure_external(QUIET_SAMPLE_S)
            if external < self.threshold or time.monotonic() > deadline:
                return external
            if not warned:
                log(
                    f"  other processes use {external:.2f} cores; waiting for a quiet moment "
                    f"(<= {self.max_wait_s:.0f} s)"
                )
                warned = True
