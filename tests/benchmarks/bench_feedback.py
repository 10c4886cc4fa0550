"""Ratings per second through the feedback path, side by side in one run.

    .venv/bin/python tests/benchmarks/bench_feedback.py [--ratings 4000] [--concurrency 8,64]
    .venv/bin/python tests/benchmarks/bench_feedback.py --baseline HEAD~3   # before vs after
    .venv/bin/python tests/benchmarks/bench_feedback.py --baseline HEAD~3 --rounds 3   # medians of 3 rounds

Ways of storing the same thumbs-up ratings with acks=all, in one run (ratios hold on a noisy
machine, absolute figures do not):

  http     POST /v1/feedback on the gateway -> gRPC -> feedback service -> Kafka (the product path),
           load from aiohttp in this process
  http-wrk the same path, load from wrk (C; `apt-get install wrk`), whose CPU per request is a
           fraction of aiohttp's (see docs/benchmarks.md): on 2 cores the load generator's CPU is
           taken from the servers
  grpc     SubmitFeedback straight to the feedback service (no HTTP hop)
  kafka    raw kafka-python producer, acks=all + idempotence, the same event bytes (no checks at all)
  rdkafka  raw confluent-kafka (librdkafka) producer, same settings as the feedback service's

With ``--baseline REF`` the http, http-wrk and grpc paths run twice: on the code at git REF (checked out
into a temporary worktree) and on the working tree, each version with its own fresh broker, level by
level with one version right after the other. Each version's services run with its directory as
their working directory and PYTHONPATH, which come before the editable install's finder on sys.path,
so the baseline's processes import the old commit's code; every stack checks and logs where its
services import from (also in the JSON, `code`).

Every rating is a new vote (its own response), by one of --principals principals (rating i by
principal i mod N), with a feedback token signed by this script playing the gateway's part and
issued to that principal; bodies, tokens and headers are made before the clock starts. Identity is
on wherever the code has it: the gateway gets a hashed keys file of the N principals
(RLHF_GATEWAY_API_KEYS_FILE), every HTTP rating carries its principal's key, the per-principal rate
limits keep their defaults (each principal stays under them), and the services' gRPC calls carry
credentials where the code has service authentication (RLHF_AUTH_*). Versions without these
features get the same requests and ignore what they do not know. After each
run the topic is read back: accepted must equal the records on rlhf.feedback, with no id twice.
Each row also gives the CPU that every process spent per rating during the run (feedback service,
gateway, broker, this load generator) and what the rest of the machine used meanwhile, as the
load averages cannot tell those apart. Prints a table, writes JSON and a PNG next to it.

On a shared machine (as bench_serving): each run starts in a quiet moment (the rest of the machine
under --quiet-threshold cores, waiting at most --quiet-max-wait-s) and is run again, up to
--retries times, when the rest of the machine used more than --max-external cores during it; the
least disturbed run is kept, its `ext` column says how disturbed it was, and the ratings of every
run are read back for the `lost` check.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import confluent_kafka
import grpc
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from shared_machine import QuietGuard  # tests/benchmarks/shared_machine.py

from shared.config import KafkaConfig
from shared.events import FeedbackEvent, RatedResponse
from shared.feedback_token import TokenClaims, sign
from shared.kafka import envelope
from shared.kafka.admin import ensure_topics
from shared.kafka.client import producer_kwargs, rdkafka_producer_config
from shared.kafka.embedded import EmbeddedBroker, free_port
from shared.kafka.envelope import decode
from shared.kafka.topics import FEEDBACK
from shared.pb import feedback_pb2, feedback_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
SECRET = "bench-feedback-token-secret-0123456789"
TICK = os.sysconf("SC_CLK_TCK")
TARGET_PER_S, TARGET_P99_MS = 2000, 50


def log(msg: str) -> None:
    print(f"[bench-feedback {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def token(rid: str, principal: str) -> str:
    return sign(SECRET, TokenClaims(rid, "policy-0001", "ph-bench", int(time.time()) + 3600, principal))


@dataclasses.dataclass(frozen=True)
class Principals:
    """The benchmark's raters: N named principals with an API key each (rating i is by i mod N)."""

    keys: tuple[tuple[str, str], ...]

    @classmethod
    def make(cls, n: int) -> Principals:
        import secrets

        return cls(tuple((f"bench-p{i:05d}", secrets.token_urlsafe(24)) for i in range(n)))

    def of(self, i: int) -> tuple[str, dict[str, str]]:
        """The principal of rating i and its Authorization header."""
        name, key = self.keys[i % len(self.keys)]
        return name, {"Authorization": f"Bearer {key}"}

    def keys_file(self, directory: Path) -> Path:
        """RLHF_GATEWAY_API_KEYS_FILE: one `name sha256:<hex>` line per principal (hashed at rest)."""
        import hashlib

        path = directory / "gateway-api-keys"
        path.write_text("".join(f"{n} sha256:{hashlib.sha256(k.encode()).hexdigest()}\n" for n, k in self.keys))
        return path


def features(code: Path, env: dict[str, str]) -> dict[str, bool]:
    """What the code at ``code`` supports: gateway identity (API keys file), service authentication."""
    probe = (
        "import dataclasses, json, services.gateway.config as g, shared.config as s; "
        "print(json.dumps({'identity': 'api_keys_file' in {f.name for f in dataclasses.fields(g.GatewayConfig)}, "
        "'service_auth': hasattr(s, 'ServiceAuthConfig')}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=code, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def wait_for(check, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up")
        time.sleep(0.2)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and all its threads so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def code_origins(code: Path, env: dict[str, str]) -> dict[str, str]:
    """The files the services' processes, started in ``code`` with ``env``, import their packages from;
    an error if any lies outside ``code`` (e.g. the baseline picking up the working tree)."""
    probe = "import importlib.util as u, sys; print(*(u.find_spec(m).origin for m in sys.argv[1:]), sep='\\n')"
    modules = ("services.feedback", "services.gateway", "shared")
    found = subprocess.run(
        [sys.executable, "-c", probe, *modules], env=env, cwd=code, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    origins = dict(zip(modules, found))
    outside = {m: f for m, f in origins.items() if not Path(f).resolve().is_relative_to(code.resolve())}
    if len(origins) != len(modules) or outside:
        raise RuntimeError(f"services started in {code} would import code from elsewhere: {outside or found}")
    return origins


def machine_busy_s() -> float:
    """CPU seconds all cores have spent not idle since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / TICK  # minus idle and iowait


class Stack:
    """Broker, feedback service and gateway as separate processes, as `rlhf up` runs them, with the
    services' code taken from ``code`` (the working tree, or a baseline worktree)."""

    def __init__(self, code: Path, label: str, principals: Principals, partitions: int | None = None) -> None:
        self.label = label
        self.principals = principals
        self._tmp = Path(tempfile.mkdtemp(prefix=f"bench-feedback-{label}-"))
        self.broker = EmbeddedBroker().start()
        self.kafka = KafkaConfig(
            bootstrap_servers=self.broker.bootstrap_servers, topic_partitions=partitions or KafkaConfig.topic_partitions
        )
        ensure_topics(self.kafka)
        self.feedback_port, self.gateway_port, self.metrics_port = free_port(), free_port(), free_port()
        env = {
            **os.environ,
            "PYTHONPATH": str(code),
            "RLHF_KAFKA_BOOTSTRAP_SERVERS": self.broker.bootstrap_servers,
            "RLHF_FEEDBACK_TOKEN_SECRET": SECRET,
            "RLHF_LOG_LEVEL": "WARNING",
            "RLHF_FEEDBACK_GRPC_PORT": str(self.feedback_port),
            "RLHF_FEEDBACK_METRICS_PORT": str(self.metrics_port),
            "RLHF_GATEWAY_PORT": str(self.gateway_port),
            "RLHF_GATEWAY_FEEDBACK_ADDRESS": f"127.0.0.1:{self.feedback_port}",
        }
        self.origins = code_origins(code, env)
        log(f"{label}: services import " + ", ".join(f"{m} from {f}" for m, f in self.origins.items()))
        self.features = features(code, env)
        self.grpc_metadata: tuple[tuple[str, str], ...] = ()
        if self.features["identity"]:
            env["RLHF_GATEWAY_API_KEYS_FILE"] = str(principals.keys_file(self._tmp))
        if self.features["service_auth"]:
            import hashlib
            import secrets

            gateway_token = secrets.token_urlsafe(32)  # this run's gateway credential
            env["RLHF_AUTH_ACCEPT"] = f"gateway:{hashlib.sha256(gateway_token.encode()).hexdigest()}"
            self.grpc_metadata = (("authorization", f"Bearer {gateway_token}"),)
        gateway_env = {**env, **({"RLHF_AUTH_TOKEN": gateway_token} if self.grpc_metadata else {})}
        log(f"{label}: " + ", ".join(f"{k} {'on' if v else 'not in this code'}" for k, v in self.features.items()))
        self.feedback = subprocess.Popen(
            [sys.executable, "-m", "services.feedback"], env=env, cwd=code, start_new_session=True
        )
        self.gateway = subprocess.Popen(
            [sys.executable, "-m", "services.gateway"], env=gateway_env, cwd=code, start_new_session=True
        )
        wait_for(lambda: port_open(self.feedback_port), f"{label} feedback service")
        wait_for(feedback_serving(self.feedback_port), f"{label} feedback service")
        wait_for(lambda: port_open(self.gateway_port), f"{label} gateway")

    def cpu(self) -> dict[str, float]:
        return {
            "feedback": process_cpu_s(self.feedback.pid),
            "gateway": process_cpu_s(self.gateway.pid),
            "broker": process_cpu_s(self.broker._proc.pid),
            # This process, plus wrk once it has exited (the services are children too, but
            # count here only after they exit, which is after the last window).
            "loadgen": sum(
                getattr(resource.getrusage(who), f)
                for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                for f in ("ru_utime", "ru_stime")
            ),
            "machine": machine_busy_s(),
        }

    def batches(self) -> tuple[float, float]:
        """(SubmitFeedbackBatch calls, submissions in them) so far, from the feedback service's
        metrics; zeros for a version without the batch call."""
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        values = {}
        for line in text.splitlines():
            if line.startswith(("rlhf_feedback_batch_size_count ", "rlhf_feedback_batch_size_sum ")):
                name, value = line.split()
                values[name] = float(value)
        return values.get("rlhf_feedback_batch_size_count", 0.0), values.get("rlhf_feedback_batch_size_sum", 0.0)

    def stop(self) -> None:
        for p in (self.gateway, self.feedback):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in (self.gateway, self.feedback):
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        self.broker.stop()
        shutil.rmtree(self._tmp, ignore_errors=True)


def feedback_serving(port: int):
    """The feedback service's health check (open to callers without a credential)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    def check() -> bool:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.RpcError:
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    return check


@dataclasses.dataclass
class Run:
    sent: int
    accepted: int
    """Ratings answered with success (HTTP 200, gRPC OK, Kafka acknowledgement)."""
    p50_s: float
    p99_s: float
    """Latency quantiles of the accepted ratings."""
    wall_s: float
    cpu_s: dict[str, float]
    """CPU seconds per process during the load (request preparation excluded)."""
    loadavg: tuple[float, float, float]
    mean_batch: float | None
    """Mean submissions per SubmitFeedbackBatch call during the load (None: no batch calls)."""


# --- load generators: each prepares its requests, then returns an async ``one(i)`` -------------


async def run_http(stack: Stack, prefix: str, n: int, concurrency: int) -> Run:
    # aiohttp, not httpx: httpx's connection pool costs several times more CPU per request at high
    # concurrency, and the load generator shares the 2 cores with the servers it measures.
    import aiohttp

    url = f"http://127.0.0.1:{stack.gateway_port}/v1/feedback"
    bodies, headers = [], []
    for i in range(n):
        principal, auth = stack.principals.of(i)
        headers.append({"Content-Type": "application/json", **auth})
        bodies.append(
            json.dumps(
                {
                    "type": "thumb",
                    "response_id": f"{prefix}-r{i}",
                    "thumb": "up",
                    "user": f"{prefix}-u{i}",
                    "feedback_tokens": [token(f"{prefix}-r{i}", principal)],
                }
            ).encode()
        )
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as client:

        async def one(i: int) -> tuple[float, bool]:
            t = time.perf_counter()
            async with client.post(url, data=bodies[i], headers=headers[i]) as r:
                await r.read()
                ok = r.status == 200
            return time.perf_counter() - t, ok

        return await closed_loop(stack, one, n, concurrency)


async def run_grpc(stack: Stack, prefix: str, n: int, concurrency: int) -> Run:
    requests = []
    for i in range(n):
        principal, _ = stack.principals.of(i)
        requests.append(
            feedback_pb2.SubmitFeedbackRequest(
                thumb=feedback_pb2.ThumbRating(response_id=f"{prefix}-r{i}", thumb=feedback_pb2.THUMB_UP),
                feedback_tokens=[token(f"{prefix}-r{i}", principal)],
                user_id=f"{prefix}-u{i}",  # the label (the voter, before principals)
                principal=principal,  # the voter (code before principals ignores the field)
            )
        )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.feedback_port}") as channel:
        stub = feedback_pb2_grpc.FeedbackServiceStub(channel)

        async def one(i: int) -> tuple[float, bool]:
            t = time.perf_counter()
            try:
                await stub.SubmitFeedback(requests[i], timeout=60, metadata=stack.grpc_metadata)
                ok = True
            except grpc.aio.AioRpcError:
                ok = False
            return time.perf_counter() - t, ok

        return await closed_loop(stack, one, n, concurrency)


def raw_records(prefix: str, n: int) -> list[tuple[bytes, bytes]]:
    """(key, value) of n feedback events, encoded as the feedback service encodes them."""
    out = []
    for i in range(n):
        rid = f"{prefix}-r{i}"
        ev = FeedbackEvent(
            feedback_id=f"{prefix}-f{i}",
            kind="thumb",
            user_id=f"{prefix}-u{i}",
            target=f"thumb:{rid}",
            revision=1,
            supersedes=None,
            responses=[RatedResponse(rid, "policy-0001", "ph-bench")],
            thumb="up",
            received_at=time.time(),
        )
        out.append((ev.user_id.encode(), envelope.encode(envelope.wrap(ev, "bench"))))
    return out


async def run_kafka(stack: Stack, prefix: str, n: int, concurrency: int) -> Run:
    records = raw_records(prefix, n)
    producer = KafkaProducer(**producer_kwargs(stack.kafka, "bench"))
    loop = asyncio.get_running_loop()

    async def one(i: int) -> tuple[float, bool]:
        done = loop.create_future()
        t = time.perf_counter()
        fut = producer.send(FEEDBACK, key=records[i][0], value=records[i][1])
        fut.add_callback(lambda _: loop.call_soon_threadsafe(lambda: done.done() or done.set_result(True)))
        fut.add_errback(lambda _: loop.call_soon_threadsafe(lambda: done.done() or done.set_result(False)))
        ok = await done
        return time.perf_counter() - t, ok

    try:
        return await closed_loop(stack, one, n, concurrency)
    finally:
        producer.close(timeout=10)


async def run_rdkafka(stack: Stack, prefix: str, n: int, concurrency: int) -> Run:
    records = raw_records(prefix, n)
    producer = confluent_kafka.Producer(rdkafka_producer_config(stack.kafka, "bench"))
    loop = asyncio.get_running_loop()
    polling = True

    def serve_reports() -> None:
        while polling:
            producer.poll(0.05)

    poller = loop.run_in_executor(None, serve_reports)

    async def one(i: int) -> tuple[float, bool]:
        done = loop.create_future()
        t = time.perf_counter()
        producer.produce(
            FEEDBACK,
            records[i][1],
            records[i][0],
            on_delivery=lambda err, _: loop.call_soon_threadsafe(done.set_result, err is None),
        )
        ok = await done
        return time.perf_counter() - t, ok

    try:
        return await closed_loop(stack, one, n, concurrency)
    finally:
        polling = False
        await poller
        producer.flush(10)


async def closed_loop(stack: Stack, one, n: int, concurrency: int) -> Run:
    """``concurrency`` clients, each sending its next rating as soon as the last is answered."""
    results: list[tuple[float, bool]] = []
    next_i = 0
    loadavg, cpu_before, batches_before = os.getloadavg(), stack.cpu(), stack.batches()
    started = time.perf_counter()

    async def client() -> None:
        nonlocal next_i
        while next_i < n:
            i, next_i = next_i, next_i + 1
            results.append(await one(i))
            if len(results) % max(1, n // 4) == 0:
                log(f"  {len(results)}/{n} done, {len(results) / (time.perf_counter() - started):.0f}/s")

    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    lat = sorted(t for t, ok in results if ok)
    q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [float("nan")] * 99
    cpu, mean_batch = window_usage(stack, cpu_before, batches_before)
    return Run(len(results), len(lat), q[49], q[98], wall, cpu, loadavg, mean_batch)


def window_usage(stack: Stack, cpu_before: dict[str, float], batches_before: tuple[float, float]):
    """CPU seconds per process since ``cpu_before`` (``other``: the rest of the machine), and the
    mean batch size since ``batches_before``."""
    cpu_after = stack.cpu()
    cpu = {k: cpu_after[k] - cpu_before[k] for k in cpu_before}
    cpu["other"] = max(0.0, cpu.pop("machine") - sum(cpu.values()))
    calls, items = (after - before for after, before in zip(stack.batches(), batches_before))
    return cpu, (items / calls if calls else None)


def run_wrk(stack: Stack, prefix: str, n: int, concurrency: int) -> Run:
    """POST /v1/feedback driven by wrk (C, one thread): each of n distinct bodies sent once, by
    ``concurrency`` connections in a closed loop; wrk stops at the last answer (wrk/feedback.lua)."""
    if stack.features["identity"]:
        raise SystemExit("http-wrk sends no per-principal keys (wrk/feedback.lua): use --paths http with identity on")
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for i in range(n):
            f.write(
                json.dumps(
                    {
                        "type": "thumb",
                        "response_id": f"{prefix}-r{i}",
                        "thumb": "up",
                        "user": f"{prefix}-u{i}",
                        "feedback_tokens": [token(f"{prefix}-r{i}", stack.principals.of(i)[0])],
                    }
                )
                + "\n"
            )
    try:
        loadavg, cpu_before, batches_before = os.getloadavg(), stack.cpu(), stack.batches()
        wrk = subprocess.Popen(
            [
                "wrk",
                "-t1",
                f"-c{concurrency}",
                "-d600s",
                "--timeout",
                "60s",
                "-s",
                str(Path(__file__).parent / "wrk" / "feedback.lua"),
                f"http://127.0.0.1:{stack.gateway_port}",
                "--",
                f.name,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        out = []
        for line in wrk.stdout:
            out.append(line)
            if line.strip() == "ALL-ANSWERED":
                wrk.send_signal(signal.SIGINT)
        wrk.wait()
        out = "".join(out)
        cpu, mean_batch = window_usage(stack, cpu_before, batches_before)
    finally:
        os.unlink(f.name)
    result = json.loads(out.rsplit("RESULT ", 1)[1])
    if result["socket_errors"]:
        log(f"  wrk reports {result['socket_errors']} socket errors")
    return Run(
        result["sent"],
        result["accepted"],
        result["p50_us"] / 1e6,
        result["p99_us"] / 1e6,
        result["duration_us"] / 1e6,
        cpu,
        loadavg,
        mean_batch,
    )


def records_on_topic(kafka: KafkaConfig, prefix: str) -> tuple[int, int]:
    """(records whose label (the client's user; the voter before principals) starts with prefix,
    distinct feedback ids among them)."""
    consumer = KafkaConsumer(bootstrap_servers=kafka.servers, enable_auto_commit=False)
    parts = [TopicPartition(FEEDBACK, p) for p in consumer.partitions_for_topic(FEEDBACK)]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    end = consumer.end_offsets(parts)
    count, ids = 0, set()
    while any(consumer.position(tp) < end[tp] for tp in parts):
        for records in consumer.poll(timeout_ms=500).values():
            for r in records:
                p = decode(r.value).payload
                if (p.label or p.user_id).startswith(prefix + "-"):
                    count += 1
                    ids.add(p.feedback_id)
    consumer.close()
    return count, len(ids)


def external_cores(stack: Stack, seconds: float) -> float:
    """Cores the rest of the machine (not the stack, not this process) used over the next ``seconds``."""
    before, started = stack.cpu(), time.monotonic()
    time.sleep(seconds)
    after = stack.cpu()
    ours = sum(after[k] - before[k] for k in after if k != "machine")
    return max(0.0, after["machine"] - before["machine"] - ours) / (time.monotonic() - started)


def measure(
    stack: Stack, version: str, path: str, runner, n: int, concurrency: int, quiet: QuietGuard, round_no: int = 1
) -> dict:
    def call(prefix: str, n: int) -> Run:
        return (
            asyncio.run(runner(stack, prefix, n, concurrency))
            if asyncio.iscoroutinefunction(runner)
            else runner(stack, prefix, n, concurrency)
        )

    attempts = []
    for attempt in range(1 + quiet.retries):
        # Unique per round and attempt: a rating sent twice would be a duplicate, not a new vote.
        prefix = f"{version}-{path}{concurrency}-r{round_no}" + (f"-a{attempt + 1}" if attempt else "")
        before = quiet.wait(lambda seconds: external_cores(stack, seconds), log)
        log(
            f"round {round_no}: {version} {path} at {concurrency} concurrent: warm-up, then {n} ratings"
            + (f" (attempt {attempt + 1})" if attempt else "")
            + f"; other processes {before:.2f} cores"
        )
        call(prefix + "w", 200)
        row = summarise(version, path, concurrency, call(prefix, n), records_on_topic(stack.kafka, prefix))
        row["round"] = round_no
        attempts.append(row)
        if row["external_cores"] <= quiet.max_external:
            break
        log(f"  disturbed: other processes used {row['external_cores']:.2f} cores during the run")
    best = min(attempts, key=lambda r: r["external_cores"])
    best["attempts_external_cores"] = [round(r["external_cores"], 3) for r in attempts]
    # Every attempt's ratings were read back: a loss in a discarded attempt still counts.
    best["lost_all_attempts"] = sum(r["lost"] for r in attempts)
    return best


def summarise(version: str, path: str, concurrency: int, run: Run, on_topic: tuple[int, int]) -> dict:
    return {
        "version": version,
        "path": path,
        "concurrency": concurrency,
        "sent": run.sent,
        "accepted": run.accepted,
        "errors": run.sent - run.accepted,
        "ratings_per_s": run.accepted / run.wall_s,
        "p50_ms": run.p50_s * 1e3,
        "p99_ms": run.p99_s * 1e3,
        "records_on_topic": on_topic[0],
        "distinct_ids_on_topic": on_topic[1],
        "lost": run.accepted - on_topic[1],
        "wall_s": run.wall_s,
        "cpu_s": run.cpu_s,
        "cpu_ms_per_rating": {k: v * 1e3 / max(1, run.sent) for k, v in run.cpu_s.items()},
        "loadavg_at_start": run.loadavg,
        "mean_batch": run.mean_batch,
        "external_cores": run.cpu_s["other"] / run.wall_s,
    }


def baseline_worktree(ref: str) -> Path:
    where = Path(tempfile.mkdtemp(prefix="bench-feedback-baseline-"))
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(where), ref], check=True, capture_output=True
    )
    # Generated stubs are checked in; nothing to build.
    return where


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratings", type=int, default=4000, help="ratings per path and concurrency level")
    ap.add_argument("--concurrency", default="8,32,64")
    ap.add_argument(
        "--paths", default="http-wrk,http,grpc,kafka,rdkafka" if shutil.which("wrk") else "http,grpc,kafka,rdkafka"
    )
    ap.add_argument("--baseline", default="", help="git ref to measure http and grpc on as well (before vs after)")
    ap.add_argument("--out", default=str(REPO / "bench-results" / "feedback.json"))
    ap.add_argument(
        "--partitions",
        type=int,
        default=None,
        help="partitions per topic on the benchmark's broker (default: as `rlhf up` creates them)",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every level this many times (versions alternating); the verdict and the "
        "plot use each row's median over the rounds",
    )
    ap.add_argument(
        "--principals",
        type=int,
        default=1000,
        help="principals with an API key each; rating i is by principal i mod N (with identity on, "
        "each stays under its per-principal rate limit when ratings per level / N is below the burst)",
    )
    QuietGuard.add_arguments(ap, "run", max_wait_s=45.0)
    args = ap.parse_args()
    quiet = QuietGuard.from_args(args)
    levels = [int(c) for c in args.concurrency.split(",")]
    paths = args.paths.split(",")
    runners = {"http": run_http, "http-wrk": run_wrk, "grpc": run_grpc, "kafka": run_kafka, "rdkafka": run_rdkafka}
    principals = Principals.make(args.principals)
    versions = [("now", REPO)]
    worktree = None
    if args.baseline:
        worktree = baseline_worktree(args.baseline)
        versions.insert(0, ("before", worktree))
    rows = []
    stacks: dict[str, Stack] = {}
    origins: dict[str, dict[str, str]] = {}
    try:
        # Level by level, one version right after the other: on a shared machine before and after
        # then meet the same moment's load, not loads minutes apart. (The idle stack costs little.)
        for round_no in range(1, args.rounds + 1):
            # Fresh stacks each round: the embedded broker keeps every record in memory and slows
            # down as they pile up, which would penalise later rounds.
            for stack in stacks.values():
                stack.stop()
            stacks = {}
            for version, code in versions:
                stacks[version] = Stack(code, version, principals, args.partitions)
                origins[version] = stacks[version].origins
            # Which version goes first alternates by round: the second one in a round measured
            # systematically slower (an A/A run of one commit against itself gave x0.78 ratings/s),
            # so a fixed order would be read as a regression. Use an even number of rounds.
            order = versions if round_no % 2 else versions[::-1]
            for concurrency in levels:
                for path in paths:
                    for version, _ in order:
                        if version == "before" and path not in ("http", "http-wrk", "grpc"):
                            continue  # the raw producers do not depend on the code version
                        rows.append(
                            measure(
                                stacks[version],
                                version,
                                path,
                                runners[path],
                                args.ratings,
                                concurrency,
                                quiet,
                                round_no,
                            )
                        )
    finally:
        for stack in stacks.values():
            stack.stop()
        if worktree is not None:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)], check=False)
            shutil.rmtree(worktree, ignore_errors=True)

    print_table(rows, args.baseline)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
                "baseline": args.baseline,
                "code": origins,
                "ratings_per_level": args.ratings,
                "principals": args.principals,
                "features": {version: stack.features for version, stack in stacks.items()},
                "shared_machine_guard": dataclasses.asdict(quiet),
                "rounds": args.rounds,
                "rows": rows,
                "medians": medians(rows),
            },
            indent=2,
        )
    )
    plot(medians(rows), out.with_suffix(".png"))
    log(f"wrote {out} and {out.with_suffix('.png')}")


def medians(rows: list[dict]) -> list[dict]:
    """One row per (version, path, concurrency): the median ratings/s, p50 and p99 over its rounds,
    with the rounds' ranges, and the losses of every round and attempt."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["version"], r["path"], r["concurrency"]), []).append(r)
    out = []
    for (version, path, concurrency), rs in groups.items():
        m = {
            "version": version,
            "path": path,
            "concurrency": concurrency,
            "rounds": len(rs),
            "lost_all_attempts": sum(r["lost_all_attempts"] for r in rs),
        }
        for key in ("ratings_per_s", "p50_ms", "p99_ms"):
            values = [r[key] for r in rs]
            m[key], m[key + "_range"] = statistics.median(values), (min(values), max(values))
        out.append(m)
    return out


def print_table(rows: list[dict], baseline: str) -> None:
    procs = ("feedback", "gateway", "broker", "loadgen", "other")
    header = (
        f"{'rnd':<4}{'version':<8}{'path':<8}{'conc':>5}{'ratings/s':>10}{'p50 ms':>8}{'p99 ms':>8}{'accepted':>9}"
        f"{'on topic':>9}{'lost':>5}{'err':>5} | CPU ms per rating: "
        + " ".join(f"{p:>8}" for p in procs)
        + f" | {'ext':>5}{'batch':>6}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        per = r["cpu_ms_per_rating"]
        print(
            f"{r['round']:<4}{r['version']:<8}{r['path']:<8}{r['concurrency']:>5}{r['ratings_per_s']:>10.0f}{r['p50_ms']:>8.1f}"
            f"{r['p99_ms']:>8.1f}{r['accepted']:>9}{r['distinct_ids_on_topic']:>9}{r['lost']:>5}{r['errors']:>5} | "
            f"{'':19}"
            + " ".join(f"{per[p]:>8.3f}" for p in procs)
            + f" | {r['external_cores']:>5.2f}"
            + (f"{r['mean_batch']:>6.1f}" if r["mean_batch"] else f"{'-':>6}")
        )
    rounds = max(r["round"] for r in rows)
    rows = medians(rows)
    if rounds > 1:
        print(f"\nmedians over {rounds} rounds (range):")
        for r in rows:
            print(
                f"  {r['version']:<7}{r['path']:<9}at {r['concurrency']:>3}: {r['ratings_per_s']:>6.0f}/s "
                f"({r['ratings_per_s_range'][0]:.0f}-{r['ratings_per_s_range'][1]:.0f}), "
                f"p99 {r['p99_ms']:.1f} ms ({r['p99_ms_range'][0]:.1f}-{r['p99_ms_range'][1]:.1f})"
            )
    if baseline:
        print(f"\nnow / before ({baseline}), same run" + (", medians:" if rounds > 1 else ":"))
        for r in rows:
            if r["version"] != "now":
                continue
            b = next(
                (
                    x
                    for x in rows
                    if x["version"] == "before" and x["path"] == r["path"] and x["concurrency"] == r["concurrency"]
                ),
                None,
            )
            if b:
                print(
                    f"  {r['path']:<5} at {r['concurrency']:>3}: ratings/s x{r['ratings_per_s'] / b['ratings_per_s']:.2f}, "
                    f"p99 x{r['p99_ms'] / b['p99_ms']:.2f}"
                )
    http = [r for r in rows if r["path"] in ("http", "http-wrk") and r["version"] == "now"]
    if http:
        meeting = [r for r in http if r["ratings_per_s"] >= TARGET_PER_S and r["p99_ms"] < TARGET_P99_MS]
        best = max(meeting or http, key=lambda r: r["ratings_per_s"])
        lost = sum(r["lost_all_attempts"] for r in rows)
        ok = bool(meeting) and lost == 0
        print(
            f"\nTarget >= {TARGET_PER_S} ratings/s with p99 < {TARGET_P99_MS} ms through HTTP, zero lost: best HTTP "
            + ("row (medians over rounds)" if rounds > 1 else "row")
            + f" {best['ratings_per_s']:.0f}/s ({best['path']} at {best['concurrency']} concurrent), "
            f"p99 {best['p99_ms']:.1f} ms, "
            f"lost {lost} -> {'PASS' if ok else 'FAIL'}"
        )


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    bars = sorted({(r["version"], r["path"]) for r in rows}, key=lambda vp: (vp[1], vp[0] != "before"))
    names = [f"{p}\n{v}" for v, p in bars]
    levels = sorted({r["concurrency"] for r in rows})
    width = 0.8 / len(levels)
    for k, c in enumerate(levels):
        by = {(r["version"], r["path"]): r for r in rows if r["concurrency"] == c}
        xs = [i + k * width for i in range(len(bars))]
        ax1.bar(xs, [by[b]["ratings_per_s"] if b in by else 0 for b in bars], width, label=f"{c} concurrent")
        ax2.bar(xs, [by[b]["p99_ms"] if b in by else 0 for b in bars], width, label=f"{c} concurrent")
    for ax, title in ((ax1, "ratings/s (acks=all)"), (ax2, "p99 latency (ms)")):
        ax.set_xticks([i + width * (len(levels) - 1) / 2 for i in range(len(bars))], names, fontsize=8)
        ax.set_title(title)
        ax.legend()
    ax1.axhline(TARGET_PER_S, color="grey", ls="--", lw=1)
    ax2.axhline(TARGET_P99_MS, color="grey", ls="--", lw=1)
    ax2.set_yscale("log")
    fig.suptitle("Feedback path: HTTP gateway vs gRPC vs raw Kafka producers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
