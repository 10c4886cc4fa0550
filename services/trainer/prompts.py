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

No principal (``CompletionEvent.principal``, who asked) may fill the buffer: each holds at most
``principal_prompt_cap`` of its prompts (a share of the buffer, never below a floor); a principal
over its cap loses its own oldest prompt, not someone else's. Batches draw live prompts uniformly
from the buffer, so a principal's share of the live half of a batch is its share of the buffer.
"""

from __future__ import annotations

import collections
import math
import random
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

from services.trainer import metrics
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


def principal_prompt_cap(buffered: int, max_share: float, floor: int) -> int:
    """Most prompts one principal may hold in a buffer of ``buffered`` prompts:

        cap = max(floor, floor_int(max_share * buffered))

    so a principal holding more than ``floor`` holds at most ``max_share`` of the buffer; the floor
    keeps the buffer useful while it is nearly empty or has few principals. max_share = 1: no cap."""
    return max(floor, math.floor(max_share * buffered + 1e-9))


class LivePromptBuffer:
    """The most recent ``capacity`` distinct user prompts seen on rlhf.completions, each principal
    within its cap (thread-safe)."""

    def __init__(
        self,
        capacity: int,
        exclude: Iterable[Prompt] = (),
        max_principal_share: float = 1.0,
        min_principal_prompts: int = 1,
    ):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        if not 0 < max_principal_share <= 1 or min_principal_prompts < 1:
            raise ValueError("max_principal_share must be in (0, 1] and min_principal_prompts at least 1")
        self.capacity = capacity
        self.exclude = frozenset(exclude)
        """Prompts never taken (the held-out prompts: a user asking one must not leak it into training)."""
        self.max_principal_share = max_principal_share
        self.min_principal_prompts = min_principal_prompts
        self._prompts: collections.OrderedDict[Prompt, str] = collections.OrderedDict()
        """Prompt -> the principal who asked it first while it is buffered; least recently seen first."""
        self._own: dict[str, collections.OrderedDict[Prompt, None]] = {}
        """Principal -> its buffered prompts, least recently seen first (every prompt in exactly one)."""
        self._lock = threading.Lock()
        self.offered = 0
        """Completion events offered, of any source."""
        self.accepted = 0
        """User prompts that were new to the buffer."""
        self.left_out: collections.Counter[str] = collections.Counter()
        """Prompts not added or evicted early, by reason (see ``add``)."""

    def offer_completion(self, event: CompletionEvent) -> bool:
        """Take the prompt of a user's completion; False for trainer traffic, empty or known prompts.

        One event per completion: a request with n completions arrives n times, deduplicated here.
        """
        with self._lock:
            self.offered += 1
        if event.source != "user" or not event.messages:
            return False
        prompt = tuple(Message(m.role, m.content) if not isinstance(m, Message) else m for m in event.messages)
        return self.add(prompt, event.principal)

    def add(self, prompt: Prompt, principal: str = "") -> bool:
        """Buffer ``prompt`` asked by ``principal``; True when it is new. Left out (counted in
        ``left_out`` and rlhf_trainer_live_prompts_left_out_total): "invalid" (no user message, or
        ends with the assistant), "heldout", "duplicate" (already buffered: it is only refreshed),
        "principal_cap" (the principal's own oldest prompt, evicted to keep it within its cap)."""
        if not any(m.role == "user" and m.content.strip() for m in prompt) or prompt[-1].role == "assistant":
            return self._leave_out("invalid")
        if prompt in self.exclude:
            return self._leave_out("heldout")
        with self._lock:
            if prompt in self._prompts:
                self._prompts.move_to_end(prompt)  # recently asked again: keep it longer
                self._own[self._prompts[prompt]].move_to_end(prompt)
                self.left_out["duplicate"] += 1
                metrics.LIVE_PROMPTS_LEFT_OUT.labels("duplicate").inc()
                return False
            self._prompts[prompt] = principal
            own = self._own.setdefault(principal, collections.OrderedDict())
            own[prompt] = None
            cap = principal_prompt_cap(
                min(len(self._prompts), self.capacity), self.max_principal_share, self.min_principal_prompts
            )
            if len(own) > cap:  # over its cap: it loses its own oldest prompt, nobody else's
                self._evict(next(iter(own)))
                self.left_out["principal_cap"] += 1
                metrics.LIVE_PROMPTS_LEFT_OUT.labels("principal_cap").inc()
            elif len(self._prompts) > self.capacity:
                self._evict(next(iter(self._prompts)))  # the least recently seen goes first
            self.accepted += 1
            return True

    def _evict(self, prompt: Prompt) -> None:
        principal = self._prompts.pop(prompt)
        own = self._own[principal]
        del own[prompt]
        if not own:
            del self._own[principal]

    def _leave_out(self, reason: str) -> bool:
        with self._lock:
            self.left_out[reason] += 1
        metrics.LIVE_PROMPTS_LEFT_OUT.labels(reason).inc()
        return False

    def by_principal(self) -> dict[str, int]:
        """Buffered prompts per principal."""
        with self._lock:
            return {p: len(own) for p, own in self._own.items()}

    def largest_share(self) -> float:
        """The largest share of the buffer one principal holds (0 when empty)."""
        with self._lock:
            return max(map(len, self._own.values()), default=0) / max(1, len(self._prompts))

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
