"""The text-delta events encoded without pydantic are byte for byte the events pydantic writes."""

from __future__ import annotations

import json

import pytest

from services.gateway.chat.schema import ChatCompletionChunk, ChunkChoice, DeltaMessage
from services.gateway.chat.sse import MAX_HEADS, DeltaEvents, sse

TEXTS = [
    "",
    "hello",
    ' "quoted" and \\back\\slashed',
    "line\nbreak\ttab\rreturn\b\f",
    "".join(chr(c) for c in range(32)) + "\x7f",
    "héllo wörld — ünïcode ✓ 中文 🙂",
    "\u2028\u2029</script>",
]


def pydantic_event(chat_id, created, model, version, index, text, finish, response_id) -> str:
    choice = ChunkChoice(
        index=index, delta=DeltaMessage(content=text), finish_reason=finish or None, response_id=response_id
    )
    return sse(ChatCompletionChunk(id=chat_id, created=created, model=model, choices=[choice], policy_version=version))


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("finish", ["", "stop", "length"])
def test_a_delta_event_equals_the_pydantic_event(text, finish):
    events = DeltaEvents("chatcmpl-req-1", 1765000000)
    got = events.delta("rlhf-policy", "policy-0007", 1, text, finish, "resp-abc")
    assert got == pydantic_event(
        "chatcmpl-req-1", 1765000000, "rlhf-policy", "policy-0007", 1, text, finish, "resp-abc"
    )
    payload = json.loads(got.removeprefix("data: "))
    assert payload["choices"][0]["delta"]["content"] == text
    assert got.endswith("\n\n")


def test_odd_names_are_escaped_too():
    events = DeltaEvents('chatcmpl-"x"', 1)
    got = events.delta('mo"del\n', "pol\\icy", 0, "t", "", 'r"1')
    assert got == pydantic_event('chatcmpl-"x"', 1, 'mo"del\n', "pol\\icy", 0, "t", "", 'r"1')


def test_side_by_side_versions_each_get_their_own_head_and_the_cache_is_bounded():
    events = DeltaEvents("c", 1)
    a = events.delta("m", "policy-0001", 0, "x", "", "r0")
    b = events.delta("m", "policy-0002", 1, "x", "", "r1")
    assert json.loads(a[6:])["policy_version"] == "policy-0001"
    assert json.loads(b[6:])["policy_version"] == "policy-0002"
    for i in range(3 * MAX_HEADS):
        out = events.delta("m", f"v{i}", 0, "x", "", "r")
        assert json.loads(out[6:])["policy_version"] == f"v{i}", "a head past the bound is still right"
    assert len(events._heads) == MAX_HEADS
