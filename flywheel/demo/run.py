"""`rlhf demo`: simulated users chat with the loop and rate it; a report shows what the loop learned.

    rlhf demo                                   # bootstrap if needed, bring the stack up, 20 minutes
    RLHF_DEMO_DURATION_S=300 rlhf demo          # shorter
    RLHF_DEMO_GATEWAY_URL=http://127.0.0.1:8000 rlhf demo    # attach to a running `rlhf up`

It

1. bootstraps the model store when it has no policy (flywheel/bootstrap/pipeline.py: pretrain, SFT, first RM);
2. brings the stack up (flywheel.launcher.Stack: broker, inference, reward, feedback, trainer, gateway,
   and with canaries on, the default, the rollout service and a canary inference engine), or
   attaches to a running one at ``gateway_url``;
3. runs ``users`` simulated users (users.py) for ``duration_s``, printing a live progress line;
   the trainer's status (PPO step, mean reward, KL, every gate decision) is polled over gRPC;
4. reads the rollout decisions off rlhf.rollout (canaries.py);
5. optionally evaluates the first policy against the current one on held-out prompts (evaluate.py);
6. writes the report folder (report.py): report.md, PNG plots, data.json, interactions.jsonl.

**Canaries in a demo.** Each version the trainer's gate passes is first a canary for a share of the
conversations, and becomes the stable version only when the live gate concludes it is no worse
(services/rollout). With 4 users (about 4 chats a second) the production defaults (10% share, a
5-point margin) would need hours of ratings per decision, so the demo sets its own: 30% of the
conversations, a 20-point margin, 10 minutes before a canary without a conclusion is rolled back
(RLHF_DEMO_CANARY_*; docs/benchmarks.md has what they gave). A canary much worse than the stable
version is still rolled back within a minute or two.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from flywheel.demo.users import (
    PROMPTS,
    Interaction,
    UserMix,
    load_prompts,
    make_user_keys,
    parse_user_keys,
    run_users,
)
from shared.config import ConfigBase, KafkaConfig, ModelStoreConfig, OperatorConfig, load_config
from shared.grpc_channels import ClientCredentials, sync_channel
from shared.logging import get_logger, log_event
from shared.model_store import ModelStore

if TYPE_CHECKING:
    from flywheel.launcher import Stack

log = get_logger(__name__)


@dataclass(frozen=True)
class DemoConfig(ConfigBase):
    """Settings of `rlhf demo` (RLHF_DEMO_*)."""

    ENV_PREFIX: ClassVar[str] = "RLHF_DEMO_"

    model_store: ModelStoreConfig = dataclasses.field(default_factory=ModelStoreConfig)
    """The model store of the loop (RLHF_MODEL_STORE_*): versions for the report, bootstrap target."""
    gateway_url: str = ""
    """Base URL of a running gateway to attach to (e.g. http://127.0.0.1:8000); empty: bring the stack up."""
    api_keys: str = ""
    """The simulated users' gateway keys as `name:key` pairs (RLHF_GATEWAY_API_KEYS's format): user i
    takes pair i, whose name is its principal. Empty: when the demo brings the stack up it makes a
    key per user (sim-user-<i>); when attaching, each user opens an anonymous session of its own
    (the gateway needs RLHF_GATEWAY_ANONYMOUS=1, as `rlhf up` sets it on loopback)."""
    trainer_address: str = "127.0.0.1:50054"
    """host:port of the trainer's gRPC service when attaching, polled for PPO step, mean reward and KL; empty:
    not polled. When the demo brings the stack up it polls the trainer it started."""
    duration_s: float = 1200.0
    """How long the simulated users chat and rate."""
    users: int = 4
    """Concurrent simulated users."""
    mix_thumb: float = 0.4
    """Share of interactions rated with a thumb."""
    mix_likert: float = 0.2
    """Share rated on the 1-7 Likert scale."""
    mix_pairwise: float = 0.2
    """Share rated as a pairwise choice between two responses (n=2)."""
    mix_ranking: float = 0.2
    """Share rated as a ranking of three responses (n=3)."""
    temperature: float = 1.0
    """Sampling temperature the users ask for (1: the policy's own distribution)."""
    max_tokens: int = 48
    """Most tokens per response."""
    prompts_file: Path = PROMPTS
    """JSONL prompts the users ask ({"messages": [...]} per line); also the trainer's prompt file when the
    demo brings the stack up."""
    report_dir: Path = Path("var/demo-report")
    """Where report.md and the plots go."""
    progress_every_s: float = 10.0
    """Seconds between live progress lines."""
    evaluate: bool = True
    """After the run, compare the first policy with the current one on held-out prompts (rlhf eval)."""
    eval_samples: int = 2
    """Responses per held-out prompt and version in that evaluation."""
    bootstrap_quick: bool = False
    """When the store is empty, bootstrap with a few steps only (tests; the policy will be poor)."""
    ppo_lr: float = 5e-5
    """RLHF_PPO_LR given to the trainer the demo starts (a tiny model needs more than the default)."""
    kl_coef: float = 0.2
    """RLHF_PPO_KL_COEF given to the trainer the demo starts. The RM judges style far better than sums:
    with 0.05 and lr 1e-4 PPO learned the style quickly but let the sums drift, and the gold thumbs-up
    rate fell (see docs/benchmarks.md); a stronger pull to the SFT model keeps the digits it got right."""
    average_decay: float = 0.98
    """RLHF_PPO_AVERAGE_DECAY given to the trainer the demo starts: it publishes a moving average of its
    weights (services/trainer/weight_average.py): a steadier served policy, far closer to the reference
    for the same learning (docs/benchmarks.md, "Publishing an average of the weights"); 0 = off."""
    publish_every: int = 5
    """RLHF_TRAINER_PUBLISH_EVERY given to the trainer the demo starts."""
    rm_learn_every_s: float = 60.0
    """RLHF_REWARD_LEARN_EVERY_S given to the reward service the demo starts."""
    seed: int = 0
    """Seed of the users' choices."""
    until_new_versions: bool = False
    """Stop before duration_s once a new RM version and a new policy version have been published and the
    new policy has served a user (a smoke test of the loop; duration_s is then the cap)."""
    canaries: bool = True
    """Run the stack with progressive rollout (RLHF_UP_ROLLOUT): each new version is a canary first."""
    canary_share: float = 0.3
    """RLHF_ROLLOUT_CANARY_SHARE given to the rollout service the demo starts (share of conversations)."""
    canary_margin: float = 0.2
    """RLHF_ROLLOUT_MARGIN given to it: how much worse (thumbs-up rate, Likert, side by side) a canary
    may be and still be promoted. Loose because 4 users rate too little for a tight one in minutes."""
    canary_timeout_s: float = 600.0
    """RLHF_ROLLOUT_TIMEOUT_S given to it: a canary without a conclusion is rolled back after this."""
    canary_min_ratings: int = 30
    """RLHF_ROLLOUT_MIN_RATINGS given to it: ratings of a canary before it may be promoted."""
    trusted_raters: bool = True
    """The simulated users are a closed set of trusted raters (the hidden gold rater), so the
    per-principal caps are off in the services the demo starts (RLHF_REWARD_MAX_PRINCIPAL_SHARE=1,
    RLHF_TRAINER_MAX_PRINCIPAL_SHARE=1). The caps keep a few principals from outweighing the crowd
    of an open system; with 4 raters they keep RLHF_REWARD_MIN_PRINCIPAL_CAP (8) comparisons each per
    round, 32 of the ~300 the users give a minute, and the RM's gate then judges on a held-out
    slice too small to tell versions apart. Set 0 to run the demo with the caps of an open system."""
    kafka: KafkaConfig = dataclasses.field(default_factory=KafkaConfig)
    """The broker (RLHF_KAFKA_*) the report reads the rollout decisions from when attaching; when the
    demo brings the stack up, its own broker."""

    def problems(self) -> list[str]:
        out = []
        if self.duration_s <= 0 or self.users < 1:
            out.append("RLHF_DEMO_DURATION_S must be positive and RLHF_DEMO_USERS at least 1")
        if (
            min(self.mix_thumb, self.mix_likert, self.mix_pairwise, self.mix_ranking) < 0
            or self.mix_thumb + self.mix_likert + self.mix_pairwise + self.mix_ranking <= 0
        ):
            out.append("RLHF_DEMO_MIX_* must be non-negative and not all zero")
        if not Path(self.prompts_file).is_file():
            out.append(f"RLHF_DEMO_PROMPTS_FILE {self.prompts_file} does not exist")
        if not 0.0 <= self.average_decay < 1.0:
            out.append("RLHF_DEMO_AVERAGE_DECAY must be in [0, 1) (0: publish the weights trained)")
        if not 0.0 < self.canary_share < 1.0:
            out.append("RLHF_DEMO_CANARY_SHARE must be in (0, 1)")
        if self.canary_margin < 0 or self.canary_timeout_s <= 0 or self.canary_min_ratings < 1:
            out.append(
                "RLHF_DEMO_CANARY_MARGIN must not be negative, RLHF_DEMO_CANARY_TIMEOUT_S must be positive "
                "and RLHF_DEMO_CANARY_MIN_RATINGS at least 1"
            )
        if self.api_keys:
            try:
                keys = parse_user_keys(self.api_keys)
            except ValueError as exc:
                out.append(f"RLHF_DEMO_API_KEYS: {exc}")
            else:
                if len(keys) < self.users:
                    out.append(f"RLHF_DEMO_API_KEYS has {len(keys)} keys for RLHF_DEMO_USERS={self.users} users")
        return out

    @property
    def mix(self) -> UserMix:
        return UserMix(self.mix_thumb, self.mix_likert, self.mix_pairwise, self.mix_ranking)


# --- the stack -----------------------------------------------------------------------------------


def stack_environ(cfg: DemoConfig, environ: dict[str, str]) -> dict[str, str]:
    """Environment for the services the demo starts: the demo's prompts and learning pace unless set."""
    env = dict(environ)
    env.setdefault("RLHF_MODEL_STORE_ROOT", str(cfg.model_store.root))
    env.setdefault("RLHF_TRAINER_PROMPT_FILE", str(Path(cfg.prompts_file).resolve()))
    env.setdefault("RLHF_PPO_LR", str(cfg.ppo_lr))
    env.setdefault("RLHF_PPO_KL_COEF", str(cfg.kl_coef))
    env.setdefault("RLHF_PPO_AVERAGE_DECAY", str(cfg.average_decay))
    env.setdefault("RLHF_TRAINER_PUBLISH_EVERY", str(cfg.publish_every))
    env.setdefault("RLHF_REWARD_LEARN_EVERY_S", str(cfg.rm_learn_every_s))
    env.setdefault("RLHF_UP_ROLLOUT", "1" if cfg.canaries else "0")
    if cfg.trusted_raters:
        env.setdefault("RLHF_REWARD_MAX_PRINCIPAL_SHARE", "1")
        env.setdefault("RLHF_TRAINER_MAX_PRINCIPAL_SHARE", "1")
    if cfg.canaries:
        env.setdefault("RLHF_ROLLOUT_CANARY_SHARE", str(cfg.canary_share))
        env.setdefault("RLHF_ROLLOUT_MARGIN", str(cfg.canary_margin))
        env.setdefault("RLHF_ROLLOUT_TIMEOUT_S", str(cfg.canary_timeout_s))
        env.setdefault("RLHF_ROLLOUT_MIN_RATINGS", str(cfg.canary_min_ratings))
    # The services' log lines go to files, so that the demo's progress line stands alone.
    env.setdefault("RLHF_UP_LOG_DIR", str(Path(cfg.report_dir) / "service-logs"))
    return env


def start_stack(cfg: DemoConfig, environ: dict[str, str]) -> Stack:
    """flywheel.launcher.Stack (broker, inference, reward, feedback, trainer, gateway), started; its
    gateway knows the users' keys (RLHF_DEMO_API_KEYS, else a fresh one per user: user_keys_of)."""
    from flywheel.launcher import Stack, UpConfig

    env = stack_environ(cfg, environ)
    keys = cfg.api_keys or ",".join(f"{name}:{key}" for name, key in make_user_keys(cfg.users))
    given = env.get("RLHF_GATEWAY_API_KEYS", "")
    env["RLHF_GATEWAY_API_KEYS"] = f"{given},{keys}" if given else keys
    env[USER_KEYS_VARIABLE] = keys
    stack = Stack(load_config(UpConfig, env), env)
    try:
        stack.start()
    except BaseException:
        stack.stop()
        raise
    return stack


USER_KEYS_VARIABLE = "RLHF_DEMO_API_KEYS"


def user_keys_of(stack: Stack) -> list[tuple[str, str]]:
    """The simulated users' keys a stack started by ``start_stack`` knows."""
    return parse_user_keys(stack.environ[USER_KEYS_VARIABLE])


def trainer_address_of(stack: Stack) -> str:
    from services.trainer.config import TrainerConfig

    tc = load_config(TrainerConfig, stack.environ)
    return f"{tc.host}:{tc.grpc_port}"


def gateway_url_of(stack: Stack) -> str:
    from services.gateway.config import GatewayConfig

    gw = load_config(GatewayConfig, stack.environ)
    return f"http://{gw.host}:{gw.port}"


def metrics_texts_of(stack: Stack) -> dict[str, str]:
    """The /metrics texts of the reward service, the trainer and the gateway (for the report's limits
    per principal); a service whose metrics cannot be read is left out."""
    import urllib.request

    from services.gateway.config import GatewayConfig
    from services.reward.config import RewardConfig
    from services.trainer.config import TrainerConfig

    def local(host: str) -> str:
        return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host

    urls = {}
    for name, cls in (("reward", RewardConfig), ("trainer", TrainerConfig)):
        c = load_config(cls, stack.environ)
        if c.metrics_port:
            urls[name] = f"http://{local(c.host)}:{c.metrics_port}/metrics"
    gw = load_config(GatewayConfig, stack.environ)
    port = getattr(gw, "metrics_port", 0)
    urls["gateway"] = f"http://{local(gw.host)}:{port}/metrics" if port else f"{gateway_url_of(stack)}/metrics"
    texts = {}
    for name, url in urls.items():
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                texts[name] = resp.read().decode()
        except OSError as exc:
            log_event(log, "could not read a service's metrics for the report", service=name, url=url, error=str(exc))
    return texts


# --- watching the trainer ----------------------------------------------------------------------------


MAX_GATES = 10_000
"""Gate decisions a TrainerWatcher keeps (a 20-minute demo makes about a hundred)."""


def gate_record(gate: Any, t: float) -> dict[str, Any]:
    """A trainer PublishResult as the report keeps it (``rollback``: an operator's rollback, not a
    candidate's evaluation)."""
    return {
        "t": t,
        "step": int(gate.step),
        "published": gate.published,
        "rollback": gate.published and gate.reason.startswith("rolled back"),
        "version": gate.version.version,
        "reason": gate.reason,
        "refused_by": gate.refused_by,
        "compared": gate.compared,
        "same_as_baseline": gate.same_as_baseline,
        "heldout_reward": gate.heldout_reward,
        "baseline_reward": gate.baseline_reward,
        "kl": gate.kl,
        "guards": [
            {
                "name": g.name,
                "passed": g.passed,
                "value": g.value,
                "baseline": g.baseline if g.HasField("baseline") else None,
            }
            for g in gate.guards
        ],
    }


class TrainerWatcher:
    """Polls TrainerService.Status; keeps one sample per PPO step (step, mean reward, KL, entropy) and
    every gate decision it sees (at most MAX_GATES; a decision replaced within one poll is missed,
    which the trainer's own counters in the report do not miss)."""

    def __init__(
        self, address: str, started_at: float, every_s: float = 2.0, credentials: ClientCredentials | None = None
    ):
        self.address = address
        self.credentials = credentials
        """An operator's credentials (Status needs one); None: from RLHF_OPERATOR_* (var/operator-token)."""
        self.started_at = started_at
        self.every_s = every_s
        self.samples: list[dict] = []
        self.gates: list[dict[str, Any]] = []
        self.latest = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trainer-watcher", daemon=True)

    def start(self) -> TrainerWatcher:
        if self.address:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        import grpc

        from shared.pb import trainer_pb2, trainer_pb2_grpc

        creds = self.credentials or ClientCredentials.of_operator(load_config(OperatorConfig))
        with sync_channel(self.address, creds) as channel:
            stub = trainer_pb2_grpc.TrainerServiceStub(channel)
            while not self._stop.wait(self.every_s):
                try:
                    status = stub.Status(trainer_pb2.StatusRequest(), timeout=5)
                except grpc.RpcError:
                    continue
                self.latest = status
                self._note_gate(status)
                if status.step and (not self.samples or status.step > self.samples[-1]["step"]):
                    self.samples.append(
                        {
                            "t": time.time() - self.started_at,
                            "step": int(status.step),
                            "mean_reward": status.mean_reward,
                            "kl": status.kl,
                            "entropy": status.entropy,
                        }
                    )

    def _note_gate(self, status: Any) -> None:
        if not status.HasField("last_gate") or len(self.gates) >= MAX_GATES:
            return
        gate = gate_record(status.last_gate, time.time() - self.started_at)
        key = ("step", "published", "version", "reason")
        if not self.gates or any(self.gates[-1][k] != gate[k] for k in key):
            self.gates.append(gate)


# --- progress ------------------------------------------------------------------------------------


class Progress:
    """Counts interactions and prints one live line every ``every_s`` seconds."""

    def __init__(self, duration_s: float, store: ModelStore, trainer: TrainerWatcher, window_s: float = 60.0):
        self.duration_s = duration_s
        self.store = store
        self.trainer = trainer
        self.window_s = window_s
        self.records: list[Interaction] = []
        self.first_version: str | None = None

    def add(self, rec: Interaction) -> None:
        self.records.append(rec)
        if rec.policy_version and self.first_version is None:
            self.first_version = rec.policy_version

    def line(self, elapsed: float) -> str:
        ok = [r for r in self.records if r.kind != "error"]
        rated = sum(200 <= r.feedback_status < 300 for r in ok)
        recent = [up for r in ok if r.t > elapsed - self.window_s for up in r.gold_thumbs_up]
        first = [up for r in ok if r.policy_version == self.first_version for up in r.gold_thumbs_up]
        serving = ok[-1].policy_version if ok else "-"
        parts = [
            f"[{elapsed:5.0f}/{self.duration_s:.0f} s]",
            f"chats {len(ok)}",
            f"rated {rated}",
            f"errors {len(self.records) - len(ok)}",
            f"serving {serving}",
            f"rm {self.store.current('rm') or '-'}",
        ]
        if recent:
            parts.append(f"thumbs-up last {self.window_s:.0f}s {sum(recent) / len(recent):.0%}")
        if first:
            parts.append(f"({self.first_version} {sum(first) / len(first):.0%})")
        st = self.trainer.latest
        if st is not None and st.step:
            parts.append(f"PPO step {st.step} reward {st.mean_reward:+.2f} KL {st.kl:.2f}")
        return " | ".join(parts)


def loop_closed(store: ModelStore, before: dict[str, set[str]], records: list[Interaction]) -> bool:
    """A new RM and a new policy version exist, and a user has been served by a new policy version."""
    new_rm = set(store.versions("rm")) - before["rm"]
    new_policy = set(store.versions("policy")) - before["policy"]
    served = {v for r in records for v in (r.choice_versions or [r.policy_version])}
    return bool(new_rm and new_policy and served & new_policy)


async def _users_with_progress(
    cfg: DemoConfig,
    url: str,
    progress: Progress,
    keys: list[tuple[str, str]],
    stop_when: Callable[[Progress], bool] | None = None,
) -> list[Interaction]:
    prompts = load_prompts(cfg.prompts_file)
    before = {line: set(progress.store.versions(line)) for line in ("rm", "policy")}
    stop = asyncio.Event()
    started = time.monotonic()
    users = asyncio.create_task(
        run_users(
            url,
            cfg.duration_s,
            cfg.users,
            cfg.mix,
            prompts,
            seed=cfg.seed,
            temperature=cfg.temperature,
            max_tokens=cfg.max_tokens,
            keys=keys,
            on_record=progress.add,
            stop=stop,
        )
    )
    while not users.done():
        await asyncio.wait({users}, timeout=cfg.progress_every_s)
        print(progress.line(time.monotonic() - started), flush=True)
        if cfg.until_new_versions and not stop.is_set() and loop_closed(progress.store, before, progress.records):
            print("the loop has closed: new RM and policy versions published and serving; stopping early", flush=True)
            stop.set()
        if stop_when is not None and not stop.is_set() and stop_when(progress):
            print("the caller's stop condition holds; stopping early", flush=True)
            stop.set()
    return users.result()


def _manifests(store: ModelStore, line: str) -> list[dict]:
    out = []
    for v in store.versions(line):
        m = store.manifest(v)
        out.append(
            {
                "version": v,
                "parent": m.parent,
                "created_at": m.created_at,
                "metrics": dict(m.metrics),
                "extra": dict(m.extra),
            }
        )
    return out


@dataclass(frozen=True)
class DemoResult:
    summary: dict
    report_dir: Path
    interactions: list[Interaction]


def run_demo(
    cfg: DemoConfig,
    environ: dict[str, str] | None = None,
    stop_when: Callable[[Progress], bool] | None = None,
    *,
    stack: Stack | None = None,
) -> DemoResult:
    """The demo (see the module docstring). ``stop_when`` (checked at every progress line) may end the
    users' run before ``duration_s``; ``stack``: one the caller started (``start_stack``) and stops
    itself, which the demo uses as its own (a benchmark's)."""
    import os

    store = ModelStore(cfg.model_store.root)
    own_stack = stack is None and not cfg.gateway_url
    if not cfg.gateway_url and not store.versions("policy"):
        from flywheel.bootstrap.pipeline import QUICK, BootstrapSettings, run_bootstrap

        log_event(log, "empty model store: bootstrapping first", store=str(store.root))
        run_bootstrap(
            store,
            report_dir=Path(cfg.report_dir) / "bootstrap",
            settings=QUICK if cfg.bootstrap_quick else BootstrapSettings(),
        )
    try:
        if stack is None and cfg.gateway_url:
            url, trainer_address = cfg.gateway_url, cfg.trainer_address
            operator = None
            keys = parse_user_keys(cfg.api_keys) if cfg.api_keys else []
        else:
            if stack is None:
                stack = start_stack(cfg, dict(os.environ if environ is None else environ))
                print(stack.summary(), flush=True)
            url, trainer_address = gateway_url_of(stack), trainer_address_of(stack)
            operator = stack.credentials("operator")
            keys = user_keys_of(stack)
        started_at = time.time()
        trainer = TrainerWatcher(trainer_address, started_at, credentials=operator).start()
        progress = Progress(cfg.duration_s, store, trainer)
        try:
            records = asyncio.run(_users_with_progress(cfg, url, progress, keys, stop_when))
        finally:
            trainer.stop()
        duration = time.time() - started_at
        evaluation = None
        if cfg.evaluate and len(store.versions("policy")) > 1:
            from flywheel.demo.evaluate import compare, resolve_version

            first, current = resolve_version(store, "first"), resolve_version(store, "current")
            result = compare(store, first, current, samples=cfg.eval_samples)
            print(result.table(), flush=True)
            evaluation = dataclasses.asdict(result)
        metrics = metrics_texts_of(stack) if stack is not None else {}
        rollout = _rollout_events(cfg, stack)
        summary = _write(
            cfg, store, records, trainer.samples, started_at, duration, evaluation, metrics, trainer.gates, rollout
        )
    finally:
        if own_stack and stack is not None:
            stack.stop()
    return DemoResult(summary, Path(cfg.report_dir), records)


def _rollout_events(cfg: DemoConfig, stack: Stack | None) -> list[dict[str, Any]] | None:
    """The rollout decisions on rlhf.rollout (None with canaries off, or when the broker cannot be read)."""
    from flywheel.demo.canaries import read_rollout_events

    if not cfg.canaries:
        return None
    kafka = load_config(KafkaConfig, stack.environ) if stack is not None else cfg.kafka
    try:
        return read_rollout_events(kafka)
    except Exception as exc:  # noqa: BLE001 - the report is written without them, saying so
        log_event(log, "could not read the rollout decisions for the report", level=30, error=str(exc))
        return None


def _write(
    cfg: DemoConfig,
    store: ModelStore,
    records: list[Interaction],
    ppo: list[dict],
    started_at: float,
    duration: float,
    evaluation: dict | None,
    metrics: dict[str, str] | None = None,
    gates: list[dict[str, Any]] | None = None,
    rollout: list[dict[str, Any]] | None = None,
) -> dict:
    from flywheel.demo.report import write_report

    summary = write_report(
        Path(cfg.report_dir),
        [dataclasses.asdict(r) for r in records],
        _manifests(store, "policy"),
        _manifests(store, "rm"),
        ppo,
        started_at,
        duration,
        evaluation,
        metrics,
        gates=gates,
        rollout=rollout,
    )
    print(
        f"report: {Path(cfg.report_dir) / 'report.md'}  (thumbs-up by version: "
        + ", ".join(f"{r['version']} {r['rate']:.0%}" for r in summary["thumbs_up_by_version"])
        + ")",
        flush=True,
    )
    return summary


def main() -> int:
    from shared.logging import setup_logging

    setup_logging("demo")
    run_demo(load_config(DemoConfig))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
