"""Rolling swaps on a scripted engine (the real vLLM engines are in tests/integration/
test_rolling_swap.py): the replica reports NOT_SERVING before it drains and SERVING only after the
reload, waits for its requests in flight (bounded: past the timeout it swaps immediately), takes its
group's lease for the whole swap, and without a lease keeps swapping in place. A full-weight version
whose weights were left in the store is staged by the engine's worker before the gate closes, and a
refusal there leaves the served weights untouched."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from services.inference.config import InferenceConfig
from services.inference.serving import InferenceServing
from services.inference.swap_lease import SwapLease
from services.inference.worker_extension import WeightsRefused
from shared.config import VersionTrustConfig
from shared.model_store import FileDigest, ModelStore
from shared.version_line import StoreFile, VerifiedVersion


class ScriptedEngine:
    def __init__(self, log: list[tuple[str, object]], refuse: dict[str, WeightsRefused] | None = None):
        self.log = log
        self.refuse = refuse or {}
        """Step ("stage" or "load") -> the refusal the worker reports there."""

    async def reload_weights(self, model_dir: Path, *, with_requests_running: bool = False) -> None:
        self.log.append(("reload", with_requests_running))

    async def stage_weights(self, token: str, files) -> dict:
        self.log.append(("stage", [f.rel for f in files]))
        if "stage" in self.refuse:
            raise self.refuse["stage"]
        return {}

    async def load_staged(self, token: str, expected, *, with_requests_running: bool = False) -> dict[str, float]:
        self.log.append(("load_staged", with_requests_running))
        if "load" in self.refuse:
            raise self.refuse["load"]
        return {"pause_s": 0.0, "load_s": 0.0, "total_s": 0.0}

    def shutdown(self) -> None:
        pass


def make_serving(tmp_path: Path, log: list, **cfg) -> InferenceServing:
    config = InferenceConfig(
        versions=VersionTrustConfig(copies_dir=tmp_path / "copies"),
        swap_lease_dir=tmp_path,
        swap_settle_s=0.05,
        swap_drain_timeout_s=0.3,
        **cfg,
    )
    serving = InferenceServing(config, ScriptedEngine(log), ModelStore(tmp_path / "store"), None)
    serving.policy_version, serving.policy_dir = "policy-0001", tmp_path / "p1"

    async def routable(up: bool) -> None:
        log.append(("routable", up))

    serving.set_routable = routable
    return serving


def verified(version: str, tmp_path: Path, deferred: tuple[StoreFile, ...] = ()) -> VerifiedVersion:
    return VerifiedVersion(version, tmp_path / version, None, "0" * 64, deferred=deferred)


def weights_in_store(tmp_path: Path, version: str) -> tuple[StoreFile, ...]:
    """A full-weight version's weight file left in the store (VersionFollower.defer)."""
    path = tmp_path / "store" / version / "model.safetensors"
    return (StoreFile("model.safetensors", path, FileDigest("0" * 64, 8), "blake3"),)


def test_weights_left_in_the_store_are_staged_before_the_gate_closes_then_loaded(tmp_path):
    log: list = []
    serving = make_serving(tmp_path, log)
    target = verified("policy-0002", tmp_path, weights_in_store(tmp_path, "policy-0002"))
    assert asyncio.run(serving.swap_to(target, drain_s=0.0)) is True
    assert log == [("stage", ["model.safetensors"]), ("load_staged", False)]
    assert serving.policy_version == "policy-0002" and serving.base_verified is target


@pytest.mark.parametrize(("step", "reason"), [("stage", "corrupt"), ("load", "incompatible")])
def test_weights_the_worker_refuses_leave_the_served_version_untouched(tmp_path, step, reason):
    log: list = []
    serving = make_serving(tmp_path, log)
    serving.engine.refuse[step] = WeightsRefused(reason, "the worker says no")
    before = REGISTRY.get_sample_value("rlhf_inference_swap_refused_total", {"reason": f"staged_{reason}"}) or 0
    target = verified("policy-0002", tmp_path, weights_in_store(tmp_path, "policy-0002"))
    assert asyncio.run(serving.swap_to(target, drain_s=0.0)) is False
    assert serving.policy_version == "policy-0001" and serving.reload_failures == 1
    assert ("reload", False) not in log and ("reload", True) not in log  # nothing to restore: nothing was loaded
    assert REGISTRY.get_sample_value("rlhf_inference_swap_refused_total", {"reason": f"staged_{reason}"}) == before + 1


def test_a_rolling_swap_leaves_routing_before_draining_and_returns_after_the_reload(tmp_path):
    log: list = []
    serving = make_serving(tmp_path, log)

    async def scenario():
        release = asyncio.Event()

        async def request():
            async with serving.gate.admit():
                log.append(("request", "start"))
                await release.wait()
                log.append(("request", "end"))

        running = asyncio.create_task(request())
        await asyncio.sleep(0)
        swap = asyncio.create_task(serving.rolling_swap(verified("policy-0002", tmp_path)))
        await asyncio.sleep(0.1)
        release.set()
        await running
        return await swap

    assert asyncio.run(scenario()) is True
    assert log == [
        ("request", "start"),
        ("routable", False),
        ("request", "end"),
        ("reload", False),
        ("routable", True),
    ]
    assert serving.policy_version == "policy-0002"


def test_requests_outlasting_the_drain_timeout_are_swapped_immediately(tmp_path):
    log: list = []
    serving = make_serving(tmp_path, log)

    async def scenario():
        release = asyncio.Event()

        async def request():
            async with serving.gate.admit():
                await release.wait()

        running = asyncio.create_task(request())
        await asyncio.sleep(0)
        swapped = await serving.rolling_swap(verified("policy-0002", tmp_path))
        release.set()
        await running
        return swapped

    started = time.monotonic()
    assert asyncio.run(scenario()) is True
    assert ("reload", True) in log, "the request still running was swapped under, not waited for"
    assert time.monotonic() - started < 2


def test_the_follower_swaps_while_holding_the_group_lease(tmp_path):
    log: list = []
    serving = make_serving(tmp_path, log)
    serving.lease = SwapLease(tmp_path, "policy.current", "me", ttl_s=120)
    other = SwapLease(tmp_path, "policy.current", "other", ttl_s=120)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    serving._loop = loop
    try:
        assert other.try_take()
        threading.Timer(0.3, lambda: (log.append(("other", "released")), other.release())).start()
        seen_holder = []

        async def routable(up: bool) -> None:
            seen_holder.append(serving.lease.read().holder)
            log.append(("routable", up))

        serving.set_routable = routable
        assert serving._swap_from_follower(verified("policy-0002", tmp_path)) is True
        assert serving._swap_from_follower(verified("policy-0002", tmp_path)) is False  # served already
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
    assert log[0] == ("other", "released"), "no step of the swap before the other replica was done"
    assert seen_holder == ["me", "me"] and serving.lease.read() is None


def test_without_a_lease_the_swap_is_in_place(tmp_path):
    log: list = []
    serving = make_serving(tmp_path, log)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    serving._loop = loop
    try:
        assert serving._swap_from_follower(verified("policy-0002", tmp_path)) is True
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
    assert log == [("reload", False)], "no routing change, no lease: the single replica's drain swap"


def test_the_default_swap_waits_its_budget_not_for_the_slowest_request(tmp_path):
    """One replica, default swap_mode bounded: a request that would run for long holds the swap only
    for the drain budget; it is swapped under (reload with requests running) and its versions list
    the new one; a request that ends inside the budget finishes before the reload."""
    log: list = []
    serving = make_serving(tmp_path, log, swap_drain_budget_s=0.2)
    serving.lease = None
    assert serving.cfg.swap_mode == "bounded"

    async def scenario():
        release = asyncio.Event()

        async def request(name: str, hold_s: float | None):
            async with serving.gate.admit():
                seen = serving.swaps
                if hold_s is None:
                    await release.wait()
                else:
                    await asyncio.sleep(hold_s)
                log.append((name, serving.versions_since(seen)))

        slow = asyncio.create_task(request("slow", None))
        quick = asyncio.create_task(request("quick", 0.05))
        await asyncio.sleep(0)
        started = time.monotonic()
        swapped = await serving.swap_to(verified("policy-0002", tmp_path))
        pause = time.monotonic() - started
        release.set()
        await asyncio.gather(slow, quick)
        return swapped, pause

    swapped, pause = asyncio.run(scenario())
    assert swapped is True and 0.15 <= pause < 1.0
    assert log == [("quick", []), ("reload", True), ("slow", ["policy-0002"])]
    assert serving.policy_version == "policy-0002"


def test_drain_mode_still_waits_for_every_request(tmp_path):
    log: list = []
    serving = make_serving(tmp_path, log, swap_mode="drain", swap_drain_budget_s=0.05)
    serving.lease = None

    async def scenario():
        async def request():
            async with serving.gate.admit():
                await asyncio.sleep(0.3)
                log.append(("request", "end"))

        running = asyncio.create_task(request())
        await asyncio.sleep(0)
        swapped = await serving.swap_to(verified("policy-0002", tmp_path))
        await running
        return swapped

    assert asyncio.run(scenario()) is True
    assert log == [("request", "end"), ("reload", False)]


class Untokenisable:
    """A tokenizer that fails the test if the prompt reaches it."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"the prompt reached the tokenizer ({name})")


def test_a_prompt_over_the_character_bound_is_refused_before_it_is_tokenised(tmp_path):
    import pytest

    from services.inference.domain import GenerationRequest, Sampling
    from shared.errors import InvalidArgument
    from shared.events import Message

    serving = make_serving(tmp_path, [])
    serving.ready, serving.tokenizer = True, Untokenisable()
    one_mib = [Message("user", "x" * 32768) for _ in range(32)]  # each message within its own bound
    started = time.monotonic()
    with pytest.raises(InvalidArgument) as err:
        serving.validate(GenerationRequest(one_mib, Sampling(max_tokens=16)))
    assert time.monotonic() - started < 0.05
    assert err.value.param == "messages" and "1048576 characters" in str(err.value)
    with pytest.raises(AssertionError, match="reached the tokenizer"):  # a prompt within the bound goes on
        serving.validate(GenerationRequest(one_mib[:2], Sampling(max_tokens=16)))
