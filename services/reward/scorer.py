"""The reward service's logic: validate, tokenize, batch, score, hot-swap reward model versions.

Transport-free: the gRPC servicer only converts to and from these calls, and the learner or the
trainer can call ``score_sync`` in-process.

Loading a version checks its signature (shared/version_line.py) and copies it into this replica's
private directory while hashing every file against the manifest (shared/version_copies.py): the
model is loaded from that copy, so the bytes checked are the bytes loaded; a corrupt, unsigned or
malformed checkpoint is refused, never half-loaded. A hot-swap loads the new version
completely beside the old one and then replaces one reference: a request reads that reference
once, so every score of a request comes from one version (the one it reports), requests in flight
finish on the old model, and the old one is freed when the last of them ends.

Sequences are built by encoding.py (the same code as training) and scored in forward passes of at
most ``max_batch_size`` sequences, sorted by length so that padding stays small, under
``torch.no_grad``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from services.reward import metrics
from services.reward.config import RewardConfig
from services.reward.domain import ROLES, RewardModelInfo, ScoreItem, ScoreResult
from shared.errors import InvalidArgument, RlhfError, Unavailable
from shared.events import RewardModelEvent
from shared.logging import get_logger, log_event
from shared.model_store import ModelStore, ModelStoreError
from shared.models.encoding import EncodingLimits, encode_rm_input, pad_batch
from shared.models.loading import autocast_dtype, load_tokenizer
from shared.models.reward_model import LoadedRewardModel, RewardModel, RewardModelError
from shared.version_copies import PrivateCopies
from shared.version_line import REWARD_MODEL, VerifiedVersion, VersionFollower, VersionLine

log = get_logger(__name__)


class RewardScorer:
    def __init__(self, cfg: RewardConfig, store: ModelStore):
        self.cfg = cfg
        self.store = store
        self.limits = EncodingLimits(cfg.max_tokens, cfg.max_response_tokens)
        self._current: LoadedRewardModel | None = None
        self._load_lock = threading.Lock()
        self._forward_lock = threading.Lock()
        # A fast tokenizer flips shared state per call (split_special_tokens): one encoder at a time.
        self._tokenize_lock = threading.Lock()
        self.swaps = 0
        self.versions = VersionFollower(
            VersionLine(store, REWARD_MODEL, keys=cfg.versions.verify_keys("rm")),
            serving=lambda: self.version,
            swap=self.swap_to,
            refused=metrics.SWAP_REFUSED,
            copies=PrivateCopies(cfg.versions.copies_dir, "rm"),
        )
        """The rm line as this scorer follows it: announcements are authenticated and verified there,
        each version copied into this replica's private directory, then loaded from that copy."""

    @property
    def refused_updates(self) -> int:
        return self.versions.refusals

    # --- versions ------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._current is not None

    @property
    def version(self) -> str:
        return self._current.version if self._current else ""

    def load(self, version: str | None = None) -> str:
        """Verify and load a version and score with it from now on. Before the first: the version
        the store's signed announcement record names, or ``version`` (pinned; see
        VersionFollower.initial). Later: ``version`` (default the store's current), e.g. one this
        process's retraining loop just published.

        Raises ModelStoreError (unknown or corrupt version), VersionRefused (unsigned or badly
        signed), RewardModelError (not a loadable RM) or Unavailable (no rm version at all); the
        version scoring so far, if any, stays in place.
        """
        if not self.ready:
            verified = self.versions.initial(version)
            if verified is None:
                raise self._no_model()
            return self._load(verified)
        version = version or self.store.current("rm")
        if not version:
            raise self._no_model()
        if version == self.version:
            return version
        verified = self.versions.local(version)
        loaded = False
        try:
            self._load(verified)
            loaded = True
        finally:
            self.versions.settle(verified, loaded)
        return version

    def _no_model(self) -> Unavailable:
        return Unavailable(
            f"no reward model in the model store at {self.store.root}: train one with "
            "`python -m services.reward.offline --rankings FILE` (or set RLHF_REWARD_BOOTSTRAP_RANKINGS)"
        )

    def _autocast(self) -> AbstractContextManager[Any]:
        """bf16 autocast of scoring when RLHF_REWARD_PRECISION asks for it (shared/models/loading.py)."""
        device_type = torch.device(self.cfg.device).type
        dtype = autocast_dtype(self.cfg.precision, device_type)
        return nullcontext() if dtype is None else torch.autocast(device_type=device_type, dtype=dtype)

    def _load(self, verified: VerifiedVersion) -> str:
        """Load the verified private copy and make it the scoring version (one reference swap)."""
        version = verified.version
        with self._load_lock:
            if self._current and self._current.version == version:
                return version
            started = time.monotonic()
            loaded = _load_copy(verified)
            self._check_limits(loaded)
            loaded.model.eval().to(self.cfg.device)
            old, self._current = self._current, loaded  # the swap: one reference assignment
        seconds = time.monotonic() - started
        metrics.LOAD_SECONDS.observe(seconds)
        if old is not None:
            metrics.RM_VERSION.labels(old.version).set(0)
            self.swaps += 1
            metrics.SWAPS.inc()
        metrics.RM_VERSION.labels(version).set(1)
        log_event(
            log,
            "reward model loaded",
            version=version,
            previous=old.version if old else "",
            offset=round(float(loaded.model.offset), 4),
            load_s=round(seconds, 2),
        )
        return version

    def _check_limits(self, loaded: LoadedRewardModel) -> None:
        context = getattr(loaded.model.backbone.config, "max_position_embeddings", None)
        if context is not None and self.limits.max_tokens > context:
            raise RewardModelError(
                f"{loaded.version}: RLHF_REWARD_MAX_TOKENS={self.limits.max_tokens} exceeds the "
                f"backbone's context length {context}"
            )

    def apply_update(self, event: RewardModelEvent) -> bool:
        """Swap to an announced version if it verifies and matches the announced manifest; otherwise
        refuse it and keep scoring with the current one. Returns True when the version changed."""
        return self.versions.accept(event)

    def swap_to(self, verified: VerifiedVersion) -> bool:
        """Load a version the follower verified and score with it from now on; a version that does
        not load as a reward model is refused (counted) and the current one keeps scoring."""
        if verified.version == self.version:
            return False
        try:
            self._load(verified)
        except (ModelStoreError, RewardModelError, OSError, ValueError) as exc:
            self.versions.refuse(verified.version, type(exc).__name__, str(exc))
            return False
        return True

    def info(self) -> RewardModelInfo:
        cur = self._current
        if cur is None:
            raise Unavailable("the reward model is still loading")
        return RewardModelInfo(cur.version, cur.parent, cur.published_at, dict(cur.metrics or {}))

    # --- scoring -------------------------------------------------------------------------------

    def validate(self, items: list[ScoreItem]) -> None:
        """Limits and shapes; raises InvalidArgument naming the field (e.g. ``items[3].response``)."""
        cfg = self.cfg
        if not items:
            raise InvalidArgument("items must not be empty: send at least one (messages, response) item", param="items")
        if len(items) > cfg.max_items:
            raise InvalidArgument(f"at most {cfg.max_items} items per request, got {len(items)}", param="items")
        for i, item in enumerate(items):
            where = f"items[{i}]"
            if not item.messages:
                raise InvalidArgument(f"{where}.messages must not be empty", param=f"{where}.messages")
            if len(item.messages) > cfg.max_messages:
                raise InvalidArgument(
                    f"{where}.messages has {len(item.messages)} messages; at most {cfg.max_messages}",
                    param=f"{where}.messages",
                )
            for j, m in enumerate(item.messages):
                if m.role not in ROLES:
                    raise InvalidArgument(
                        f"{where}.messages[{j}].role must be one of {', '.join(ROLES)}, got {m.role!r}",
                        param=f"{where}.messages[{j}].role",
                    )
                if len(m.content) > cfg.max_message_chars:
                    raise InvalidArgument(
                        f"{where}.messages[{j}].content is longer than {cfg.max_message_chars} characters",
                        param=f"{where}.messages[{j}].content",
                    )
            if not any(m.role == "user" and m.content.strip() for m in item.messages):
                raise InvalidArgument(
                    f"{where}.messages need at least one non-empty user message", param=f"{where}.messages"
                )
            if not item.response.strip():
                raise InvalidArgument(f"{where}.response must not be empty", param=f"{where}.response")
            if len(item.response) > cfg.max_response_chars:
                raise InvalidArgument(
                    f"{where}.response is longer than {cfg.max_response_chars} characters", param=f"{where}.response"
                )

    def score_sync(self, items: list[ScoreItem]) -> ScoreResult:
        """Validate and score ``items`` with the version current at the call (blocking)."""
        started = time.monotonic()
        loaded = self._current  # read once: the whole request uses this version
        try:
            if loaded is None:
                raise Unavailable("the reward model is still loading")
            self.validate(items)
            result = self._score(loaded, items)
        except RlhfError as exc:
            metrics.REQUESTS.labels("invalid" if isinstance(exc, InvalidArgument) else "unavailable").inc()
            raise
        metrics.REQUESTS.labels("ok").inc()
        metrics.REQUEST_SECONDS.observe(time.monotonic() - started)
        return result

    async def score(self, items: list[ScoreItem]) -> ScoreResult:
        """``score_sync`` in a worker thread, so the event loop keeps serving other calls."""
        return await asyncio.to_thread(self.score_sync, items)

    def _score(self, loaded: LoadedRewardModel, items: list[ScoreItem]) -> ScoreResult:
        tok = loaded.tokenizer
        with self._tokenize_lock:
            encoded = [encode_rm_input(tok, it.messages, it.response, self.limits) for it in items]
        pad_id = next((t for t in (tok.pad_token_id, tok.eos_token_id) if t is not None), 0)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
        scores = [0.0] * len(items)
        for start in range(0, len(order), self.cfg.max_batch_size):
            chunk = order[start : start + self.cfg.max_batch_size]
            ids, mask = pad_batch([encoded[i].input_ids for i in chunk], int(pad_id))
            ids, mask = ids.to(self.cfg.device), mask.to(self.cfg.device)
            with self._forward_lock, torch.no_grad(), self._autocast():
                out = loaded.model(ids, mask).float().tolist()
            metrics.FORWARD_BATCH.observe(len(chunk))
            for i, s in zip(chunk, out):
                scores[i] = float(s)
        truncated = [e.truncated for e in encoded]
        metrics.ITEMS.inc(len(items))
        metrics.TOKENS.inc(sum(len(e.input_ids) for e in encoded))
        metrics.TRUNCATED.inc(sum(truncated))
        for s in scores:
            metrics.SCORES.observe(s)
        return ScoreResult(scores, loaded.version, truncated)


def _load_copy(verified: VerifiedVersion) -> LoadedRewardModel:
    """The reward model in a verified private copy (model, tokenizer, and the manifest's facts)."""
    model = RewardModel.load(verified.path)
    try:
        tokenizer = load_tokenizer(verified.path)
    except (OSError, ValueError) as exc:
        raise RewardModelError(f"{verified.version}: unreadable tokenizer: {exc}") from None
    m = verified.manifest
    return LoadedRewardModel(verified.version, model, tokenizer, m.parent, m.created_at, dict(m.metrics))
