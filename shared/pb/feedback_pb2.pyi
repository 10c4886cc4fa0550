from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Thumb(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    THUMB_UNSPECIFIED: _ClassVar[Thumb]
    THUMB_UP: _ClassVar[Thumb]
    THUMB_DOWN: _ClassVar[Thumb]
THUMB_UNSPECIFIED: Thumb
THUMB_UP: Thumb
THUMB_DOWN: Thumb

class ThumbRating(_message.Message):
    __slots__ = ("response_id", "thumb")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    THUMB_FIELD_NUMBER: _ClassVar[int]
    response_id: str
    thumb: Thumb
    def __init__(self, response_id: _Optional[str] = ..., thumb: _Optional[_Union[Thumb, str]] = ...) -> None: ...

class LikertRating(_message.Message):
    __slots__ = ("response_id", "score")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    response_id: str
    score: int
    def __init__(self, response_id: _Optional[str] = ..., score: _Optional[int] = ...) -> None: ...

class PairwiseChoice(_message.Message):
    __slots__ = ("response_id_a", "response_id_b", "preferred")
    RESPONSE_ID_A_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_ID_B_FIELD_NUMBER: _ClassVar[int]
    PREFERRED_FIELD_NUMBER: _ClassVar[int]
    response_id_a: str
    response_id_b: str
    preferred: str
    def __init__(self, response_id_a: _Optional[str] = ..., response_id_b: _Optional[str] = ..., preferred: _Optional[str] = ...) -> None: ...

class Ranking(_message.Message):
    __slots__ = ("response_ids", "ranks")
    RESPONSE_IDS_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    response_ids: _containers.RepeatedScalarFieldContainer[str]
    ranks: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, response_ids: _Optional[_Iterable[str]] = ..., ranks: _Optional[_Iterable[int]] = ...) -> None: ...

class SubmitFeedbackRequest(_message.Message):
    __slots__ = ("thumb", "likert", "pairwise", "ranking", "feedback_tokens", "comment", "tags", "idempotency_key", "user_id", "principal")
    THUMB_FIELD_NUMBER: _ClassVar[int]
    LIKERT_FIELD_NUMBER: _ClassVar[int]
    PAIRWISE_FIELD_NUMBER: _ClassVar[int]
    RANKING_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    thumb: ThumbRating
    likert: LikertRating
    pairwise: PairwiseChoice
    ranking: Ranking
    feedback_tokens: _containers.RepeatedScalarFieldContainer[str]
    comment: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    idempotency_key: str
    user_id: str
    principal: str
    def __init__(self, thumb: _Optional[_Union[ThumbRating, _Mapping]] = ..., likert: _Optional[_Union[LikertRating, _Mapping]] = ..., pairwise: _Optional[_Union[PairwiseChoice, _Mapping]] = ..., ranking: _Optional[_Union[Ranking, _Mapping]] = ..., feedback_tokens: _Optional[_Iterable[str]] = ..., comment: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ..., idempotency_key: _Optional[str] = ..., user_id: _Optional[str] = ..., principal: _Optional[str] = ...) -> None: ...

class SubmitFeedbackResponse(_message.Message):
    __slots__ = ("feedback_id", "revision", "duplicate")
    FEEDBACK_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    feedback_id: str
    revision: int
    duplicate: bool
    def __init__(self, feedback_id: _Optional[str] = ..., revision: _Optional[int] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class SubmitFeedbackBatchRequest(_message.Message):
    __slots__ = ("submissions",)
    SUBMISSIONS_FIELD_NUMBER: _ClassVar[int]
    submissions: _containers.RepeatedCompositeFieldContainer[SubmitFeedbackRequest]
    def __init__(self, submissions: _Optional[_Iterable[_Union[SubmitFeedbackRequest, _Mapping]]] = ...) -> None: ...

class SubmitFeedbackBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SubmitFeedbackResult]
    def __init__(self, results: _Optional[_Iterable[_Union[SubmitFeedbackResult, _Mapping]]] = ...) -> None: ...

class SubmitFeedbackResult(_message.Message):
    __slots__ = ("accepted", "error")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    accepted: SubmitFeedbackResponse
    error: FeedbackError
    def __init__(self, accepted: _Optional[_Union[SubmitFeedbackResponse, _Mapping]] = ..., error: _Optional[_Union[FeedbackError, _Mapping]] = ...) -> None: ...

class FeedbackError(_message.Message):
    __slots__ = ("code", "message", "param")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PARAM_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    param: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., param: _Optional[str] = ...) -> None: ...

class RejectFeedbackRequest(_message.Message):
    __slots__ = ("raw", "reason", "param")
    RAW_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PARAM_FIELD_NUMBER: _ClassVar[int]
    raw: str
    reason: str
    param: str
    def __init__(self, raw: _Optional[str] = ..., reason: _Optional[str] = ..., param: _Optional[str] = ...) -> None: ...

class RejectFeedbackResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
