from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RolloutStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RolloutPauseRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RolloutResumeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RolloutVersionRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: str
    def __init__(self, version: _Optional[str] = ...) -> None: ...

class RolloutModeRequest(_message.Message):
    __slots__ = ("mode",)
    MODE_FIELD_NUMBER: _ClassVar[int]
    mode: str
    def __init__(self, mode: _Optional[str] = ...) -> None: ...

class RolloutStatus(_message.Message):
    __slots__ = ("stable", "canary", "canary_share", "canary_since", "queued", "paused", "mode", "sequence", "last_verdict", "stable_signals", "canary_signals", "recent", "latest_candidate")
    STABLE_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    CANARY_SHARE_FIELD_NUMBER: _ClassVar[int]
    CANARY_SINCE_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    LAST_VERDICT_FIELD_NUMBER: _ClassVar[int]
    STABLE_SIGNALS_FIELD_NUMBER: _ClassVar[int]
    CANARY_SIGNALS_FIELD_NUMBER: _ClassVar[int]
    RECENT_FIELD_NUMBER: _ClassVar[int]
    LATEST_CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    stable: str
    canary: str
    canary_share: float
    canary_since: float
    queued: str
    paused: bool
    mode: str
    sequence: int
    last_verdict: GateVerdict
    stable_signals: VersionSignals
    canary_signals: VersionSignals
    recent: _containers.RepeatedCompositeFieldContainer[RolloutStep]
    latest_candidate: str
    def __init__(self, stable: _Optional[str] = ..., canary: _Optional[str] = ..., canary_share: _Optional[float] = ..., canary_since: _Optional[float] = ..., queued: _Optional[str] = ..., paused: _Optional[bool] = ..., mode: _Optional[str] = ..., sequence: _Optional[int] = ..., last_verdict: _Optional[_Union[GateVerdict, _Mapping]] = ..., stable_signals: _Optional[_Union[VersionSignals, _Mapping]] = ..., canary_signals: _Optional[_Union[VersionSignals, _Mapping]] = ..., recent: _Optional[_Iterable[_Union[RolloutStep, _Mapping]]] = ..., latest_candidate: _Optional[str] = ...) -> None: ...

class GateVerdict(_message.Message):
    __slots__ = ("action", "reason", "evidence_json", "at")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_JSON_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    action: str
    reason: str
    evidence_json: str
    at: float
    def __init__(self, action: _Optional[str] = ..., reason: _Optional[str] = ..., evidence_json: _Optional[str] = ..., at: _Optional[float] = ...) -> None: ...

class VersionSignals(_message.Message):
    __slots__ = ("version", "thumbs_up_rate", "thumbs", "likert_mean", "likerts", "completions", "error_rate", "latency_p50_s", "latency_p90_s", "mean_tokens")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    THUMBS_UP_RATE_FIELD_NUMBER: _ClassVar[int]
    THUMBS_FIELD_NUMBER: _ClassVar[int]
    LIKERT_MEAN_FIELD_NUMBER: _ClassVar[int]
    LIKERTS_FIELD_NUMBER: _ClassVar[int]
    COMPLETIONS_FIELD_NUMBER: _ClassVar[int]
    ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P50_S_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P90_S_FIELD_NUMBER: _ClassVar[int]
    MEAN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    version: str
    thumbs_up_rate: float
    thumbs: int
    likert_mean: float
    likerts: int
    completions: int
    error_rate: float
    latency_p50_s: float
    latency_p90_s: float
    mean_tokens: float
    def __init__(self, version: _Optional[str] = ..., thumbs_up_rate: _Optional[float] = ..., thumbs: _Optional[int] = ..., likert_mean: _Optional[float] = ..., likerts: _Optional[int] = ..., completions: _Optional[int] = ..., error_rate: _Optional[float] = ..., latency_p50_s: _Optional[float] = ..., latency_p90_s: _Optional[float] = ..., mean_tokens: _Optional[float] = ...) -> None: ...

class RolloutStep(_message.Message):
    __slots__ = ("sequence", "version", "stage", "reason", "stable", "canary", "canary_share", "at", "evidence_json")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STABLE_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    CANARY_SHARE_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_JSON_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    version: str
    stage: str
    reason: str
    stable: str
    canary: str
    canary_share: float
    at: float
    evidence_json: str
    def __init__(self, sequence: _Optional[int] = ..., version: _Optional[str] = ..., stage: _Optional[str] = ..., reason: _Optional[str] = ..., stable: _Optional[str] = ..., canary: _Optional[str] = ..., canary_share: _Optional[float] = ..., at: _Optional[float] = ..., evidence_json: _Optional[str] = ...) -> None: ...
