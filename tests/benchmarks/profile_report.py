"""Summarise the CPU-time profiles written by profiling/sitecustomize.py (bench_serving.py --profile).

    .venv/bin/python tests/benchmarks/profile_report.py bench-results/serving-logs/profiles [--top 15]

Per process and Python thread: the CPU time the thread used while the benchmark was recording, the
functions that time was charged to (self: innermost Python frame; time in C/Cython code such as
uvloop or grpc's aio core lands on the Python frame that called it), and the call sites that
accumulated the most of it (cumulative, restricted to this project's and the serving libraries' code).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

INTERESTING = re.compile(
    r"/(services|shared)/|grpc|pydantic|starlette|fastapi|uvicorn|protobuf|kafka|anyio|"
    r"vllm/entrypoints|vllm/v1/engine|vllm/renderers|transformers/tokenization|jinja2|"
    r"naive_server|json/"
)


def short(where: str) -> str:
    m = re.match(r"(.*) \((.*):(\d+)\)$", where)
    if not m:
        return where
    func, path, line = m.groups()
    for marker in ("site-packages/", "/work/main/", "/lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{func} ({path}:{line})"


def summarise(doc: dict, top: int) -> list[str]:
    wall = doc.get("recorded_wall_s") or 0.0
    total = sum(t["cpu_s"] for t in doc["threads"].values())
    lines = [
        f"== {doc['process']} (pid {doc['pid']}): {total:.1f} s CPU in Python threads over {wall:.0f} s "
        f"recorded ({total / wall if wall else 0:.2f} cores)"
    ]
    for tname, t in sorted(doc["threads"].items(), key=lambda kv: -kv[1]["cpu_s"]):
        cpu = t["cpu_s"]
        if cpu < max(0.05 * total, 0.2):
            continue
        lines.append(f"  thread {tname}: {cpu:.1f} s CPU")
        lines.append("    self:")
        for w, c in t["self"][:top]:
            if c / cpu < 0.01:
                break
            lines.append(f"      {c / cpu:6.1%}  {short(w)}")
        lines.append("    cumulative (project and serving-library frames):")
        shown = 0
        for w, c in t["cumulative"]:
            if not INTERESTING.search(w) or c > 0.995 * cpu:  # skip frames every sample has (entry points)
                continue
            if c / cpu < 0.03 or shown >= top:
                break
            lines.append(f"      {c / cpu:6.1%}  {short(w)}")
            shown += 1
    return lines


def report(directory: Path, top: int = 15) -> str:
    out = []
    for path in sorted(directory.glob("*.json")):
        out += summarise(json.loads(path.read_text()), top)
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("directory", type=Path)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    print(report(args.directory, args.top))


if __name__ == "__main__":
    main()
