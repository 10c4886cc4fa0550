"""Prompts: the prompt file parser, the held-out split, the live buffer (user prompts only,
deduplicated, bounded, most recent kept) and the live/file mixing ratio."""

from __future__ import annotations

import json

import pytest

from services.trainer.prompts import (
    LivePromptBuffer,
    PromptFileError,
    PromptMixer,
    live_count,
    parse_prompt,
    principal_prompt_cap,
    read_prompt_file,
    split_heldout_prompts,
)
from shared.events import CompletionEvent, Message, Timings

DEFAULT_FILE = "services/trainer/data/prompts.jsonl"


def completion(question: str, source: str = "user", system: str | None = None, principal: str = "") -> CompletionEvent:
    messages = ([Message("system", system)] if system else []) + [Message("user", question)]
    return CompletionEvent(
        request_id="r",
        response_id="c",
        index=0,
        n=1,
        policy_version="policy-0001",
        model="m",
        source=source,
        messages=messages,
        prompt_token_ids=[1, 2],
        completion_text="x",
        token_ids=[3],
        logprobs=None,
        finish_reason="stop",
        sampling={},
        timings=Timings(0, 0, 0),
        created_at=0.0,
        principal=principal,
    )


def user(text: str) -> tuple[Message, ...]:
    return (Message("user", text),)


def test_the_shipped_prompt_file_parses_into_distinct_prompts():
    prompts = read_prompt_file(DEFAULT_FILE)
    assert len(prompts) == 200 and len(set(prompts)) == 200
    assert all(p[-1].role == "user" for p in prompts)


@pytest.mark.parametrize(
    "doc, expected",
    [
        ({"prompt": "Hi"}, user("Hi")),
        (
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
            (Message("system", "Be brief."), Message("user", "Hi")),
        ),
    ],
)
def test_parse_prompt_accepts_text_or_messages(doc, expected):
    assert parse_prompt(doc) == expected


@pytest.mark.parametrize(
    "doc, words",
    [
        ({"text": "Hi"}, "expected"),
        ({"messages": [{"role": "robot", "content": "Hi"}]}, r"messages\[0\]"),
        ({"messages": [{"role": "user", "content": "  "}]}, "non-empty user"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}, "assistant"),
    ],
)
def test_parse_prompt_refuses_malformed_documents(doc, words):
    with pytest.raises(ValueError, match=words):
        parse_prompt(doc)


def test_a_bad_line_is_named_with_its_number(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "ok"}) + "\n\n" + "{not json\n")
    with pytest.raises(PromptFileError, match=r"p.jsonl:3"):
        read_prompt_file(path)


def test_heldout_split_is_stable_and_leaves_training_prompts():
    prompts = [user(str(i)) for i in range(10)]
    heldout, train = split_heldout_prompts(prompts, 3)
    assert heldout == prompts[:3] and train == prompts[3:]
    heldout, train = split_heldout_prompts(prompts, 50)
    assert len(heldout) == 9 and len(train) == 1


def test_live_buffer_takes_user_prompts_only_and_deduplicates():
    buf = LivePromptBuffer(capacity=10)
    assert buf.offer_completion(completion("What is 1 plus 2?"))
    assert not buf.offer_completion(completion("What is 1 plus 2?"))  # the n-th completion, a redelivery
    assert not buf.offer_completion(completion("What is 5 plus 5?", source="trainer"))
    assert buf.offer_completion(completion("What is 1 plus 2?", system="Be brief."))  # another conversation
    assert len(buf) == 2 and buf.offered == 4 and buf.accepted == 2


def test_live_buffer_is_bounded_and_keeps_the_most_recently_seen():
    buf = LivePromptBuffer(capacity=3)
    for q in "abc":
        buf.add(user(q))
    buf.add(user("a"))  # asked again: now the most recent
    buf.add(user("d"))  # evicts b, the least recently seen
    assert buf.snapshot() == [user("c"), user("a"), user("d")]


@pytest.mark.parametrize(
    "size, fraction, available, expected",
    [
        (8, 0.5, 100, 4),
        (8, 0.5, 2, 2),
        (8, 0.0, 100, 0),
        (8, 1.0, 100, 8),
        (3, 0.5, 100, 2),
        (8, 0.25, 0, 0),
    ],
)
def test_live_count(size, fraction, available, expected):
    assert live_count(size, fraction, available) == expected


def test_mixer_follows_the_ratio_and_falls_back_to_the_file():
    buf = LivePromptBuffer(capacity=100)
    files = [user(f"file {i}") for i in range(20)]
    mixer = PromptMixer(buf, files, live_fraction=0.75, seed=1)
    batch, n_live = mixer.sample(8)
    assert n_live == 0 and len(batch) == 8 and set(batch) <= set(files)  # nothing live yet
    for i in range(10):
        buf.add(user(f"live {i}"))
    batch, n_live = mixer.sample(8)
    assert n_live == 6 and len(batch) == 8
    assert all(p[0].content.startswith("live") for p in batch[:6])
    assert len(set(batch[:6])) == 6  # live drawn without replacement
    assert all(p[0].content.startswith("file") for p in batch[6:])


def test_mixer_with_live_only_waits_for_live_prompts():
    buf = LivePromptBuffer(capacity=10)
    mixer = PromptMixer(buf, [], live_fraction=1.0)
    assert mixer.sample(4) == ([], 0)
    buf.add(user("q"))
    assert mixer.sample(3) == ([user("q")] * 3, 3)
    with pytest.raises(ValueError, match="no file prompts"):
        PromptMixer(buf, [], live_fraction=0.5)


def test_live_buffer_never_takes_held_out_prompts():
    buf = LivePromptBuffer(capacity=10, exclude=[user("held out")])
    assert not buf.add(user("held out")) and buf.add(user("fine")) and buf.snapshot() == [user("fine")]


# --- the cap per principal ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "buffered, share, floor, expected",
    [
        (1000, 0.1, 32, 100),  # a share of the buffer...
        (100, 0.1, 32, 32),  # ...never below the floor
        (0, 0.1, 32, 32),
        (1024, 1.0, 1, 1024),  # share 1: no cap
        (30, 0.1, 1, 3),  # 0.1 * 30 is 3 (not 2.999...)
    ],
)
def test_principal_prompt_cap(buffered, share, floor, expected):
    assert principal_prompt_cap(buffered, share, floor) == expected


def test_a_flooding_principal_holds_at_most_its_share_of_the_buffer_and_of_the_live_batches():
    buf = LivePromptBuffer(capacity=200, max_principal_share=0.1, min_principal_prompts=5)
    # mallory asks 5000 distinct questions first, then 40 honest users ask 4 each, then mallory again.
    for i in range(5000):
        buf.offer_completion(completion(f"flood {i}", principal="mallory"))
    assert buf.by_principal() == {"mallory": 5} and len(buf) == 5  # an empty buffer: the floor
    for u in range(40):
        for i in range(4):
            assert buf.offer_completion(completion(f"question {i} of user {u}", principal=f"user{u}"))
    for i in range(5000, 6000):
        buf.offer_completion(completion(f"flood {i}", principal="mallory"))
    counts = buf.by_principal()
    # She grows with the buffer while m <= floor(0.1 * (160 + m)): 17 of 177.
    assert len(buf) == 177 and counts["mallory"] == 17
    assert all(counts[f"user{u}"] == 4 for u in range(40))  # her flood evicted only her own prompts
    assert buf.largest_share() <= 0.1 and buf.left_out["principal_cap"] == 6000 - 17
    # Her newest prompts are the ones kept.
    assert {p[0].content for p in buf.snapshot() if p[0].content.startswith("flood")} == {
        f"flood {i}" for i in range(5983, 6000)
    }
    # The mixer draws live prompts uniformly from the buffer: about her share of every live half.
    mixer = PromptMixer(buf, [user("file")], live_fraction=0.5, seed=3)
    live = [p for _ in range(400) for p in mixer.sample(16)[0][:8]]
    share = sum(p[0].content.startswith("flood") for p in live) / len(live)
    assert 0.06 < share < 0.14


def test_at_capacity_the_cap_evicts_the_flooder_not_the_others():
    buf = LivePromptBuffer(capacity=50, max_principal_share=0.1, min_principal_prompts=2)
    for u in range(45):
        buf.add(user(f"q{u}"), f"user{u}")
    for i in range(500):
        buf.add(user(f"flood {i}"), "mallory")
    assert len(buf) == 50 and buf.by_principal()["mallory"] == 5
    assert sum(1 for p, n in buf.by_principal().items() if p != "mallory") == 45  # nobody else lost a prompt
    # Honest users keep arriving at capacity: the least recently seen goes, as before.
    buf.add(user("late"), "user99")
    assert len(buf) == 50 and user("q0") not in buf.snapshot()


def test_without_a_cap_one_principal_may_fill_the_buffer():
    buf = LivePromptBuffer(capacity=10)
    for i in range(20):
        buf.add(user(f"q{i}"), "solo")
    assert buf.by_principal() == {"solo": 10}


def test_left_out_reasons_are_counted():
    buf = LivePromptBuffer(capacity=10, exclude=[user("held out")])
    buf.add(user("held out"))
    buf.add(user("a"))
    buf.add(user("a"))
    buf.add((Message("user", "q"), Message("assistant", "a")))
    assert buf.left_out == {"heldout": 1, "duplicate": 1, "invalid": 1}
