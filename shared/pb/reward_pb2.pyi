from . import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScoreItem(_message.Message):
    __slots__ = ("messages", "response")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    response: str
    def __init__(self, messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., response: _Optional[str] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoreItem]
    def __init__(self, items: _Optional[_Iterable[_Union[ScoreItem, _Mapping]]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("scores", "rm_version", "truncated")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    RM_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    rm_version: str
    truncated: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, scores: _Optional[_Iterable[float]] = ..., rm_version: _Optional[str] = ..., truncated: _Optional[_Iterable[bool]] = ...) -> None: ...

class GetRewardModelRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRatersRequest(_message.Message):
    __slots__ = ("quarantined_only", "limit")
    QUARANTINED_ONLY_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    quarantined_only: bool
    limit: int
    def __init__(self, quarantined_only: _Optional[bool] = ..., limit: _Optional[int] = ...) -> None: ...

class Rater(_message.Message):
    __slots__ = ("principal", "status", "reason", "peer_agreement", "peer_items", "rm_agreement", "rm_items", "comparisons", "updated_at", "status_at")
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PEER_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    PEER_ITEMS_FIELD_NUMBER: _ClassVar[int]
    RM_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    RM_ITEMS_FIELD_NUMBER: _ClassVar[int]
    COMPARISONS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    STATUS_AT_FIELD_NUMBER: _ClassVar[int]
    principal: str
    status: str
    reason: str
    peer_agreement: float
    peer_items: int
    rm_agreement: float
    rm_items: int
    comparisons: int
    updated_at: float
    status_at: float
    def __init__(self, principal: _Optional[str] = ..., status: _Optional[str] = ..., reason: _Optional[str] = ..., peer_agreement: _Optional[float] = ..., peer_items: _Optional[int] = ..., rm_agreement: _Optional[float] = ..., rm_items: _Optional[int] = ..., comparisons: _Optional[int] = ..., updated_at: _Optional[float] = ..., status_at: _Optional[float] = ...) -> None: ...

class ListRatersResponse(_message.Message):
    __slots__ = ("raters", "total", "quarantined", "held_back")
    class HeldBackEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    RATERS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    HELD_BACK_FIELD_NUMBER: _ClassVar[int]
    raters: _containers.RepeatedCompositeFieldContainer[Rater]
    total: int
    quarantined: int
    held_back: _containers.ScalarMap[str, int]
    def __init__(self, raters: _Optional[_Iterable[_Union[Rater, _Mapping]]] = ..., total: _Optional[int] = ..., quarantined: _Optional[int] = ..., held_back: _Optional[_Mapping[str, int]] = ...) -> None: ...

class ReleaseRaterRequest(_message.Message):
    __slots__ = ("principal",)
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    principal: str
    def __init__(self, principal: _Optional[str] = ...) -> None: ...
