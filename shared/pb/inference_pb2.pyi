from . import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "max_tokens", "seed", "stop", "n", "logprobs")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    n: int
    logprobs: bool
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., max_tokens: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., n: _Optional[int] = ..., logprobs: _Optional[bool] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("messages", "sampling", "source", "principal", "conversation_id", "policy_version")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    sampling: SamplingParams
    source: str
    principal: str
    conversation_id: str
    policy_version: str
    def __init__(self, messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., source: _Optional[str] = ..., principal: _Optional[str] = ..., conversation_id: _Optional[str] = ..., policy_version: _Optional[str] = ...) -> None: ...

class Completion(_message.Message):
    __slots__ = ("response_id", "index", "text", "token_ids", "logprobs", "finish_reason", "tokens", "policy_versions")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    response_id: str
    index: int
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    finish_reason: str
    tokens: _containers.RepeatedScalarFieldContainer[str]
    policy_versions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, response_id: _Optional[str] = ..., index: _Optional[int] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., finish_reason: _Optional[str] = ..., tokens: _Optional[_Iterable[str]] = ..., policy_versions: _Optional[_Iterable[str]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "policy_version", "model", "prompt_token_ids", "completions", "usage")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    COMPLETIONS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    policy_version: str
    model: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    completions: _containers.RepeatedCompositeFieldContainer[Completion]
    usage: _common_pb2.Usage
    def __init__(self, request_id: _Optional[str] = ..., policy_version: _Optional[str] = ..., model: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., completions: _Optional[_Iterable[_Union[Completion, _Mapping]]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("request_id", "policy_version", "model", "index", "response_id", "text", "token_ids", "logprobs", "finish_reason", "usage", "prompt_token_ids", "tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    policy_version: str
    model: str
    index: int
    response_id: str
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    finish_reason: str
    usage: _common_pb2.Usage
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    tokens: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_id: _Optional[str] = ..., policy_version: _Optional[str] = ..., model: _Optional[str] = ..., index: _Optional[int] = ..., response_id: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., finish_reason: _Optional[str] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., tokens: _Optional[_Iterable[str]] = ...) -> None: ...

class GetPolicyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PolicyInfo(_message.Message):
    __slots__ = ("policy_version", "model", "serving_since", "max_model_len", "swaps", "refused_updates")
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SERVING_SINCE_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    SWAPS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_UPDATES_FIELD_NUMBER: _ClassVar[int]
    policy_version: str
    model: str
    serving_since: float
    max_model_len: int
    swaps: int
    refused_updates: int
    def __init__(self, policy_version: _Optional[str] = ..., model: _Optional[str] = ..., serving_since: _Optional[float] = ..., max_model_len: _Optional[int] = ..., swaps: _Optional[int] = ..., refused_updates: _Optional[int] = ...) -> None: ...

class GetLoadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LoadInfo(_message.Message):
    __slots__ = ("user_in_flight", "user_waiting", "trainer_in_flight", "trainer_waiting", "user_ttft_p50_s", "user_ttft_samples", "ttft_window_s", "user_quiet_s", "user_requests")
    USER_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    USER_WAITING_FIELD_NUMBER: _ClassVar[int]
    TRAINER_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    TRAINER_WAITING_FIELD_NUMBER: _ClassVar[int]
    USER_TTFT_P50_S_FIELD_NUMBER: _ClassVar[int]
    USER_TTFT_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TTFT_WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    USER_QUIET_S_FIELD_NUMBER: _ClassVar[int]
    USER_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    user_in_flight: int
    user_waiting: int
    trainer_in_flight: int
    trainer_waiting: int
    user_ttft_p50_s: float
    user_ttft_samples: int
    ttft_window_s: float
    user_quiet_s: float
    user_requests: int
    def __init__(self, user_in_flight: _Optional[int] = ..., user_waiting: _Optional[int] = ..., trainer_in_flight: _Optional[int] = ..., trainer_waiting: _Optional[int] = ..., user_ttft_p50_s: _Optional[float] = ..., user_ttft_samples: _Optional[int] = ..., ttft_window_s: _Optional[float] = ..., user_quiet_s: _Optional[float] = ..., user_requests: _Optional[int] = ...) -> None: ...
