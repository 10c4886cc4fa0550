"""Chat completions over the inference service: OpenAI schema in, gRPC call, OpenAI schema out.

No HTTP here (see api_router.py): these are plain async calls on pydantic models.

Several versions at once (services/gateway/rollout/routing.py): each request is routed to the
stable or the canary group of inference replicas; a request routed to the canary that finds the
canary group unavailable (before any answer) is served by the stable group. While a canary runs,
an n=2 request routed to it is answered side by side: one completion from each group, in random
order, each choice with its own policy_version and feedback token.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.gateway import metrics
from services.gateway.chat.schema import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    DeltaMessage,
    ModelCard,
    ModelList,
    TokenLogprob,
    Usage,
)
from services.gateway.chat.sse import DeltaEvents, sse
from services.gateway.errors import error_from_grpc, sse_error
from services.gateway.rollout.routing import CANARY, STABLE, Route, Router
from shared.config import FeedbackTokenConfig
from shared.errors import NotFound
from shared.feedback_token import TokenClaims, prompt_hash, sign
from shared.grpc_channels import ClientCredentials, aio_channel, balanced_options, replica_target
from shared.pb import common_pb2, inference_pb2, inference_pb2_grpc

INFERENCE_HEALTH_SERVICE = "rlhf.v1.InferenceService"
"""The grpc.health.v1 service name an inference replica reports NOT_SERVING under while it drains
and reloads a new version (services/inference/app.py); the gateway's channels route around it."""
MERGE_QUEUE = 64
"""Chunks of a side-by-side stream waiting to be sent on (a bound: the two upstreams wait beyond it)."""


class InferenceClient:
    """The gateway's gRPC channel to one group of inference replicas: round robin over the replicas
    reporting SERVING (shared.grpc_channels.balanced_options)."""

    def __init__(self, address: str, timeout_s: float, credentials: ClientCredentials):
        self.timeout_s = timeout_s
        self.channel = aio_channel(
            replica_target(address),
            credentials,
            options=[("grpc.max_receive_message_length", 64 << 20), *balanced_options(INFERENCE_HEALTH_SERVICE)],
        )
        self.stub = inference_pb2_grpc.InferenceServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()


def to_generate_request(
    req: ChatCompletionRequest, principal: str, n: int | None = None
) -> inference_pb2.GenerateRequest:
    """The inference call for ``req`` (with ``n`` completions instead of the request's, if given)."""
    sampling = inference_pb2.SamplingParams(n=n or req.n or 1, logprobs=req.logprobs, stop=req.stop_list())
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    for name, value in (
        ("temperature", req.temperature),
        ("top_p", req.top_p),
        ("top_k", req.top_k),
        ("max_tokens", max_tokens),
        ("seed", req.seed),
    ):
        if value is not None:
            setattr(sampling, name, value)
    return inference_pb2.GenerateRequest(
        messages=[common_pb2.ChatMessage(role=m.canonical_role(), content=m.text()) for m in req.messages],
        sampling=sampling,
        source="user",
        principal=principal,
        conversation_id=req.conversation_id or "",
    )


def _logprobs(tokens: Iterable[str], logprobs: Iterable[float]) -> ChoiceLogprobs:
    return ChoiceLogprobs(
        content=[TokenLogprob(token=t, logprob=lp, bytes=list(t.encode())) for t, lp in zip(tokens, logprobs)]
    )


def _usage(u: common_pb2.Usage) -> Usage:
    return Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, total_tokens=u.total_tokens)


Signer = Callable[[str, str], str | None]
"""(response_id, policy_version) -> the feedback token of that response (None: feedback is off)."""


class FeedbackTokens:
    """Signs each served response's feedback token (HMAC over response_id, policy_version, prompt,
    expiry, and the principal it was served to: only that principal can rate it)."""

    def __init__(self, cfg: FeedbackTokenConfig):
        self.cfg = cfg

    def for_request(self, req: ChatCompletionRequest, principal: str) -> Signer:
        """A signer for the responses to this request of ``principal``, or a no-op when feedback is off."""
        if not self.cfg.secret:
            return lambda response_id, policy_version: None
        ph = prompt_hash((m.canonical_role(), m.text()) for m in req.messages)
        expires = int(time.time()) + self.cfg.ttl_s
        conversation = req.conversation_id or ""
        return lambda response_id, policy_version: sign(
            self.cfg.secret, TokenClaims(response_id, policy_version, ph, expires, principal, conversation)
        )


def is_unavailable(exc: grpc.aio.AioRpcError) -> bool:
    """A refusal that says the group cannot serve now (no replica reachable, or still loading)."""
    return exc.code() == grpc.StatusCode.UNAVAILABLE


@dataclass
class Upstream:
    """One generation stream from a group of replicas, whose first chunk has arrived."""

    call: Any  # the gRPC stream call (grpc is untyped)
    iterator: AsyncIterator[inference_pb2.GenerateChunk]
    first: inference_pb2.GenerateChunk
    index: int | None = None
    """Side by side: the choice index its one completion is shown at; None: the chunks' own indices."""


class ChatServing:
    def __init__(self, tokens: FeedbackTokens, router: Router | None = None, side_by_side: bool = True) -> None:
        self.tokens = tokens
        self.router = router or Router(canary_enabled=False)
        self.side_by_side = side_by_side
        self._client: InferenceClient | None = None
        self._canary: InferenceClient | None = None
        self._model_name: str | None = None

    def attach(self, client: InferenceClient, canary: InferenceClient | None = None) -> None:
        """The stable group's client, and the canary group's (None: no canary routing)."""
        self._client = client
        self._canary = canary

    @property
    def client(self) -> InferenceClient:
        if self._client is None:
            raise RuntimeError("ChatServing used before the app started")
        return self._client

    def client_of(self, group: str) -> InferenceClient:
        return self._canary if group == CANARY and self._canary is not None else self.client

    def route(self, req: ChatCompletionRequest, principal: str) -> Route:
        """The group that serves this request (the stable one without a canary client)."""
        if self._canary is None:
            return Route(STABLE, self.router.state.stable)
        return self.router.route(principal, req.conversation_id)

    def _side_by_side(self, req: ChatCompletionRequest, route: Route) -> bool:
        return self.side_by_side and route.group == CANARY and (req.n or 1) == 2

    def _served(self, group: str) -> None:
        metrics.ROUTED.labels(group).inc()
        self.router.count(group)

    async def policy(self) -> inference_pb2.PolicyInfo:
        info = await self.client.stub.GetPolicy(inference_pb2.GetPolicyRequest(), timeout=10)
        self._model_name = info.model
        return info

    async def models(self) -> ModelList:
        info = await self.policy()
        return ModelList(
            data=[ModelCard(id=info.model, created=int(info.serving_since), policy_version=info.policy_version)]
        )

    async def check_model(self, name: str) -> None:
        if self._model_name is None:
            await self.policy()
        if name != self._model_name:
            raise NotFound(f"the model {name!r} does not exist; this server serves {self._model_name!r}", param="model")

    async def healthy(self) -> bool:
        try:
            reply = await self.client.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    # --- one request, one or two groups --------------------------------------------------------

    async def _generate(self, group: str, msg: inference_pb2.GenerateRequest) -> inference_pb2.GenerateResponse:
        """Generate on ``group``; a canary group that is unavailable hands the request to the stable one."""
        try:
            reply = await self.client_of(group).stub.Generate(msg, timeout=self.client.timeout_s)
        except grpc.aio.AioRpcError as exc:
            if group != CANARY or not is_unavailable(exc):
                raise
            self._served("canary_fallback")
            return await self.client.stub.Generate(msg, timeout=self.client.timeout_s)
        return reply

    async def _open(self, group: str, msg: inference_pb2.GenerateRequest, index: int | None = None) -> Upstream:
        """A stream on ``group`` whose first chunk has arrived (the canary falls back as in _generate)."""
        call = self.client_of(group).stub.GenerateStream(msg, timeout=self.client.timeout_s)
        iterator = call.__aiter__()
        try:
            first = await iterator.__anext__()
        except grpc.aio.AioRpcError as exc:
            if group != CANARY or not is_unavailable(exc):
                raise
            self._served("canary_fallback")
            return await self._open(STABLE, msg, index)
        return Upstream(call, iterator, first, index)

    def _choice(
        self, req: ChatCompletionRequest, c: inference_pb2.Completion, index: int, version: str, token: Signer
    ) -> Choice:
        return Choice(
            index=index,
            message=ChatMessageOut(content=c.text),
            finish_reason=c.finish_reason,
            logprobs=_logprobs(c.tokens, c.logprobs) if req.logprobs else None,
            response_id=c.response_id,
            feedback_token=token(c.response_id, version),
            policy_version=version,
        )

    async def complete(self, req: ChatCompletionRequest, principal: str) -> ChatCompletionResponse:
        await self.check_model(req.model)
        route = self.route(req, principal)
        token = self.tokens.for_request(req, principal)
        if self._side_by_side(req, route):
            return await self._complete_side_by_side(req, principal, token)
        r = await self._generate(route.group, to_generate_request(req, principal))
        self._served(route.group)
        choices = [self._choice(req, c, c.index, r.policy_version, token) for c in r.completions]
        return ChatCompletionResponse(
            id=f"chatcmpl-{r.request_id}",
            model=r.model,
            choices=choices,
            usage=_usage(r.usage),
            policy_version=r.policy_version,
            response_id=choices[0].response_id,
        )

    async def _complete_side_by_side(
        self, req: ChatCompletionRequest, principal: str, token: Signer
    ) -> ChatCompletionResponse:
        """One completion from each group, at random places (index 0 or 1)."""
        msg = to_generate_request(req, principal, n=1)
        groups = [STABLE, CANARY]
        random.shuffle(groups)
        replies = await asyncio.gather(*(self._generate(g, msg) for g in groups))
        self._served("side_by_side")
        choices = [self._choice(req, r.completions[0], i, r.policy_version, token) for i, r in enumerate(replies)]
        usage = Usage(
            prompt_tokens=replies[0].usage.prompt_tokens,
            completion_tokens=sum(r.usage.completion_tokens for r in replies),
            total_tokens=replies[0].usage.prompt_tokens + sum(r.usage.completion_tokens for r in replies),
        )
        return ChatCompletionResponse(
            id=f"chatcmpl-{replies[0].request_id}",
            model=replies[0].model,
            choices=choices,
            usage=usage,
            policy_version=replies[0].policy_version,
            response_id=choices[0].response_id,
        )

    async def stream(self, req: ChatCompletionRequest, principal: str) -> AsyncIterator[str]:
        """Server-sent events for a streamed completion.

        The first upstream chunk (of each upstream, side by side) is awaited before this returns,
        so that a refused request still gets a real HTTP error status rather than a 200 stream
        carrying an error.
        """
        await self.check_model(req.model)
        route = self.route(req, principal)
        if self._side_by_side(req, route):
            msg = to_generate_request(req, principal, n=1)
            groups = [STABLE, CANARY]
            random.shuffle(groups)
            opened = await asyncio.gather(
                *(self._open(g, msg, index=i) for i, g in enumerate(groups)), return_exceptions=True
            )
            ups = [u for u in opened if isinstance(u, Upstream)]
            failed = [e for e in opened if isinstance(e, BaseException)]
            if failed:
                for u in ups:
                    u.call.cancel()
                raise failed[0]
            self._served("side_by_side")
        else:
            ups = [await self._open(route.group, to_generate_request(req, principal))]
            self._served(route.group)
        return self._events(req, ups, self.tokens.for_request(req, principal))

    async def _events(self, req: ChatCompletionRequest, ups: list[Upstream], token: Signer) -> AsyncIterator[str]:
        first = ups[0].first
        created = int(time.time())
        chat_id = f"chatcmpl-{first.request_id or uuid.uuid4().hex}"
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        started: set[int] = set()
        usages: list[inference_pb2.GenerateChunk] = []
        deltas = DeltaEvents(chat_id, created)
        chunks = tokens = 0
        try:
            async for up, chunk in _merged(ups):
                if chunk.HasField("usage"):
                    usages.append(chunk)
                    continue
                chunks += 1
                tokens += len(chunk.token_ids)
                index = chunk.index if up.index is None else up.index
                if index in started and not req.logprobs:
                    # The per-token path: a continuation of a choice, encoded without pydantic.
                    if chunk.text or chunk.finish_reason:
                        yield deltas.delta(
                            chunk.model, chunk.policy_version, index, chunk.text, chunk.finish_reason, chunk.response_id
                        )
                    continue
                if not (chunk.text or chunk.finish_reason or index not in started or chunk.token_ids):
                    # (a chunk of tokens without text, the start of a multi-byte character, still
                    # carries their logprobs)
                    continue
                delta = DeltaMessage(content=chunk.text)
                choice = ChunkChoice(
                    index=index,
                    delta=delta,
                    finish_reason=chunk.finish_reason or None,
                    logprobs=_logprobs(chunk.tokens, chunk.logprobs) if req.logprobs else None,
                    response_id=chunk.response_id,
                )
                if index not in started:
                    delta.role = "assistant"
                    choice.feedback_token = token(chunk.response_id, chunk.policy_version)
                    choice.policy_version = chunk.policy_version
                    started.add(index)
                yield sse(
                    ChatCompletionChunk(
                        id=chat_id,
                        created=created,
                        model=chunk.model,
                        choices=[choice],
                        policy_version=chunk.policy_version,
                    )
                )
            if include_usage and usages:
                prompt = usages[0].usage.prompt_tokens
                completion = sum(u.usage.completion_tokens for u in usages)
                yield sse(
                    ChatCompletionChunk(
                        id=chat_id,
                        created=created,
                        model=usages[0].model,
                        choices=[],
                        usage=Usage(
                            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
                        ),
                        policy_version=usages[0].policy_version,
                    )
                )
        except grpc.aio.AioRpcError as exc:
            yield sse_error(*error_from_grpc(exc))
        finally:
            for up in ups:
                up.call.cancel()
            # Counted once per stream, not per chunk: tokens / chunks is the tokens per message.
            metrics.STREAM_CHUNKS.inc(chunks)
            metrics.STREAM_TOKENS.inc(tokens)
        yield "data: [DONE]\n\n"


async def _merged(ups: list[Upstream]) -> AsyncIterator[tuple[Upstream, inference_pb2.GenerateChunk]]:
    """The chunks of every upstream as they arrive, each with its upstream (first chunks first)."""
    if len(ups) == 1:
        up = ups[0]
        yield up, up.first
        async for chunk in up.iterator:
            yield up, chunk
        return
    queue: asyncio.Queue[tuple[Upstream, inference_pb2.GenerateChunk | grpc.aio.AioRpcError | None]] = asyncio.Queue(
        MERGE_QUEUE
    )

    async def pump(up: Upstream) -> None:
        try:
            await queue.put((up, up.first))
            async for chunk in up.iterator:
                await queue.put((up, chunk))
            await queue.put((up, None))
        except grpc.aio.AioRpcError as exc:
            await queue.put((up, exc))

    tasks = [asyncio.create_task(pump(up)) for up in ups]
    try:
        running = len(ups)
        while running:
            up, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, grpc.aio.AioRpcError):
                raise item
            else:
                yield up, item
    finally:
        for task in tasks:
            task.cancel()
