"""The chat and legacy completions schema: integers beyond the gRPC field they go into are refused
naming the field (not a 500 from protobuf), top_logprobs gets a clear refusal, and the legacy
completions API maps to one chat message and back."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.gateway.chat.schema import (
    UINT32_MAX,
    UINT64_MAX,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    Choice,
    ChoiceLogprobs,
    CompletionRequest,
    TokenLogprob,
    Usage,
    as_completion,
    in_range,
    unicode_text,
)
from services.gateway.chat.serving import to_generate_request

BASE = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def field_of(exc: ValidationError) -> str:
    return ".".join(str(p) for p in exc.errors()[0]["loc"])


def test_in_range_accepts_the_fields_range_and_names_it_otherwise():
    assert in_range(None, 7) is None and in_range(0, 7) == 0 and in_range(7, 7) == 7
    for bad in (-1, 8):
        with pytest.raises(ValueError, match="from 0 to 7"):
            in_range(bad, 7)


def test_unicode_text_refuses_a_lone_surrogate_only():
    assert unicode_text("héllo 😀") == "héllo 😀"
    with pytest.raises(ValueError, match="lone surrogate"):
        unicode_text("a\ud800")


@pytest.mark.parametrize(
    "body, field",
    [
        (b'{"model": "m", "messages": [{"role": "user", "content": "a\\ud800"}]}', "messages.0.content"),
        (b'{"model": "m\\udfff", "messages": [{"role": "user", "content": "hi"}]}', "model"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud800"]}', "stop"),
    ],
)
def test_a_lone_surrogate_in_json_is_refused_naming_the_field(body, field):
    import json

    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate(json.loads(body))  # FastAPI parses with json.loads
    assert field_of(caught.value).startswith(field)


@pytest.mark.parametrize("field", ["n", "max_tokens", "max_completion_tokens", "top_k"])
@pytest.mark.parametrize("value", [UINT32_MAX + 1, 2**63, -1])
def test_uint32_fields_refuse_values_their_grpc_field_cannot_hold(field, value):
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate({**BASE, field: value})
    assert field_of(caught.value) == field


def test_every_accepted_value_fits_its_grpc_field():
    req = ChatCompletionRequest.model_validate(
        {**BASE, "max_tokens": UINT32_MAX, "top_k": UINT32_MAX, "seed": UINT64_MAX}
    )
    msg = to_generate_request(req, "alice")
    assert msg.sampling.max_tokens == UINT32_MAX and msg.sampling.seed == UINT64_MAX
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate({**BASE, "seed": UINT64_MAX + 1})
    assert field_of(caught.value) == "seed"


def test_top_logprobs_is_refused_clearly():
    with pytest.raises(ValidationError, match="sampled token's logprob only") as caught:
        ChatCompletionRequest.model_validate({**BASE, "logprobs": True, "top_logprobs": 2})
    assert field_of(caught.value) == "top_logprobs"
    assert ChatCompletionRequest.model_validate({**BASE, "logprobs": True, "top_logprobs": 0}).logprobs


@pytest.mark.parametrize(
    "extra, field",
    [
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"echo": True}, "echo"),
        ({"suffix": "x"}, "suffix"),
        ({"logprobs": 3}, "logprobs"),
        ({"n": 2, "best_of": 3}, "best_of"),
        ({"stream": True}, "stream"),
        ({"max_tokens": UINT32_MAX + 1}, "max_tokens"),
        ({"conversation_id": "a b"}, "conversation_id"),
    ],
)
def test_legacy_fields_this_server_cannot_honour_are_refused_by_name(extra, field):
    with pytest.raises(ValidationError) as caught:
        CompletionRequest.model_validate({"model": "m", "prompt": "hi", **extra})
    assert field_of(caught.value) == field


def test_a_legacy_prompt_is_served_as_one_user_message():
    req = CompletionRequest.model_validate(
        {"model": "m", "prompt": ["Say hi"], "max_tokens": 5, "n": 2, "best_of": 2, "logprobs": 0, "seed": 3}
    )
    chat = req.as_chat()
    assert [(m.role, m.text()) for m in chat.messages] == [("user", "Say hi")]
    assert (chat.max_tokens, chat.n, chat.seed, chat.logprobs) == (5, 2, 3, True)


def test_a_chat_response_maps_to_the_legacy_shape():
    lp = ChoiceLogprobs(content=[TokenLogprob(token="He", logprob=-0.5), TokenLogprob(token="llo", logprob=-1.0)])
    chat = ChatCompletionResponse(
        id="chatcmpl-abc",
        model="m",
        choices=[
            Choice(
                index=0,
                message=ChatMessageOut(content="Hello"),
                finish_reason="stop",
                logprobs=lp,
                response_id="resp-1",
                feedback_token="tok",
                policy_version="policy-0001",
            )
        ],
        usage=Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5),
        policy_version="policy-0001",
        response_id="resp-1",
    )
    out = as_completion(chat)
    assert out.id == "cmpl-abc" and out.object == "text_completion"
    choice = out.choices[0]
    assert (choice.text, choice.response_id, choice.feedback_token) == ("Hello", "resp-1", "tok")
    assert choice.logprobs is not None
    assert choice.logprobs.tokens == ["He", "llo"] and choice.logprobs.text_offset == [0, 2]
    assert choice.logprobs.token_logprobs == [-0.5, -1.0]
