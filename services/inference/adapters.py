"""Adapter versions (LoRA) in the engine's LoRA slots: check, load, prove, serve side by side, unload.

A policy version that is an adapter (shared/models/adapters.py: PEFT's safetensors output, its
manifest naming the full-weight ``base_version``) is served beside the base weights the engine
holds, never in place of them:

    slots = AdapterSlots(engine, capacity=4, max_rank=16)
    adapter_check(verified, base_version, base_dir, store, max_rank)  # before anything is loaded
    handle = await slots.load("policy-0007", verified.path, keep={"policy-0006"})  # added, then proven
    handle = slots.acquire("policy-0007")     # a request runs with it ...
    slots.release(handle)                     # ... and is done

**Atomic swap.** ``load`` adds the adapter to the engine (vLLM reads its files between two steps;
no request is paused, no request is recomputed) and proves it serves with a one-token greedy
generation through it. Only then does the caller point new requests at it (serving.py: one
assignment, no await); requests already running keep the adapter they were admitted with to their
end, so every answer comes from exactly one version with no pause at all. An adapter that fails
anywhere before that (refused by ``adapter_check``, not added, or its probe fails) is removed again
(AdapterLoadError) and the served version never changed. The previous adapter stays loaded: a
rollback to it is a pointer move.

**Bounded.** At most ``capacity`` adapters are held (vLLM's ``max_cpu_loras`` is the same number,
so vLLM never evicts one itself and never re-reads a file). Loading one more first unloads the
least recently used adapters that no pointer references (``keep``) and no request runs with
(``evictions``); when none can go, the load is refused. ``rlhf_inference_adapters_loaded`` shows the
count. A base-weight reload drops every adapter in the engine (vLLM: they were trained on the old
base); ``forget_all`` clears the book.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

from services.inference import metrics
from services.inference.domain import Sampling
from services.inference.engine import AdapterHandle, VllmEngine
from services.inference.weights import Signature, check_adapter_fits
from shared.logging import get_logger, log_event
from shared.model_store import Manifest, ModelStore, version_number
from shared.models.adapters import EXTRA_KEY, AdapterInfo, adapter_info, adapter_problem
from shared.version_line import VerifiedVersion, VersionRefused

log = get_logger(__name__)

PROBE_TIMEOUT_S = 60.0
"""How long the one-token proof of a newly loaded adapter may take before the load counts as failed."""


class AdapterLoadError(RuntimeError):
    """An adapter version could not be loaded and proven; the served version is unchanged."""


def slot_id(version: str) -> int:
    """vLLM's lora_int_id of a version: its number on the line (unique per version, at least 1)."""
    return max(1, version_number(version))


def evictions(lru: Sequence[str], keep: Collection[str], busy: Mapping[str, int], capacity: int) -> list[str]:
    """The adapters to unload before one more is loaded, with at most ``capacity`` loaded after it.

    ``lru`` is the loaded versions, least recently used first. Candidates are those no pointer
    references (not in ``keep``) and no request runs with (``busy[v]`` is 0), taken oldest first
    until ``len(lru) - len(chosen) + 1 <= capacity``. Raises AdapterLoadError when not enough can go.
    """
    need = len(lru) + 1 - capacity
    if need <= 0:
        return []
    chosen = [v for v in lru if v not in keep and busy.get(v, 0) == 0][:need]
    if len(chosen) < need:
        raise AdapterLoadError(
            f"no room for another adapter: {len(lru)} loaded (capacity {capacity}) and only {len(chosen)} "
            "of them unreferenced and idle"
        )
    return chosen


def is_adapter(manifest: Manifest | None) -> bool:
    """Whether a version's manifest makes it an adapter version (``extra["adapter"]`` present)."""
    return manifest is not None and EXTRA_KEY in manifest.extra


def adapter_check(
    verified: VerifiedVersion,
    base_version: str,
    base_dir: Path,
    store: ModelStore,
    max_rank: int,
    base_signature: Signature | None = None,
) -> AdapterInfo:
    """The adapter ``verified`` holds, if it may be loaded on the base the engine serves; raises
    VersionRefused otherwise: the format contract (``adapter_problem``: kind, files, no pickle, its
    config agreeing with the manifest, the base a full-weight version in the store), the base being
    the one the engine holds (``adapter_base_mismatch``: a new base comes through the full-weight
    path first), and its tensors fitting the base's layers and the slots' rank
    (``check_adapter_fits``; ``base_signature``: the base's tensors, when its weights are not in
    ``base_dir``)."""
    problem = adapter_problem(verified.manifest, store=store, version_dir=verified.path)
    if problem:
        raise VersionRefused("adapter_invalid", problem)
    info = adapter_info(verified.manifest)
    assert info is not None  # adapter_problem refuses a full-weight manifest
    if info.base_version != base_version:
        raise VersionRefused(
            "adapter_base_mismatch",
            f"{verified.version} is an adapter of {info.base_version}, but the engine holds {base_version}; "
            "announce the new base (full weights) first",
        )
    check_adapter_fits(base_dir, verified.path, info.rank, max_rank, base_signature)  # IncompatibleWeights
    return info


class AdapterSlots:
    """The adapter versions the engine holds, least recently used first, with the requests on each."""

    def __init__(self, engine: VllmEngine, capacity: int, max_rank: int, probe_prompt: Sequence[int] = (0,)):
        self.engine = engine
        self.capacity = capacity
        self.max_rank = max_rank
        self.probe_prompt = list(probe_prompt)
        """Token ids the one-token proof generates from (any valid ids; the serving sets a chat prompt)."""
        self._loaded: OrderedDict[str, AdapterHandle] = OrderedDict()
        self._busy: dict[str, int] = {}
        self._lock = asyncio.Lock()
        self.last_load: dict[str, float] = {}
        """Seconds of the last load: ``add_s`` (asking vLLM to add it, answered after the step in
        progress and the add), ``engine_hold_s`` (the add itself, between two steps: the only part
        that holds the engine's other requests), ``proof_s`` and ``total_s``."""
        metrics.ADAPTERS_LOADED.set(0)

    @property
    def versions(self) -> list[str]:
        """The loaded adapter versions, least recently used first."""
        return list(self._loaded)

    def get(self, version: str) -> AdapterHandle | None:
        return self._loaded.get(version)

    def busy(self, version: str) -> int:
        """Requests running with ``version`` now."""
        return self._busy.get(version, 0)

    def acquire(self, version: str) -> AdapterHandle | None:
        """The handle a request runs with (None: ``version`` is not loaded); counted until ``release``."""
        handle = self._loaded.get(version)
        if handle is None:
            return None
        self._loaded.move_to_end(version)
        self._busy[version] = self._busy.get(version, 0) + 1
        return handle

    def release(self, handle: AdapterHandle) -> None:
        left = self._busy.get(handle.version, 0) - 1
        if left > 0:
            self._busy[handle.version] = left
        else:
            self._busy.pop(handle.version, None)

    async def load(self, version: str, path: Path, keep: Collection[str] = ()) -> AdapterHandle:
        """Add ``version`` (its verified copy at ``path``) to the engine and prove it generates;
        unload least recently used adapters first if the slots are full (never one in ``keep`` or
        one a request runs with). Raises AdapterLoadError; then nothing of it stays loaded."""
        async with self._lock:
            existing = self._loaded.get(version)
            if existing is not None:
                self._loaded.move_to_end(version)
                return existing
            started = time.monotonic()
            for old in evictions(list(self._loaded), set(keep) | {version}, self._busy, self.capacity):
                await self._unload(old, "lru")
            handle = AdapterHandle(version, slot_id(version), path)
            try:
                adding = time.monotonic()
                held = await self.engine.add_adapter(handle)  # raises unless the engine lists it after
                added = time.monotonic()
                await asyncio.wait_for(self._probe(handle), PROBE_TIMEOUT_S)
            except Exception as exc:  # any failure: the adapter is not served
                metrics.ADAPTER_LOADS.labels("failed").inc()
                try:
                    await self.engine.remove_adapter(handle)
                except Exception as cleanup:  # noqa: BLE001 - best effort; the error below says what failed
                    log_event(log, "could not remove a failed adapter", level=30, version=version, error=str(cleanup))
                if isinstance(exc, AdapterLoadError):
                    raise
                raise AdapterLoadError(f"{version}: {type(exc).__name__}: {exc}") from exc
            self._loaded[version] = handle
            done = time.monotonic()
            self.last_load = {
                "add_s": added - adding,
                "engine_hold_s": held,
                "proof_s": done - added,
                "total_s": done - started,
            }
            metrics.ADAPTER_LOADS.labels("ok").inc()
            metrics.ADAPTER_LOAD_SECONDS.observe(done - started)
            metrics.ADAPTER_ENGINE_HOLD_SECONDS.observe(held)
            metrics.ADAPTERS_LOADED.set(len(self._loaded))
            log_event(
                log,
                "adapter loaded",
                version=version,
                slot=handle.slot_id,
                add_ms=round((added - adding) * 1e3, 1),
                engine_hold_ms=round(held * 1e3, 1),
                proof_ms=round((done - added) * 1e3, 1),
                load_ms=round((done - started) * 1e3, 1),
            )
            return handle

    async def _probe(self, handle: AdapterHandle) -> None:
        """One greedy token through the adapter: it is in the slots and the forward pass runs."""
        tokens = 0
        sampling = Sampling(temperature=0.0, max_tokens=1)
        async for step in self.engine.generate(
            f"adapter-probe-{uuid.uuid4().hex}", self.probe_prompt, sampling, 0, adapter=handle
        ):
            tokens += sum(len(out.token_ids) for out in step)
        if tokens < 1:
            raise AdapterLoadError(f"{handle.version}: the probe generated no token")

    async def make_room(self, keep: Collection[str] = ()) -> list[str]:
        """Unload the least recently used idle adapters (never one in ``keep`` or one a request runs
        with) until one more fits, so that the next version's load waits for no unload (each is a
        round trip through the engine's loop, a step on a busy engine). Where that is not possible
        nothing is unloaded: the next load makes room then, or says there is none. Returns the
        versions unloaded."""
        async with self._lock:
            try:
                gone = evictions(list(self._loaded), set(keep), self._busy, self.capacity)
            except AdapterLoadError:
                return []
            for old in gone:
                await self._unload(old, "lru")
            return gone

    async def unload(self, version: str, reason: str = "lru") -> bool:
        """Unload ``version`` if it is loaded and no request runs with it; True when it went."""
        async with self._lock:
            if version not in self._loaded or self.busy(version):
                return False
            await self._unload(version, reason)
            return True

    async def _unload(self, version: str, reason: str) -> None:
        handle = self._loaded.pop(version)  # before the await: no request can take it any more
        metrics.ADAPTERS_LOADED.set(len(self._loaded))
        metrics.ADAPTER_UNLOADS.labels(reason).inc()
        await self.engine.remove_adapter(handle)
        log_event(log, "adapter unloaded", version=version, reason=reason)

    def forget_all(self, reason: str = "base_changed") -> list[str]:
        """The engine dropped every adapter (its base weights were reloaded): clear the book."""
        gone = list(self._loaded)
        self._loaded.clear()
        metrics.ADAPTERS_LOADED.set(0)
        if gone:
            metrics.ADAPTER_UNLOADS.labels(reason).inc(len(gone))
            log_event(log, "adapters dropped", versions=gone, reason=reason)
        return gone
