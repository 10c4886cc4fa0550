from . import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
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
    __slots__ = ("step", "paused", "base_policy_version", "last_published", "mean_reward", "kl", "entropy", "state", "detail", "reference_policy_version", "rm_version", "checkpoint_step", "live_prompts", "dropped_rollouts", "last_gate", "baseline_reward")
    class DroppedRolloutsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    BASE_POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    MEAN_REWARD_FIELD_NUMBER: _ClassVar[int]
    KL_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    RM_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_STEP_FIELD_NUMBER: _ClassVar[int]
    LIVE_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_ROLLOUTS_FIELD_NUMBER: _ClassVar[int]
    LAST_GATE_FIELD_NUMBER: _ClassVar[int]
    BASELINE_REWARD_FIELD_NUMBER: _ClassVar[int]
    step: int
    paused: bool
    base_policy_version: str
    last_published: _common_pb2.ModelVersion
    mean_reward: float
    kl: float
    entropy: float
    state: str
    detail: str
    reference_policy_version: str
    rm_version: str
    checkpoint_step: int
    live_prompts: int
    dropped_rollouts: _containers.ScalarMap[str, int]
    last_gate: PublishResult
    baseline_reward: float
    def __init__(self, step: _Optional[int] = ..., paused: _Optional[bool] = ..., base_policy_version: _Optional[str] = ..., last_published: _Optional[_Union[_common_pb2.ModelVersion, _Mapping]] = ..., mean_reward: _Optional[float] = ..., kl: _Optional[float] = ..., entropy: _Optional[float] = ..., state: _Optional[str] = ..., detail: _Optional[str] = ..., reference_policy_version: _Optional[str] = ..., rm_version: _Optional[str] = ..., checkpoint_step: _Optional[int] = ..., live_prompts: _Optional[int] = ..., dropped_rollouts: _Optional[_Mapping[str, int]] = ..., last_gate: _Optional[_Union[PublishResult, _Mapping]] = ..., baseline_reward: _Optional[float] = ...) -> None: ...

class PublishResult(_message.Message):
    __slots__ = ("published", "version", "reason", "heldout_reward", "kl", "baseline_reward", "step", "guards", "refused_by", "compared", "same_as_baseline")
    PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    HELDOUT_REWARD_FIELD_NUMBER: _ClassVar[int]
    KL_FIELD_NUMBER: _ClassVar[int]
    BASELINE_REWARD_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    GUARDS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_BY_FIELD_NUMBER: _ClassVar[int]
    COMPARED_FIELD_NUMBER: _ClassVar[int]
    SAME_AS_BASELINE_FIELD_NUMBER: _ClassVar[int]
    published: bool
    version: _common_pb2.ModelVersion
    reason: str
    heldout_reward: float
    kl: float
    baseline_reward: float
    step: int
    guards: _containers.RepeatedCompositeFieldContainer[GuardCheck]
    refused_by: str
    compared: bool
    same_as_baseline: bool
    def __init__(self, published: _Optional[bool] = ..., version: _Optional[_Union[_common_pb2.ModelVersion, _Mapping]] = ..., reason: _Optional[str] = ..., heldout_reward: _Optional[float] = ..., kl: _Optional[float] = ..., baseline_reward: _Optional[float] = ..., step: _Optional[int] = ..., guards: _Optional[_Iterable[_Union[GuardCheck, _Mapping]]] = ..., refused_by: _Optional[str] = ..., compared: _Optional[bool] = ..., same_as_baseline: _Optional[bool] = ...) -> None: ...

class GuardCheck(_message.Message):
    __slots__ = ("name", "passed", "value", "baseline", "bar", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    BAR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    passed: bool
    value: float
    baseline: float
    bar: float
    reason: str
    def __init__(self, name: _Optional[str] = ..., passed: _Optional[bool] = ..., value: _Optional[float] = ..., baseline: _Optional[float] = ..., bar: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...
