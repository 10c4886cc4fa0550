"""Fault injection against the real stack: what `rlhf up` loses, and how fast it heals.

Used by tests/integration/test_faults.py (a short subset, marker ``faults``) and
tests/benchmarks/bench_faults.py (every fault, a table and JSON). One fault run is:

1. a stack: `rlhf up` as a user runs it (``StackRun``: its own process group, run folder, model store
   copy and free ports), with Kafka either this harness's own tansu broker (``broker="external"``:
   the services' faults leave Kafka's storage intact, as on a real cluster) or the launcher's
   embedded one (``broker="embedded"``: what `rlhf up` does by default; the broker fault);
2. a steady load (``Load``): simulated users, each a principal with its own key, chat through the
   OpenAI API (the ``openai`` client, no retries) and rate every answer through ``POST /v1/feedback``
   (``httpx``) with its real feedback tokens, as the demo's users do (thumbs and pairwise choices by
   the demo's gold rater, so that the reward model has something to learn); a rating answered
   429/503 or not answered is sent again with the same idempotency key, as a client should;
3. one fault (``FAULTS``), the load kept on;
4. the accounting (``FaultReport``), from what the clients saw and what the broker holds at the end:

   accepted ratings lost = accepted (2xx, by feedback_id) - distinct feedback_ids on rlhf.feedback
   completion events lost = answered chats' response_ids - distinct response_ids on rlhf.completions
   failed chats          = chat requests after the fault that got no answer (any error)
   seconds to recover    = first chat answered after the fault - the fault
   seconds to steady     = first answer to a chat sent after the last failed one - the fault
   service back          = seconds until the killed process is replaced and reports healthy
   learned afterwards    = a new rm-NNNN or policy-NNNN directory in the store after recovery,
                           within a bounded wait (the report says how long it waited)

When the launcher itself gives up (today's `rlhf up` stops every service when one dies) the harness
starts `rlhf up` again on the same store, folders and broker, once, and says so
(``recovered_by="manual restart"``): that shows what the state on disk is worth after the crash, and
that recovering needed a person.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from flywheel.launcher import ALL_SERVICES, SERVICE_NEEDS, UpConfig
from shared.kafka.embedded import free_ports

REPO = Path(__file__).resolve().parents[1]
MODEL = "rlhf-policy"
GRPC_SERVICES = ("inference", "inference-canary", "reward", "feedback", "rollout", "trainer")
SERVICES = (*GRPC_SERVICES, "gateway")
VERSION_DIR = re.compile(r"^(policy|rm)-[0-9]{4,}\Z")
UP_SERVICES: tuple[str, ...] = ALL_SERVICES
"""What RLHF_UP_SERVICES may name, in the launcher's order."""
TMP_PREFIX = ".tmp-"  # shared.model_store.TMP_PREFIX: a publish in progress


def log(msg: str) -> None:
    print(f"[faults {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- pure accounting ------------------------------------------------------------------------------


@dataclass
class ChatRecord:
    started: float
    """time.monotonic() when the request was sent."""
    finished: float
    ok: bool
    response_ids: list[str] = field(default_factory=list)
    policy_version: str = ""
    error: str = ""


@dataclass
class RatingRecord:
    sent: float
    """time.monotonic() of the first attempt."""
    finished: float
    status: int
    """HTTP status of the last attempt; 0: no answer at all (connection refused, timeout)."""
    feedback_id: str = ""
    attempts: int = 1
    error: str = ""

    @property
    def accepted(self) -> bool:
        return 200 <= self.status < 300 and bool(self.feedback_id)


def lost_ids(accepted: Iterable[str], on_topic: set[str]) -> list[str]:
    """Accepted ids that the topic does not hold: ``sorted(set(accepted) - on_topic)``.

    An accepted rating is one answered 2xx; the gateway answers 2xx only once the rating is on Kafka
    (acks=all), so any id here is a rating the system promised to keep and did not."""
    return sorted(set(accepted) - on_topic)


def seconds_to_recover(fault_at: float, chats: Iterable[ChatRecord]) -> float | None:
    """Seconds from the fault to the first chat *sent after it* that was answered; None if none was.

    ``min(c.finished for answered c with c.started >= fault_at) - fault_at``: a request sent before
    the fault and answered after it says nothing about recovery."""
    done = [c.finished for c in chats if c.ok and c.started >= fault_at]
    return round(min(done) - fault_at, 2) if done else None


def seconds_to_steady(fault_at: float, chats: Iterable[ChatRecord]) -> float | None:
    """Seconds from the fault until chats stopped failing: the first answer to a chat sent after the
    last failed one (sent after the fault), minus the fault; 0-failure runs give ``seconds_to_recover``.
    None when a chat still failed last. (With a canary running, some users' chats go to the other
    engine and keep being answered: the first answer alone then says little about the rest.)"""
    chats = [c for c in chats if c.started >= fault_at]
    failed = [c.started for c in chats if not c.ok]
    if not failed:
        return seconds_to_recover(fault_at, chats)
    last = max(failed)
    done = [c.finished for c in chats if c.ok and c.started > last]
    return round(min(done) - fault_at, 2) if done else None


def failed_chats(chats: Iterable[ChatRecord], since: float, until: float = float("inf")) -> int:
    """Chat requests sent in [since, until) that got no answer."""
    return sum(1 for c in chats if not c.ok and since <= c.started < until)


def phase_of(t: float, fault_at: float, recovered_at: float | None) -> str:
    """Which phase a rating sent at ``t`` belongs to: "before" the fault, "during" (fault to
    recovery, or to the end when it never recovered), or "after" recovery."""
    if t < fault_at:
        return "before"
    if recovered_at is None or t < recovered_at:
        return "during"
    return "after"


def lost_by_phase(
    ratings: Iterable[RatingRecord], on_topic: set[str], fault_at: float, recovered_at: float | None
) -> dict[str, dict[str, int]]:
    """Per phase (``phase_of`` on the rating's first send): accepted ratings and how many of them
    the topic lacks. A memory-only broker's restart should lose "before" and nothing else."""
    out = {p: {"accepted": 0, "lost": 0} for p in ("before", "during", "after")}
    for r in ratings:
        if not r.accepted:
            continue
        phase = out[phase_of(r.sent, fault_at, recovered_at)]
        phase["accepted"] += 1
        phase["lost"] += r.feedback_id not in on_topic
    return out


def first_new_version(seen: dict[str, float], known_before: set[str], after: float) -> tuple[str, float] | None:
    """The first version directory (name, first seen) that appeared after ``after`` and was not in
    the store before: the loop "learned" (a reward model or policy version published)."""
    new = [(t, v) for v, t in seen.items() if v not in known_before and t >= after]
    if not new:
        return None
    t, v = min(new)
    return v, t


# --- Kafka: what the broker holds ------------------------------------------------------------------


def read_topic(bootstrap: str, topic: str, timeout_s: float = 60.0) -> list[bytes]:
    """Every record value of ``topic``, from the beginning to its end offsets when called."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap.split(","),
        enable_auto_commit=False,
        group_id=None,
        auto_offset_reset="earliest",
        request_timeout_ms=15000,
    )
    try:
        deadline = time.monotonic() + timeout_s
        partitions = consumer.partitions_for_topic(topic)
        while not partitions and time.monotonic() < deadline:
            time.sleep(0.5)
            partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            return []
        parts = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        end = consumer.end_offsets(parts)
        values: list[bytes] = []
        while any(consumer.position(tp) < end[tp] for tp in parts):
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic}: not at its end after {timeout_s} s")
            for records in consumer.poll(timeout_ms=500).values():
                values.extend(r.value for r in records)
        return values
    finally:
        consumer.close()


def payload_ids(values: Iterable[bytes], key: str) -> tuple[set[str], int]:
    """The distinct ``payload[key]`` of envelope records, and how many records had none (not JSON,
    another shape: e.g. this harness's own poison records)."""
    ids: set[str] = set()
    unreadable = 0
    for raw in values:
        try:
            value = json.loads(raw)["payload"][key]
        except (ValueError, KeyError, TypeError):
            unreadable += 1
            continue
        if isinstance(value, str) and value:
            ids.add(value)
        else:
            unreadable += 1
    return ids, unreadable


POISON_RECORDS: tuple[bytes, ...] = (
    b"\xff\xfe not json at all \x00",
    b'{"type": "completion", "schema_version": 99, "event_id": "x", "produced_at": 0, "producer": "faults",'
    b' "payload": {}}',
    b'{"type": "completion", "schema_version": 1, "event_id": "poison", "produced_at": 1, "producer": "faults",'
    b' "payload": {"request_id": 7, "response_id": ["not", "a", "string"], "index": "zero"}}',
    b'{"type": "completion", "schema_version": 1, "event_id": "poison-2", "produced_at": "NaN",'
    b' "producer": "faults", "payload": null}',
)
"""What a poison record on rlhf.completions looks like: not JSON, an unknown schema version, a known
event whose payload has the wrong types, a malformed envelope. Every consumer must skip them."""


def produce_raw(bootstrap: str, topic: str, values: Iterable[bytes]) -> int:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap.split(","), acks="all")
    try:
        n = 0
        for v in values:
            producer.send(topic, value=v).get(timeout=30)
            n += 1
        return n
    finally:
        producer.close()


def port_open(address: str) -> bool:
    host, port = address.split(",")[0].rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def broker_answers(bootstrap: str, topic: str | None = "rlhf.feedback") -> bool:
    """Whether the broker answers a metadata request (that lists ``topic``, unless None)."""
    from kafka import KafkaConsumer
    from kafka.errors import KafkaError

    try:
        # (kafka-python refuses a request timeout below the session timeout: left at its default.)
        consumer = KafkaConsumer(bootstrap_servers=bootstrap.split(","))
    except KafkaError:
        return False
    try:
        topics = consumer.topics()
        return topic is None or topic in (topics or set())
    except KafkaError:
        return False
    finally:
        consumer.close()


# --- the stack ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StackOptions:
    services: tuple[str, ...] = UP_SERVICES
    """RLHF_UP_SERVICES."""
    rollout: bool = True
    """RLHF_UP_ROLLOUT: the rollout service and the canary engine (rlhf up's default)."""
    broker: str = "external"
    """"external": this harness's own tansu broker (Kafka outlives the stack, as a cluster would);
    "embedded": the launcher's own (memory only, stops with it)."""
    store_on_tmpfs: bool = False
    """Keep the model store on a tmpfs mounted for the run (needs root): the "store full" fault
    then fills a real filesystem (ENOSPC). Falls back to a plain folder when mounting fails."""
    tmpfs_mib: int = 1024
    users: int = 2
    learn_fast: bool = True
    """The demo test's learning pace: an RM round every 16 comparisons or 30 s, a publish every 2
    PPO iterations of 8 rollouts, gates that pass (this is about faults, not quality)."""
    extra_env: tuple[tuple[str, str], ...] = ()


def prepare_base_store(root: Path, with_rm: bool) -> Path:
    """A model store with the default policy and (``with_rm``) the first reward model trained on the
    example rankings: made once, copied for every stack (rlhf up would train the RM at each start)."""
    from shared.model_store import ModelStore
    from shared.models.default_model import ensure_default_policy

    store = ModelStore(root)
    ensure_default_policy(store)
    if with_rm and not store.versions("rm"):
        from services.reward.offline import EXAMPLE_RANKINGS, train_first_rm

        train_first_rm(store, EXAMPLE_RANKINGS)
    return root


class StackRun:
    """`rlhf up` in its own session on a run folder of its own; ``stop()`` leaves no process behind."""

    def __init__(self, work: Path, base_store: Path, options: StackOptions):
        self.work = work
        self.options = options
        self.run_no = 0
        work.mkdir(parents=True, exist_ok=True)
        self.mounted = False
        self.fs_root = work / "fs"
        if options.store_on_tmpfs:
            self.fs_root.mkdir(exist_ok=True)
            done = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={options.tmpfs_mib}m", "tmpfs", str(self.fs_root)],
                capture_output=True,
                text=True,
            )
            self.mounted = done.returncode == 0
            if not self.mounted:
                log(f"no tmpfs for the store ({done.stderr.strip() or done.returncode}): a plain folder")
        self.store_root = self.fs_root / "store"
        shutil.copytree(base_store, self.store_root)
        self.keys = [(f"fault-user-{i}", secrets.token_urlsafe(32)) for i in range(options.users)]
        # all different: a port given twice is bound twice (gRPC sets SO_REUSEPORT)
        names = ("gateway", "inference", "canary", "feedback", "reward", "trainer", "rollout", "broker", "up_metrics")
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        self.bootstrap = f"127.0.0.1:{self.ports['broker']}"
        self.broker: Any = None  # the harness's own EmbeddedBroker (external mode, or a restart it made)
        if options.broker == "external":
            self.start_own_broker()
        self.env = self._environ()
        self.proc: subprocess.Popen[bytes] | None = None
        self._known: dict[int, float] = {}
        self._log_file: Any = None

    # -- environment ------------------------------------------------------------------------------

    def _environ(self) -> dict[str, str]:
        o = self.options
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RLHF_", "VLLM_"))}
        p = self.ports
        env |= {
            "RLHF_MODEL_STORE_ROOT": str(self.store_root),
            "RLHF_UP_BOOTSTRAP": "quick",
            "RLHF_UP_SERVICES": ",".join(o.services),
            "RLHF_UP_ROLLOUT": "1" if o.rollout else "0",
            "RLHF_UP_LOG_DIR": str(self.work / "logs"),
            "RLHF_UP_KEYS_DIR": str(self.work / "keys"),
            "RLHF_UP_OPERATOR_TOKEN_FILE": str(self.work / "operator-token"),
            "RLHF_OPERATOR_TOKEN_FILE": str(self.work / "operator-token"),
            "RLHF_UP_GATEWAY_KEY_FILE": str(self.work / "gateway-api-key"),
            "RLHF_TRAINER_CHECKPOINT_DIR": str(self.work / "trainer-checkpoints"),
            "RLHF_REWARD_STATE_DIR": str(self.work / "reward-state"),
            # Feedback tokens stay valid across a restart of the stack (rlhf up makes one per run).
            "RLHF_FEEDBACK_TOKEN_SECRET": secrets.token_urlsafe(32),
            "RLHF_GATEWAY_PORT": str(p["gateway"]),
            "RLHF_INFERENCE_GRPC_PORT": str(p["inference"]),
            "RLHF_UP_CANARY_GRPC_PORT": str(p["canary"]),
            "RLHF_FEEDBACK_GRPC_PORT": str(p["feedback"]),
            "RLHF_REWARD_GRPC_PORT": str(p["reward"]),
            "RLHF_TRAINER_GRPC_PORT": str(p["trainer"]),
            "RLHF_ROLLOUT_GRPC_PORT": str(p["rollout"]),
            **{
                f"RLHF_{s}_METRICS_PORT": "0"
                for s in ("INFERENCE", "FEEDBACK", "REWARD", "TRAINER", "ROLLOUT", "GATEWAY")
            },
            "RLHF_UP_CANARY_METRICS_PORT": "0",
            "RLHF_INFERENCE_MAX_MODEL_LEN": "512",
            "RLHF_INFERENCE_MAX_TOKENS_LIMIT": "256",
            "RLHF_INFERENCE_DEFAULT_MAX_TOKENS": "16",
            "RLHF_INFERENCE_KV_CACHE_GIB": "1",
            "RLHF_GATEWAY_API_KEYS": ",".join(f"{n}:{k}" for n, k in self.keys),
            "RLHF_GATEWAY_CHAT_RATE_PER_MIN": "0",
            "RLHF_GATEWAY_FEEDBACK_RATE_PER_MIN": "0",
            "RLHF_REWARD_MAX_PRINCIPAL_SHARE": "1",
            "RLHF_TRAINER_MAX_PRINCIPAL_SHARE": "1",
        }
        if "metrics_port" in {f.name for f in dataclasses.fields(UpConfig)}:
            # The launcher's own /metrics (rlhf_up_restarts_total), on a port of this run's own.
            env["RLHF_UP_METRICS_PORT"] = str(p["up_metrics"])
        if o.broker == "external":
            env["RLHF_KAFKA_BOOTSTRAP_SERVERS"] = self.bootstrap
        else:
            env["RLHF_UP_BROKER_PORT"] = str(p["broker"])
        if o.learn_fast:
            from flywheel.demo.users import PROMPTS

            env |= {
                "RLHF_TRAINER_PROMPT_FILE": str(PROMPTS),
                "RLHF_REWARD_LEARN_EVERY_COMPARISONS": "16",
                "RLHF_REWARD_LEARN_EVERY_S": "30",
                "RLHF_REWARD_GATE_TOLERANCE": "1.0",
                "RLHF_TRAINER_ROLLOUTS_PER_ITERATION": "8",
                "RLHF_TRAINER_PUBLISH_EVERY": "2",
                "RLHF_TRAINER_HELDOUT_PROMPTS": "4",
                "RLHF_TRAINER_REWARD_TOLERANCE": "1000",
            }
        env |= dict(o.extra_env)
        return env

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['gateway']}"

    def address(self, service: str) -> str:
        port = self.ports["canary" if service == "inference-canary" else service]
        return f"127.0.0.1:{port}"

    @property
    def running(self) -> list[str]:
        """The services this stack runs (as the launcher plans them)."""
        wanted = set(self.options.services)
        if self.options.rollout:
            wanted.add("rollout")
            if "inference" in wanted:
                wanted.add("inference-canary")
        return [s for s in SERVICES if s in wanted]

    # -- processes --------------------------------------------------------------------------------

    def start_own_broker(self) -> None:
        from shared.config import KafkaConfig
        from shared.kafka.admin import ensure_topics
        from shared.kafka.embedded import EmbeddedBroker

        self.broker = EmbeddedBroker(port=self.ports["broker"], log_path=self.work / "logs" / "harness-broker.log")
        self.broker.start()
        ensure_topics(KafkaConfig(bootstrap_servers=self.bootstrap))

    def start(self, timeout_s: float = 900.0) -> float:
        """Start `rlhf up` and wait until it printed its banner; returns the seconds it took."""
        self.run_no += 1
        started = time.monotonic()
        log_path = self.work / "logs" / f"rlhf-up-{self.run_no}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(log_path, "ab")  # noqa: SIM115 - the launcher writes to it until stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flywheel.cli", "up"],
            env=self.env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=REPO,
        )
        log(f"rlhf up #{self.run_no} starting ({', '.join(self.running)}; log {log_path})")
        while "Press Ctrl-C to stop." not in log_path.read_text(errors="replace"):
            if self.proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"rlhf up exited with {self.proc.returncode} while starting:\n{tail}")
            if time.monotonic() - started > timeout_s:
                raise RuntimeError(f"rlhf up not up after {timeout_s:.0f} s (log: {log_path})")
            time.sleep(0.5)
        self.tree()
        took = time.monotonic() - started
        log(f"rlhf up #{self.run_no} up in {took:.0f} s")
        return took

    def banner_kafka_line(self) -> str:
        """The Kafka line of the launcher's banner (e.g. "... (tansu, memory only: ...)")."""
        try:
            text = (self.work / "logs" / f"rlhf-up-{self.run_no}.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return next((line.strip() for line in text.splitlines() if line.strip().startswith("kafka ")), "")

    def launcher_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tree(self) -> list[psutil.Process]:
        if self.proc is None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        for p in procs:
            with contextlib.suppress(psutil.Error):
                self._known.setdefault(p.pid, p.create_time())
        return procs

    def process(self, name: str) -> psutil.Process | None:
        """The process of service ``name`` (or "broker": the launcher's tansu) in the launcher's tree,
        the topmost one when a service has children of the same command line."""
        procs = self.tree()
        labelled = {p.pid: label for p in procs if (label := process_label(p))}
        for p in procs:
            if labelled.get(p.pid) != name:
                continue
            with contextlib.suppress(psutil.Error):
                if labelled.get(p.ppid()) != name:
                    return p
        return None

    def pids(self) -> dict[str, int]:
        """The process id of each service running now."""
        out = {}
        for name in self.running:
            p = self.process(name)
            if p is not None:
                out[name] = p.pid
        return out

    def healthy(self, name: str) -> bool:
        from flywheel.launcher import grpc_serving, http_ok

        if name == "gateway":
            return http_ok(self.url + "/healthz")()
        if name == "broker":
            return broker_answers(self.bootstrap)
        return grpc_serving(self.address(name))()

    def all_healthy(self) -> bool:
        return self.launcher_alive() and all(self.healthy(s) for s in self.running)

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM to the launcher (it stops its services), then SIGKILL whatever of its tree is left."""
        self.tree()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log("rlhf up did not stop in time after SIGTERM; killing its processes")
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        for pid, created in self._known.items():
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if abs(p.create_time() - created) < 0.01:
                    p.kill()
        self._known.clear()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.wait(10)
        self.proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def close(self) -> None:
        """stop(), then the harness's broker and the tmpfs."""
        self.stop()
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.fs_root)], capture_output=True)
            self.mounted = False

    def versions(self) -> set[str]:
        try:
            return {e.name for e in os.scandir(self.store_root) if VERSION_DIR.match(e.name)}
        except FileNotFoundError:
            return set()

    def up_restarts(self) -> dict[str, float]:
        """rlhf_up_restarts_total per service from the launcher's /metrics ({} when it has none)."""
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['up_metrics']}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return {}
        out = {}
        for m in re.finditer(r'^rlhf_up_restarts_total\{service="([^"]+)"\} ([0-9.e+]+)$', text, re.M):
            out[m.group(1)] = float(m.group(2))
        return out

    def count_log_lines(self, marker: str) -> dict[str, int]:
        """Per service log (``<service>.log``), the lines that contain ``marker``."""
        out = {}
        for path in sorted((self.work / "logs").glob("*.log")):
            n = sum(marker in line for line in path.read_text(errors="replace").splitlines())
            if n:
                out[path.stem] = n
        return out

    def log_tail(self, name: str, chars: int = 1500) -> str:
        path = self.work / "logs" / f"{name}.log"
        try:
            return path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""


def process_label(p: psutil.Process) -> str | None:
    """ "inference", "inference-canary", "feedback", ... for a service process, "broker" for tansu,
    None for anything else (the launcher, vLLM's helpers)."""
    try:
        cmd = p.cmdline()
    except psutil.Error:
        return None
    if cmd and Path(cmd[0]).name == "tansu":
        return "broker"
    if "-m" in cmd[:-1]:
        module = cmd[cmd.index("-m") + 1]
        if module.startswith("services."):
            name = module.split(".")[1]
            if name == "inference":
                with contextlib.suppress(psutil.Error):
                    if p.environ().get("RLHF_INFERENCE_FOLLOW") == "canary":
                        return "inference-canary"
            return name
    return None


# --- the load -----------------------------------------------------------------------------------------


class Load:
    """Simulated users in threads: chat (n=1 and a thumb, or n=2 and a pairwise choice, by the
    demo's gold rater), rate, repeat. Records what each request got."""

    def __init__(self, url: str, keys: list[tuple[str, str]], seed: int = 0, max_tokens: int = 24):
        from flywheel.demo.users import load_prompts

        self.url = url
        self.keys = keys
        self.seed = seed
        self.max_tokens = max_tokens
        self.prompts = load_prompts()
        self.chats: list[ChatRecord] = []
        self.ratings: list[RatingRecord] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def start(self) -> Load:
        for i, (name, key) in enumerate(self.keys):
            t = threading.Thread(target=self._user, args=(i, name, key), name=f"load-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout_s)

    def snapshot(self) -> tuple[list[ChatRecord], list[RatingRecord]]:
        with self._lock:
            return list(self.chats), list(self.ratings)

    def wait_for_answers(self, n: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            chats, _ = self.snapshot()
            if sum(c.ok for c in chats) >= n:
                return True
            time.sleep(0.5)
        return False

    def wait_for_accepted(self, n: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            _, ratings = self.snapshot()
            if sum(r.accepted for r in ratings) >= n:
                return True
            time.sleep(0.5)
        return False

    def _user(self, i: int, name: str, key: str) -> None:
        import httpx
        import openai

        from flywheel.demo.users import rating_body

        rng = random.Random(self.seed * 1000 + i)
        chat = openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)
        http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        try:
            while not self._stop.is_set():
                kind = "pairwise" if rng.random() < 0.6 else "thumb"
                prompt = rng.choice(self.prompts)
                started = time.monotonic()
                try:
                    r = chat.chat.completions.create(
                        model=MODEL,
                        messages=[{"role": "user", "content": prompt}],
                        n=2 if kind == "pairwise" else 1,
                        max_tokens=self.max_tokens,
                        temperature=1.0,
                    )
                except (openai.APIError, httpx.HTTPError) as exc:
                    with self._lock:
                        self.chats.append(ChatRecord(started, time.monotonic(), False, error=_short(exc)))
                    self._stop.wait(0.5)
                    continue
                extras = [c.model_extra or {} for c in r.choices]
                ids = [e.get("response_id", "") for e in extras]
                with self._lock:
                    self.chats.append(
                        ChatRecord(
                            started, time.monotonic(), True, ids, str((r.model_extra or {}).get("policy_version", ""))
                        )
                    )
                body = rating_body(
                    kind,
                    prompt,
                    [c.message.content or "" for c in r.choices],
                    ids,
                    [e.get("feedback_token", "") for e in extras],
                    name,
                    rng,
                )
                self._rate(http, body)
        finally:
            chat.close()
            http.close()

    def _rate(self, http: Any, body: dict[str, Any]) -> None:
        """POST the rating; 429/503/no answer: again with the same idempotency key (at most 6 tries)."""
        import httpx

        rec = RatingRecord(time.monotonic(), 0.0, 0, attempts=0)
        for attempt in range(6):
            rec.attempts = attempt + 1
            try:
                resp = http.post("/v1/feedback", json=body)
            except httpx.HTTPError as exc:
                rec.status, rec.error = 0, _short(exc)
            else:
                rec.status = resp.status_code
                if resp.status_code < 300:
                    rec.feedback_id = str(resp.json().get("feedback_id", ""))
                    rec.error = ""
                    break
                rec.error = resp.text[:200]
                if resp.status_code not in (429, 503):
                    break
            if self._stop.wait(1.0) and attempt >= 2:
                break
        rec.finished = time.monotonic()
        with self._lock:
            self.ratings.append(rec)


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]


# --- watching the store ---------------------------------------------------------------------------


class VersionWatcher:
    """When each version directory first appeared in the store (polled every ``every_s``)."""

    def __init__(self, run: StackRun, every_s: float = 0.5):
        self.run = run
        self.seen: dict[str, float] = {}
        self.before = run.versions()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(every_s,), name="versions", daemon=True)
        self._thread.start()

    def _poll(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            now = time.monotonic()
            for v in self.run.versions():
                self.seen.setdefault(v, now)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def half_written_versions(store_root: Path) -> list[str]:
    """Version directories a reader can see that are not whole: no readable manifest.json, or a
    file of the manifest missing or of another size. (Left-over ``.tmp-*`` folders are not visible
    versions; ``leftover_tmp`` counts them.)"""
    bad = []
    for e in sorted(os.scandir(store_root), key=lambda e: e.name):
        if not VERSION_DIR.match(e.name):
            continue
        try:
            manifest = json.loads((Path(e.path) / "manifest.json").read_text())
            files = manifest.get("files", {})
            for rel, meta in files.items():
                size = meta.get("bytes") if isinstance(meta, dict) else None
                if size is not None and (Path(e.path) / rel).stat().st_size != size:
                    raise ValueError(rel)
        except (OSError, ValueError, AttributeError):
            bad.append(e.name)
    return bad


def leftover_tmp(store_root: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(store_root) if e.name.startswith(TMP_PREFIX))
    except FileNotFoundError:
        return []


# --- faults ---------------------------------------------------------------------------------------------


@dataclass
class Injected:
    """What a fault did: when (time.monotonic()), what it hit, and what to wait for."""

    at: float
    what: str
    target: str = ""
    """The service whose replacement "service back" waits for ("" for none)."""
    old_pid: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    after: Callable[[], None] | None = None
    """Called once the fault's hold is over (e.g. the store full: free it again)."""
    hold_s: float = 0.0


def kill9(run: StackRun, name: str) -> Injected:
    p = run.process(name)
    if p is None:
        raise RuntimeError(f"no {name} process in the stack")
    p.send_signal(signal.SIGKILL)
    return Injected(time.monotonic(), f"kill -9 {name} (pid {p.pid})", name, p.pid)


def kill_broker(run: StackRun) -> Injected:
    """kill -9 the broker: the launcher's tansu (embedded) or the harness's own (external)."""
    if run.options.broker == "embedded":
        p = run.process("broker")
        if p is None:
            raise RuntimeError("no embedded broker process in the stack")
        pid = p.pid
        p.send_signal(signal.SIGKILL)
    else:
        assert run.broker is not None and run.broker._proc is not None
        pid = run.broker._proc.pid
        os.kill(pid, signal.SIGKILL)
        run.broker._proc.wait()
    return Injected(time.monotonic(), f"kill -9 the broker (pid {pid})", "broker", pid)


@contextlib.contextmanager
def stopped(p: psutil.Process) -> Iterator[None]:
    """``p`` frozen (SIGSTOP) inside the block, running again (SIGCONT) after it."""
    p.suspend()
    try:
        yield
    finally:
        with contextlib.suppress(psutil.Error):
            p.resume()


def _open_inside(pid: int, prefix: str) -> list[str]:
    """Files process ``pid`` has open inside a folder whose path starts with ``prefix`` (from
    /proc/<pid>/fd): a version being copied into ``<store>/.tmp-<id>/``, not the temporary file of
    a line record (``<store>/.tmp-<id>.<record>``, written and renamed in one go)."""
    out = []
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return []
    for fd in fds:
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue
        if target.startswith(prefix) and os.path.dirname(target).startswith(prefix):
            out.append(target)
    return out


def kill_trainer_mid_publish(run: StackRun, timeout_s: float = 240.0) -> Injected:
    """Wait for the trainer to copy a version into the store: while a ``.tmp-*`` folder exists there
    (a publish in progress, shared.model_store), watch the trainer's open files; when one is inside
    that folder, freeze the trainer (SIGSTOP), check it still is, and kill -9 it."""
    store = run.store_root
    inside_prefix = str(store.resolve() / TMP_PREFIX)
    deadline = time.monotonic() + timeout_s
    copies = 0
    first_seen: dict[str, float] = {}
    while time.monotonic() < deadline:
        now = time.monotonic()
        # A folder older than 5 s is left over (a killed publish), not a copy in progress.
        fresh = [n for n in leftover_tmp(store) if now - first_seen.setdefault(n, now) < 5.0]
        if not fresh:
            time.sleep(0.002)
            continue
        trainer = run.process("trainer")
        if trainer is None:
            time.sleep(0.5)
            continue
        copies += 1
        watch_until = now + 5.0  # a copy of this model takes milliseconds
        while time.monotonic() < watch_until and any((store / n).exists() for n in fresh):
            if not _open_inside(trainer.pid, inside_prefix):
                continue
            with stopped(trainer):
                inside = _open_inside(trainer.pid, inside_prefix)
                if inside:
                    trainer.send_signal(signal.SIGKILL)
                    return Injected(
                        time.monotonic(),
                        f"kill -9 trainer (pid {trainer.pid}) while it copied a version into the store",
                        "trainer",
                        trainer.pid,
                        {"writing": sorted(inside), "copies_seen": copies},
                    )
        time.sleep(0.002)
    raise TimeoutError(f"the trainer did not publish within {timeout_s:.0f} s ({copies} copies seen, none its own)")


def _line_state(store_root: Path, line: str) -> tuple[str | None, str | None, bool]:
    """(the line's current pointer, the version of its last announcement, whether acknowledged)."""

    def read(name: str) -> dict[str, Any] | None:
        try:
            doc = json.loads((store_root / f"{line}.{name}").read_bytes())
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    current = read("current")
    announced = read("announced")
    return (
        current.get("version") if current else None,
        announced.get("version") if announced else None,
        bool(announced.get("acked", True)) if announced else False,
    )


def kill_reward_between_publish_and_announce(run: StackRun, timeout_s: float = 300.0) -> Injected:
    """Wait for the reward service to move ``rm.current`` to a new version that is not announced
    (and acknowledged) yet, freeze it (SIGSTOP), check that is still so, kill -9: published, not
    announced. Only a version newer than the one current when the wait began counts."""
    store = run.store_root
    first, _, _ = _line_state(store, "rm")
    deadline = time.monotonic() + timeout_s
    looked = 0
    while time.monotonic() < deadline:
        current, announced, acked = _line_state(store, "rm")
        if current is None or current == first or (current == announced and acked):
            time.sleep(0.001)
            continue
        reward = run.process("reward")
        if reward is None:
            time.sleep(0.5)
            continue
        looked += 1
        with stopped(reward):
            current, announced, acked = _line_state(store, "rm")
            if not (current == announced and acked):
                reward.send_signal(signal.SIGKILL)
                return Injected(
                    time.monotonic(),
                    f"kill -9 reward (pid {reward.pid}) after publishing {current}, before announcing it",
                    "reward",
                    reward.pid,
                    {"published": current, "last_announced": announced, "acked": acked, "windows_looked_at": looked},
                )
        first = current
        time.sleep(0.02)
    raise TimeoutError(f"no reward model published within {timeout_s:.0f} s ({looked} windows seen, all closed)")


def fill_up(path: Path) -> int:
    """Write zeros to ``path`` until its filesystem has no byte left (ENOSPC), in ever smaller
    writes so that the last partly used block is taken too; returns the bytes written."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 1 << 9, 1):
            buf = b"\0" * size
            while True:
                try:
                    n = os.write(fd, buf)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
                written += n
                if n < size:
                    break
    finally:
        os.close(fd)
    return written


def fill_store(run: StackRun, hold_s: float) -> Injected:
    """The model store full for ``hold_s`` seconds, then freed.

    On a tmpfs (StackOptions.store_on_tmpfs, root): a filler file takes every free byte, so every
    write to the store fails with ENOSPC, as on a full disk. Without one: RLIMIT_FSIZE of the
    trainer and reward processes (and their replacements while it lasts) set to 64 KiB, so every
    write past 64 KiB in a file fails with EFBIG (Python ignores SIGXFSZ): a quota per file,
    the nearest honest emulation without root."""
    if run.mounted:
        filler = run.fs_root / "filler"
        fill_up(filler)
        free = shutil.disk_usage(run.fs_root).free

        def free_it() -> None:
            filler.unlink(missing_ok=True)

        return Injected(
            time.monotonic(),
            f"model store full: tmpfs of {run.options.tmpfs_mib} MiB filled ({free} bytes free), ENOSPC for {hold_s:.0f} s",
            details={"mode": "tmpfs ENOSPC", "free_bytes": free},
            after=free_it,
            hold_s=hold_s,
        )
    limit = 64 * 1024
    stop = threading.Event()
    limited: dict[int, str] = {}

    def apply() -> None:
        while not stop.is_set():
            for name in ("trainer", "reward"):
                p = run.process(name)
                if p is not None and p.pid not in limited:
                    with contextlib.suppress(psutil.Error):
                        p.rlimit(psutil.RLIMIT_FSIZE, (limit, psutil.RLIM_INFINITY))
                        limited[p.pid] = name
            stop.wait(0.5)

    thread = threading.Thread(target=apply, name="fsize", daemon=True)
    thread.start()

    def lift() -> None:
        stop.set()
        thread.join(5)
        for pid in limited:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).rlimit(psutil.RLIMIT_FSIZE, (psutil.RLIM_INFINITY, psutil.RLIM_INFINITY))

    return Injected(
        time.monotonic(),
        f"model store full: RLIMIT_FSIZE {limit} B on trainer and reward (EFBIG) for {hold_s:.0f} s",
        details={"mode": "RLIMIT_FSIZE EFBIG", "limit_bytes": limit, "limited": limited},
        after=lift,
        hold_s=hold_s,
    )


def poison_completions(run: StackRun) -> Injected:
    n = produce_raw(run.bootstrap, "rlhf.completions", POISON_RECORDS)
    return Injected(time.monotonic(), f"{n} poison records on rlhf.completions", details={"records": n})


@dataclass(frozen=True)
class Fault:
    name: str
    description: str
    inject: Callable[[StackRun], Injected]
    needs: tuple[str, ...] = ()
    """Services the stack must run for this fault."""
    broker: str = "external"
    tmpfs: bool = False
    kafka_intact: bool = True
    """Whether Kafka's storage survives the fault (then zero accepted ratings may be lost)."""
    owner: str = ""
    """The part that owns a failure of this fault (issue #17's parts)."""
    log_marker: str = ""
    """Count the services' log lines containing this after the fault (e.g. records skipped)."""


def _kill(name: str) -> Callable[[StackRun], Injected]:
    return lambda run: kill9(run, name)


FAULTS: dict[str, Fault] = {
    f.name: f
    for f in [
        *(
            Fault(f"kill-{s}", f"kill -9 of the {s} service", _kill(s), needs=needs, owner="S1 (supervisor)")
            for s, needs in (
                ("feedback", ("feedback",)),
                ("gateway", ("gateway",)),
                ("inference", ("inference",)),
                ("reward", ("reward",)),
                ("trainer", ("trainer",)),
                ("rollout", ("rollout",)),
                ("inference-canary", ("inference", "rollout")),
            )
        ),
        Fault(
            "trainer-mid-publish",
            "trainer killed while it copies a version into the store",
            kill_trainer_mid_publish,
            needs=("trainer",),
            owner="S2 (restart-safe state) / S1",
        ),
        Fault(
            "reward-publish-announce",
            "reward service killed after publishing an RM, before announcing it",
            kill_reward_between_publish_and_announce,
            needs=("reward",),
            owner="S2 (restart-safe state) / S1",
        ),
        Fault(
            "store-full",
            "model store full for a while, then freed",
            lambda run: fill_store(run, 60.0),
            needs=("trainer", "reward"),
            tmpfs=True,
            owner="S4 (retention) / trainer and reward publishing",
        ),
        Fault(
            "poison-completions",
            "undecodable and ill-typed records on rlhf.completions",
            poison_completions,
            owner="S2 (readers)",
            log_marker="skipping bad record",
        ),
        Fault(
            "broker-restart",
            "the embedded broker killed (kill -9) and restarted",
            kill_broker,
            broker="embedded",
            kafka_intact=False,
            owner="S1 (supervisor, durable broker)",
        ),
    ]
}


# --- one fault run ----------------------------------------------------------------------------------


@dataclass
class FaultReport:
    fault: str
    description: str
    injected: str = ""
    kafka_intact: bool = True
    stack_start_s: float = 0.0
    ratings_accepted: int = 0
    ratings_lost: int = 0
    lost_by_phase: dict[str, dict[str, int]] = field(default_factory=dict)
    ratings_not_accepted: int = 0
    chats_answered: int = 0
    chats_failed_after_fault: int = 0
    completion_events_lost: int = 0
    recover_s: float | None = None
    steady_s: float | None = None
    """Seconds until chats stopped failing (``seconds_to_steady``)."""
    service_back_s: float | None = None
    recovered_by: str = ""
    """"not needed" (the launcher kept running and the killed part came back or was not needed),
    "supervisor", "manual restart" (the harness ran `rlhf up` again), "harness broker restart",
    or "" (did not recover)."""
    launcher_survived: bool = True
    learned: bool | None = None
    """A new rm or policy version after recovery within ``learn_wait_s``; None: not checked."""
    learned_version: str = ""
    learned_after_s: float | None = None
    learn_wait_s: float = 0.0
    new_versions: dict[str, list[Any] | None] = field(default_factory=dict)
    """Per line ("rm", "policy"): [the first new version after recovery, seconds after it], or
    None when none came within ``learn_wait_s``."""
    others_restarted: list[str] = field(default_factory=list)
    """Services other than the one hit whose process changed (or vanished) during the fault: a crash
    (not checked after a manual restart, which replaces them all)."""
    half_written_versions: list[str] = field(default_factory=list)
    leftover_tmp: list[str] = field(default_factory=list)
    poison_records_on_topic: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Timings:
    warmup_s: float = 20.0
    """Load before the fault (after the first answered chat)."""
    min_accepted_before: int = 0
    """And at least this many ratings accepted before the fault (a slow machine takes longer)."""
    completions_grace_s: float = 30.0
    """Completion events reach Kafka through an outbox, after the answer: how long the accounting
    re-reads rlhf.completions while some are still missing."""
    after_s: float = 30.0
    """Load after the fault at least."""
    after_recovery_s: float = 10.0
    """Load after recovery at least (ratings accepted then must be kept too)."""
    recover_timeout_s: float = 120.0
    """How long the stack may take to answer chats again before the harness restarts `rlhf up`
    (when the launcher gave up) or gives up."""
    supervisor_grace_s: float = 20.0
    """How long to wait for the launcher to restart a killed broker before the harness does."""
    learn_wait_s: float = 180.0
    """How long to wait for a new rm/policy version after recovery (0: not checked)."""
    manual_restart: bool = True


def run_fault(run: StackRun, fault: Fault, t: Timings) -> FaultReport:
    """One fault on a started stack, under load; the stack is left as the fault left it."""
    rep = FaultReport(fault.name, fault.description, kafka_intact=fault.kafka_intact)
    if fault.broker == "embedded":
        # What rlhf up promises about its broker: memory only (a restart loses every record) or not.
        banner = run.banner_kafka_line()
        rep.details["broker_banner"] = banner
        rep.kafka_intact = fault.kafka_intact or "memory only" not in banner
    load = Load(run.url, run.keys, seed=sum(fault.name.encode())).start()
    watcher = VersionWatcher(run)
    inj: Injected | None = None
    recovered_at: float | None = None
    try:
        if not load.wait_for_answers(1, 180):
            raise RuntimeError("no chat answered before the fault")
        time.sleep(t.warmup_s)
        if not load.wait_for_accepted(t.min_accepted_before, 180):
            raise RuntimeError(f"fewer than {t.min_accepted_before} ratings accepted before the fault")
        pids_before = run.pids()
        inj = fault.inject(run)
        rep.injected = inj.what
        rep.details |= inj.details
        log(f"{fault.name}: {inj.what}")
        since = inj.at
        if inj.after is not None:
            end = inj.at + inj.hold_s
            while time.monotonic() < end and run.launcher_alive():
                time.sleep(0.5)
            if not run.launcher_alive():
                rep.notes.append(f"rlhf up stopped the stack {time.monotonic() - inj.at:.0f} s into the fault")
            rep.half_written_versions = half_written_versions(run.store_root)
            inj.after()
            since = time.monotonic()
            rep.notes.append(f"held {since - inj.at:.0f} s, then freed; recovery and learning counted from then")
        recovered_at, back_at = _await_recovery(run, load, inj, t, rep, since)
        rep.recover_s = seconds_to_recover(inj.at, load.snapshot()[0])
        rep.service_back_s = round(back_at - inj.at, 2) if back_at else None
        rest = max(inj.at + t.after_s, (recovered_at or 0.0) + t.after_recovery_s) - time.monotonic()
        if rest > 0:
            time.sleep(rest)
        if t.learn_wait_s > 0 and recovered_at is not None:
            # Both lines are waited for (within the bound): a new policy alone may come from a
            # trainer that kept going on an RM that no longer learns.
            rep.learn_wait_s = t.learn_wait_s
            deadline = time.monotonic() + t.learn_wait_s
            found: dict[str, tuple[str, float] | None] = {}
            while time.monotonic() < deadline:
                for line in ("rm", "policy"):
                    seen = {v: at for v, at in watcher.seen.items() if v.startswith(line + "-")}
                    found[line] = first_new_version(seen, watcher.before, recovered_at)
                if all(found.values()):
                    break
                time.sleep(1.0)
            for line, hit in found.items():
                rep.new_versions[line] = [hit[0], round(hit[1] - recovered_at, 1)] if hit else None
            first = min((hit for hit in found.values() if hit), key=lambda h: h[1], default=None)
            rep.learned = first is not None
            if first:
                rep.learned_version = first[0]
                rep.learned_after_s = round(first[1] - recovered_at, 1)
        if fault.log_marker:
            rep.details["log_lines"] = run.count_log_lines(fault.log_marker)
        owed = rep.details.get("published")
        if fault.name == "reward-publish-announce" and owed:
            announced, _ = payload_ids(read_topic(run.bootstrap, "rlhf.reward-models"), "version")
            rep.details["announced_after_restart"] = owed in announced
        if not run.launcher_alive():
            rep.launcher_survived = False
        if rep.recovered_by != "manual restart":
            after = run.pids()
            rep.others_restarted = sorted(
                s for s, pid in pids_before.items() if s != inj.target and after.get(s) != pid
            )
    except Exception as exc:  # noqa: BLE001 - a fault that breaks the harness is a finding, reported
        rep.error = _short(exc)
        log(f"{fault.name}: {rep.error}")
    finally:
        load.stop()
        watcher.stop()
    time.sleep(3.0)  # the outboxes flush what the last answers produced
    _account(run, load, rep, inj.at if inj else time.monotonic(), recovered_at, t.completions_grace_s)
    rep.leftover_tmp = leftover_tmp(run.store_root)
    rep.details["up_restarts_total"] = run.up_restarts()
    if not rep.half_written_versions:
        rep.half_written_versions = half_written_versions(run.store_root)
    return rep


def _await_recovery(
    run: StackRun, load: Load, inj: Injected, t: Timings, rep: FaultReport, since: float
) -> tuple[float | None, float | None]:
    """Wait until a chat sent after ``since`` is answered and the part hit is healthy again (a new
    process for a killed service). Restarts `rlhf up` once when the launcher gave up (a manual
    restart), and a killed broker that the launcher does not bring back. Returns (recovered at,
    service back at), both time.monotonic()."""
    deadline = since + t.recover_timeout_s
    back_at: float | None = None
    restarted_launcher = restarted_broker = False
    while True:
        now = time.monotonic()
        chats, _ = load.snapshot()
        answered = [c.finished for c in chats if c.ok and c.started >= since]
        if back_at is None and inj.target:
            if inj.target == "broker":
                if port_open(run.bootstrap) and broker_answers(run.bootstrap, topic=None):
                    back_at = now
                    rep.details["topics_after_broker_restart"] = broker_answers(run.bootstrap)
            else:
                p = run.process(inj.target)
                if p is not None and p.pid != inj.old_pid and run.healthy(inj.target):
                    back_at = now
        if not run.launcher_alive():
            rep.launcher_survived = False
            if restarted_launcher or not t.manual_restart:
                rep.notes.append("rlhf up stopped the stack")
                return None, back_at
            rep.notes.append("rlhf up stopped the stack; the harness started it again")
            run.stop()
            restarted_launcher = True
            run.start()
            rep.recovered_by = "manual restart"
            deadline = time.monotonic() + t.recover_timeout_s
            continue
        if inj.target == "broker" and back_at is None and not restarted_broker and not port_open(run.bootstrap):
            external = run.options.broker == "external"
            if external or now - inj.at > t.supervisor_grace_s:
                if not external:
                    rep.notes.append(
                        f"rlhf up did not restart its broker within {t.supervisor_grace_s:.0f} s; the harness did"
                    )
                run.start_own_broker()  # same port, topics created again
                restarted_broker = True
                rep.recovered_by = "harness broker restart"
        if answered and (not inj.target or back_at is not None):
            if not rep.recovered_by:
                rep.recovered_by = "supervisor" if inj.target else "not needed"
            return max(min(answered), back_at or 0.0), back_at
        if now > deadline:
            rep.notes.append(f"not recovered within {t.recover_timeout_s:.0f} s")
            return None, back_at
        time.sleep(0.25)


def _account(
    run: StackRun, load: Load, rep: FaultReport, fault_at: float, recovered_at: float | None, grace_s: float = 0.0
) -> None:
    chats, ratings = load.snapshot()
    rep.chats_answered = sum(c.ok for c in chats)
    rep.chats_failed_after_fault = failed_chats(chats, fault_at)
    rep.steady_s = seconds_to_steady(fault_at, chats)
    rep.details["failed_chats_at_s"] = [round(c.started - fault_at, 1) for c in chats if not c.ok]
    rep.ratings_accepted = sum(r.accepted for r in ratings)
    rep.ratings_not_accepted = sum(not r.accepted for r in ratings)
    try:
        feedback_ids, _ = payload_ids(read_topic(run.bootstrap, "rlhf.feedback"), "feedback_id")
        completion_values = read_topic(run.bootstrap, "rlhf.completions")
    except Exception as exc:  # noqa: BLE001 - a broker that cannot be read: everything counts as lost
        rep.notes.append(f"the broker could not be read: {_short(exc)}")
        feedback_ids, completion_values = set(), []
    response_ids, rep.poison_records_on_topic = payload_ids(completion_values, "response_id")
    rep.ratings_lost = len(lost_ids((r.feedback_id for r in ratings if r.accepted), feedback_ids))
    rep.lost_by_phase = lost_by_phase(ratings, feedback_ids, fault_at, recovered_at)
    served = [rid for c in chats if c.ok for rid in c.response_ids if rid]
    missing = lost_ids(served, response_ids)
    deadline = time.monotonic() + grace_s
    while missing and time.monotonic() < deadline:
        time.sleep(2.0)
        with contextlib.suppress(Exception):
            response_ids, rep.poison_records_on_topic = payload_ids(
                read_topic(run.bootstrap, "rlhf.completions"), "response_id"
            )
        missing = lost_ids(served, response_ids)
    rep.completion_events_lost = len(missing)


def verdict(rep: FaultReport) -> list[str]:
    """What failed issue #17's targets: ratings lost with Kafka intact (or, broker restarted, lost
    after recovery), no recovery, the launcher giving up, no learning, half-written versions."""
    out = []
    if rep.error:
        out.append(f"harness error: {rep.error}")
    if rep.kafka_intact and rep.ratings_lost:
        out.append(f"{rep.ratings_lost} accepted ratings lost")
    if not rep.kafka_intact and rep.lost_by_phase.get("after", {}).get("lost"):
        out.append(f"{rep.lost_by_phase['after']['lost']} ratings accepted after the restart lost")
    if not rep.launcher_survived:
        out.append("rlhf up stopped the whole stack")
    if rep.recover_s is None:
        out.append("no chat answered after the fault")
    if not rep.recovered_by and not rep.error:
        out.append("the part hit did not come back")
    if rep.learned is False:
        out.append(f"no new version within {rep.learn_wait_s:.0f} s after recovery")
    if rep.details.get("announced_after_restart") is False:
        out.append(f"{rep.details.get('published')} was never announced")
    if rep.others_restarted:
        out.append(f"other services died meanwhile: {', '.join(rep.others_restarted)}")
    if rep.half_written_versions:
        out.append(f"half-written versions visible: {rep.half_written_versions}")
    return out


def table(reports: list[FaultReport]) -> str:
    """The fault table: one line per fault."""
    head = (
        f"{'fault':<26}{'accepted':>9}{'lost':>6}{'chat fail':>10}{'recover s':>10}{'steady s':>9}{'back s':>8}"
        f"{'compl lost':>11}  {'recovered by':<24}{'learned':<22}{'verdict'}"
    )
    lines = [head, "-" * len(head)]
    for r in reports:
        learned = "-" if r.learned is None else _learned(r)
        problems = verdict(r)
        lines.append(
            f"{r.fault:<26}{r.ratings_accepted:>9}{r.ratings_lost:>6}{r.chats_failed_after_fault:>10}"
            f"{_fmt(r.recover_s):>10}{_fmt(r.steady_s):>9}{_fmt(r.service_back_s):>8}{r.completion_events_lost:>11}  "
            f"{r.recovered_by or 'none':<24}{learned:<22}{'ok' if not problems else '; '.join(problems)}"
        )
    return "\n".join(lines)


def _learned(r: FaultReport) -> str:
    """ "rm +12s policy +3s" (seconds after recovery to each line's first new version), "no rm"."""
    parts = []
    for line in ("rm", "policy"):
        hit = r.new_versions.get(line)
        parts.append(f"{line} +{hit[1]:.0f}s" if hit else f"no {line}")
    return " ".join(parts)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def options_for(fault: Fault, base: StackOptions, tmpfs_ok: bool) -> StackOptions:
    """The stack a fault runs on: ``base`` with the services it needs, its broker, a tmpfs store."""
    from dataclasses import replace

    wanted = {*base.services, *(n for n in fault.needs if n != "rollout")}
    for service, needs in SERVICE_NEEDS.items():
        if service in wanted:
            wanted.update(needs)
    services = tuple(s for s in UP_SERVICES if s in wanted)
    return replace(
        base,
        services=services,
        rollout=base.rollout or "rollout" in fault.needs,
        broker=fault.broker,
        store_on_tmpfs=base.store_on_tmpfs or (fault.tmpfs and tmpfs_ok),
    )


def can_mount_tmpfs() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount") is not None
