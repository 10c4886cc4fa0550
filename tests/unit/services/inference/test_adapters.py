"""services/inference/adapters.py on a scripted engine (the real vLLM engine with real PEFT adapters
is tests/integration/test_adapter_serving.py): which adapters make room for another (least recently
used, never one a pointer serves or a request runs with), a load that counts only once proven (a
failed add or probe leaves nothing loaded), the checks against the base the engine holds, and the
serving's adapter swap: no request held, the old version kept when the new one fails, a request
naming a version the replica does not hold refused by name."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import REGISTRY
from safetensors.torch import save_file

from services.inference.adapters import (
    AdapterLoadError,
    AdapterSlots,
    adapter_check,
    evictions,
    is_adapter,
    slot_id,
)
from services.inference.config import InferenceConfig
from services.inference.domain import Sampling
from services.inference.engine import AdapterHandle, EngineOutput
from services.inference.serving import InferenceServing
from services.inference.weights import IncompatibleWeights
from shared.config import VersionTrustConfig
from shared.errors import NotFound
from shared.model_store import Manifest, ModelStore
from shared.models.adapters import adapter_extra
from shared.version_line import VerifiedVersion, VersionRefused


class ScriptedEngine:
    """The engine's adapter calls, scripted: ``bad_add`` versions fail to load, ``bad_probe`` ones
    load but fail to generate."""

    def __init__(self, bad_add: tuple[str, ...] = (), bad_probe: tuple[str, ...] = ()):
        self.held: dict[int, str] = {}
        self.log: list[tuple[str, str]] = []
        self.bad_add, self.bad_probe = bad_add, bad_probe

    async def add_adapter(self, adapter: AdapterHandle) -> float:
        self.log.append(("add", adapter.version))
        if adapter.version in self.bad_add:
            raise RuntimeError("size mismatch for lora_A")
        self.held[adapter.slot_id] = adapter.version
        await asyncio.sleep(0.002)  # the add itself, between two steps
        return 0.002

    async def remove_adapter(self, adapter: AdapterHandle) -> bool:
        self.log.append(("remove", adapter.version))
        return self.held.pop(adapter.slot_id, None) is not None

    async def generate(
        self, request_id: str, prompt: list[int], sampling: Sampling, priority: int = 0, adapter: Any = None
    ) -> AsyncIterator[list[EngineOutput]]:
        self.log.append(("generate", adapter.version if adapter else "base"))
        if adapter is not None and adapter.version in self.bad_probe:
            raise RuntimeError("the engine failed the step")
        yield [EngineOutput(0, "x", [5], None, "length")]

    async def reload_weights(self, model_dir: Path, *, with_requests_running: bool = False) -> None:
        self.log.append(("reload", model_dir.name))

    def shutdown(self) -> None:
        pass


def test_slot_ids_are_the_version_numbers():
    assert slot_id("policy-0007") == 7 and slot_id("policy-0123") == 123


def test_only_a_manifest_with_an_adapter_entry_is_an_adapter():
    assert is_adapter(Manifest("policy-0002", "policy", None, 0.0, {}, {}, {"adapter": {}}))
    assert not is_adapter(Manifest("policy-0002", "policy", None, 0.0, {}, {}, {"kind": "x"}))
    assert not is_adapter(None)


def test_room_is_made_from_the_least_recently_used_idle_unreferenced_adapters():
    lru = ["policy-0002", "policy-0003", "policy-0004"]
    assert evictions(lru, keep=set(), busy={}, capacity=4) == []
    assert evictions(lru, keep=set(), busy={}, capacity=3) == ["policy-0002"]
    assert evictions(lru, keep={"policy-0002"}, busy={}, capacity=3) == ["policy-0003"]
    assert evictions(lru, keep=set(), busy={"policy-0002": 1, "policy-0003": 2}, capacity=3) == ["policy-0004"]
    assert evictions(lru, keep={"policy-0004"}, busy={}, capacity=2) == ["policy-0002", "policy-0003"]
    with pytest.raises(AdapterLoadError, match="no room"):
        evictions(lru, keep={"policy-0004"}, busy={"policy-0002": 1}, capacity=2)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_a_load_counts_only_once_the_adapter_generated(tmp_path):
    engine = ScriptedEngine()
    slots = AdapterSlots(engine, capacity=2, max_rank=8)  # type: ignore[arg-type]
    handle = run(slots.load("policy-0002", tmp_path))
    assert handle == AdapterHandle("policy-0002", 2, tmp_path)
    assert engine.log == [("add", "policy-0002"), ("generate", "policy-0002")]
    assert slots.versions == ["policy-0002"]
    assert run(slots.load("policy-0002", tmp_path)) is handle, "loading a loaded version is a no-op"
    assert len(engine.log) == 2
    # the engine's own figure for the pause: what its add took (ScriptedEngine: 2 ms), apart from the wait
    assert slots.last_load["engine_hold_s"] == 0.002 <= slots.last_load["add_s"]


@pytest.mark.parametrize("failure", ["bad_add", "bad_probe"])
def test_a_failed_load_leaves_nothing_loaded(tmp_path, failure):
    engine = ScriptedEngine(**{failure: ("policy-0003",)})
    slots = AdapterSlots(engine, capacity=2, max_rank=8)  # type: ignore[arg-type]
    run(slots.load("policy-0002", tmp_path))
    failed = REGISTRY.get_sample_value("rlhf_inference_adapter_loads_total", {"outcome": "failed"}) or 0
    with pytest.raises(AdapterLoadError, match="policy-0003"):
        run(slots.load("policy-0003", tmp_path))
    assert slots.versions == ["policy-0002"] and set(engine.held.values()) == {"policy-0002"}
    assert engine.log[-1] == ("remove", "policy-0003")
    assert REGISTRY.get_sample_value("rlhf_inference_adapter_loads_total", {"outcome": "failed"}) == failed + 1


def test_full_slots_unload_the_least_recently_used_idle_adapter(tmp_path):
    engine = ScriptedEngine()
    slots = AdapterSlots(engine, capacity=2, max_rank=8)  # type: ignore[arg-type]
    run(slots.load("policy-0002", tmp_path))
    run(slots.load("policy-0003", tmp_path))
    running = slots.acquire("policy-0002")  # a request runs with it, and it is now the most recent
    assert running is not None and slots.busy("policy-0002") == 1
    run(slots.load("policy-0004", tmp_path))
    assert slots.versions == ["policy-0002", "policy-0004"]
    assert ("remove", "policy-0003") in engine.log
    with pytest.raises(AdapterLoadError, match="no room"):  # 0002 is busy, 0004 is served
        run(slots.load("policy-0005", tmp_path, keep={"policy-0004"}))
    slots.release(running)
    run(slots.load("policy-0005", tmp_path, keep={"policy-0004"}))
    assert slots.versions == ["policy-0004", "policy-0005"]
    assert REGISTRY.get_sample_value("rlhf_inference_adapters_loaded") == 2
    assert slots.acquire("policy-0002") is None


def test_forget_all_clears_the_book_after_a_base_reload(tmp_path):
    slots = AdapterSlots(ScriptedEngine(), capacity=2, max_rank=8)  # type: ignore[arg-type]
    run(slots.load("policy-0002", tmp_path))
    assert slots.forget_all() == ["policy-0002"] and slots.versions == []


# --- the checks, on a real store -------------------------------------------------------------------

Q = "model.layers.0.self_attn.q_proj.weight"


def publish_base(store: ModelStore, tmp_path: Path) -> str:
    src = tmp_path / f"base-src-{len(store.versions('policy'))}"
    src.mkdir()
    save_file({Q: torch.zeros(8, 16)}, src / "model.safetensors")
    (src / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    return store.publish("policy", src).version


def publish_adapter(store: ModelStore, tmp_path: Path, base: str, rank: int = 2, config_rank: int | None = None) -> str:
    src = tmp_path / f"adapter-src-{len(store.versions('policy'))}"
    src.mkdir()
    save_file(
        {
            f"base_model.model.{Q.removesuffix('.weight')}.lora_A.weight": torch.zeros(rank, 16),
            f"base_model.model.{Q.removesuffix('.weight')}.lora_B.weight": torch.zeros(8, rank),
        },
        src / "adapter_model.safetensors",
    )
    peft = {"peft_type": "LORA", "r": config_rank or rank, "lora_alpha": 4, "target_modules": ["q_proj"]}
    (src / "adapter_config.json").write_text(json.dumps(peft))
    extra = {"adapter": adapter_extra(base_version=base, rank=rank, alpha=4, target_modules=["q_proj"])}
    return store.publish("policy", src, parent=base, extra=extra, make_current=False).version


def verified(store: ModelStore, version: str) -> VerifiedVersion:
    return VerifiedVersion(version, store.path(version), store.manifest(version), store.manifest_sha256(version))


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "store")


def test_an_adapter_of_the_served_base_that_fits_passes(store, tmp_path):
    base = publish_base(store, tmp_path)
    adapter = publish_adapter(store, tmp_path, base)
    info = adapter_check(verified(store, adapter), base, store.path(base), store, max_rank=8)
    assert info.base_version == base and info.rank == 2


def test_an_adapter_of_another_base_is_refused_until_that_base_is_served(store, tmp_path):
    first = publish_base(store, tmp_path)
    second = publish_base(store, tmp_path)
    adapter = publish_adapter(store, tmp_path, second)
    with pytest.raises(VersionRefused, match="announce the new base") as err:
        adapter_check(verified(store, adapter), first, store.path(first), store, max_rank=8)
    assert err.value.reason == "adapter_base_mismatch"


def test_an_adapter_whose_config_disagrees_with_its_manifest_is_refused(store, tmp_path):
    base = publish_base(store, tmp_path)
    adapter = publish_adapter(store, tmp_path, base, config_rank=8)
    with pytest.raises(VersionRefused, match="r=8") as err:
        adapter_check(verified(store, adapter), base, store.path(base), store, max_rank=8)
    assert err.value.reason == "adapter_invalid"


def test_an_adapter_above_the_slots_rank_is_refused(store, tmp_path):
    base = publish_base(store, tmp_path)
    adapter = publish_adapter(store, tmp_path, base, rank=16)
    with pytest.raises(IncompatibleWeights, match="rank 16 exceeds"):
        adapter_check(verified(store, adapter), base, store.path(base), store, max_rank=8)


# --- the serving's adapter swap -------------------------------------------------------------------


def serving_on(store: ModelStore, tmp_path: Path, engine: ScriptedEngine, base: str, **cfg: Any) -> InferenceServing:
    settings: dict[str, Any] = {"lora_adapters": True, **cfg}
    config = InferenceConfig(versions=VersionTrustConfig(copies_dir=tmp_path / "copies"), **settings)
    serving = InferenceServing(config, engine, store, None)  # type: ignore[arg-type]
    serving.policy_version = serving.base_version = base
    serving.policy_dir = serving.base_dir = store.path(base)
    return serving


def refused(reason: str) -> float:
    return REGISTRY.get_sample_value("rlhf_inference_swap_refused_total", {"reason": reason}) or 0.0


def test_an_adapter_swap_holds_no_request_and_keeps_the_old_adapter_loaded(store, tmp_path):
    base = publish_base(store, tmp_path)
    first, second = publish_adapter(store, tmp_path, base), publish_adapter(store, tmp_path, base, rank=4)
    engine = ScriptedEngine()
    serving = serving_on(store, tmp_path, engine, base)

    async def scenario() -> None:
        async with serving.gate.admit():  # a request in flight on the base: the swap does not wait for it
            assert await asyncio.wait_for(serving.swap_to(verified(store, first)), 5) is True
        assert serving.policy_version == first and serving.swap_log == []
        on_first = serving._adapter_for(first, named=False)
        assert on_first is not None and on_first.version == first
        assert await serving.swap_to(verified(store, second)) is True
        # the request admitted on the first adapter keeps it; new ones get the second
        assert serving.adapters is not None and serving.adapters.busy(first) == 1
        assert serving._adapter_for(serving.policy_version, named=False).version == second  # type: ignore[union-attr]
        assert serving._adapter_for(first, named=True).version == first  # type: ignore[union-attr]
        assert serving._adapter_for(base, named=True) is None  # the base weights themselves
        with pytest.raises(NotFound, match="policy-0009 is not served by this replica") as err:
            serving._adapter_for("policy-0009", named=True)
        assert err.value.param == "policy_version"

    run(scenario())
    assert ("reload", base) not in engine.log, "an adapter swap never reloads the base"


def test_an_adapter_that_fails_to_load_is_refused_and_the_old_version_keeps_serving(store, tmp_path):
    base = publish_base(store, tmp_path)
    first, second = publish_adapter(store, tmp_path, base), publish_adapter(store, tmp_path, base, rank=4)
    serving = serving_on(store, tmp_path, ScriptedEngine(bad_probe=(second,)), base)
    before = refused("adapter_load_failed")
    assert run(serving.swap_to(verified(store, first))) is True
    assert run(serving.swap_to(verified(store, second))) is False
    assert serving.policy_version == first and serving.refused_updates == 1
    assert refused("adapter_load_failed") == before + 1
    assert serving.adapters is not None and serving.adapters.versions == [first]


def test_a_replica_without_adapter_serving_refuses_adapter_versions(store, tmp_path):
    base = publish_base(store, tmp_path)
    adapter = publish_adapter(store, tmp_path, base)
    serving = serving_on(store, tmp_path, ScriptedEngine(), base, lora_adapters=False)
    with pytest.raises(VersionRefused, match="RLHF_INFERENCE_LORA_ADAPTERS=1") as err:
        serving._check_compatible(verified(store, adapter))
    assert err.value.reason == "adapters_disabled"


def test_a_rollback_to_the_base_serves_the_held_weights_without_a_reload(store, tmp_path):
    base = publish_base(store, tmp_path)
    adapter = publish_adapter(store, tmp_path, base)
    engine = ScriptedEngine()
    serving = serving_on(store, tmp_path, engine, base)
    assert run(serving.swap_to(verified(store, adapter))) is True
    assert run(serving.swap_to(verified(store, base))) is True
    assert serving.policy_version == base and not [e for e in engine.log if e[0] == "reload"]
    assert serving._adapter_for(base, named=False) is None


def test_the_canary_is_held_beside_the_served_version_and_never_unloaded_for_another(store, tmp_path):
    base = publish_base(store, tmp_path)
    served_adapter, canary = publish_adapter(store, tmp_path, base), publish_adapter(store, tmp_path, base, rank=4)
    nxt, after = publish_adapter(store, tmp_path, base, rank=8), publish_adapter(store, tmp_path, base, rank=1)
    serving = serving_on(store, tmp_path, ScriptedEngine(), base, lora_canary_beside=True, lora_max_loaded=3)
    assert serving.beside is not None, "the canary pointer is followed too"
    assert run(serving.swap_to(verified(store, served_adapter))) is True
    assert run(serving.hold_beside(verified(store, canary))) is True
    assert (serving.policy_version, serving.beside_version) == (served_adapter, canary)
    assert serving._adapter_for(canary, named=True).version == canary  # type: ignore[union-attr]
    assert run(serving.swap_to(verified(store, nxt))) is True
    # the next one makes room by unloading the previous served adapter, never the canary held beside
    assert run(serving.swap_to(verified(store, after))) is True
    assert serving.adapters is not None and set(serving.adapters.versions) == {canary, nxt, after}


def test_after_a_swap_room_is_made_for_the_next_adapter_off_its_path(store, tmp_path):
    base = publish_base(store, tmp_path)
    versions = [publish_adapter(store, tmp_path, base) for _ in range(4)]
    engine = ScriptedEngine()
    serving = serving_on(store, tmp_path, engine, base, lora_max_loaded=3)

    async def swap(version: str) -> list[tuple[str, str]]:
        start = len(engine.log)
        assert await serving.swap_to(verified(store, version)) is True
        path = engine.log[start:]
        assert serving.adapter_room is not None
        await serving.adapter_room
        return path

    async def scenario() -> None:
        for version in versions[:3]:
            await swap(version)
        # three slots: the served version and the one it replaced stay; the oldest went after the swap
        assert serving.adapters is not None and serving.adapters.versions == versions[1:3]
        assert engine.log[-1] == ("remove", versions[0])
        # so the next swap's own path is the add and the proof, no unload
        assert await swap(versions[3]) == [("add", versions[3]), ("generate", versions[3])]
        assert serving.adapters.versions == versions[2:4]

    run(scenario())


def test_room_is_not_made_from_kept_or_busy_adapters(tmp_path):
    slots = AdapterSlots(ScriptedEngine(), capacity=2, max_rank=8)  # type: ignore[arg-type]
    run(slots.load("policy-0002", tmp_path))
    run(slots.load("policy-0003", tmp_path))
    assert run(slots.make_room(keep={"policy-0002", "policy-0003"})) == []
    running = slots.acquire("policy-0002")
    assert running is not None
    assert run(slots.make_room(keep={"policy-0003"})) == [] and slots.versions == ["policy-0003", "policy-0002"]
    slots.release(running)
    assert run(slots.make_room(keep={"policy-0003"})) == ["policy-0002"] and slots.versions == ["policy-0003"]


def test_a_full_weight_canary_other_than_the_base_cannot_be_held_beside(store, tmp_path):
    base = publish_base(store, tmp_path)
    other = publish_base(store, tmp_path)
    serving = serving_on(store, tmp_path, ScriptedEngine(), base, lora_canary_beside=True)
    before = refused("not_beside")
    assert run(serving.hold_beside(verified(store, other))) is False
    assert refused("not_beside") == before + 1
    assert run(serving.hold_beside(verified(store, base))) is True and serving.adapter_pins == set()
