"""The feedback service's logic: check a rating, bind it to what the server actually served, write
it to Kafka with acks=all exactly once per intent, refuse the rest to the dead-letter topic.

Transport-free: the gRPC servicer only converts to and from these calls.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import cast

from services.feedback import metrics
from services.feedback.config import FeedbackConfig
from services.feedback.domain import (
    KINDS,
    MAX_ID_CHARS,
    MAX_RANKED,
    MAX_TAGS,
    MIN_RANKED,
    PREFERENCES,
    TAGS,
    THUMBS,
    Submission,
    SubmitResult,
)
from services.feedback.ledger import FeedbackLedger, LiveVote, comment_digest
from services.feedback.limits import TokenBucket
from shared.errors import InvalidArgument, PermissionDenied, RlhfError, Unauthenticated, Unavailable
from shared.events import FeedbackEvent, RatedResponse, RejectedFeedbackEvent
from shared.feedback_token import InvalidToken, verify
from shared.kafka.envelope import Envelope
from shared.kafka.publishers import Outbox, Publisher, PublishFailed
from shared.kafka.topics import FEEDBACK, FEEDBACK_DLQ
from shared.logging import get_logger, log_event

log = get_logger(__name__)

RAW_LIMIT = 8192
MAX_BATCH = 1000
_ACCEPTED = {kind: metrics.ACCEPTED.labels(kind) for kind in KINDS}  # labels() per rating cost more than inc()


class KeyedLocks:
    """One lock per key, dropped when nobody holds or waits for it.

    ``try_acquire`` takes a free key at once, without awaiting, so a batch can take the keys of all
    its ratings in one pass instead of running a task per rating; ``hold`` waits for a busy one.
    """

    def __init__(self) -> None:
        # A key is held while it is in here; its deque holds the waiters, first come first served.
        self._waiters: dict[object, collections.deque[asyncio.Future]] = {}

    def __len__(self) -> int:
        """Keys held now."""
        return len(self._waiters)

    def try_acquire(self, key: object) -> bool:
        if key in self._waiters:
            return False
        self._waiters[key] = collections.deque()
        return True

    async def acquire(self, key: object) -> None:
        if self.try_acquire(key):
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[key].append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(key)  # the key was handed over just as this waiter was cancelled: pass it on
            raise

    def release(self, key: object) -> None:
        """Hand the key to its next waiter, or drop it."""
        waiters = self._waiters[key]
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():  # a cancelled waiter is skipped
                waiter.set_result(None)
                return
        del self._waiters[key]

    def hold(self, key: object) -> _Held:
        """``async with locks.hold(key):`` runs the block alone among holders of the same key."""
        return _Held(self, key)


class _Held:
    # A class rather than @asynccontextmanager: this runs for every rating, and a generator-based
    # context manager costs several times more.
    __slots__ = ("key", "locks")

    def __init__(self, locks: KeyedLocks, key: object):
        self.locks = locks
        self.key = key

    async def __aenter__(self) -> None:
        await self.locks.acquire(self.key)

    async def __aexit__(self, *exc: object) -> None:
        self.locks.release(self.key)


# How many response ids each kind rates (at least, at most), and which kind each verdict field belongs to.
_RATED_COUNT = {"thumb": (1, 1), "likert": (1, 1), "pairwise": (2, 2), "ranking": (MIN_RANKED, MAX_RANKED)}
_FIELD_OWNER = {"thumb": "thumb", "score": "likert", "preferred": "pairwise", "ranks": "ranking"}


def check(sub: Submission, max_comment_chars: int) -> None:
    """Schema and range checks; raises InvalidArgument naming the field."""
    if sub.kind not in KINDS:
        raise InvalidArgument(f"kind must be one of {', '.join(KINDS)}, got {sub.kind!r}", param="type")
    if not sub.principal:
        raise Unauthenticated("no principal: the caller must say who was authenticated", param="principal")
    if len(sub.principal) > MAX_ID_CHARS:
        raise InvalidArgument(f"principal is longer than {MAX_ID_CHARS} characters", param="principal")
    if len(sub.label) > MAX_ID_CHARS:
        raise InvalidArgument(f"user must be at most {MAX_ID_CHARS} characters", param="user")
    if len(sub.idempotency_key) > MAX_ID_CHARS:
        raise InvalidArgument(f"idempotency_key is longer than {MAX_ID_CHARS} characters", param="idempotency_key")
    ids = sub.response_ids
    expected = _RATED_COUNT[sub.kind]
    param = "response_id" if sub.kind in ("thumb", "likert") else "response_ids"
    if not expected[0] <= len(ids) <= expected[1] or any(not i or len(i) > MAX_ID_CHARS for i in ids):
        n = str(expected[0]) if expected[0] == expected[1] else f"{expected[0]} to {expected[1]}"
        raise InvalidArgument(f"a {sub.kind} rates {n} response id(s), got {len(ids)}", param=param)
    if len(set(ids)) != len(ids):
        raise InvalidArgument("the same response id appears twice", param=param)
    if sub.kind == "thumb" and sub.thumb not in THUMBS:
        raise InvalidArgument(f"thumb must be 'up' or 'down', got {sub.thumb!r}", param="thumb")
    if sub.kind == "likert" and (sub.score is None or not 1 <= sub.score <= 7):
        raise InvalidArgument(f"score must be an integer from 1 to 7, got {sub.score!r}", param="score")
    if sub.kind == "pairwise" and sub.preferred not in PREFERENCES:
        raise InvalidArgument(f"preferred must be 'a', 'b' or 'tie', got {sub.preferred!r}", param="preferred")
    if sub.kind == "ranking" and sub.ranks is not None:
        check_ranks(sub.ranks, len(ids))
    for name, value in (("thumb", sub.thumb), ("score", sub.score), ("preferred", sub.preferred), ("ranks", sub.ranks)):
        owner = _FIELD_OWNER[name]
        if value is not None and sub.kind != owner:
            raise InvalidArgument(f"{name} belongs to {owner} ratings, not {sub.kind}", param=name)
    if len(sub.comment) > max_comment_chars:
        raise InvalidArgument(f"comment is longer than {max_comment_chars} characters", param="comment")
    if len(sub.tags) > MAX_TAGS or len(set(sub.tags)) != len(sub.tags):
        raise InvalidArgument(f"tags takes at most {MAX_TAGS} different tags", param="tags")
    unknown = [t for t in sub.tags if t not in TAGS]
    if unknown:
        raise InvalidArgument(f"unknown tag {unknown[0]!r}; known tags: {', '.join(TAGS)}", param="tags")


def check_ranks(ranks: list[int], n: int) -> None:
    """Ties in a ranking: one rank per response, positive, non-decreasing (best first)."""
    if len(ranks) != n:
        raise InvalidArgument(f"ranks needs one rank per response id ({n}), got {len(ranks)}", param="ranks")
    if any(type(r) is not int or r < 1 for r in ranks):
        raise InvalidArgument("ranks must be positive integers (1 = best)", param="ranks")
    if any(b < a for a, b in zip(ranks, ranks[1:])):
        raise InvalidArgument(
            f"ranks must not decrease (response_ids are listed best first), got {ranks}", param="ranks"
        )


def bind_tokens(sub: Submission, secret: str, now: float) -> list[RatedResponse]:
    """Verify one token per rated response; the rated facts come from the tokens only.

    Every token must have been issued to ``sub.principal`` (claim ``sub``): a response may be rated
    only by the principal it was served to. A token issued to anyone else, or to nobody (signed
    before votes were bound to principals), is refused with PERMISSION_DENIED, counted and logged.
    """
    claims = {}
    for token in sub.feedback_tokens:
        try:
            c = verify(secret, token, now)
        except InvalidToken as exc:
            raise PermissionDenied(str(exc), param="feedback_tokens") from None
        if c.principal != sub.principal:
            metrics.WRONG_PRINCIPAL.inc()
            log_event(
                log,
                "rating refused: token issued to another principal",
                level=logging.WARNING,
                principal=sub.principal,
                response_id=c.response_id,
                issued_to=c.principal or "(none)",
            )
            raise PermissionDenied(
                f"the feedback token for response {c.response_id} was issued to another principal: "
                "a response can be rated only by the principal it was served to",
                param="feedback_tokens",
            )
        claims[c.response_id] = c
    missing = [i for i in sub.response_ids if i not in claims]
    if missing:
        raise PermissionDenied(
            f"no valid feedback token for response {missing[0]} (it was not served here, or its token was not sent)",
            param="feedback_tokens",
        )
    if len(claims) != len(sub.response_ids):
        raise InvalidArgument("feedback_tokens has tokens for responses that are not rated", param="feedback_tokens")
    rated = [RatedResponse(i, claims[i].policy_version, claims[i].prompt_hash) for i in sub.response_ids]
    if len({r.prompt_hash for r in rated}) > 1:
        raise InvalidArgument("the compared responses answer different prompts", param="response_ids")
    return rated


def same_vote(live: LiveVote, sub: Submission) -> bool:
    return (
        live.response_ids == tuple(sub.response_ids)
        and live.thumb == sub.thumb
        and live.score == sub.score
        and live.preferred == sub.preferred
        and live.ranks == (tuple(sub.ranks) if sub.ranks is not None else None)
        and live.comment == comment_digest(sub.comment)
        and live.tags == tuple(sub.tags)
    )


def feedback_id(principal: str, intent: str) -> str:
    """Deterministic: the same intent (idempotency key) of a principal always gets the same id, even
    across retries."""
    return hashlib.sha256(f"{principal}\0{intent}".encode()).hexdigest()[:32]


class FeedbackServing:
    def __init__(self, cfg: FeedbackConfig, publisher: Publisher, dlq: Outbox, ledger: FeedbackLedger):
        self.cfg = cfg
        self.publisher = publisher
        self.dlq = dlq
        self.ledger = ledger
        self._locks = KeyedLocks()
        self._dlq_count = TokenBucket(cfg.dlq_rate_per_s, cfg.dlq_burst)
        self._dlq_bytes = TokenBucket(cfg.dlq_bytes_per_s, cfg.dlq_bytes_per_s)

    async def submit(self, sub: Submission, raw: Callable[[], str]) -> SubmitResult:
        """Store one rating; ``raw`` renders the submission as received, for a dead-letter copy."""
        now = time.time()
        rated = self._validated(sub, raw, now)
        async with self._locks.hold((sub.principal, sub.target)):
            decided = self._decide(sub, rated, now)
            if isinstance(decided, SubmitResult):
                return decided
            started = time.perf_counter()
            try:
                # Keyed by principal: one principal's votes stay in order on one partition.
                await self.publisher.publish(FEEDBACK, decided, key=sub.principal)
            except Exception as exc:  # noqa: BLE001 - any Kafka failure: the rating is not stored, say so (503)
                raise _unavailable(exc) from None
            metrics.ACK_SECONDS.observe(time.perf_counter() - started)
            return self._stored(decided)

    async def submit_many(self, items: list[tuple[Submission, Callable[[], str]]]) -> list[SubmitResult | RlhfError]:
        """``submit`` for each item; each item's outcome is its result or the RlhfError it was
        refused with.

        The ratings whose (principal, target) is free are judged in one pass, written to Kafka together
        and awaited together (no task per rating: at thousands of ratings a second the tasks cost
        more than the ratings' own checks); then each rating whose (principal, target) was busy (an
        earlier vote on it still waiting for Kafka) waits for it and goes through ``submit``.
        """
        if len(items) > MAX_BATCH:
            raise InvalidArgument(
                f"a batch holds at most {MAX_BATCH} submissions, got {len(items)}", param="submissions"
            )
        metrics.BATCH_SIZE.observe(len(items))
        outcomes: list[SubmitResult | RlhfError | None] = [None] * len(items)
        staged: list[tuple[int, tuple[str, str], FeedbackEvent]] = []
        busy: list[int] = []
        now = time.time()
        for i, (sub, raw) in enumerate(items):
            try:
                rated = self._validated(sub, raw, now)
            except RlhfError as exc:
                outcomes[i] = exc
                continue
            except Exception as exc:  # noqa: BLE001 - one item's bug must not fail the others
                outcomes[i] = _internal(exc)
                continue
            key = (sub.principal, sub.target)
            if not self._locks.try_acquire(key):
                busy.append(i)
                continue
            try:
                decided = self._decide(sub, rated, now)
            except Exception as exc:  # noqa: BLE001
                self._locks.release(key)
                outcomes[i] = _internal(exc)
                continue
            if isinstance(decided, SubmitResult):
                self._locks.release(key)
                outcomes[i] = decided
            else:
                staged.append((i, key, decided))
        # Awaited here, not in a task: its finally must run (releasing the keys) even if this call is
        # cancelled right now. The busy ratings go after it, as some may wait for these very keys.
        await self._store(staged, outcomes)
        if busy:
            await asyncio.gather(*(self._outcome_into(outcomes, i, *items[i]) for i in busy))
        return cast("list[SubmitResult | RlhfError]", outcomes)  # every slot is filled by now

    async def _store(
        self, staged: list[tuple[int, tuple[str, str], FeedbackEvent]], outcomes: list[SubmitResult | RlhfError | None]
    ) -> None:
        """Write the staged events to Kafka together; each key is released once its event is
        acknowledged and in the ledger (or failed)."""
        if not staged:
            return
        started = time.perf_counter()
        try:
            # Keyed by principal: one principal's votes stay in order on one partition.
            results: Sequence[Envelope | PublishFailed | Exception]
            try:
                results = await self.publisher.publish_many([(FEEDBACK, ev, ev.user_id) for _, _, ev in staged])
            except Exception as exc:  # noqa: BLE001 - not expected (failures are per record), but never a crash
                results = [exc] * len(staged)
            waited = time.perf_counter() - started
            for (i, _, ev), result in zip(staged, results, strict=True):
                if isinstance(result, Exception):
                    outcomes[i] = _unavailable(result)
                else:
                    metrics.ACK_SECONDS.observe(waited)
                    outcomes[i] = self._stored(ev)
        finally:
            for _, key, _ in staged:
                self._locks.release(key)

    async def _outcome_into(self, outcomes: list, i: int, sub: Submission, raw: Callable[[], str]) -> None:
        try:
            outcomes[i] = await self.submit(sub, raw)
        except RlhfError as exc:
            outcomes[i] = exc
        except Exception as exc:  # noqa: BLE001 - one item's bug must not fail the others
            outcomes[i] = _internal(exc)

    def _validated(self, sub: Submission, raw: Callable[[], str], now: float) -> list[RatedResponse]:
        """Checks and token binding; a refusal also goes to the dead-letter topic."""
        try:
            check(sub, self.cfg.max_comment_chars)
            return bind_tokens(sub, self.cfg.token.secret, now)
        except RlhfError as exc:
            self.reject(raw(), exc.message, exc.param)
            raise

    def _decide(self, sub: Submission, rated: list[RatedResponse], now: float) -> SubmitResult | FeedbackEvent:
        """With the (principal, target) key held: the earlier result of a retry or an unchanged vote, or
        the event to write."""
        if sub.idempotency_key and (seen := self.ledger.by_key(sub.principal, sub.idempotency_key)):
            metrics.DUPLICATES.inc()
            return seen
        target = sub.target
        live = self.ledger.live(sub.principal, target)
        if live is not None and same_vote(live, sub):
            metrics.DUPLICATES.inc()
            return SubmitResult(live.feedback_id, live.revision, duplicate=True)
        revision = self.ledger.next_revision(live)
        intent = sub.idempotency_key or f"auto:{target}:{revision}:{raw_digest(sub)}"
        return FeedbackEvent(
            feedback_id=feedback_id(sub.principal, intent),
            kind=sub.kind,
            user_id=sub.principal,
            target=target,
            revision=revision,
            supersedes=live.feedback_id if live else None,
            responses=rated,
            thumb=sub.thumb,
            score=sub.score,
            preferred=sub.preferred,
            ranks=sub.ranks,
            comment=sub.comment,
            tags=sub.tags,
            idempotency_key=sub.idempotency_key,
            received_at=now,
            label=sub.label,
        )

    def _stored(self, event: FeedbackEvent) -> SubmitResult:
        """Once Kafka acknowledged ``event``."""
        self.ledger.apply(event)
        _ACCEPTED[event.kind].inc()
        if event.supersedes is not None:
            metrics.SUPERSEDED.inc()
        return SubmitResult(event.feedback_id, event.revision, duplicate=False)

    def reject(self, raw: str, reason: str, param: str | None, source: str = "grpc") -> None:
        """Put a refused submission on the dead-letter topic (best effort, never blocks), within the
        rate and byte limits (RLHF_FEEDBACK_DLQ_*): beyond them it is only counted."""
        metrics.REJECTED.labels(param or "unparsable").inc()
        raw = raw[:RAW_LIMIT]
        reason = reason[:RAW_LIMIT]
        if not self._dlq_count.take():
            metrics.DLQ_DROPPED.labels("rate").inc()
            return
        if not self._dlq_bytes.take(len(raw.encode()) + len(reason.encode())):
            metrics.DLQ_DROPPED.labels("bytes").inc()
            return
        self.dlq.publish(
            FEEDBACK_DLQ,
            RejectedFeedbackEvent(reason=reason, param=param, raw=raw, source=source, received_at=time.time()),
        )


def _internal(exc: Exception) -> RlhfError:
    log.exception("unexpected error on a batched submission", exc_info=exc)
    return RlhfError(f"internal error: {type(exc).__name__}")  # status INTERNAL


def _unavailable(exc: Exception) -> Unavailable:
    metrics.UNAVAILABLE.inc()
    log.warning("rating not acknowledged by Kafka: %s: %s", type(exc).__name__, exc)
    return Unavailable("the rating could not be stored (Kafka did not acknowledge it); retry later")


def raw_digest(sub: Submission) -> str:
    text = f"{sub.response_ids}|{sub.thumb}|{sub.score}|{sub.preferred}|{sub.comment}|{sub.tags}"
    if sub.ranks is not None:  # appended only when present: digests of rankings without ties stay as they were
        text += f"|{sub.ranks}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]
