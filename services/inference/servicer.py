"""gRPC InferenceService: converts protobuf messages to domain objects and back, nothing more."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from services.inference.domain import GenerationRequest, GenerationResult
from services.inference.serving import InferenceServing
from shared.events import Message
from shared.pb import common_pb2, inference_pb2, inference_pb2_grpc


def request_from_proto(serving: InferenceServing, msg: inference_pb2.GenerateRequest) -> GenerationRequest:
    s = msg.sampling

    def opt(name: str) -> Any:
        return getattr(s, name) if s.HasField(name) else None

    sampling = serving.sampling_defaults(
        temperature=opt("temperature"),
        top_p=opt("top_p"),
        top_k=opt("top_k"),
        max_tokens=opt("max_tokens"),
        seed=opt("seed"),
        stop=tuple(s.stop),
        n=s.n or 1,
        logprobs=s.logprobs,
    )
    return GenerationRequest(
        messages=[Message(m.role, m.content) for m in msg.messages],
        sampling=sampling,
        source=msg.source or "user",
        principal=msg.principal,
        conversation_id=msg.conversation_id,
        policy_version=msg.policy_version,
    )


def usage(prompt_tokens: int, completion_tokens: int) -> common_pb2.Usage:
    return common_pb2.Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )


def result_to_proto(serving: InferenceServing, r: GenerationResult) -> inference_pb2.GenerateResponse:
    return inference_pb2.GenerateResponse(
        request_id=r.request_id,
        policy_version=r.policy_version,
        model=r.model,
        prompt_token_ids=r.prompt_token_ids,
        completions=[
            inference_pb2.Completion(
                response_id=c.response_id,
                index=c.index,
                text=c.text,
                token_ids=c.token_ids,
                logprobs=c.logprobs or [],
                finish_reason=c.finish_reason,
                tokens=serving.token_texts(c.token_ids) if c.logprobs is not None else [],
                policy_versions=r.policy_versions,
            )
            for c in r.completions
        ],
        usage=usage(len(r.prompt_token_ids), r.completion_tokens),
    )


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, serving: InferenceServing):
        self.serving = serving

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.GenerateResponse:
        result = await self.serving.generate(request_from_proto(self.serving, request))
        return result_to_proto(self.serving, result)

    async def GenerateStream(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        req = request_from_proto(self.serving, request)
        async with self.serving.stream(req) as stream:
            first = True
            # Several tokens per message when the engine is ahead (RLHF_INFERENCE_STREAM_COALESCE_MS).
            async for d in stream.coalesced():
                chunk = inference_pb2.GenerateChunk(
                    request_id=stream.request_id,
                    policy_version=stream.policy_version,
                    model=stream.model,
                    index=d.index,
                    response_id=d.response_id,
                    text=d.text,
                    token_ids=d.token_ids,
                    logprobs=d.logprobs or [],
                    finish_reason=d.finish_reason,
                    tokens=self.serving.token_texts(d.token_ids) if d.logprobs is not None else [],
                )
                if first:
                    chunk.prompt_token_ids.extend(stream.prompt_token_ids)
                    first = False
                yield chunk
            result = stream.result()
            yield inference_pb2.GenerateChunk(
                request_id=stream.request_id,
                policy_version=stream.policy_version,
                model=stream.model,
                usage=usage(len(result.prompt_token_ids), result.completion_tokens),
            )

    async def GetPolicy(
        self, request: inference_pb2.GetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.PolicyInfo:
        s = self.serving.status()
        return inference_pb2.PolicyInfo(
            policy_version=s.policy_version,
            model=s.model,
            serving_since=s.serving_since,
            max_model_len=s.max_model_len,
            swaps=s.swaps,
            refused_updates=s.refused_updates,
        )

    async def GetLoad(
        self, request: inference_pb2.GetLoadRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.LoadInfo:
        s = self.serving.load.snapshot()
        return inference_pb2.LoadInfo(
            user_in_flight=s.user_in_flight,
            user_waiting=s.user_waiting,
            trainer_in_flight=s.trainer_in_flight,
            trainer_waiting=s.trainer_waiting,
            user_ttft_p50_s=s.user_ttft_p50_s,
            user_ttft_samples=s.user_ttft_samples,
            ttft_window_s=s.ttft_window_s,
            user_quiet_s=s.user_quiet_s,
            user_requests=s.user_requests,
        )
