"""Simulated users: they chat through the OpenAI-compatible API and rate through POST /v1/feedback,
with the real response ids and feedback tokens, exactly as people would.

Each user repeatedly picks a training prompt of the task, picks a kind of rating (UserMix), asks
for as many responses as that rating needs (thumb, Likert: 1; pairwise: 2; ranking: 3, as ``n``
choices of one request, since the feedback service only compares responses to the same prompt),
judges them with the hidden gold rater and sends the rating with the responses' feedback tokens.

    mix = UserMix(thumb=0.4, likert=0.2, pairwise=0.2, ranking=0.2)
    records = await run_users("http://127.0.0.1:8000", duration_s=600, users=4, mix=mix,
                              prompts=load_prompts(PROMPTS))

Each user is a principal of its own at the gateway: with a key of its own (``keys``: `name:key`
pairs, as RLHF_GATEWAY_API_KEYS takes them; `rlhf demo` makes one per user when it brings the stack
up), or, without keys, with an anonymous session of its own (the gateway in anonymous mode, as
`rlhf up` runs it on loopback). Its answers' feedback tokens are issued to that principal, so only
it can rate them, and the per-principal rate limits and rater quality apply to each user apart.

Every interaction becomes an Interaction record (what was served by which policy version, the gold
verdicts, whether the rating was accepted); the demo's report is computed from these.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flywheel.demo import gold_rater

if TYPE_CHECKING:
    import httpx
    import openai
    import pydantic

PROMPTS = Path(__file__).parent / "data" / "prompts.jsonl"
RESPONSES_PER_KIND = {"thumb": 1, "likert": 1, "pairwise": 2, "ranking": 3}


@dataclass(frozen=True)
class UserMix:
    thumb: float = 0.4
    likert: float = 0.2
    pairwise: float = 0.2
    ranking: float = 0.2

    def __post_init__(self) -> None:
        weights = asdict(self).values()
        if min(weights) < 0 or sum(weights) <= 0:
            raise ValueError("rating kind weights must be non-negative and not all zero")

    def pick(self, rng: random.Random) -> str:
        kinds = list(RESPONSES_PER_KIND)
        return rng.choices(kinds, weights=[getattr(self, k) for k in kinds])[0]


@dataclass
class Interaction:
    t: float
    """Seconds since the run started, when the chat answer arrived."""
    user: str
    kind: str
    prompt: str
    responses: list[str]
    response_ids: list[str]
    policy_version: str
    gold_scores: list[int]
    gold_thumbs_up: list[bool]
    chat_latency_s: float
    feedback_status: int = 0
    """HTTP status of the rating (0: not sent, e.g. the chat failed)."""
    error: str = ""
    rating: dict = field(default_factory=dict)
    """The rating as sent, without the tokens."""
    principal: str = ""
    """Who the gateway served and counted this user as (its key's name, or anon:...)."""
    conversation_id: str = ""
    """The conversation the request opened (one per interaction; the gateway routes by it)."""
    choice_versions: list[str] = field(default_factory=list)
    """The policy version of each response (side by side during a canary, the two differ)."""
    at: float = 0.0
    """Unix time the chat answer arrived (to put interactions on the rollout's clock)."""


def load_prompts(path: Path = PROMPTS) -> list[str]:
    """The user messages of a prompts JSONL file ({"messages": [{"role": "user", ...}]} per line)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            messages = json.loads(line)["messages"]
            out.append(next(m["content"] for m in messages if m["role"] == "user"))
    return out


def rating_body(
    kind: str,
    prompt: str,
    responses: list[str],
    response_ids: list[str],
    tokens: list[str],
    user: str,
    rng: random.Random,
) -> dict:
    """The POST /v1/feedback body a user who believes the gold rater sends for these responses."""
    body: dict = {"type": kind, "user": user, "feedback_tokens": tokens, "idempotency_key": uuid.uuid4().hex}
    if kind == "thumb":
        body.update(
            response_id=response_ids[0], thumb="up" if gold_rater.judge(prompt, responses[0]).thumb_up else "down"
        )
    elif kind == "likert":
        body.update(response_id=response_ids[0], score=gold_rater.judge(prompt, responses[0]).likert)
    elif kind == "pairwise":
        body.update(response_ids=response_ids[:2], preferred=gold_rater.prefer(prompt, responses[0], responses[1]))
    elif kind == "ranking":
        # Equally good answers are ranked as ties (equal ranks), as a careful labeller would.
        order = gold_rater.rank(prompt, responses)
        body.update(
            response_ids=[response_ids[i] for i in order],
            ranks=gold_rater.tie_ranks([gold_rater.judge(prompt, responses[i]).score for i in order]),
        )
    else:
        raise ValueError(f"unknown rating kind {kind!r}")
    return body


def _extra(model: pydantic.BaseModel) -> dict[str, Any]:
    """The fields the gateway adds to an OpenAI response (openai's models keep unknown fields)."""
    assert model.model_extra is not None
    return model.model_extra


def parse_user_keys(value: str) -> list[tuple[str, str]]:
    """``name:key,name:key`` (RLHF_GATEWAY_API_KEYS's format) -> [(name, key)]; ValueError if malformed."""
    from services.gateway.identity import parse_key_pairs

    parse_key_pairs(value)  # the gateway's own checks: names, key lengths, characters
    return [tuple(entry.strip().split(":", 1)) for entry in value.split(",")]  # type: ignore[misc]


def make_user_keys(users: int) -> list[tuple[str, str]]:
    """A fresh key for each simulated user, named sim-user-<i> (its principal at the gateway)."""
    import secrets

    return [(f"sim-user-{i}", secrets.token_urlsafe(32)) for i in range(users)]


class SimulatedUser:
    def __init__(
        self,
        name: str,
        chat: openai.AsyncOpenAI,
        http: httpx.AsyncClient,
        model: str,
        prompts: list[str],
        mix: UserMix,
        seed: int,
        temperature: float = 1.0,
        max_tokens: int = 64,
        principal: str = "",
        keyless: bool = False,
    ):
        self.name = name
        self.principal = principal or name
        self.request_headers: dict[str, Any] | None = {"Authorization": _omit()} if keyless else None
        """Per call: a keyless user sends no Authorization header at all (its session cookie instead)."""
        self.chat = chat
        self.http = http
        self.model = model
        self.prompts = prompts
        self.mix = mix
        self.rng = random.Random(seed)
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.conversations = 0

    async def interact(self, started: float) -> Interaction:
        kind = self.mix.pick(self.rng)
        prompt = self.rng.choice(self.prompts)
        self.conversations += 1
        conversation = f"{self.name}-{self.conversations}"
        t0 = time.monotonic()
        r = await self.chat.chat.completions.create(
            model=self.model,
            messages=[{"role": "user", "content": prompt}],
            n=RESPONSES_PER_KIND[kind],
            temperature=self.temperature,
            max_tokens=self.max_tokens,
            extra_headers=self.request_headers,
            extra_body={"conversation_id": conversation},
        )
        latency = time.monotonic() - t0
        responses = [c.message.content or "" for c in r.choices]
        ids = [_extra(c)["response_id"] for c in r.choices]
        tokens = [_extra(c).get("feedback_token") or "" for c in r.choices]
        verdicts = [gold_rater.judge(prompt, text) for text in responses]
        rec = Interaction(
            time.monotonic() - started,
            self.name,
            kind,
            prompt,
            responses,
            ids,
            _extra(r)["policy_version"],
            [v.score for v in verdicts],
            [v.thumb_up for v in verdicts],
            latency,
            principal=self.principal,
            conversation_id=conversation,
            choice_versions=[_extra(c).get("policy_version") or _extra(r)["policy_version"] for c in r.choices],
            at=time.time(),
        )
        body = rating_body(kind, prompt, responses, ids, tokens, self.name, self.rng)
        rec.rating = {k: v for k, v in body.items() if k not in ("feedback_tokens", "idempotency_key")}
        for _attempt in range(3):
            resp = await self.http.post("/v1/feedback", json=body)
            rec.feedback_status = resp.status_code
            if resp.status_code != 503:
                break
            await asyncio.sleep(float(resp.headers.get("Retry-After", "1")))  # Kafka briefly unavailable
        if resp.status_code >= 300:
            rec.error = resp.text[:300]
        return rec


async def run_users(
    gateway_url: str,
    duration_s: float,
    users: int,
    mix: UserMix,
    prompts: list[str],
    *,
    seed: int = 0,
    temperature: float = 1.0,
    max_tokens: int = 64,
    keys: list[tuple[str, str]] | None = None,
    on_record: Callable[[Interaction], None] | None = None,
    stop: asyncio.Event | None = None,
) -> list[Interaction]:
    """Run ``users`` simulated users against the gateway for ``duration_s`` seconds; returns every
    interaction. User i is ``keys[i]``'s principal; without ``keys``, each opens an anonymous session."""
    import httpx
    import openai

    if keys and len(keys) < users:
        raise ValueError(f"{users} users need {users} keys, got {len(keys)}")
    base = gateway_url.rstrip("/")
    clients: list[tuple[openai.AsyncOpenAI, httpx.AsyncClient]] = []
    records: list[Interaction] = []
    started = time.monotonic()
    deadline = started + duration_s
    stop = stop or asyncio.Event()
    try:
        identities = []
        for i in range(users):
            name, key = keys[i] if keys else (f"sim-user-{i}", "")
            chat, http, principal = await _user_clients(base, key)
            clients.append((chat, http))
            identities.append((name, principal))
        no_key = None if keys else {"Authorization": _omit()}
        model = (await clients[0][0].models.list(extra_headers=no_key)).data[0].id

        async def user_loop(i: int) -> None:
            chat, http = clients[i]
            name, principal = identities[i]
            user = SimulatedUser(
                name, chat, http, model, prompts, mix, seed * 1000 + i, temperature, max_tokens, principal, not keys
            )
            while time.monotonic() < deadline and not stop.is_set():
                try:
                    rec = await user.interact(started)
                except (openai.APIError, httpx.HTTPError) as exc:
                    rec = Interaction(
                        time.monotonic() - started,
                        user.name,
                        "error",
                        "",
                        [],
                        [],
                        "",
                        [],
                        [],
                        0.0,
                        error=f"{type(exc).__name__}: {exc}"[:300],
                        principal=user.principal,
                        at=time.time(),
                    )
                    await asyncio.sleep(1.0)
                records.append(rec)
                if on_record:
                    on_record(rec)

        await asyncio.gather(*(user_loop(i) for i in range(users)))
    finally:
        for chat, http in clients:
            await chat.close()
            await http.aclose()
    return records


def _omit() -> Any:
    """openai's marker for a header not to send (here: Authorization, for a user without a key)."""
    import openai

    return openai.Omit()


async def _user_clients(base: str, key: str) -> tuple[openai.AsyncOpenAI, httpx.AsyncClient, str]:
    """One user's OpenAI client, HTTP client (for ratings) and principal: by its key, or by the
    anonymous session its HTTP client opens (the OpenAI client then sends the same session cookie)."""
    import httpx
    import openai

    if key:
        auth = {"Authorization": f"Bearer {key}"}
        http = httpx.AsyncClient(base_url=base, timeout=60, headers=auth)
        chat = openai.AsyncOpenAI(base_url=base + "/v1", api_key=key, max_retries=2, timeout=120)
    else:
        http = httpx.AsyncClient(base_url=base, timeout=60)
        chat = None  # made below, once the session exists
    try:
        session = await http.get("/v1/session")
        if session.status_code != 200:
            raise RuntimeError(
                f"the gateway did not open a session ({session.status_code}: {session.text[:200]}): give the "
                "users keys (RLHF_DEMO_API_KEYS) or turn anonymous sessions on (RLHF_GATEWAY_ANONYMOUS=1)"
            )
        principal = session.json()["principal"]
        if chat is None:
            # The session cookie instead of a key (SimulatedUser omits the Authorization header).
            chat = openai.AsyncOpenAI(
                base_url=base + "/v1",
                api_key="-",
                default_headers={"Cookie": f"rlhf_session={http.cookies['rlhf_session']}"},
                max_retries=2,
                timeout=120,
            )
    except BaseException:
        await http.aclose()
        raise
    return chat, http, principal
