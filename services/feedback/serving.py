"""The feedback service's logic: check a rating, bind it to what the server actually served, write
it to Kafka with acks=all exactly once per intent, refuse the rest to the dead-letter topic.

Transport-free: the gRPC servicer only converts to and from these calls.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable

from services.feedback import metrics
from services.feedback.config import FeedbackConfig
from services.feedback.ledger import FeedbackLedger
from services.feedback.protocol import (
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
from shared.errors import InvalidArgument, PermissionDenied, RlhfError, Unavailable
from shared.events import FeedbackEvent, RatedResponse, RejectedFeedbackEvent
from shared.feedback_token import InvalidToken, verify
from shared.kafka.producer import AsyncPublisher, EventPublisher
from shared.kafka.topics import FEEDBACK, FEEDBACK_DLQ
from shared.logging import get_logger

log = get_logger(__name__)

RAW_LIMIT = 8192
MAX_BATCH = 1000


class KeyedLocks:
    """One asyncio lock per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[object, asyncio.Lock] = {}
        self._users: dict[object, int] = {}

    def hold(self, key: object) -> "_Held":
        """``async with locks.hold(key):`` runs the block alone among holders of the same key."""
        return _Held(self, key)


class _Held:
    # A class rather than @asynccontextmanager: this runs for every rating, and a generator-based
    # context manager costs several times more.
    __slots__ = ("locks", "key")

    def __init__(self, locks: KeyedLocks, key: object):
        self.locks = locks
        self.key = key

    async def __aenter__(self) -> None:
        locks = self.locks
        lock = locks._locks.get(self.key)
        if lock is None:
            lock = locks._locks[self.key] = asyncio.Lock()
        locks._users[self.key] = locks._users.get(self.key, 0) + 1
        try:
            await lock.acquire()
        except BaseException:
            self._leave()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self.locks._locks[self.key].release()
        self._leave()

    def _leave(self) -> None:
        locks = self.locks
        locks._users[self.key] -= 1
        if not locks._users[self.key]:
            del locks._users[self.key], locks._locks[self.key]


def check(sub: Submission, max_comment_chars: int) -> None:
    """Schema and range checks; raises InvalidArgument naming the field."""
    if sub.kind not in KINDS:
        raise InvalidArgument(f"kind must be one of {', '.join(KINDS)}, got {sub.kind!r}", param="type")
    if not 1 <= len(sub.user_id) <= MAX_ID_CHARS:
        raise InvalidArgument(f"user must be 1 to {MAX_ID_CHARS} characters", param="user")
    if len(sub.idempotency_key) > MAX_ID_CHARS:
        raise InvalidArgument(f"idempotency_key is longer than {MAX_ID_CHARS} characters", param="idempotency_key")
    ids = sub.response_ids
    expected = {"thumb": (1, 1), "likert": (1, 1), "pairwise": (2, 2), "ranking": (MIN_RANKED, MAX_RANKED)}[sub.kind]
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
    for name, value in (("thumb", sub.thumb), ("score", sub.score), ("preferred", sub.preferred),
                        ("ranks", sub.ranks)):
        owner = {"thumb": "thumb", "score": "likert", "preferred": "pairwise", "ranks": "ranking"}[name]
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
        raise InvalidArgument(f"ranks must not decrease (response_ids are listed best first), got {ranks}",
                              param="ranks")


def bind_tokens(sub: Submission, secret: str, now: float) -> list[RatedResponse]:
    """Verify one token per rated response; the rated facts come from the tokens only."""
    claims = {}
    for token in sub.feedback_tokens:
        try:
            c = verify(secret, token, now)
        except InvalidToken as exc:
            raise PermissionDenied(str(exc), param="feedback_tokens") from None
        claims[c.response_id] = c
    missing = [i for i in sub.response_ids if i not in claims]
    if missing:
        raise PermissionDenied(f"no valid feedback token for response {missing[0]} (it was not served here, "
                               "or its token was not sent)", param="feedback_tokens")
    if len(claims) != len(sub.response_ids):
        raise InvalidArgument("feedback_tokens has tokens for responses that are not rated", param="feedback_tokens")
    rated = [RatedResponse(i, claims[i].policy_version, claims[i].prompt_hash) for i in sub.response_ids]
    if len({r.prompt_hash for r in rated}) > 1:
        raise InvalidArgument("the compared responses answer different prompts", param="response_ids")
    return rated


def same_vote(ev: FeedbackEvent, sub: Submission) -> bool:
    return ([r.response_id for r in ev.responses] == sub.response_ids and ev.thumb == sub.thumb
            and ev.score == sub.score and ev.preferred == sub.preferred and ev.ranks == sub.ranks
            and ev.comment == sub.comment
            and ev.tags == sub.tags)


def feedback_id(user_id: str, intent: str) -> str:
    """Deterministic: the same intent (idempotency key) always gets the same id, even across retries."""
    return hashlib.sha256(f"{user_id}\0{intent}".encode()).hexdigest()[:32]


class FeedbackServing:
    def __init__(self, cfg: FeedbackConfig, publisher: AsyncPublisher, dlq: EventPublisher, ledger: FeedbackLedger):
        self.cfg = cfg
        self.publisher = publisher
        self.dlq = dlq
        self.ledger = ledger
        self._locks = KeyedLocks()

    async def submit(self, sub: Submission, raw: Callable[[], str]) -> SubmitResult:
        """Store one rating; ``raw`` renders the submission as received, for a dead-letter copy."""
        now = time.time()
        try:
            check(sub, self.cfg.max_comment_chars)
            rated = bind_tokens(sub, self.cfg.token.secret, now)
        except RlhfError as exc:
            self.reject(raw(), exc.message, exc.param)
            raise
        target = sub.target
        async with self._locks.hold((sub.user_id, target)):
            if sub.idempotency_key and (seen := self.ledger.by_key(sub.user_id, sub.idempotency_key)):
                metrics.DUPLICATES.inc()
                return seen
            live = self.ledger.live(sub.user_id, target)
            if live is not None and same_vote(live, sub):
                metrics.DUPLICATES.inc()
                return SubmitResult(live.feedback_id, live.revision, duplicate=True)
            revision = live.revision + 1 if live else 1
            intent = sub.idempotency_key or f"auto:{target}:{revision}:{raw_digest(sub)}"
            event = FeedbackEvent(
                feedback_id=feedback_id(sub.user_id, intent), kind=sub.kind, user_id=sub.user_id, target=target,
                revision=revision, supersedes=live.feedback_id if live else None, responses=rated,
                thumb=sub.thumb, score=sub.score, preferred=sub.preferred, ranks=sub.ranks, comment=sub.comment,
                tags=sub.tags,
                idempotency_key=sub.idempotency_key, received_at=now)
            started = time.perf_counter()
            try:
                # Keyed by user: one user's votes stay in order on one partition.
                await self.publisher.publish(FEEDBACK, event, key=sub.user_id)
            except Exception as exc:
                metrics.UNAVAILABLE.inc()
                log.warning("rating not acknowledged by Kafka: %s: %s", type(exc).__name__, exc)
                raise Unavailable("the rating could not be stored (Kafka did not acknowledge it); retry later") from None
            metrics.ACK_SECONDS.observe(time.perf_counter() - started)
            self.ledger.apply(event)
        metrics.ACCEPTED.labels(sub.kind).inc()
        if live is not None:
            metrics.SUPERSEDED.inc()
        return SubmitResult(event.feedback_id, revision, duplicate=False)

    async def submit_many(self, items: list[tuple[Submission, Callable[[], str]]]) -> list[SubmitResult | RlhfError]:
        """``submit`` for each item, concurrently (their Kafka writes share produce requests); each
        item's outcome is its result or the RlhfError it was refused with."""
        if len(items) > MAX_BATCH:
            raise InvalidArgument(f"a batch holds at most {MAX_BATCH} submissions, got {len(items)}",
                                  param="submissions")
        metrics.BATCH_SIZE.observe(len(items))
        return await asyncio.gather(*(self._outcome(sub, raw) for sub, raw in items))

    async def _outcome(self, sub: Submission, raw: Callable[[], str]) -> SubmitResult | RlhfError:
        try:
            return await self.submit(sub, raw)
        except RlhfError as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 - one item's bug must not fail the others
            log.exception("unexpected error on a batched submission")
            return RlhfError(f"internal error: {type(exc).__name__}")  # status INTERNAL

    def reject(self, raw: str, reason: str, param: str | None, source: str = "grpc") -> None:
        """Put a refused submission on the dead-letter topic (best effort, never blocks)."""
        metrics.REJECTED.labels(param or "unparsable").inc()
        self.dlq.publish(FEEDBACK_DLQ, RejectedFeedbackEvent(reason=reason, param=param, raw=raw[:RAW_LIMIT],
                                                             source=source, received_at=time.time()))


def raw_digest(sub: Submission) -> str:
    text = f"{sub.response_ids}|{sub.thumb}|{sub.score}|{sub.preferred}|{sub.comment}|{sub.tags}"
    if sub.ranks is not None:  # appended only when present: digests of rankings without ties stay as they were
        text += f"|{sub.ranks}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]
