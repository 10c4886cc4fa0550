"""Chat completions over the inference service: OpenAI schema in, gRPC call, OpenAI schema out.

No HTTP here (see api_router.py): these are plain async calls on pydantic models.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

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
from services.gateway.errors import error_from_grpc, sse_error
from shared.config import FeedbackTokenConfig
from shared.errors import NotFound
from shared.feedback_token import TokenClaims, prompt_hash, sign
from shared.grpc_channels import ClientCredentials, aio_channel
from shared.pb import common_pb2, inference_pb2, inference_pb2_grpc


class InferenceClient:
    """The gateway's gRPC channel to the inference service."""

    def __init__(self, address: str, timeout_s: float, credentials: ClientCredentials):
        self.timeout_s = timeout_s
        self.channel = aio_channel(address, credentials, options=[("grpc.max_receive_message_length", 64 << 20)])
        self.stub = inference_pb2_grpc.InferenceServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()


def to_generate_request(req: ChatCompletionRequest, principal: str) -> inference_pb2.GenerateRequest:
    sampling = inference_pb2.SamplingParams(n=req.n or 1, logprobs=req.logprobs, stop=req.stop_list())
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


class FeedbackTokens:
    """Signs each served response's feedback token (HMAC over response_id, policy_version, prompt,
    expiry, and the principal it was served to: only that principal can rate it)."""

    def __init__(self, cfg: FeedbackTokenConfig):
        self.cfg = cfg

    def for_request(self, req: ChatCompletionRequest, principal: str) -> Callable[[str, str], str | None]:
        """A signer for the responses to this request of ``principal``, or a no-op when feedback is off."""
        if not self.cfg.secret:
            return lambda response_id, policy_version: None
        ph = prompt_hash((m.canonical_role(), m.text()) for m in req.messages)
        expires = int(time.time()) + self.cfg.ttl_s
        conversation = req.conversation_id or ""
        return lambda response_id, policy_version: sign(
            self.cfg.secret, TokenClaims(response_id, policy_version, ph, expires, principal, conversation)
        )


class ChatServing:
    def __init__(self, tokens: FeedbackTokens) -> None:
        self.tokens = tokens
        self._client: InferenceClient | None = None
        self._model_name: str | None = None

    def attach(self, client: InferenceClient) -> None:
        self._client = client

    @property
    def client(self) -> InferenceClient:
        if self._client is None:
            raise RuntimeError("ChatServing used before the app started")
        return self._client

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

    async def complete(self, req: ChatCompletionRequest, principal: str) -> ChatCompletionResponse:
        await self.check_model(req.model)
        r = await self.client.stub.Generate(to_generate_request(req, principal), timeout=self.client.timeout_s)
        token = self.tokens.for_request(req, principal)
        choices = [
            Choice(
                index=c.index,
                message=ChatMessageOut(content=c.text),
                finish_reason=c.finish_reason,
                logprobs=_logprobs(c.tokens, c.logprobs) if req.logprobs else None,
                response_id=c.response_id,
                feedback_token=token(c.response_id, r.policy_version),
            )
            for c in r.completions
        ]
        return ChatCompletionResponse(
            id=f"chatcmpl-{r.request_id}",
            model=r.model,
            choices=choices,
            usage=_usage(r.usage),
            policy_version=r.policy_version,
            response_id=choices[0].response_id,
        )

    async def stream(self, req: ChatCompletionRequest, principal: str) -> AsyncIterator[str]:
        """Server-sent events for a streamed completion.

        The first upstream chunk is awaited before this returns, so that a refused request still
        gets a real HTTP error status rather than a 200 stream carrying an error.
        """
        await self.check_model(req.model)
        call = self.client.stub.GenerateStream(to_generate_request(req, principal), timeout=self.client.timeout_s)
        iterator = call.__aiter__()
        first = await iterator.__anext__()
        return self._events(req, call, iterator, first, self.tokens.for_request(req, principal))

    async def _events(
        self,
        req: ChatCompletionRequest,
        call: Any,  # the gRPC stream call (grpc is untyped)
        iterator: AsyncIterator[inference_pb2.GenerateChunk],
        first: inference_pb2.GenerateChunk,
        token: Callable[[str, str], str | None],
    ) -> AsyncIterator[str]:
        created = int(time.time())
        chat_id = f"chatcmpl-{first.request_id or uuid.uuid4().hex}"
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        started: set[int] = set()
        chunk = first
        try:
            while True:
                if chunk.HasField("usage"):
                    if include_usage:
                        yield _sse(
                            ChatCompletionChunk(
                                id=chat_id,
                                created=created,
                                model=chunk.model,
                                choices=[],
                                usage=_usage(chunk.usage),
                                policy_version=chunk.policy_version,
                            )
                        )
                elif chunk.text or chunk.finish_reason or chunk.index not in started:
                    delta = DeltaMessage(content=chunk.text)
                    choice = ChunkChoice(
                        index=chunk.index,
                        delta=delta,
                        finish_reason=chunk.finish_reason or None,
                        logprobs=_logprobs(chunk.tokens, chunk.logprobs) if req.logprobs else None,
                        response_id=chunk.response_id,
                    )
                    if chunk.index not in started:
                        delta.role = "assistant"
                        choice.feedback_token = token(chunk.response_id, chunk.policy_version)
                        started.add(chunk.index)
                    yield _sse(
                        ChatCompletionChunk(
                            id=chat_id,
                            created=created,
                            model=chunk.model,
                            choices=[choice],
                            policy_version=chunk.policy_version,
                        )
                    )
                try:
                    chunk = await iterator.__anext__()
                except StopAsyncIteration:
                    break
        except grpc.aio.AioRpcError as exc:
            yield sse_error(*error_from_grpc(exc))
        finally:
            call.cancel()
        yield "data: [DONE]\n\n"


def _sse(chunk: ChatCompletionChunk) -> str:
    return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"
