"""The /flywheel page's data: the recent rollout events and the figures they carry, kept in memory
and turned into a ``FlywheelView`` on request. No HTTP here (see api_router.py).

    board = FlywheelBoard(max_events=50)
    board.add(event)                                   # the feed's thread, each RolloutEvent in order
    view = board.view(router, following=True)          # a request

Figures per version come from the rollout service's live Status when the gateway can ask it
(live.py: what users said since the canary started), else from the evidence of the latest event
that carries it: the live gate's decisions put ``evidence["canary"]`` (the canary's summary) and
``evidence["stable"]`` (the stable version's at that moment) into the event. The page shows them
with the time they were taken.
"""

from __future__ import annotations

import collections
import math
import threading
from typing import Any

from services.gateway import metrics
from services.gateway.rollout.live import LiveFigures
from services.gateway.rollout.routing import CANARY, STABLE, Router
from services.gateway.rollout.schema import DecisionView, FlywheelView, Role, RoutedView, VersionView
from shared.events import RolloutEvent

SIGNALS = ("thumbs", "likert", "side_by_side", "no_error")
"""The live gate's tested signals, as its evidence names them."""
DISPLAY_ALPHA = 0.05
"""Level of the thumbs-up intervals the page shows (95%)."""
DISPLAY_RHO = 25.0
"""Mixture parameter of those intervals (the rollout service's default)."""


def thumbs_interval(ups: float, n: int, alpha: float = DISPLAY_ALPHA, rho: float = DISPLAY_RHO) -> list[float] | None:
    """The always-valid confidence interval of a thumbs-up rate of ``ups`` in ``n`` ratings: the
    normal-mixture confidence sequence the rollout service's gate uses (services/rollout/confidence.py),

        rate +- sqrt((V + rho) * log((V + rho) / (rho * (alpha / 2)^2))) / n,   V = n / 4,

    clipped to [0, 1] and rounded to 4 places; None without ratings."""
    if n <= 0:
        return None
    v = n / 4
    radius = math.sqrt((v + rho) * math.log((v + rho) / (rho * (alpha / 2) ** 2))) / n
    rate = ups / n
    return [round(max(0.0, rate - radius), 4), round(min(1.0, rate + radius), 4)]


def arm_summaries(ev: RolloutEvent, stable_before: str) -> dict[str, dict[str, Any]]:
    """Version -> its summary in an event's evidence: ``evidence["canary"]`` is the summary of the
    version the step is about, ``evidence["stable"]`` that of the stable version the decision
    compared it with (``stable_before``: the stable version before this step, which a promotion
    replaces). Entries that are not summaries are left out."""
    out: dict[str, dict[str, Any]] = {}
    for key, version in (("canary", ev.version), ("stable", stable_before)):
        summary = ev.evidence.get(key) if isinstance(ev.evidence, dict) else None
        if version and isinstance(summary, dict) and "thumbs" in summary:
            out[version] = summary
    return out


def decision_of(ev: RolloutEvent) -> DecisionView:
    evidence = ev.evidence if isinstance(ev.evidence, dict) else {}
    verdicts = {}
    for name in SIGNALS:
        signal = evidence.get(name)
        if isinstance(signal, dict) and isinstance(signal.get("verdict"), str):
            verdicts[name] = signal["verdict"]
    thumbs = evidence.get("thumbs")
    difference = thumbs.get("difference") if isinstance(thumbs, dict) else None
    return DecisionView(
        sequence=ev.sequence,
        at=ev.at,
        version=ev.version,
        stage=ev.stage,
        reason=ev.reason,
        stable=ev.stable,
        canary=ev.canary,
        canary_share=ev.canary_share,
        verdicts=verdicts,
        thumbs_difference=_floats(difference),
    )


def _floats(value: Any) -> list[float] | None:
    if isinstance(value, list) and len(value) == 2 and all(isinstance(x, int | float) for x in value):
        return [float(x) for x in value]
    return None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _count(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and math.isfinite(value) and value > 0 else 0


class FlywheelBoard:
    """The recent rollout events (bounded) and the latest figures of each version named in them."""

    def __init__(self, max_events: int):
        if max_events < 1:
            raise ValueError(f"max_events must be at least 1, got {max_events}")
        self._lock = threading.Lock()
        self.events: collections.deque[RolloutEvent] = collections.deque(maxlen=max_events)
        self.figures: collections.OrderedDict[str, tuple[dict[str, Any], float]] = collections.OrderedDict()
        """Version -> (its latest summary, when it was taken); at most ``max_events`` versions."""
        self.max_versions = max_events
        self.latest: RolloutEvent | None = None
        self.role_since: dict[str, float] = {}
        """"stable"/"canary" -> when the current version took the role."""

    def add(self, ev: RolloutEvent) -> None:
        """The next event of rlhf.rollout (in topic order)."""
        with self._lock:
            before = self.latest
            stable_before = before.stable if before is not None else ev.stable
            for version, summary in arm_summaries(ev, stable_before).items():
                self.figures[version] = (summary, ev.at)
                self.figures.move_to_end(version)
            while len(self.figures) > self.max_versions:
                self.figures.popitem(last=False)
            if before is None or before.stable != ev.stable:
                self.role_since[STABLE] = ev.at
            if ev.canary and (before is None or before.canary != ev.canary):
                self.role_since[CANARY] = ev.at
            self.events.append(ev)
            self.latest = ev
            metrics.ROLLOUT_EVENTS_HELD.set(len(self.events))

    def view(self, router: Router, *, following: bool, live: LiveFigures | None = None) -> FlywheelView:
        """The page's data; ``live``: the rollout service's live figures, which replace an event's for
        the versions they cover."""
        with self._lock:
            latest = self.latest
            events = list(self.events)
            figures = dict(self.figures)
            since = dict(self.role_since)
        if live is not None:
            figures.update({version: (summary, live.at) for version, summary in live.by_version.items()})
        share = router.canary_share if latest is not None and latest.canary else 0.0
        versions = []
        if latest is None and live is not None and live.stable:  # no step yet: the stable version only
            versions.append(self._version(live.stable, "stable", 1.0, figures.get(live.stable), None))
        if latest is not None:
            roles: list[tuple[str, Role, float]] = [
                (latest.stable, "stable", 1.0 - share),
                (latest.canary, "canary", share),
                (latest.queued, "queued", 0.0),
            ]
            for version, role, traffic in roles:
                if version:
                    versions.append(self._version(version, role, traffic, figures.get(version), since.get(role)))
        return FlywheelView(
            following=following,
            canary_routing=router.canary_enabled,
            live_figures=live is not None,
            sequence=latest.sequence if latest else 0,
            updated_at=latest.at if latest else None,
            stable=latest.stable if latest else (live.stable if live else router.state.stable),
            canary=latest.canary if latest else "",
            queued=latest.queued if latest else "",
            canary_share=share,
            paused=latest.paused if latest else False,
            mode=latest.mode if latest else "auto",
            versions=versions,
            routed=RoutedView(**router.routed),
            decisions=[decision_of(ev) for ev in reversed(events)],
        )

    @staticmethod
    def _version(
        version: str, role: Role, traffic: float, figures: tuple[dict[str, Any], float] | None, since: float | None
    ) -> VersionView:
        view = VersionView(version=version, role=role, traffic_share=round(traffic, 6), since=since)
        if figures is None:
            return view
        summary, at = figures
        rate, n = _number(summary.get("thumbs_up_rate")), _count(summary.get("thumbs"))
        view.thumbs_up_rate = rate
        view.thumbs = n
        view.thumbs_interval = thumbs_interval(rate * n, n) if rate is not None else None
        view.likert_mean = _number(summary.get("likert_mean"))
        view.likerts = _count(summary.get("likerts"))
        view.completions = _count(summary.get("completions"))
        view.error_rate = _number(summary.get("error_rate"))
        view.latency_p50_s = _number(summary.get("latency_p50_s"))
        view.mean_tokens = _number(summary.get("mean_tokens"))
        view.evidence_at = at
        return view
