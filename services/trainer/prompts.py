"""Where PPO prompts come from: live user prompts off rlhf.completions, mixed with a prompt file.

    file_prompts = read_prompt_file(Path("services/trainer/data/prompts.jsonl"))
    heldout, train = split_heldout_prompts(file_prompts, 16)
    live = LivePromptBuffer(capacity=1024)
    live.offer_completion(event)                   # from rlhf.completions; only source "user" counts
    mixer = PromptMixer(live, train, live_fraction=0.5, seed=0)
    batch = mixer.sample(8)                        # ~half live (while the buffer has any), rest from the file

A prompt is the conversation *before* the assistant's answer (a tuple of Message). Live prompts are
deduplicated by content, so one user repeating a question (or Kafka redelivering an event) does not
weigh it more, and the buffer keeps only the most recent ``capacity`` distinct prompts.
"""

from __future__ import annotations

import collections
import random
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

from shared.events import CompletionEvent, Message
from shared.jsonl import read_jsonl

Prompt = tuple[Message, ...]
"""A conversation up to (not including) the assistant's reply."""

ROLES = frozenset({"system", "user", "assistant"})


class PromptFileError(ValueError):
    """The prompt file is malformed; the message names the line."""


def parse_prompt(doc: object) -> Prompt:
    """One JSONL document -> a prompt: {"messages": [{"role", "content"}, ...]} or {"prompt": "text"}."""
    if isinstance(doc, dict) and isinstance(doc.get("prompt"), str):
        messages = [{"role": "user", "content": doc["prompt"]}]
    elif isinstance(doc, dict) and isinstance(doc.get("messages"), list):
        messages = doc["messages"]
    else:
        raise ValueError('expected {"messages": [...]} or {"prompt": "..."}')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be {{role: system|user|assistant, content: str}}")
        out.append(Message(m["role"], m["content"]))
    if not any(m.role == "user" and m.content.strip() for m in out):
        raise ValueError("needs a non-empty user message")
    if out[-1].role == "assistant":
        raise ValueError("must not end with an assistant message (that is the part the policy writes)")
    return tuple(out)


def read_prompt_file(path: Path) -> list[Prompt]:
    """Every prompt of a JSONL file, in file order, duplicates removed; raises PromptFileError."""
    return list(dict.fromkeys(read_jsonl(path, parse_prompt, PromptFileError, "prompts")))


def split_heldout_prompts(prompts: Sequence[Prompt], count: int) -> tuple[list[Prompt], list[Prompt]]:
    """(held-out, training) prompts: the first ``count`` are held out, the same ones on every start,
    so the publish gate compares a candidate with its parent on identical prompts. At least one
    prompt stays for training."""
    count = max(0, min(count, len(prompts) - 1))
    return list(prompts[:count]), list(prompts[count:])


class LivePromptBuffer:
    """The most recent ``capacity`` distinct user prompts seen on rlhf.completions (thread-safe)."""

    def __init__(self, capacity: int, exclude: Iterable[Prompt] = ()):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.exclude = frozenset(exclude)
        """Prompts never taken (the held-out prompts: a user asking one must not leak it into training)."""
        self._prompts: collections.OrderedDict[Prompt, None] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.offered = 0
        """Completion events offered, of any source."""
        self.accepted = 0
        """User prompts that were new to the buffer."""

    def offer_completion(self, event: CompletionEvent) -> bool:
        """Take the prompt of a user's completion; False for trainer traffic, empty or known prompts.

        One event per completion: a request with n completions arrives n times, deduplicated here.
        """
        with self._lock:
            self.offered += 1
        if event.source != "user" or not event.messages:
            return False
        return self.add(tuple(Message(m.role, m.content) if not isinstance(m, Message) else m for m in event.messages))

    def add(self, prompt: Prompt) -> bool:
        if not any(m.role == "user" and m.content.strip() for m in prompt) or prompt[-1].role == "assistant":
            return False
        if prompt in self.exclude:
            return False
        with self._lock:
            if prompt in self._prompts:
                self._prompts.move_to_end(prompt)  # recently asked again: keep it longer
                return False
            self._prompts[prompt] = None
            if len(self._prompts) > self.capacity:
                self._prompts.popitem(last=False)  # the least recently seen goes first
            self.accepted += 1
            return True

    def snapshot(self) -> list[Prompt]:
        with self._lock:
            return list(self._prompts)

    def __len__(self) -> int:
        with self._lock:
            return len(self._prompts)


def live_count(batch_size: int, live_fraction: float, live_available: int) -> int:
    """How many of ``batch_size`` prompts come from the live buffer: round(fraction * size), never
    more than the buffer holds distinct prompts (the file fills the rest)."""
    want = round(batch_size * live_fraction)
    return max(0, min(want, live_available, batch_size))


class PromptMixer:
    """Draws batches of prompts: ``live_fraction`` from the live buffer, the rest from the file prompts."""

    def __init__(self, live: LivePromptBuffer, file_prompts: Sequence[Prompt], live_fraction: float, seed: int = 0):
        if not 0.0 <= live_fraction <= 1.0:
            raise ValueError("live_fraction must be in [0, 1]")
        if not file_prompts and live_fraction < 1.0:
            raise ValueError("no file prompts to mix in")
        self.live = live
        self.file_prompts = list(file_prompts)
        self.live_fraction = live_fraction
        self._rng = random.Random(seed)

    def sample(self, batch_size: int) -> tuple[list[Prompt], int]:
        """(prompts, how many are live). Live prompts are drawn uniformly without replacement from the
        buffer; file prompts uniformly with replacement. With no file prompts, the batch is live only."""
        live_pool = self.live.snapshot()
        n_live = live_count(batch_size, self.live_fraction, len(live_pool))
        if not self.file_prompts:  # live only: repeat live prompts when there are too few
            n_live = batch_size if live_pool else 0
            live = [self._rng.choice(live_pool) for _ in range(n_live)]
            return live, n_live
        live = self._rng.sample(live_pool, n_live)
        files = [self._rng.choice(self.file_prompts) for _ in range(batch_size - n_live)]
        batch = live + files
        return batch, n_live
