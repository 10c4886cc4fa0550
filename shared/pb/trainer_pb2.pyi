from . import common_pb2 as _common_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PauseRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PublishNowRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("policy_version",)
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    policy_version: str
    def __init__(self, policy_version: _Optional[str] = ...) -> None: ...

class TrainerStatus(_message.Message):
    __slots__ = ("step", "paused", "base_policy_version", "last_published", "mean_reward", "kl", "entropy")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    BASE_POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    MEAN_REWARD_FIELD_NUMBER: _ClassVar[int]
    KL_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    step: int
    paused: bool
    base_policy_version: str
    last_published: _common_pb2.ModelVersion
    mean_reward: float
    kl: float
    entropy: float
    def __init__(self, step: _Optional[int] = ..., paused: _Optional[bool] = ..., base_policy_version: _Optional[str] = ..., last_published: _Optional[_Union[_common_pb2.ModelVersion, _Mapping]] = ..., mean_reward: _Optional[float] = ..., kl: _Optional[float] = ..., entropy: _Optional[float] = ...) -> None: ...

class PublishResult(_message.Message):
    __slots__ = ("published", "version", "reason")
    PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    published: bool
    version: _common_pb2.ModelVersion
    reason: str
    def __init__(self, published: _Optional[bool] = ..., version: _Optional[_Union[_common_pb2.ModelVersion, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...
