"""Settings the benchmarks pass to the stacks they start (bench_demo.py ``--stack-env``,
bench_serving.py ``--loop-env``): ``RLHF_NAME=VALUE`` items, parsed one way.

    settings = parse_settings(args.loop_env)      # {"RLHF_UP_ROLLOUT": "0"}; ValueError names a bad item
"""

from __future__ import annotations

from collections.abc import Iterable


def parse_settings(items: Iterable[str]) -> dict[str, str]:
    """``{"RLHF_X": "v", ...}`` from ``["RLHF_X=v", ...]`` (a later item wins; the value may hold
    ``=`` and may be empty); ValueError naming the first item that is not ``RLHF_NAME=VALUE``."""
    settings: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.startswith("RLHF_") or key == "RLHF_":
            raise ValueError(f"{item!r}: expected RLHF_NAME=VALUE")
        settings[key] = value
    return settings
