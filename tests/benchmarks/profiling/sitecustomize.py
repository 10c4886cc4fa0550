"""A CPU-time sampling profiler that bench_serving.py --profile injects into server processes.

Python imports ``sitecustomize`` at start-up from the first directory on PYTHONPATH that has one;
bench_serving.py prepends this directory for the servers it starts and sets BENCH_PROFILE_DIR. In a
process whose command line contains one of BENCH_PROFILE_MATCH (comma-separated), a daemon thread
wakes every BENCH_PROFILE_INTERVAL_S seconds, reads each thread's CPU clock and charges the CPU time
the thread used since the previous sample to the thread's current Python stack (self: innermost
frame; cumulative: every frame). Idle threads use no CPU and so are charged nothing; time in C or
Cython code (uvloop, grpc's aio core, tokenizers) is charged to the Python frame that called it.

Samples count only while the file ``<dir>/recording`` exists (the benchmark creates it for the
measured levels, so start-up and shutdown are left out). The profile is written to
``<dir>/<match>-<pid>.json`` every few seconds and at exit. Processes matching nothing are left
alone; the profiled program is unchanged apart from the sampling overhead.
"""

from __future__ import annotations

import os
import sys


def _start() -> None:
    out_dir = os.environ.get("BENCH_PROFILE_DIR")
    if not out_dir:
        return
    argv = " ".join(getattr(sys, "orig_argv", sys.argv))
    matches = [m for m in os.environ.get("BENCH_PROFILE_MATCH", "").split(",") if m]
    name = next((m for m in matches if m in argv), None)
    if name is None:
        return

    import atexit
    import collections
    import json
    import threading
    import time

    interval = float(os.environ.get("BENCH_PROFILE_INTERVAL_S", "0.005"))
    flag = os.path.join(out_dir, "recording")
    path = os.path.join(out_dir, f"{name}-{os.getpid()}.json")
    cpu_total: collections.Counter = collections.Counter()
    self_cpu: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    cum_cpu: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    lock = threading.Lock()
    state = {"recorded_s": 0.0}

    def where(code) -> str:
        return f"{code.co_name} ({code.co_filename}:{code.co_firstlineno})"

    def dump() -> None:
        with lock:
            doc = {
                "process": name,
                "pid": os.getpid(),
                "argv": argv,
                "interval_s": interval,
                "recorded_wall_s": state["recorded_s"],
                "threads": {
                    t: {
                        "cpu_s": cpu_total[t],
                        "self": self_cpu[t].most_common(80),
                        "cumulative": cum_cpu[t].most_common(200),
                    }
                    for t in cpu_total
                },
            }
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, path)

    def run() -> None:
        me = threading.get_ident()
        clocks: dict[int, int] = {}
        previous: dict[int, float] = {}
        recording = False
        last_check = last_dump = last_tick = time.monotonic()
        while True:
            time.sleep(interval)
            now = time.monotonic()
            if now - last_check > 0.2:
                recording = os.path.exists(flag)
                last_check = now
            if recording:
                state["recorded_s"] += now - last_tick
            last_tick = now
            names = {t.ident: t.name for t in threading.enumerate()}
            frames = sys._current_frames()
            with lock:
                for tid, frame in frames.items():
                    if tid == me:
                        continue
                    try:
                        if tid not in clocks:
                            clocks[tid] = time.pthread_getcpuclockid(tid)
                        cpu = time.clock_gettime(clocks[tid])
                    except (OSError, OverflowError):
                        continue
                    used = cpu - previous.get(tid, cpu)
                    previous[tid] = cpu
                    if not recording or used <= 0:
                        continue
                    tname = names.get(tid, f"thread-{tid}")
                    cpu_total[tname] += used
                    self_cpu[tname][where(frame.f_code)] += used
                    seen = set()
                    f = frame
                    while f is not None:
                        key = where(f.f_code)
                        if key not in seen:
                            seen.add(key)
                            cum_cpu[tname][key] += used
                        f = f.f_back
            if now - last_dump > 5:
                dump()
                last_dump = now

    threading.Thread(target=run, name="bench-sampler", daemon=True).start()
    atexit.register(dump)


try:
    _start()
except Exception as exc:  # noqa: BLE001 - never break the profiled program
    print(f"bench sampler not started: {exc}", file=sys.stderr)
