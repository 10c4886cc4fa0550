"""Fuzzing at scale, and the gateway's memory under abuse.

    .venv/bin/python tests/benchmarks/bench_fuzz.py [--requests 10000] [--abuse 100000] [--out bench-results/bench_fuzz.json]

Starts the real stack: the embedded broker, the inference service (vLLM on the default model) and
the feedback service in this process (as the integration tests start them), and the gateway as its
own process (`python -m services.gateway`, as `rlhf up` runs it: its protocol, bounds and
concurrency limit), so that its memory is its own.

1. Fuzz: the drivers of tests/integration/test_gateway_fuzz.py until --requests requests were sent
   in all: schemathesis over the gateway's OpenAPI schema (every operation, valid and schema-breaking
   requests; 70 %), hypothesis on the feedback service's SubmitFeedback/SubmitFeedbackBatch (20 %)
   and on the inference service's Generate (10 %). Counts every status; a 5xx or a gRPC
   INTERNAL/UNKNOWN answer is a failure; rlhf.feedback must grow by exactly the ratings accepted as
   new and rlhf.completions by exactly the completions served.
2. Abuse: --abuse requests from 64 connections, in equal shares: random paths under /v1/ with a key,
   random paths anywhere without one, chat completions with a wrong or non-ASCII key, bodies
   declared at 8 MiB (64 KiB sent), heads of 100 KB. The gateway's RSS (VmRSS; VmHWM the peak) is
   read before (after a warm-up of 2,000 such requests), right after and 10 s after, with the
   number of series on /metrics.

Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from shared.kafka.topics import COMPLETIONS, FEEDBACK  # noqa: E402
from tests.conftest import (  # noqa: E402
    TEST_API_KEYS,
    TEST_CALLER_TOKENS,
    TEST_TOKEN_SECRET,
    LoopThread,
    api_keys_setting,
    free_port,
    start_broker,
    start_feedback,
    start_inference,
    test_signing_key,
    wait_until,
)
from tests.integration.test_gateway_fuzz import (  # noqa: E402
    Tally,
    fuzz_feedback,
    fuzz_http,
    fuzz_inference,
    settled_offset,
)

ALICE = f"Bearer {TEST_API_KEYS['alice']}"


def log(message: str) -> None:
    print(f"[bench_fuzz {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0])
    return out


def metric_series(url: str) -> int:
    text = httpx.get(url + "/metrics", timeout=30).text
    return sum(1 for line in text.splitlines() if line.startswith("rlhf_gateway_"))


class Gateway:
    """`python -m services.gateway` against the in-process services."""

    def __init__(self, inference: str, feedback: str, code: Path = REPO) -> None:
        self.port = free_port()
        env = {
            **os.environ,
            "PYTHONPATH": str(code),
            "RLHF_LOG_LEVEL": "ERROR",
            "RLHF_GATEWAY_PORT": str(self.port),
            "RLHF_GATEWAY_INFERENCE_ADDRESS": inference,
            "RLHF_GATEWAY_FEEDBACK_ADDRESS": feedback,
            "RLHF_GATEWAY_API_KEYS": api_keys_setting(),
            "RLHF_GATEWAY_CHAT_RATE_PER_MIN": "0",
            "RLHF_GATEWAY_FEEDBACK_RATE_PER_MIN": "0",
            "RLHF_FEEDBACK_TOKEN_SECRET": TEST_TOKEN_SECRET,
            "RLHF_AUTH_TOKEN": TEST_CALLER_TOKENS["gateway"],
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.gateway"], env=env, cwd=code, start_new_session=True
        )
        wait_until(self._up, 60, "the gateway did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _up(self) -> bool:
        try:
            return httpx.get(self.url + "/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)


# --- 1. fuzz ---------------------------------------------------------------------------------------


def fuzz(stack: dict, gateway: Gateway, total: int) -> dict:
    openapi = httpx.get(gateway.url + "/openapi.json", headers={"Authorization": ALICE}, timeout=30).json()
    operations = sum(len(methods) for methods in openapi["paths"].values())
    kafka = stack["kafka"]
    feedback_before, completions_before = settled_offset(kafka, FEEDBACK), settled_offset(kafka, COMPLETIONS)
    parts: dict[str, Tally] = {"http": Tally(), "grpc_feedback": Tally(), "grpc_inference": Tally()}
    targets = {"http": int(total * 0.7), "grpc_feedback": int(total * 0.2), "grpc_inference": total - int(total * 0.9)}
    started = time.monotonic()
    for name, target in targets.items():
        run_seed = 0
        while parts[name].requests < target:
            left = target - parts[name].requests
            if name == "http":
                # Two generation modes per operation; an operation with little to vary runs out early.
                got = fuzz_http(gateway.url, openapi, max(5, left // (2 * operations)), run_seed)
            elif name == "grpc_feedback":
                got = fuzz_feedback(stack["feedback"].address, max(5, left // 3), run_seed)
            else:
                got = fuzz_inference(stack["inference"].address, max(5, left), run_seed)
            merged = parts[name]
            merged.requests += got.requests
            merged.statuses.update(got.statuses)
            merged.failures += got.failures
            merged.served |= got.served
            merged.accepted += got.accepted
            run_seed += 1
            log(f"{name}: {merged.requests}/{target} requests, {len(merged.failures)} failures")
    served = len(parts["http"].served) + len(parts["grpc_inference"].served)
    feedback_after, completions_after = settled_offset(kafka, FEEDBACK), settled_offset(kafka, COMPLETIONS)
    return {
        "seconds": round(time.monotonic() - started, 1),
        "requests": sum(t.requests for t in parts.values()),
        "failures": sum(len(t.failures) for t in parts.values()),
        "http_5xx": sum(n for s, n in parts["http"].statuses.items() if isinstance(s, int) and s >= 500),
        "parts": {name: t.as_dict() for name, t in parts.items()},
        "feedback_records_written": feedback_after - feedback_before,
        "ratings_accepted": parts["grpc_feedback"].accepted,
        "completion_records_written": completions_after - completions_before,
        "completions_served": served,
        "records_match": feedback_after - feedback_before == parts["grpc_feedback"].accepted
        and completions_after - completions_before == served,
    }


# --- 2. abuse --------------------------------------------------------------------------------------

KINDS = ("random_path_with_key", "random_path_without_key", "bad_key", "huge_body", "huge_head")


def abusive(kind: str) -> bytes:
    """One abusive request, as raw bytes."""
    if kind == "random_path_with_key":
        return f"GET /v1/{uuid.uuid4()} HTTP/1.1\r\nHost: x\r\nAuthorization: {ALICE}\r\n\r\n".encode()
    if kind == "random_path_without_key":
        return f"GET /{uuid.uuid4()}/{uuid.uuid4().hex} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    if kind == "bad_key":
        key = random.choice([f"Bearer {uuid.uuid4().hex * 2}".encode(), "Bearer ключ-ключ-ключ".encode(), b"\xff\xfe"])
        body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
        return (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: "
            + key
            + f"\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
    if kind == "huge_body":
        head = f"POST /v1/feedback HTTP/1.1\r\nHost: x\r\nAuthorization: {ALICE}\r\nContent-Length: {8 << 20}\r\n\r\n"
        return head.encode() + b"x" * (64 << 10)
    return b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 100_000 + b"\r\n\r\n"


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, whether the server closes the connection) of one answer; (0, True) when it closed
    first (status 0 in the tables: no answer, also after 10 s without one)."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return 0, True
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    length = int(headers.get("content-length", "0"))
    if length:
        await reader.readexactly(length)
    return status, headers.get("connection", "").lower() == "close"


async def abuse(port: int, total: int, connections: int = 64) -> dict:
    statuses: Counter = Counter()
    by_kind: dict[str, Counter] = {k: Counter() for k in KINDS}
    sent = 0

    async def worker() -> None:
        nonlocal sent
        reader = writer = None
        while sent < total:
            sent += 1
            kind = KINDS[sent % len(KINDS)]
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(abusive(kind))
                await writer.drain()
                status, closing = await asyncio.wait_for(read_answer(reader), 10)
            except (ConnectionError, TimeoutError):
                status, closing = 0, True  # no answer (0): a new connection
            # The rest of a refused body is not sent: a new connection after each (a gateway that
            # keeps the connection open would read the next request as that body).
            closing = closing or kind == "huge_body"
            statuses[status] += 1
            by_kind[kind][status] += 1
            if closing:
                writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(connections)))
    seconds = time.monotonic() - started
    return {
        "requests": sum(statuses.values()),
        "seconds": round(seconds, 1),
        "per_s": round(sum(statuses.values()) / seconds),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "by_kind": {k: {str(s): n for s, n in sorted(c.items())} for k, c in by_kind.items()},
        "answered_5xx": sum(n for s, n in statuses.items() if s >= 500),
    }


def memory_under_abuse(gateway: Gateway, total: int) -> dict:
    pid = gateway.process.pid
    # Warm: every kind of answer given (and its series made), so that the before figures are not a
    # cold start's.
    for _ in range(200):
        httpx.get(gateway.url + "/v1/models", headers={"Authorization": ALICE}, timeout=30)
    asyncio.run(abuse(gateway.port, 2000))
    metric_series(gateway.url)
    before, series_before = memory_kib(pid), metric_series(gateway.url)
    result = asyncio.run(abuse(gateway.port, total))
    after, series_after = memory_kib(pid), metric_series(gateway.url)
    time.sleep(10)
    settled = memory_kib(pid)
    return {
        **result,
        "rss_kib_before": before["VmRSS"],
        "rss_kib_after": after["VmRSS"],
        "rss_kib_after_10s": settled["VmRSS"],
        "peak_rss_kib": settled["VmHWM"],
        "metric_series_before": series_before,
        "metric_series_after": series_after,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000, help="fuzzed requests in all")
    parser.add_argument("--abuse", type=int, default=100_000, help="abusive requests for the memory figures")
    parser.add_argument(
        "--gateway-code",
        type=Path,
        default=REPO,
        help="run the gateway from this checkout (e.g. a `git worktree` of an older commit, for a before/after)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "bench_fuzz.json")
    args = parser.parse_args()

    from shared.model_store import ModelStore
    from shared.models.default_model import ensure_default_policy

    tmp = Path(tempfile.mkdtemp(prefix="bench-fuzz-"))
    (tmp / "models").mkdir()
    ensure_default_policy(ModelStore(tmp / "models"), signer=test_signing_key())
    broker = start_broker()
    loop = LoopThread()
    log("starting inference (vLLM) and feedback")
    inference = start_inference(loop, broker.kafka, tmp / "models")
    feedback = start_feedback(loop, broker.kafka)
    gateway = Gateway(inference.address, feedback.address, args.gateway_code)
    stack = {"kafka": broker.kafka, "inference": inference, "feedback": feedback}
    try:
        log(f"fuzzing: {args.requests} requests")
        fuzzed = fuzz(stack, gateway, args.requests) if args.requests else {}
        log(f"abuse: {args.abuse} requests")
        memory = memory_under_abuse(gateway, args.abuse) if args.abuse else {}
    finally:
        gateway.stop()
        loop.run(feedback.stop())
        loop.run(inference.stop())
        loop.close()
        broker.broker.stop()
    report = {
        "machine": platform.node(),
        "cpus": os.cpu_count(),
        "gateway_code": str(args.gateway_code),
        "fuzz": fuzzed,
        "abuse": memory,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"\nJSON: {args.out}")


def print_table(report: dict) -> None:
    fuzzed, memory = report["fuzz"], report["abuse"]
    if fuzzed:
        print(f"\nFuzz: {fuzzed['requests']} requests in {fuzzed['seconds']} s")
        print(f"{'part':<16}{'requests':>10}{'failures':>10}  statuses")
        for name, part in fuzzed["parts"].items():
            statuses = ", ".join(f"{s}: {n}" for s, n in part["statuses"].items())
            print(f"{name:<16}{part['requests']:>10}{part['failure_count']:>10}  {statuses}")
        print(
            f"records: rlhf.feedback +{fuzzed['feedback_records_written']} (accepted {fuzzed['ratings_accepted']}), "
            f"rlhf.completions +{fuzzed['completion_records_written']} (served {fuzzed['completions_served']}): "
            f"{'match' if fuzzed['records_match'] else 'MISMATCH'}"
        )
    if memory:
        print(
            f"\nAbuse: {memory['requests']} requests in {memory['seconds']} s ({memory['per_s']}/s), 5xx: {memory['answered_5xx']}"
        )
        for kind, statuses in memory["by_kind"].items():
            print(f"  {kind:<26}{statuses}")
        mib = 1024
        print(
            f"gateway RSS: before {memory['rss_kib_before'] / mib:.1f} MiB, after {memory['rss_kib_after'] / mib:.1f} MiB, "
            f"10 s later {memory['rss_kib_after_10s'] / mib:.1f} MiB, peak {memory['peak_rss_kib'] / mib:.1f} MiB"
        )
        print(f"metric series: before {memory['metric_series_before']}, after {memory['metric_series_after']}")


if __name__ == "__main__":
    main()
