"""The trainer yields to users: it reads the serving load (inference's GetLoad) and decides, before
each group of rollouts it sends, whether to sample now, how many at once, or how long to wait.

    governor = UserLoadGovernor(YieldSettings(user_in_flight=6, user_waiting=4, user_ttft_s=1.0), full=16)
    d = governor.decide(probe.load(), now=time.monotonic())
    d.concurrency    # rollouts to send at once now; 0: wait d.wait_s and ask again
    governor.worked(seconds, now)   # after an iteration: the idle budget's pause

The rule (one number for "how much users need the capacity"):

    pressure = max(user_in_flight / T_in_flight, user_waiting / T_waiting, user_ttft_p50 / T_ttft)

over the thresholds that are set (> 0). At pressure >= 1 the trainer *yields*: it sends no
rollouts (and so takes no learner step), cancelling those of a group still in flight (the trainer
reads the load every ``poll_s`` while a group is out: ``interrupts``), until the pressure has stayed at ``resume_fraction`` or
below for ``resume_after_s`` (hysteresis in level and in time: it does not flap at the threshold, nor
resume on one low read of a closed loop's dip). Between ``resume_fraction`` and 1 it sends fewer
rollouts at once (``rollout_concurrency``); the PPO batch stays ``rollouts_per_iteration``, only
assembled in smaller groups. While nobody uses the system (no user request in flight for
``idle_after_s``), it trains at the *idle budget*: a share of wall time (``idle_pause_s``).
Load unknown (inference unreachable, an older replica without GetLoad): it samples as before.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import grpc

from services.trainer import metrics
from shared.logging import get_logger, log_event
from shared.pb import inference_pb2, inference_pb2_grpc

log = get_logger(__name__)

STATES = ("full", "slowed", "yielding", "idle", "unknown")
"""What the governor lets the trainer do (rlhf_trainer_user_load_state{state}): sample at full
concurrency, fewer rollouts at once, none (users need the capacity), at the idle budget (nobody uses
the system), or as before (the load could not be read)."""


@dataclass(frozen=True)
class UserLoad:
    """One replica's load (rlhf.v1.LoadInfo)."""

    user_in_flight: int
    user_waiting: int = 0
    user_ttft_p50_s: float = 0.0
    user_quiet_s: float = 0.0
    trainer_in_flight: int = 0


@dataclass(frozen=True)
class YieldSettings:
    """TrainerConfig's yield_* and idle_* settings (see there)."""

    user_in_flight: int = 6
    user_waiting: int = 4
    user_ttft_s: float = 1.0
    resume_fraction: float = 0.5
    poll_s: float = 0.5
    resume_after_s: float = 2.0
    idle_after_s: float = 30.0
    idle_budget: float = 0.25

    @property
    def enabled(self) -> bool:
        """Whether the load needs reading at all (a threshold set, or an idle budget below full)."""
        return self.user_in_flight > 0 or self.user_waiting > 0 or self.user_ttft_s > 0 or self.idle_budget < 1


@dataclass(frozen=True)
class Decision:
    state: str
    """One of STATES."""
    concurrency: int
    """Rollouts to send at once now; 0: send none, wait ``wait_s`` and ask again."""
    wait_s: float
    reason: str
    """For the status' detail and the log."""


def user_pressure(load: UserLoad, s: YieldSettings) -> float:
    """How much of the capacity users need, 1 = a threshold reached:

        pressure = max(user_in_flight / T_in_flight, user_waiting / T_waiting, user_ttft_p50 / T_ttft)

    over the thresholds set (> 0); 0 when none is set."""
    terms = [0.0]
    if s.user_in_flight > 0:
        terms.append(load.user_in_flight / s.user_in_flight)
    if s.user_waiting > 0:
        terms.append(load.user_waiting / s.user_waiting)
    if s.user_ttft_s > 0:
        terms.append(load.user_ttft_p50_s / s.user_ttft_s)
    return max(terms)


def rollout_concurrency(pressure: float, full: int, resume_fraction: float) -> int:
    """Rollouts to send at once below the yield threshold:

        k = full                                              for pressure <= r
        k = max(1, ceil(full * (1 - pressure) / (1 - r)))     for r < pressure < 1

    (r = resume_fraction): full up to the level at which a yield ends, then down linearly to one
    rollout at a time just below the threshold; 0 at pressure >= 1 (yield)."""
    if pressure >= 1:
        return 0
    if pressure <= resume_fraction:
        return full
    return max(1, math.ceil(full * (1 - pressure) / (1 - resume_fraction) - 1e-9))


def idle_pause_s(worked_s: float, budget: float) -> float:
    """Pause after ``worked_s`` seconds of work done while nobody used the system, so that work takes
    the share ``budget`` of wall time:

        pause = worked_s * (1 - budget) / budget

    e.g. budget 0.25: 3 s of pause per second of work; budget 1: none. (Budget 0 never works while
    idle: no pause is needed.)"""
    if budget >= 1 or budget <= 0:
        return 0.0
    return worked_s * (1 - budget) / budget


class UserLoadGovernor:
    """The decision rule, with its two bits of memory: whether it is yielding (hysteresis), and
    until when the idle budget pauses. Pure: no clock, no network (``now`` is given)."""

    def __init__(self, settings: YieldSettings, full: int):
        self.settings = settings
        self.full = full
        self.yielding = False
        self.low_since: float | None = None
        """While yielding: since when every read was at or under the resume level (None: the last was not)."""
        self.idle_until = 0.0

    def idle(self, load: UserLoad) -> bool:
        """Nobody uses the system: no user request in flight for ``idle_after_s``."""
        return load.user_in_flight == 0 and load.user_quiet_s >= self.settings.idle_after_s

    def decide(self, load: UserLoad | None, now: float) -> Decision:
        s = self.settings
        if load is None:
            self.yielding = False
            return Decision("unknown", self.full, 0.0, "serving load unknown: sampling as before")
        pressure = user_pressure(load, s)
        figures = (
            f"{load.user_in_flight} user requests in flight, {load.user_waiting} kept waiting for a first token, "
            f"user TTFT p50 {load.user_ttft_p50_s:.2f} s"
        )
        if self.yielding:
            if pressure > s.resume_fraction:
                self.low_since = None
                return Decision("yielding", 0, s.poll_s, f"yielding to users: {figures}")
            if self.low_since is None:
                self.low_since = now
            if now - self.low_since < s.resume_after_s:
                return Decision(
                    "yielding", 0, s.poll_s, f"yielding to users (load low for {now - self.low_since:.1f} s): {figures}"
                )
        elif pressure >= 1:
            self.yielding = True
            self.low_since = None
            return Decision("yielding", 0, s.poll_s, f"yielding to users: {figures}")
        self.yielding = False
        self.low_since = None
        if self.idle(load):
            if s.idle_budget <= 0:
                return Decision(
                    "idle", 0, s.poll_s, f"nobody used the system for {load.user_quiet_s:.0f} s: idle budget 0"
                )
            if now < self.idle_until:
                return Decision(
                    "idle",
                    0,
                    min(s.poll_s, self.idle_until - now),
                    f"nobody used the system for {load.user_quiet_s:.0f} s: training at the idle budget "
                    f"({s.idle_budget:.0%} of the time)",
                )
            return Decision("idle", self.full, 0.0, "idle budget: sampling")
        k = rollout_concurrency(pressure, self.full, s.resume_fraction)
        if k < self.full:
            return Decision("slowed", k, 0.0, f"slowed for users ({k} rollouts at once): {figures}")
        return Decision("full", k, 0.0, "")

    def interrupts(self, load: UserLoad | None) -> bool:
        """Whether rollouts already in flight should be cancelled: users' pressure reached the yield
        threshold while a group was out (the next ``decide`` then yields). Load unknown: no."""
        return load is not None and user_pressure(load, self.settings) >= 1

    def worked(self, seconds: float, now: float, idle: bool) -> None:
        """An iteration's work (sampling, scoring, the step) ended at ``now``; when it ran while idle,
        the idle budget pauses the next one (ended early if users come back)."""
        self.idle_until = now + idle_pause_s(seconds, self.settings.idle_budget) if idle else 0.0


class GrpcLoadProbe:
    """Reads GetLoad from the inference service; None when it cannot (counted, logged once per kind)."""

    def __init__(self, channel: grpc.Channel, timeout_s: float = 2.0):
        self.stub = inference_pb2_grpc.InferenceServiceStub(channel)
        self.timeout_s = timeout_s
        self._last_error = ""
        self._lock = threading.Lock()

    def load(self) -> UserLoad | None:
        try:
            info = self.stub.GetLoad(inference_pb2.GetLoadRequest(), timeout=self.timeout_s)
        except grpc.RpcError as exc:
            code = exc.code().name if exc.code() is not None else "UNKNOWN"
            metrics.USER_LOAD_ERRORS.labels(code).inc()
            with self._lock:
                if code != self._last_error:
                    self._last_error = code
                    log_event(
                        log,
                        "cannot read the serving load: sampling as before",
                        level=30,
                        code=code,
                        detail=exc.details(),
                    )
            return None
        with self._lock:
            self._last_error = ""
        return UserLoad(
            user_in_flight=info.user_in_flight,
            user_waiting=info.user_waiting,
            user_ttft_p50_s=info.user_ttft_p50_s,
            user_quiet_s=info.user_quiet_s,
            trainer_in_flight=info.trainer_in_flight,
        )
