"""Several tokens per streamed message: the wait rule (coalesce_delay) and a GenerationStream over a
scripted engine that merges what the consumer has not taken yet, as vLLM's output collector does
(the real engine is in tests/integration/test_streaming_chunks.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.inference.config import InferenceConfig
from services.inference.domain import GenerationRequest, Sampling
from services.inference.engine import EngineOutput
from services.inference.serving import GenerationStream, InferenceServing
from services.inference.streaming import coalesce_delay
from shared.config import VersionTrustConfig
from shared.events import Message
from shared.model_store import ModelStore

# --- the rule ------------------------------------------------------------------------------------


def test_no_window_never_waits():
    assert coalesce_delay(10.0, 10.0, 0.0, 16, 1, 0.01) == 0.0


def test_the_window_counts_from_when_the_previous_output_was_taken():
    assert coalesce_delay(10.0, 10.0, 0.04, 0, 0, 0.0) == pytest.approx(0.04)
    # sending the previous message took 15 ms of the window
    assert coalesce_delay(10.015, 10.0, 0.04, 0, 0, 0.0) == pytest.approx(0.025)
    assert coalesce_delay(10.1, 10.0, 0.04, 0, 0, 0.0) == 0.0, "a slow send leaves nothing to wait"


def test_the_count_bound_shortens_the_wait_at_the_streams_pace():
    # 4 tokens in 20 ms = 5 ms per token: 2 tokens take 10 ms, shorter than the 40 ms window
    assert coalesce_delay(10.0, 10.0, 0.04, 2, 4, 0.02) == pytest.approx(0.01)
    # a slow stream (1 token in 30 ms): 16 tokens take longer than the window, the window holds
    assert coalesce_delay(10.0, 10.0, 0.04, 16, 1, 0.03) == pytest.approx(0.04)


def test_with_a_count_bound_and_no_pace_yet_the_next_output_is_taken_when_ready():
    assert coalesce_delay(10.0, 10.0, 0.04, 2, 0, 0.0) == 0.0  # after the first output
    assert coalesce_delay(10.0, 10.0, 0.04, 2, 3, 0.0) == 0.0
    assert coalesce_delay(10.0, 10.0, 0.04, 0, 0, 0.0) == pytest.approx(0.04), "no bound: the window alone"


# --- a GenerationStream over a scripted engine ---------------------------------------------------

STEP_S = 0.004
TOKENS = 30


class MergingEngine:
    """Produces one token every STEP_S; outputs not yet taken are merged into one (as vLLM's
    RequestOutputCollector does with DELTA outputs)."""

    def __init__(self) -> None:
        self.taken: list[int] = []
        self.aborted: list[str] = []

    async def generate(
        self, request_id: str, prompt: list[int], sampling: Sampling, priority: int = 0
    ) -> AsyncIterator[list[EngineOutput]]:
        pending: list[int] = []
        ready = asyncio.Event()
        finished = False

        async def produce() -> None:
            nonlocal finished
            for t in range(TOKENS):
                await asyncio.sleep(STEP_S)
                pending.append(t)
                ready.set()
            finished = True
            ready.set()

        task = asyncio.create_task(produce())
        try:
            sent = 0
            while sent < TOKENS:
                await ready.wait()
                ready.clear()
                ids, pending[:] = list(pending), []
                if not ids:
                    continue
                sent += len(ids)
                self.taken.append(len(ids))
                last = sent == TOKENS
                yield [EngineOutput(0, "".join(f"<{t}>" for t in ids), ids, None, "length" if last else None)]
        finally:
            task.cancel()

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


def stream_over(engine: MergingEngine, tmp_path: Path, **cfg: object) -> GenerationStream:
    config = InferenceConfig(versions=VersionTrustConfig(copies_dir=tmp_path / "copies"), **cfg)  # type: ignore[arg-type]
    serving = InferenceServing(config, engine, ModelStore(tmp_path / "store"), None)  # type: ignore[arg-type]
    req = GenerationRequest(messages=[Message("user", "hi")], sampling=Sampling(max_tokens=TOKENS))
    return GenerationStream(serving, req, [1, 2, 3], time.monotonic())


async def collect(stream: GenerationStream) -> list[tuple[float, list[int], str, str]]:
    started = time.monotonic()
    return [(time.monotonic() - started, d.token_ids, d.text, d.finish_reason) async for d in stream.coalesced()]


def test_a_coalesced_stream_sends_several_tokens_per_delta_and_the_first_at_once(tmp_path):
    engine = MergingEngine()
    deltas = asyncio.run(collect(stream_over(engine, tmp_path, stream_coalesce_ms=40, stream_max_tokens_per_chunk=0)))
    assert [t for _, ids, _, _ in deltas for t in ids] == list(range(TOKENS)), "every token once, in order"
    assert "".join(text for *_, text, _ in deltas) == "".join(f"<{t}>" for t in range(TOKENS))
    assert [f for *_, f in deltas] == [""] * (len(deltas) - 1) + ["length"]
    assert len(deltas[0][1]) == 1, "the first token is not held for the window"
    assert len(deltas) < TOKENS / 3, f"expected several tokens per delta, got {[len(d[1]) for d in deltas]}"
    assert engine.aborted == []


def test_without_a_window_each_step_is_its_own_delta(tmp_path):
    engine = MergingEngine()
    deltas = asyncio.run(collect(stream_over(engine, tmp_path, stream_coalesce_ms=0)))
    assert [t for _, ids, _, _ in deltas for t in ids] == list(range(TOKENS))
    assert len(deltas) > TOKENS / 2, "nothing held: about one token per delta"


def test_the_count_bound_keeps_deltas_near_the_bound(tmp_path):
    engine = MergingEngine()
    deltas = asyncio.run(collect(stream_over(engine, tmp_path, stream_coalesce_ms=500, stream_max_tokens_per_chunk=4)))
    assert [t for _, ids, _, _ in deltas for t in ids] == list(range(TOKENS))
    # a 500 ms window alone would send everything after the first in one delta
    assert len(deltas) >= 4, [len(d[1]) for d in deltas]


class TwoCompletions:
    """n=2 where the second completion starts 10 ms after the first (as vLLM's child requests may)."""

    async def generate(
        self, request_id: str, prompt: list[int], sampling: Sampling, priority: int = 0
    ) -> AsyncIterator[list[EngineOutput]]:
        yield [EngineOutput(0, "a", [1], None, None)]
        await asyncio.sleep(0.01)
        yield [EngineOutput(1, "b", [2], None, None)]
        await asyncio.sleep(0.01)
        yield [EngineOutput(0, "c", [3], None, "length"), EngineOutput(1, "d", [4], None, "length")]

    async def abort(self, request_id: str) -> None:
        raise AssertionError("nothing to abort")


def test_no_completion_has_its_first_token_held(tmp_path):
    config = InferenceConfig(
        versions=VersionTrustConfig(copies_dir=tmp_path / "copies"),
        stream_coalesce_ms=300,
        stream_max_tokens_per_chunk=0,
    )
    serving = InferenceServing(config, TwoCompletions(), ModelStore(tmp_path / "store"), None)  # type: ignore[arg-type]
    req = GenerationRequest(messages=[Message("user", "hi")], sampling=Sampling(max_tokens=2, n=2))
    deltas = asyncio.run(collect(GenerationStream(serving, req, [1], time.monotonic())))
    first_of = {ids[0]: at for at, ids, _, _ in deltas}
    assert first_of[2] < 0.15, "the second completion's first token waited for the window"
    assert first_of[4] >= 0.25, "once both have started, the window applies"


def test_the_plain_iteration_never_waits(tmp_path):
    """Generate (not streamed) iterates the stream itself: no window there."""
    engine = MergingEngine()
    stream = stream_over(engine, tmp_path, stream_coalesce_ms=1000)

    async def run() -> float:
        started = time.monotonic()
        async for _ in stream:
            pass
        return time.monotonic() - started

    assert asyncio.run(run()) < 0.9, "a 1 s window must not apply to the plain iteration"
    assert stream.completions[0].token_ids == list(range(TOKENS))


# --- the settings ----------------------------------------------------------------------------------


def test_the_stream_settings_are_checked_with_their_variable_names(tmp_path):
    base = {"versions": VersionTrustConfig(copies_dir=tmp_path / "copies")}
    assert not InferenceConfig(**base).problems()  # type: ignore[arg-type]
    bad = InferenceConfig(stream_coalesce_ms=-1, stream_max_tokens_per_chunk=-2, **base)  # type: ignore[arg-type]
    problems = " ".join(bad.problems())
    assert "RLHF_INFERENCE_STREAM_COALESCE_MS=-1" in problems
    assert "RLHF_INFERENCE_STREAM_MAX_TOKENS_PER_CHUNK" in problems
    assert InferenceConfig(stream_coalesce_ms=5000, **base).problems()  # type: ignore[arg-type]
