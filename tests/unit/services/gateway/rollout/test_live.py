"""The rollout service's live figures for /flywheel, from a scripted RolloutService on real loopback
gRPC: the Status signals become evidence summaries (no rate without observations), they are fetched
at most once per max_age however often the page asks, a rollout service that is down gives None
(the page keeps the events' figures), and the board prefers live figures to an event's."""

from __future__ import annotations

import asyncio

import grpc

from services.gateway.rollout.board import FlywheelBoard
from services.gateway.rollout.live import LiveFigures, LiveStatus, figures_of, summary_of
from services.gateway.rollout.routing import Router
from shared.events import RolloutEvent
from shared.grpc_channels import ClientCredentials
from shared.pb import rollout_pb2, rollout_pb2_grpc


def status() -> rollout_pb2.RolloutStatus:
    return rollout_pb2.RolloutStatus(
        stable="policy-0007",
        canary="policy-0008",
        canary_share=0.1,
        sequence=4,
        stable_signals=rollout_pb2.VersionSignals(
            version="policy-0007", thumbs_up_rate=0.6, thumbs=50, completions=80, latency_p50_s=0.2
        ),
        canary_signals=rollout_pb2.VersionSignals(version="policy-0008", thumbs_up_rate=0.0, thumbs=0),
    )


class ScriptedRollout(rollout_pb2_grpc.RolloutServiceServicer):
    def __init__(self) -> None:
        self.calls = 0

    async def Status(self, request, context):
        self.calls += 1
        return status()


def test_signals_become_summaries_without_rates_for_versions_nobody_rated():
    figures = figures_of(status(), at=123.0)
    assert figures.sequence == 4 and figures.at == 123.0
    stable, canary = figures.by_version["policy-0007"], figures.by_version["policy-0008"]
    assert (stable["thumbs_up_rate"], stable["thumbs"], stable["latency_p50_s"]) == (0.6, 50, 0.2)
    assert canary["thumbs_up_rate"] is None and canary["thumbs"] == 0 and canary["error_rate"] is None
    assert summary_of(rollout_pb2.VersionSignals())["likert_mean"] is None


def test_figures_are_fetched_at_most_once_per_max_age_and_none_while_the_service_is_down():
    async def main():
        servicer = ScriptedRollout()
        server = grpc.aio.server()
        rollout_pb2_grpc.add_RolloutServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        live = LiveStatus(f"127.0.0.1:{port}", ClientCredentials(), max_age_s=0.3, timeout_s=1)
        first = await asyncio.gather(*(live.figures() for _ in range(5)))
        calls_at_once = servicer.calls
        await asyncio.sleep(0.35)
        again = await live.figures()
        await server.stop(None)
        await asyncio.sleep(0.35)
        down = await live.figures()
        await live.close()
        return first, calls_at_once, again, servicer.calls, down

    first, calls_at_once, again, calls, down = asyncio.run(main())
    assert calls_at_once == 1 and all(f is first[0] for f in first)
    assert first[0].by_version["policy-0007"]["thumbs"] == 50
    assert again is not None and calls == 2
    assert down is None


def test_the_board_prefers_live_figures_to_an_events():
    board, router = FlywheelBoard(5), Router(canary_enabled=True)
    ev = RolloutEvent(
        sequence=3, version="policy-0008", stage="paused", reason="r", stable="policy-0007", canary="policy-0008",
        canary_share=0.1, paused=True, mode="auto", at=100.0,
        evidence={"canary": {"thumbs_up_rate": 0.2, "thumbs": 10}, "stable": {"thumbs_up_rate": 0.5, "thumbs": 20}},
    )  # fmt: skip
    router.apply(ev)
    board.add(ev)
    live = LiveFigures(at=200.0, sequence=3, by_version={"policy-0008": {"thumbs_up_rate": 0.4, "thumbs": 30}})
    view = board.view(router, following=True, live=live)
    rows = {v.version: v for v in view.versions}
    assert (rows["policy-0008"].thumbs_up_rate, rows["policy-0008"].evidence_at) == (0.4, 200.0)
    assert (rows["policy-0007"].thumbs_up_rate, rows["policy-0007"].evidence_at) == (0.5, 100.0)
    assert view.live_figures and not board.view(router, following=True).live_figures


def test_before_any_rollout_step_the_live_status_names_the_stable_version():
    live = figures_of(status(), at=50.0)
    view = FlywheelBoard(5).view(Router(canary_enabled=True), following=True, live=live)
    assert view.stable == "policy-0007" and view.canary == ""
    (only,) = view.versions
    assert (only.version, only.role, only.traffic_share, only.thumbs) == ("policy-0007", "stable", 1.0, 50)
