"""The inference service's logic: validate, template, generate, attribute, publish, hot-swap.

Transport-free: the gRPC servicer converts to and from these calls, and tests can drive it
directly. Every completion gets a response_id and the policy_versions that produced it (one, unless
a hot-swap happened under it: never with swap_mode "drain"; with the default "bounded" only for the
requests still running after the swap's drain budget), and one CompletionEvent on rlhf.completions.
Each request reaches the engine with a priority from its source (priority.py): users first.

Rolling swaps (a group of several replicas, RLHF_INFERENCE_SWAP_LEASE_DIR set): a verified version
is swapped in while this replica holds its group's lease (swap_lease.py), so that one replica of the
group swaps at a time; meanwhile it reports NOT_SERVING to the channels that route to it
(``set_routable``), lets its requests in flight finish (bounded), reloads and reports SERVING again.

Adapter versions (RLHF_INFERENCE_LORA_ADAPTERS; adapters.py): an announced LoRA adapter of the base
the engine holds is loaded into the engine's LoRA slots and proven, then new requests take it; no
request is held or recomputed (``_swap_adapter``), and the previous adapter stays loaded. A request
may name any loaded version (``GenerationRequest.policy_version``). A full-weight version is a new
base: swapped in place as above, which drops the loaded adapters.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from services.inference import metrics
from services.inference.adapters import AdapterLoadError, AdapterSlots, adapter_check, is_adapter
from services.inference.config import InferenceConfig, swap_drain_s
from services.inference.domain import (
    ROLES,
    CompletionResult,
    Delta,
    GenerationRequest,
    GenerationResult,
    PolicyStatus,
    Sampling,
)
from services.inference.engine import AdapterHandle, VllmEngine
from services.inference.load import LoadTicket, LoadTracker
from services.inference.priority import priority_class, request_priority
from services.inference.streaming import coalesce_delay
from services.inference.swap_gate import SwapGate
from services.inference.swap_lease import LeaseAbandoned, SwapLease
from services.inference.weights import Signature, check_compatible, files_signature, is_weight_file, tensor_signature
from services.inference.worker_extension import WeightsRefused
from shared.errors import InvalidArgument, NotFound, Unavailable
from shared.events import CompletionEvent, PolicyUpdateEvent, Timings
from shared.kafka.publishers import Outbox
from shared.kafka.topics import COMPLETIONS
from shared.logging import get_logger, log_event
from shared.model_store import ModelStore, ModelStoreError
from shared.models.adapters import adapter_info
from shared.models.encoding import render_prompt
from shared.version_copies import PrivateCopies
from shared.version_line import (
    POLICY_CANARY,
    POLICY_KINDS,
    VerifiedVersion,
    VersionFollower,
    VersionLine,
    VersionRefused,
)

log = get_logger(__name__)

MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 64
MAX_VERSION_CHARS = 64
"""Longest policy_version a request may name (a version name is ``<line>-<NNNN>``)."""


class GenerationStream:
    """One admitted request: its identity up front, then its deltas as they are generated."""

    def __init__(
        self,
        serving: InferenceServing,
        req: GenerationRequest,
        prompt_token_ids: list[int],
        arrived_at: float,
        load: LoadTicket | None = None,
    ):
        self.serving = serving
        self.load = load
        """This request's place in the replica's load counts (load.py), told of its first token."""
        self.request = req
        self.request_id = f"req-{uuid.uuid4().hex}"
        self.policy_version = req.policy_version or serving.policy_version
        self.adapter: AdapterHandle | None = None
        """The loaded adapter this request runs with (set at admission; None: the base weights)."""
        self.swaps_at_admission = serving.swaps
        self.model = serving.cfg.served_model_name
        self.prompt_token_ids = prompt_token_ids
        self.arrived_at = arrived_at
        self.admitted_at = time.monotonic()
        self.completions = [
            CompletionResult(
                response_id=f"resp-{uuid.uuid4().hex}", index=i, logprobs=[] if req.sampling.logprobs else None
            )
            for i in range(req.sampling.n)
        ]

    def __aiter__(self) -> AsyncIterator[Delta]:
        return self._run()

    def coalesced(self) -> AsyncIterator[Delta]:
        """The deltas for a streamed answer: after the first, each holds what the engine produced
        within RLHF_INFERENCE_STREAM_COALESCE_MS of the previous one (streaming.coalesce_delay)."""
        cfg = self.serving.cfg
        return self._run(cfg.stream_coalesce_ms / 1e3, cfg.stream_max_tokens_per_chunk)

    async def _run(self, window_s: float = 0.0, max_tokens: int = 0) -> AsyncIterator[Delta]:
        engine = self.serving.engine
        done = 0
        taken_at = 0.0  # when the previous step came from the engine (0: none yet)
        # Only a request on an adapter names one (engines without LoRA slots take no adapter argument).
        on_adapter = {"adapter": self.adapter} if self.adapter is not None else {}
        try:
            async for step in engine.generate(
                self.request_id,
                self.prompt_token_ids,
                self.request.sampling,
                request_priority(self.request.source),
                **on_adapter,
            ):
                now = time.monotonic()
                for out in step:
                    c = self.completions[out.index]
                    if c.first_token_at is None and out.token_ids:
                        c.first_token_at = now
                        if out.index == 0:
                            metrics.TTFT_SECONDS.observe(now - self.arrived_at)
                            if self.load is not None:
                                self.load.first_token(now)
                    c.text += out.text
                    c.token_ids += out.token_ids
                    if c.logprobs is not None and out.logprobs is not None:
                        c.logprobs += out.logprobs
                    if out.finish_reason:
                        c.finish_reason = "length" if out.finish_reason == "length" else "stop"
                        done += 1
                    yield Delta(out.index, c.response_id, out.text, out.token_ids, out.logprobs, c.finish_reason)
                if window_s > 0 and done < len(self.completions) and self._all_started():
                    # vLLM merges what it produces meanwhile: the next step holds all of it. (No
                    # wait before every completion has sent its first token: TTFT is never held.)
                    tokens = max((len(out.token_ids) for out in step), default=0)
                    span = now - taken_at if taken_at else 0.0
                    taken_at = now
                    delay = coalesce_delay(time.monotonic(), now, window_s, max_tokens, tokens, span)
                    if delay > 0:
                        await asyncio.sleep(delay)
        finally:
            if done < len(self.completions):
                # Client went away (or an error): free the engine's slots now.
                await engine.abort(self.request_id)
                metrics.REQUESTS.labels(self.request.source, "aborted").inc()
        self._finish()

    def _all_started(self) -> bool:
        return all(c.first_token_at is not None for c in self.completions)

    def policy_versions(self) -> list[str]:
        """The versions that produced tokens of this request: more than one only if an immediate
        swap happened while it ran."""
        return [self.policy_version, *self.serving.versions_since(self.swaps_at_admission)]

    def result(self) -> GenerationResult:
        return GenerationResult(
            self.request_id,
            self.policy_version,
            self.model,
            self.prompt_token_ids,
            self.completions,
            self.policy_versions(),
        )

    def _finish(self) -> None:
        now = time.monotonic()
        metrics.REQUESTS.labels(self.request.source, "ok").inc()
        metrics.REQUEST_SECONDS.observe(now - self.arrived_at)
        metrics.PROMPT_TOKENS.inc(len(self.prompt_token_ids))
        metrics.COMPLETION_TOKENS.inc(sum(len(c.token_ids) for c in self.completions))
        self.serving.publish_completions(self, now)


class InferenceServing:
    def __init__(self, cfg: InferenceConfig, engine: VllmEngine, store: ModelStore, publisher: Outbox | None):
        self.cfg = cfg
        self.engine = engine
        self.store = store
        self.publisher = publisher
        self.gate = SwapGate()
        self.load = LoadTracker()
        """In flight, waiting and recent user TTFT by source (GetLoad: the trainer yields to users)."""
        self.tokenizer: Any = None
        self.policy_version = ""
        self.policy_dir: Path | None = None
        self.base_version = ""
        """The full-weight version the engine holds: the served version, or the base of the served adapter."""
        self.base_dir: Path | None = None
        self.adapters = AdapterSlots(engine, cfg.lora_max_loaded, cfg.lora_max_rank) if cfg.lora_adapters else None
        """The adapter versions in the engine's LoRA slots (None: RLHF_INFERENCE_LORA_ADAPTERS off)."""
        self.adapter_pins: set[str] = set()
        """Adapter versions a pointer other than the followed one serves here (kept loaded)."""
        self.adapter_room: asyncio.Task[None] | None = None
        """The unload that makes room for the next adapter version after a swap (``_room_ahead``)."""
        self.serving_since = 0.0
        self.swaps = 0
        self.swap_log: list[tuple[int, str]] = []
        """(swap number, version swapped to), the most recent swaps."""
        self.reload_failures = 0
        self.ready = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.lease: SwapLease | None = None
        """Set (by the app) for a replica of a group: swaps are rolling, one replica at a time."""
        self.set_routable: Callable[[bool], Awaitable[None]] | None = None
        """Reports SERVING (True) or NOT_SERVING (False) to the channels that route to this replica."""
        self.stopping = threading.Event()
        self.versions = VersionFollower(
            VersionLine(store, POLICY_KINDS[cfg.follow], keys=cfg.versions.verify_keys("policy")),
            serving=lambda: self.policy_version,
            swap=self._swap_from_follower,
            refused=metrics.SWAP_REFUSED,
            check=self._check_compatible,
            copies=PrivateCopies(cfg.versions.copies_dir, "policy"),
            defer=lambda manifest, rel: not is_adapter(manifest) and is_weight_file(rel),
        )
        """The policy line as this replica follows it: announcements are authenticated and verified
        there, each version copied into this replica's private directory except a full-weight
        version's weight files, which the engine's worker reads from the store once, checking them
        against the signed manifest as it reads (worker_extension.py); either way the engine loads
        the bytes that were checked."""
        self.base_signature: Signature = {}
        """The tensors of the full weights the engine holds (name -> shape, dtype): what a new
        full-weight version must match, and what an adapter's factors must fit."""
        self.base_verified: VerifiedVersion | None = None
        """The full-weight version the engine holds, as verified (reloaded if a swap fails midway)."""
        self.beside_version = ""
        """The canary pointer's version, held beside the served one (RLHF_INFERENCE_LORA_CANARY_BESIDE)."""
        self.beside = (
            VersionFollower(
                VersionLine(store, POLICY_CANARY, keys=cfg.versions.verify_keys("policy")),
                serving=lambda: self.beside_version,
                swap=self._beside_from_follower,
                refused=metrics.SWAP_REFUSED,
                check=self._check_compatible,
                copies=PrivateCopies(cfg.versions.copies_dir, "policy"),
            )
            if cfg.lora_canary_beside
            else None
        )
        """The canary pointer as this replica follows it beside its own (None: it follows one pointer)."""

    # --- start ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Verify the policy version to serve (the store's signed announcement record, or the pinned
        version; see VersionFollower.initial), load its private copy into the engine and its tokenizer."""
        try:
            verified = await asyncio.to_thread(self.versions.initial, self.cfg.policy_version or None)
        except VersionRefused as exc:
            raise Unavailable(f"cannot start from the model store at {self.store.root}: {exc}") from None
        except ModelStoreError as exc:
            raise Unavailable(f"cannot start: {type(exc).__name__}: {exc}") from None
        if verified is None:
            raise Unavailable(f"no policy version in the model store at {self.store.root}; run `rlhf bootstrap`")
        version, model_dir = verified.version, verified.path
        base = await asyncio.to_thread(self._base_at_start, verified)  # itself, or the adapter's base
        from shared.models.loading import load_tokenizer

        self.tokenizer = await asyncio.to_thread(load_tokenizer, base.path)
        if not getattr(self.tokenizer, "chat_template", None):
            raise Unavailable(f"{version}: the tokenizer has no chat template")
        started = time.monotonic()
        await self.engine.start(base.path)
        self.base_version, self.base_dir = base.version, base.path
        self.base_verified = base
        self.base_signature = await asyncio.to_thread(tensor_signature, base.path)
        if self.adapters is not None:
            self.adapters.probe_prompt = [self.tokenizer.bos_token_id or 0]
        if base is not verified:
            await self._load_adapter_at_start(verified)
        self._set_version(version, model_dir)
        self._loop = asyncio.get_running_loop()
        await self._start_beside()
        self.ready = True
        log_event(log, "policy loaded", version=version, load_s=round(time.monotonic() - started, 2))

    def _base_at_start(self, verified: VerifiedVersion) -> VerifiedVersion:
        """The full-weight version the engine starts from: ``verified`` itself, or, for an adapter
        version, its base (signed and copied privately like any version; kept among the served
        copies, the engine's weights, as long as adapters of it are served)."""
        if not is_adapter(verified.manifest):
            return verified
        if self.adapters is None:
            raise Unavailable(f"{verified.version} is an adapter version; serve it with RLHF_INFERENCE_LORA_ADAPTERS=1")
        try:
            info = adapter_info(verified.manifest)
            assert info is not None
            base = self.versions.line.materialize(info.base_version, self.versions.private, expected_sha256=None)
        except (VersionRefused, ModelStoreError, ValueError) as exc:
            raise Unavailable(f"cannot start from adapter {verified.version}: {exc}") from None
        self.versions.private.promote(base.path)
        self.versions.private.promote(verified.path)  # the served copy last: the base stays the "previous"
        return base

    async def _load_adapter_at_start(self, verified: VerifiedVersion) -> None:
        assert self.adapters is not None and self.base_dir is not None
        try:
            adapter_check(
                verified, self.base_version, self.base_dir, self.store, self.cfg.lora_max_rank, self.base_signature
            )
            await self.adapters.load(verified.version, verified.path)
        except (VersionRefused, ValueError, AdapterLoadError) as exc:
            raise Unavailable(f"cannot start from adapter {verified.version}: {exc}") from None

    async def _start_beside(self) -> None:
        """Load the canary pointer's version beside the served one (RLHF_INFERENCE_LORA_CANARY_BESIDE);
        one that cannot be held here is logged and the replica serves its own version alone."""
        if self.beside is None:
            return
        try:
            verified = await asyncio.to_thread(self.beside.initial)
        except (VersionRefused, ModelStoreError) as exc:
            log_event(log, "the canary version cannot be held beside", level=30, error=str(exc))
            return
        if verified is not None:
            try:
                await asyncio.to_thread(self._check_compatible, verified)
            except (VersionRefused, ValueError) as exc:
                log_event(log, "the canary version cannot be held beside", level=30, error=str(exc))
                return
            await self.hold_beside(verified)

    def _set_version(self, version: str, model_dir: Path) -> None:
        if self.policy_version:
            metrics.POLICY_VERSION.labels(self.policy_version).set(0)
        metrics.POLICY_VERSION.labels(version).set(1)
        self.policy_version = version
        self.policy_dir = model_dir
        self.serving_since = time.time()

    # --- requests ------------------------------------------------------------------------------

    def validate(self, req: GenerationRequest) -> list[int]:
        """Check a request against the limits and return its chat-templated prompt token ids."""
        if not self.ready:
            raise Unavailable("the policy is still loading")
        cfg, s = self.cfg, req.sampling
        if not req.messages:
            raise InvalidArgument("messages must not be empty", param="messages")
        if len(req.messages) > cfg.max_messages:
            raise InvalidArgument(f"at most {cfg.max_messages} messages per request", param="messages")
        for i, m in enumerate(req.messages):
            if m.role not in ROLES:
                raise InvalidArgument(
                    f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.role!r}", param=f"messages[{i}].role"
                )
            if len(m.content) > cfg.max_message_chars:
                raise InvalidArgument(
                    f"messages[{i}].content is longer than {cfg.max_message_chars} characters",
                    param=f"messages[{i}].content",
                )
        prompt_chars = sum(len(m.content) for m in req.messages)
        if prompt_chars > cfg.max_prompt_chars:
            # Before tokenising: the cost of a refusal must not grow with the prompt.
            raise InvalidArgument(
                f"the messages hold {prompt_chars} characters; at most {cfg.max_prompt_chars} per request",
                param="messages",
            )
        if not any(m.content.strip() for m in req.messages if m.role == "user"):
            raise InvalidArgument("messages need at least one non-empty user message", param="messages")
        if req.source not in ("user", "trainer"):
            raise InvalidArgument(f"source must be user or trainer, got {req.source!r}", param="source")
        if not 1 <= s.n <= cfg.max_n:
            raise InvalidArgument(f"n must be between 1 and {cfg.max_n}, got {s.n}", param="n")
        if not 0 <= s.temperature <= 2:
            raise InvalidArgument(f"temperature must be between 0 and 2, got {s.temperature}", param="temperature")
        if not 0 < s.top_p <= 1:
            raise InvalidArgument(f"top_p must be in (0, 1], got {s.top_p}", param="top_p")
        if s.top_k < 0:
            raise InvalidArgument("top_k must not be negative", param="top_k")
        if not 1 <= s.max_tokens <= cfg.max_tokens_limit:
            raise InvalidArgument(
                f"max_tokens must be between 1 and {cfg.max_tokens_limit}, got {s.max_tokens}", param="max_tokens"
            )
        if len(s.stop) > MAX_STOP_SEQUENCES or any(not x or len(x) > MAX_STOP_CHARS for x in s.stop):
            raise InvalidArgument(
                f"stop takes at most {MAX_STOP_SEQUENCES} non-empty strings of at most {MAX_STOP_CHARS} characters",
                param="stop",
            )
        prompt_ids = render_prompt(self.tokenizer, req.messages)
        if len(prompt_ids) + s.max_tokens > cfg.max_model_len:
            raise InvalidArgument(
                f"the prompt has {len(prompt_ids)} tokens; with max_tokens={s.max_tokens} that exceeds the "
                f"context length {cfg.max_model_len}",
                param="messages",
            )
        return prompt_ids

    def sampling_defaults(self, **given: Any) -> Sampling:
        """A Sampling with the server's defaults for every value not given (None)."""
        values = {k: v for k, v in given.items() if v is not None}
        values.setdefault("max_tokens", self.cfg.default_max_tokens)
        return Sampling(**values)

    @asynccontextmanager
    async def stream(self, req: GenerationRequest) -> AsyncIterator[GenerationStream]:
        """Admit a validated request; the stream's policy_version is fixed for its whole life."""
        arrived = time.monotonic()
        prompt_ids = self.validate(req)
        async with self.gate.admit():
            stream = GenerationStream(self, req, prompt_ids, arrived)
            stream.adapter = self._adapter_for(stream.policy_version, named=bool(req.policy_version))
            metrics.REQUESTS_BY_PRIORITY.labels(priority_class(request_priority(req.source))).inc()
            metrics.IN_FLIGHT.inc()
            stream.load = ticket = self.load.enter(req.source, arrived)
            try:
                yield stream
            finally:
                metrics.IN_FLIGHT.dec()
                ticket.leave()
                if stream.adapter is not None and self.adapters is not None:
                    self.adapters.release(stream.adapter)

    def _adapter_for(self, version: str, *, named: bool) -> AdapterHandle | None:
        """The loaded adapter a request on ``version`` runs with, counted as in use (None: the base
        weights serve it). NotFound for a named version this replica does not serve."""
        if len(version) > MAX_VERSION_CHARS:
            raise InvalidArgument(
                f"policy_version is longer than {MAX_VERSION_CHARS} characters", param="policy_version"
            )
        handle = self.adapters.acquire(version) if self.adapters is not None else None
        if handle is not None:
            metrics.ADAPTER_REQUESTS.labels("named" if named else "served").inc()
            return handle
        if version not in (self.policy_version, self.base_version):
            served = sorted({self.policy_version, *(self.adapters.versions if self.adapters else [])})
            raise NotFound(
                f"policy_version {version} is not served by this replica (it serves {', '.join(served)})",
                param="policy_version",
            )
        if version != self.base_version:  # the served adapter is always loaded; a bug otherwise
            raise Unavailable(f"adapter {version} is not loaded")
        return None

    async def generate(self, req: GenerationRequest) -> GenerationResult:
        async with self.stream(req) as stream:
            async for _ in stream:
                pass
            return stream.result()

    def publish_completions(self, stream: GenerationStream, finished_at: float) -> None:
        if self.publisher is None:
            return
        req = stream.request
        sampling = asdict(req.sampling)
        sampling["stop"] = list(req.sampling.stop)
        for c in stream.completions:
            first = c.first_token_at or finished_at
            event = CompletionEvent(
                request_id=stream.request_id,
                response_id=c.response_id,
                index=c.index,
                n=req.sampling.n,
                policy_version=stream.policy_version,
                model=stream.model,
                source=req.source,
                messages=list(req.messages),
                prompt_token_ids=stream.prompt_token_ids,
                completion_text=c.text,
                token_ids=c.token_ids,
                logprobs=c.logprobs,
                finish_reason=c.finish_reason,
                sampling=sampling,
                policy_versions=stream.policy_versions(),
                timings=Timings(
                    queued_s=stream.admitted_at - stream.arrived_at,
                    first_token_s=first - stream.arrived_at,
                    total_s=finished_at - stream.arrived_at,
                ),
                created_at=time.time(),
                principal=req.principal,
                conversation_id=req.conversation_id,
            )
            # Keyed by request: all completions of one prompt land on one partition, in order.
            self.publisher.publish(COMPLETIONS, event, key=stream.request_id)

    # --- hot-swap --------------------------------------------------------------------------------

    @property
    def refused_updates(self) -> int:
        """Announced versions not swapped in: refused by verification, or whose reload failed."""
        return self.versions.refusals + self.reload_failures

    async def apply_update(self, update: PolicyUpdateEvent) -> bool:
        """Swap to an announced version if it verifies; otherwise refuse and keep serving.

        Returns True when the served version changed. (The follower thread does the same through
        ``VersionFollower.accept``; this is the call for code already on the event loop.)
        """
        return await asyncio.to_thread(self.versions.accept, update)

    def _swap_from_follower(self, verified: VerifiedVersion) -> bool:
        """The follower thread's swap: run ``swap_to`` on the serving loop and wait for it; for a
        replica of a group, a ``rolling_swap`` while it holds the group's lease."""
        assert self._loop is not None, "start() first"
        if self.lease is None or is_adapter(verified.manifest):
            # An adapter swap holds no request: no need to leave the group's routing for it.
            return asyncio.run_coroutine_threadsafe(self.swap_to(verified), self._loop).result()
        if verified.version == self.policy_version:
            return False
        try:
            with self.lease.held(self.stopping) as waited_s:
                log_event(log, "swap lease taken", version=verified.version, waited_s=round(waited_s, 2))
                return asyncio.run_coroutine_threadsafe(self.rolling_swap(verified), self._loop).result()
        except LeaseAbandoned:
            log_event(log, "stopping: the swap waiting for the lease is dropped", version=verified.version)
            return False

    async def _routable(self, serving: bool) -> None:
        metrics.ROUTABLE.set(1 if serving else 0)
        if self.set_routable is not None:
            await self.set_routable(serving)

    async def rolling_swap(self, verified: VerifiedVersion) -> bool:
        """Swap while the group's other replicas serve: report NOT_SERVING, wait ``swap_settle_s``
        (clients stop sending new requests here), let the requests in flight finish (at most
        ``swap_drain_timeout_s``; those still running then are swapped immediately and finish on the
        new weights), reload, report SERVING and wait ``swap_settle_s`` again (clients route here
        again before the next replica of the group goes). After the drain, requests that arrived
        meanwhile get the drain budget (swap_drain_budget_s), as in a bounded swap: never unbounded."""
        cfg = self.cfg
        await self._routable(False)
        try:
            await asyncio.sleep(cfg.swap_settle_s)
            idle = await self.gate.wait_idle(cfg.swap_drain_timeout_s)
            if not idle:
                metrics.ROLLING_DRAIN_TIMEOUTS.inc()
                log_event(
                    log,
                    "requests still running after the drain timeout: swapping immediately",
                    level=30,
                    in_flight=self.gate.in_flight,
                    timeout_s=cfg.swap_drain_timeout_s,
                )
            return await self.swap_to(verified, drain_s=cfg.swap_drain_budget_s if idle else 0.0)
        finally:
            await self._routable(True)
            await asyncio.sleep(cfg.swap_settle_s)

    def _check_compatible(self, verified: VerifiedVersion) -> None:
        """The new weights must fit the engine's model in place (raises IncompatibleWeights); an
        adapter must be one of the base the engine holds, fit its layers and the LoRA slots
        (adapters.adapter_check: VersionRefused or IncompatibleWeights)."""
        served = self.base_dir or self.policy_dir  # the weights the engine holds
        assert served is not None
        if is_adapter(verified.manifest):
            if self.adapters is None:
                raise VersionRefused(
                    "adapters_disabled",
                    f"{verified.version} is an adapter version; this replica serves none "
                    "(RLHF_INFERENCE_LORA_ADAPTERS=1 serves them)",
                )
            adapter_check(verified, self.base_version, served, self.store, self.cfg.lora_max_rank, self.base_signature)
            return
        deferred = [f.path for f in verified.deferred if is_weight_file(f.rel)]
        check_compatible(
            served,
            verified.path,
            served_signature=self.base_signature or None,
            # read from the store's headers before the load; the worker checks the bytes it loads again
            new_signature=files_signature(deferred) if deferred else None,
        )

    async def swap_to(self, verified: VerifiedVersion, drain_s: float | None = None) -> bool:
        """Hot-swap the engine to a verified version, holding new requests at most ``drain_s`` while
        those in flight finish (None: by swap_mode, ``config.swap_drain_s``); the requests still
        running then are recomputed on the new weights and list both versions."""
        if verified.version == self.policy_version:
            return False
        if is_adapter(verified.manifest):
            return await self._swap_adapter(verified)
        if verified.version == self.base_version and self.adapters is not None:
            return self._serve_base(verified)  # back from an adapter to the weights the engine holds
        new_dir = verified.path
        if drain_s is None:
            drain_s = swap_drain_s(self.cfg)
        staged = await self._stage(verified)  # read and checked while users are still served
        if staged is False:
            return False
        closed_at = time.monotonic()
        async with self.gate.exclusive(drain_s) as idle:
            drained_at = time.monotonic()
            running = not idle
            swapped_under = self.gate.in_flight
            try:
                phases = await self._load(verified, staged, running)
            except WeightsRefused as exc:  # nothing was loaded: the served weights are intact
                self._refuse_staged(verified, exc)
                return False
            except Exception as exc:  # noqa: BLE001 - any engine failure: restore the served weights
                self.reload_failures += 1
                metrics.SWAP_REFUSED.labels("reload_failed").inc()
                log_event(
                    log,
                    "reload failed; restoring the served weights",
                    level=40,
                    version=verified.version,
                    error=f"{type(exc).__name__}: {exc}",
                )
                # The engine may hold part of the new tensors: reload the served version in full.
                served = self.base_verified  # set by start(), before any swap
                assert served is not None
                await self._load(served, await self._stage(served, required=True), running)
                await self._reload_served_adapter()
                return False
            self.base_verified = verified
            old = self.policy_version
            self._set_version(verified.version, new_dir)
            self.base_version, self.base_dir = verified.version, new_dir
            if self.adapters is not None:
                self.adapters.forget_all()  # vLLM dropped them with the old base
                self.adapter_pins.clear()  # a canary held beside was an adapter of the old base too
            self.swaps += 1
            self.swap_log = [*self.swap_log[-99:], (self.swaps, verified.version)]
        pause = time.monotonic() - closed_at
        # the engine's part of the pause: waiting for its step in progress, vLLM's reload
        engine_phases: dict[str, Any] = {
            f"engine_{k.removesuffix('_s')}_ms": round(v * 1e3, 1) for k, v in phases.items()
        }
        metrics.SWAPS.inc()
        metrics.SWAP_PAUSE_SECONDS.observe(pause)
        metrics.SWAPPED_UNDER.inc(swapped_under)
        log_event(
            log,
            "hot-swapped policy",
            old=old,
            new=verified.version,
            reason=verified.reason,
            mode=self.cfg.swap_mode,
            drain_budget_s=None if math.isinf(drain_s) else drain_s,
            rolling=self.lease is not None,
            in_flight=self.gate.in_flight,
            swapped_under=swapped_under,
            drain_ms=round((drained_at - closed_at) * 1e3, 1),
            **engine_phases,
            pause_ms=round(pause * 1e3, 1),
        )
        return True

    async def _stage(self, verified: VerifiedVersion, *, required: bool = False) -> str | bool | None:
        """Have the engine's worker read and check ``verified``'s weight files from the store (the
        engine keeps generating meanwhile); the staging token, None when its weights are in its
        private copy, False when they were refused (counted and logged). ``required``: raise instead."""
        files = [f for f in verified.deferred if is_weight_file(f.rel)]
        if not files:
            return None
        token = f"{verified.version}-{uuid.uuid4().hex[:8]}"
        size = sum(f.digest.bytes for f in files)
        metrics.STAGED_WEIGHT_BYTES.set(size)
        started = time.monotonic()
        try:
            await self.engine.stage_weights(token, files)
        except WeightsRefused as exc:
            metrics.STAGED_WEIGHT_BYTES.set(0)
            if required:
                raise
            self._refuse_staged(verified, exc)
            return False
        log_event(
            log,
            "staged weights",
            version=verified.version,
            bytes=size,
            stage_ms=round((time.monotonic() - started) * 1e3, 1),
        )
        return token

    async def _load(self, verified: VerifiedVersion, staged: str | bool | None, running: bool) -> dict[str, float]:
        """Load ``verified``'s weights in place: the staged ones (the worker checks that their tensors
        are exactly ``base_signature``'s) or its private copy's (checked by ``_check_compatible``).
        Either way the engine's tensors keep their names, shapes and dtypes. Returns the staged
        load's phases (engine.load_staged; empty for a load from the private copy)."""
        try:
            if isinstance(staged, str):
                return await self.engine.load_staged(staged, self.base_signature, with_requests_running=running)
            await self.engine.reload_weights(verified.path, with_requests_running=running)
            return {}
        finally:
            metrics.STAGED_WEIGHT_BYTES.set(0)

    def _refuse_staged(self, verified: VerifiedVersion, exc: WeightsRefused) -> None:
        self.reload_failures += 1
        metrics.SWAP_REFUSED.labels(f"staged_{exc.reason}").inc()
        log_event(
            log,
            "the engine refused the version's weights; still serving the old version",
            level=40,
            version=verified.version,
            serving=self.policy_version,
            reason=exc.reason,
            error=str(exc),
        )

    async def _swap_adapter(self, verified: VerifiedVersion) -> bool:
        """Serve an adapter version (checked by ``_check_compatible``): load it beside the served
        one and prove it (adapters.AdapterSlots.load), then point new requests at it. Nothing is held:
        requests in flight finish with the version they were admitted with. A load that fails is
        refused (``adapter_load_failed``) and the served version is unchanged."""
        assert self.adapters is not None
        started = time.monotonic()
        keep = {self.policy_version, *self.adapter_pins}
        try:
            await self.adapters.load(verified.version, verified.path, keep=keep)
        except AdapterLoadError as exc:
            self.reload_failures += 1
            metrics.SWAP_REFUSED.labels("adapter_load_failed").inc()
            log_event(
                log,
                "adapter load failed; still serving the old version",
                level=40,
                version=verified.version,
                serving=self.policy_version,
                error=str(exc),
            )
            return False
        old = self.policy_version
        self._set_version(verified.version, verified.path)  # no await since the load: one step
        self.swaps += 1  # not in swap_log: no request in flight changes version
        self.adapter_room = asyncio.create_task(self._room_ahead({verified.version, old, *self.adapter_pins}))
        assert self.base_dir is not None
        self.versions.private.promote(self.base_dir)  # the engine's base stays among the kept copies
        seconds = time.monotonic() - started
        metrics.SWAPS.inc()
        log_event(
            log,
            "swapped to adapter version",
            old=old,
            new=verified.version,
            base=self.base_version,
            reason=verified.reason,
            loaded=self.adapters.versions,
            in_flight=self.gate.in_flight,
            load_ms=round(seconds * 1e3, 1),
        )
        return True

    async def _room_ahead(self, keep: set[str]) -> None:
        """After an adapter swap, make room for the next version now, off the path of its
        announcement (adapters.AdapterSlots.make_room); the version replaced stays loaded (an
        instant way back), as do the pinned ones."""
        assert self.adapters is not None
        try:
            await self.adapters.make_room(keep)
        except Exception as exc:  # noqa: BLE001 - the next load makes room itself
            log_event(log, "could not make room for the next adapter", level=30, error=f"{type(exc).__name__}: {exc}")

    def _beside_from_follower(self, verified: VerifiedVersion) -> bool:
        """The canary follower thread's swap: ``hold_beside`` on the serving loop."""
        assert self._loop is not None, "start() first"
        return asyncio.run_coroutine_threadsafe(self.hold_beside(verified), self._loop).result()

    async def hold_beside(self, verified: VerifiedVersion) -> bool:
        """Hold the canary pointer's version loaded beside the served one (its adapter pinned: never
        unloaded while it is the canary), so that requests naming it are answered here; the served
        version does not change. A full-weight version is held only if it is the base the engine
        has (the canary pointer back on the stable version); another one cannot be served beside."""
        if not is_adapter(verified.manifest):
            if verified.version != self.base_version:
                metrics.SWAP_REFUSED.labels("not_beside").inc()
                log_event(
                    log,
                    "a full-weight canary cannot be served beside this engine's base",
                    level=30,
                    version=verified.version,
                    base=self.base_version,
                )
                return False
            self.adapter_pins.clear()
            self.beside_version = verified.version
            return True
        assert self.adapters is not None  # lora_canary_beside needs lora_adapters (config.problems)
        try:
            await self.adapters.load(verified.version, verified.path, keep={self.policy_version})
        except AdapterLoadError as exc:
            metrics.SWAP_REFUSED.labels("adapter_load_failed").inc()
            log_event(log, "could not load the canary beside", level=40, version=verified.version, error=str(exc))
            return False
        self.adapter_pins = {verified.version}
        self.beside_version = verified.version
        log_event(log, "holding the canary beside", version=verified.version, serving=self.policy_version)
        return True

    def _serve_base(self, verified: VerifiedVersion) -> bool:
        """Serve the base weights the engine holds (a rollback from an adapter to its base): new
        requests run without an adapter; nothing is reloaded or held."""
        old = self.policy_version
        self._set_version(verified.version, verified.path)
        self.swaps += 1
        assert self.base_dir is not None
        self.versions.private.promote(self.base_dir)
        metrics.SWAPS.inc()
        log_event(log, "serving the base weights", old=old, new=verified.version, reason=verified.reason)
        return True

    async def _reload_served_adapter(self) -> None:
        """After the base weights were reloaded (vLLM dropped every adapter): load the served
        adapter again, if one is served."""
        if self.adapters is None:
            return
        self.adapters.forget_all()
        if self.policy_version != self.base_version and self.policy_dir is not None:
            try:
                await self.adapters.load(self.policy_version, self.policy_dir)
            except AdapterLoadError as exc:
                log_event(log, "could not reload the served adapter", level=40, error=str(exc))

    def versions_since(self, swaps_seen: int) -> list[str]:
        return [version for n, version in self.swap_log if n > swaps_seen]

    def token_texts(self, token_ids: list[int]) -> list[str]:
        """The text of each token on its own (for OpenAI-style logprobs)."""
        return [self.tokenizer.decode([t]) for t in token_ids]

    def status(self) -> PolicyStatus:
        return PolicyStatus(
            self.policy_version,
            self.cfg.served_model_name,
            self.serving_since,
            self.cfg.max_model_len,
            self.swaps,
            self.refused_updates,
        )

    async def close(self) -> None:
        self.stopping.set()
        self.ready = False
        self.engine.shutdown()
        self.versions.private.close()
        if self.beside is not None:
            self.beside.private.close()
