"""The rollout service's live figures for the /flywheel page: what users said about the stable
version and the canary since the canary started (RolloutService.Status), between the decisions
that put evidence into rollout events.

    live = LiveStatus(address, credentials)           # in the server's event loop
    figures = await live.figures()                    # None when the rollout service cannot be asked

Fetched when the page asks, at most once per ``max_age_s`` (one call at a time, however many pages
poll), with a short deadline: a rollout service that is down costs the page its live figures, never
its answer. The gateway calls as ``gateway``, which the rollout service lets read Status only.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import grpc

from services.gateway import metrics
from shared.grpc_channels import ClientCredentials, aio_channel, replica_target
from shared.logging import get_logger, log_event
from shared.pb import rollout_pb2, rollout_pb2_grpc

log = get_logger(__name__)


@dataclass(frozen=True)
class LiveFigures:
    at: float
    """When they were fetched (Unix time)."""
    sequence: int
    """The last rollout step the rollout service had taken."""
    by_version: dict[str, dict[str, Any]]
    """Version -> its summary, in the shape of a rollout event's evidence["canary"]."""
    stable: str = ""
    """The stable version the rollout service names (before its first step too)."""


def summary_of(signals: rollout_pb2.VersionSignals) -> dict[str, Any]:
    """A VersionSignals message as an evidence summary (rates and means None without observations)."""
    return {
        "thumbs_up_rate": signals.thumbs_up_rate if signals.thumbs else None,
        "thumbs": signals.thumbs,
        "likert_mean": signals.likert_mean if signals.likerts else None,
        "likerts": signals.likerts,
        "completions": signals.completions,
        "error_rate": signals.error_rate if signals.completions else None,
        "latency_p50_s": signals.latency_p50_s if signals.completions else None,
        "mean_tokens": signals.mean_tokens if signals.completions else None,
    }


def figures_of(status: rollout_pb2.RolloutStatus, at: float) -> LiveFigures:
    by_version = {s.version: summary_of(s) for s in (status.stable_signals, status.canary_signals) if s.version}
    return LiveFigures(at, status.sequence, by_version, status.stable)


class LiveStatus:
    def __init__(self, address: str, credentials: ClientCredentials, *, max_age_s: float = 2.0, timeout_s: float = 2.0):
        self.max_age_s = max_age_s
        self.timeout_s = timeout_s
        self.channel = aio_channel(replica_target(address), credentials)
        self.stub = rollout_pb2_grpc.RolloutServiceStub(self.channel)
        self._cached: LiveFigures | None = None
        self._fetched_at = -float("inf")
        self._lock = asyncio.Lock()
        self._last_error_log = -float("inf")

    async def figures(self) -> LiveFigures | None:
        """The latest figures (fetched now if the cached ones are older than ``max_age_s``); None
        when the rollout service did not answer."""
        async with self._lock:
            if time.monotonic() - self._fetched_at < self.max_age_s:
                return self._cached
            self._fetched_at = time.monotonic()
            try:
                status = await self.stub.Status(rollout_pb2.RolloutStatusRequest(), timeout=self.timeout_s)
            except grpc.aio.AioRpcError as exc:
                metrics.ROLLOUT_STATUS_ERRORS.inc()
                self._cached = None
                if time.monotonic() - self._last_error_log > 60:
                    self._last_error_log = time.monotonic()
                    log_event(log, "rollout service Status failed", level=30, code=exc.code().name)
                return None
            self._cached = figures_of(status, time.time())
            return self._cached

    async def close(self) -> None:
        await self.channel.close()
