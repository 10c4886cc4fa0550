"""The feedback service's rules on small tables: schema checks, token binding (to the response and to
the principal it was served to), idempotency, revisions."""

import asyncio
import time

import pytest
from prometheus_client import REGISTRY

from services.feedback.domain import Submission
from services.feedback.ledger import FeedbackLedger, LiveVote
from services.feedback.serving import KeyedLocks, bind_tokens, check, feedback_id, same_vote
from shared.errors import InvalidArgument, PermissionDenied, Unauthenticated
from shared.events import FeedbackEvent, RatedResponse
from shared.feedback_token import TokenClaims, sign

SECRET = "k" * 32


def token(rid: str, ph: str = "p1", pv: str = "policy-0001", ttl: int = 60, principal: str = "u1") -> str:
    return sign(SECRET, TokenClaims(rid, pv, ph, int(time.time()) + ttl, principal))


def sub(kind="thumb", ids=("r1",), **over) -> Submission:
    defaults = {"thumb": {"thumb": "up"}, "likert": {"score": 5}, "pairwise": {"preferred": "a"}}.get(kind, {})
    fields = dict(feedback_tokens=[token(i) for i in ids], principal="u1", **defaults)
    fields.update(over)
    return Submission(kind, list(ids), **fields)


@pytest.mark.parametrize(
    "s",
    [
        sub(),
        sub("likert", score=1),
        sub("likert", score=7),
        sub("pairwise", ("r1", "r2"), preferred="tie"),
        sub("ranking", ("r1", "r2")),
        sub("ranking", tuple(f"r{i}" for i in range(9))),
        sub("ranking", ("r1", "r2", "r3"), ranks=[1, 2, 2]),
        sub("ranking", ("r1", "r2", "r3"), ranks=[1, 1, 1]),
        sub("ranking", ("r1", "r2", "r3"), ranks=[1, 1, 3]),
        sub(comment="x" * 2000, tags=["hallucination", "harmful"]),
        sub(label=""),
        sub(label="x" * 128),
    ],
)
def test_valid_submissions_pass(s):
    check(s, max_comment_chars=2000)


@pytest.mark.parametrize(
    "s, param",
    [
        (sub(kind="vote"), "type"),
        (sub(label="x" * 129), "user"),
        (sub(principal="p" * 129), "principal"),
        (sub(thumb="sideways"), "thumb"),
        (sub("likert", score=0), "score"),
        (sub("likert", score=8), "score"),
        (sub("likert", score=None), "score"),
        (sub("pairwise", ("r1",), preferred="a"), "response_ids"),
        (sub("pairwise", ("r1", "r2"), preferred="both"), "preferred"),
        (sub("ranking", ("r1",)), "response_ids"),
        (sub("ranking", tuple(f"r{i}" for i in range(10))), "response_ids"),
        (sub("ranking", ("r1", "r1")), "response_ids"),
        (sub("ranking", ("r1", "r2", "r3"), ranks=[1, 2]), "ranks"),  # one rank per response
        (sub("ranking", ("r1", "r2"), ranks=[2, 1]), "ranks"),  # listed best first
        (sub("ranking", ("r1", "r2"), ranks=[0, 1]), "ranks"),  # 1 = best
        (sub(ranks=[1]), "ranks"),  # only rankings have ranks
        (sub(comment="x" * 2001), "comment"),
        (sub(tags=["nice"]), "tags"),
        (sub(tags=["harmful", "harmful"]), "tags"),
        (sub(score=3), "score"),
        (sub(idempotency_key="k" * 129), "idempotency_key"),
    ],
)
def test_invalid_submissions_name_the_field(s, param):
    with pytest.raises(InvalidArgument) as err:
        check(s, max_comment_chars=2000)
    assert err.value.param == param


def test_a_submission_without_a_principal_is_unauthenticated():
    with pytest.raises(Unauthenticated) as err:
        check(sub(principal=""), max_comment_chars=2000)
    assert err.value.param == "principal" and err.value.http_status == 401


def wrong_principal_refusals() -> float:
    return REGISTRY.get_sample_value("rlhf_feedback_wrong_principal_total") or 0


def test_a_token_served_to_another_principal_or_to_none_is_refused_and_counted():
    now = time.time()
    before = wrong_principal_refusals()
    with pytest.raises(PermissionDenied, match="issued to another principal") as err:
        bind_tokens(sub(principal="mallory"), SECRET, now)
    assert err.value.param == "feedback_tokens"
    # one foreign token among the rater's own is enough to refuse the whole rating
    mixed = sub("pairwise", ("r1", "r2"), feedback_tokens=[token("r1"), token("r2", principal="bob")])
    with pytest.raises(PermissionDenied, match="response r2 was issued to another principal"):
        bind_tokens(mixed, SECRET, now)
    legacy = sign(SECRET, TokenClaims("r1", "policy-0001", "p1", int(now) + 60))  # no principal claim
    with pytest.raises(PermissionDenied, match="another principal"):
        bind_tokens(sub(feedback_tokens=[legacy]), SECRET, now)
    assert wrong_principal_refusals() == before + 3
    assert bind_tokens(sub(), SECRET, now)[0].response_id == "r1"  # its own principal: accepted


def test_tokens_bind_the_server_facts_not_the_clients():
    rated = bind_tokens(sub("pairwise", ("r1", "r2")), SECRET, time.time())
    assert [(r.response_id, r.policy_version, r.prompt_hash) for r in rated] == [
        ("r1", "policy-0001", "p1"),
        ("r2", "policy-0001", "p1"),
    ]


def test_forged_missing_expired_and_cross_prompt_tokens_are_refused():
    now = time.time()
    with pytest.raises(PermissionDenied, match="signature"):
        bind_tokens(
            sub(feedback_tokens=[sign("x" * 32, TokenClaims("r1", "p", "p1", int(now) + 60, "u1"))]), SECRET, now
        )
    with pytest.raises(PermissionDenied, match="no valid feedback token for response r1"):
        bind_tokens(sub(feedback_tokens=[token("r9")]), SECRET, now)
    with pytest.raises(PermissionDenied, match="expired"):
        bind_tokens(sub(feedback_tokens=[token("r1", ttl=-5)]), SECRET, now)
    cross = sub("pairwise", ("r1", "r2"), feedback_tokens=[token("r1", "p1"), token("r2", "p2")])
    with pytest.raises(InvalidArgument, match="different prompts"):
        bind_tokens(cross, SECRET, now)
    extra = sub(feedback_tokens=[token("r1"), token("r2")])
    with pytest.raises(InvalidArgument, match="not rated"):
        bind_tokens(extra, SECRET, now)


def event(revision=1, thumb="up", key="", fid=None) -> FeedbackEvent:
    return FeedbackEvent(
        feedback_id=fid or f"f{revision}{thumb}{key}",
        kind="thumb",
        user_id="u1",
        target="thumb:r1",
        revision=revision,
        supersedes=None,
        responses=[RatedResponse("r1", "policy-0001", "p1")],
        thumb=thumb,
        idempotency_key=key,
        received_at=time.time(),
    )


def test_ledger_keeps_the_highest_revision_and_ignores_replays():
    ledger = FeedbackLedger()
    ledger.apply(event(2, "down"))
    ledger.apply(event(1, "up"))  # an older revision arriving late does not win
    ledger.apply(event(2, "down"))  # a replay changes nothing
    assert ledger.live("u1", "thumb:r1") == LiveVote.of(event(2, "down")) and len(ledger) == 2


def test_ledger_remembers_idempotency_keys_per_principal():
    ledger = FeedbackLedger()
    ledger.apply(event(1, key="k1", fid="abc"))
    assert ledger.by_key("u1", "k1").feedback_id == "abc"
    assert ledger.by_key("u2", "k1") is None


def test_same_vote_compares_every_part_of_the_verdict():
    ev = LiveVote.of(event(1, "up"))
    assert same_vote(ev, sub())
    assert not same_vote(ev, sub(thumb="down"))
    assert not same_vote(ev, sub(comment="now with a comment"))
    assert not same_vote(ev, sub(ranks=[1]))
    tied = sub("ranking", ("r1", "r2", "r3"), ranks=[1, 2, 2])
    tied_vote = LiveVote("f", 1, ("r1", "r2", "r3"), None, None, None, (1, 2, 2), b"", ())
    assert same_vote(tied_vote, tied) and not same_vote(tied_vote, sub("ranking", ("r1", "r2", "r3")))


def test_feedback_id_is_deterministic_per_principal_and_intent():
    assert feedback_id("u1", "k") == feedback_id("u1", "k") != feedback_id("u2", "k")


def test_keyed_locks_serialise_one_key_and_forget_it_afterwards():
    async def scenario():
        locks, order = KeyedLocks(), []

        async def worker(name, key, pause):
            async with locks.hold(key):
                order.append(f"{name}+")
                await asyncio.sleep(pause)
                order.append(f"{name}-")

        await asyncio.gather(worker("a", "k", 0.02), worker("b", "k", 0), worker("c", "other", 0))
        return order, len(locks)

    order, held = asyncio.run(scenario())
    assert order.index("a-") < order.index("b+"), "b must wait for a on the same key"
    assert order.index("c+") < order.index("a-"), "another key must not wait"
    assert held == 0


def test_keyed_locks_forget_a_waiter_that_was_cancelled():
    async def scenario():
        locks = KeyedLocks()
        release = asyncio.Event()

        async def holder():
            async with locks.hold("k"):
                await release.wait()

        first = asyncio.ensure_future(holder())
        await asyncio.sleep(0)
        waiter = asyncio.ensure_future(holder())
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        release.set()
        await first
        return len(locks)

    assert asyncio.run(scenario()) == 0


def test_keyed_locks_try_acquire_takes_only_a_free_key_and_release_hands_it_to_the_next_waiter():
    async def scenario():
        locks, order = KeyedLocks(), []
        assert locks.try_acquire("k") and not locks.try_acquire("k") and locks.try_acquire("other")

        async def waiter(name):
            async with locks.hold("k"):
                order.append(name)

        waiters = [asyncio.ensure_future(waiter(n)) for n in ("w1", "w2")]
        await asyncio.sleep(0.01)
        assert order == [], "the key is held: nobody may enter"
        locks.release("k")
        await asyncio.gather(*waiters)
        locks.release("other")
        return order, len(locks)

    assert asyncio.run(scenario()) == (["w1", "w2"], 0)


def test_keyed_locks_a_waiter_cancelled_as_the_key_is_handed_to_it_passes_it_on():
    async def scenario():
        locks = KeyedLocks()
        assert locks.try_acquire("k")
        first = asyncio.ensure_future(locks.acquire("k"))
        second = asyncio.ensure_future(locks.acquire("k"))
        await asyncio.sleep(0)
        locks.release("k")  # handed to first ...
        first.cancel()  # ... which is cancelled before it runs: second must get the key
        await asyncio.gather(first, return_exceptions=True)
        await asyncio.wait_for(second, 1)
        locks.release("k")
        return len(locks)

    assert asyncio.run(scenario()) == 0


class Published:
    """A publisher and an outbox that record what they are given (Kafka itself is tested in
    tests/integration)."""

    service = "feedback"

    def __init__(self):
        self.sent = []

    async def publish_many(self, items):
        self.sent += items
        return [object() for _ in items]

    def publish(self, topic, payload, key=None):  # the dead-letter Outbox: queued, never awaited
        self.sent.append((topic, payload, key))
        return "e"


class PublishedAsync(Published):
    async def publish(self, topic, payload, key=None):  # the rating publisher: awaited until acknowledged
        self.sent.append((topic, payload, key))
        return object()


def serving(ledger=None, **cfg):
    from services.feedback.config import FeedbackConfig
    from services.feedback.serving import FeedbackServing
    from shared.config import FeedbackTokenConfig

    config = FeedbackConfig(token=FeedbackTokenConfig(secret=SECRET), **cfg)
    return FeedbackServing(config, PublishedAsync(), Published(), ledger if ledger is not None else FeedbackLedger())


def dropped(limit):
    return REGISTRY.get_sample_value("rlhf_feedback_dlq_dropped_total", {"limit": limit}) or 0.0


def test_dead_letter_copies_are_limited_in_rate_and_counted():
    s = serving(dlq_rate_per_s=0.001, dlq_burst=3)
    before = dropped("rate")
    for _ in range(10):
        s.reject("garbage", "unparsable", None)
    assert len(s.dlq.sent) == 3, "the burst, then nothing until the bucket refills"
    assert dropped("rate") - before == 7


def test_dead_letter_copies_are_limited_in_bytes():
    s = serving(dlq_rate_per_s=1000, dlq_burst=1000, dlq_bytes_per_s=20_000)
    before = dropped("bytes")
    for _ in range(5):
        s.reject("x" * 100_000, "too big", "comment")  # each copy is cut to 8 KiB
    assert len(s.dlq.sent) == 2 and all(len(p.raw) == 8192 for _, p, _ in s.dlq.sent)
    assert dropped("bytes") - before == 3


def test_a_full_ledger_evicts_and_revisions_still_go_forward():
    s = serving(ledger=FeedbackLedger(max_votes=2))
    outcomes = asyncio.run(s.submit_many([(sub(ids=(f"r{i}",)), lambda: "raw") for i in range(3)]))
    assert [(o.revision, o.duplicate) for o in outcomes] == [(1, False)] * 3, "nothing refused"
    assert len(s.ledger) == 2 and s.ledger.live("u1", "thumb:r0") is None, "r0's vote was evicted"
    changed = asyncio.run(s.submit(sub(ids=("r0",), thumb="down"), lambda: "raw"))
    assert changed.revision == 2 and not changed.duplicate, "above the evicted revision 1, never 1 again"
