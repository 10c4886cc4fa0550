"""What every contender of bench_trainer.py shares: the run spec, the reward model scorer, a timer
around ``generate``, and the result file. Imported both from the project's venv and from the TRL
venvs (which see the project's site-packages, its editable install included, through a .pth file),
so it imports nothing TRL-specific.

Every contender scores responses the same way: the response *text* (decoded, special tokens
dropped) is encoded with the reward service's own encoding (shared/models/encoding.py) and
scored by the same reward model version, as the reward service would over gRPC.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class BenchSpec:
    store: str
    policy: str
    rm: str
    prompts: list[list[dict]]
    """Training prompts (chat messages), drawn in order, cycling."""
    batch_size: int
    minibatch_size: int
    epochs: int
    response_length: int
    steps: int
    lr: float
    kl_coef: float
    seed: int
    num_generations: int
    """Completions per prompt for TRL's GRPO (group size); PPO samples one per prompt."""
    out_dir: str = ""

    @classmethod
    def read(cls, path: Path) -> BenchSpec:
        return cls(**json.loads(Path(path).read_text()))

    def write(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))


@dataclass
class RunResult:
    contender: str
    steps: int = 0
    samples: int = 0
    """Scored responses used for updates."""
    rollout_tokens: int = 0
    """Response tokens generated (up to and including EOS)."""
    wall_s: float = 0.0
    """Training wall-clock time (models loaded before the clock starts)."""
    cpu_s: float = 0.0
    """CPU time the process spent in that interval (all its threads): robust to other load on the machine."""
    generate_s: float = 0.0
    score_s: float = 0.0
    curve: list[dict] = field(default_factory=list)
    """Per step: elapsed seconds and mean training-batch reward."""
    notes: list[str] = field(default_factory=list)
    policy_dir: str = ""
    versions: dict[str, str] = field(default_factory=dict)

    def write(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))


class RMScorer:
    """The reward model version of the spec, scoring (messages, response text) pairs."""

    def __init__(self, store_root: str, rm_version: str):
        from shared.model_store import ModelStore
        from shared.models.encoding import EncodingLimits
        from shared.models.reward_model import load_version

        loaded = load_version(ModelStore(Path(store_root)), rm_version)  # verifies the sha256 manifest
        self.model = loaded.model.eval()
        self.tokenizer = loaded.tokenizer
        self.limits = EncodingLimits()
        self.seconds = 0.0

    @torch.no_grad()
    def score(self, conversations: list[list[dict]], responses: list[str]) -> list[float]:
        from shared.events import Message
        from shared.models.encoding import encode_rm_input, pad_batch

        started = time.monotonic()
        seqs = [
            encode_rm_input(self.tokenizer, [Message(**m) for m in conv], text, self.limits).input_ids
            for conv, text in zip(conversations, responses)
        ]
        ids, mask = pad_batch(seqs, self.tokenizer.pad_token_id)
        scores = self.model(ids, mask).tolist()
        self.seconds += time.monotonic() - started
        return scores


class GenerateTimer:
    """Wraps ``model.generate`` to add up its wall time and the response tokens it produced."""

    def __init__(self, model: Any, eos_token_id: int, pad_token_id: int):
        self.seconds = 0.0
        self.tokens = 0
        self.calls = 0
        self._generate = model.generate
        self._eos, self._pad = eos_token_id, pad_token_id
        model.generate = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        out = self._generate(*args, **kwargs)
        self.seconds += time.monotonic() - started
        self.calls += 1
        sequences = out.sequences if hasattr(out, "sequences") else out
        prompt = kwargs.get("input_ids", args[0] if args else None)
        width = prompt.shape[1] if prompt is not None else 0
        self.tokens += count_response_tokens(sequences[:, width:], self._eos, self._pad)
        return out


def count_response_tokens(responses: torch.Tensor, eos_token_id: int, pad_token_id: int) -> int:
    """Tokens up to and including the first EOS of each row (padding after it not counted)."""
    total = 0
    for row in responses.tolist():
        n = len(row)
        for i, tok in enumerate(row):
            if tok == eos_token_id:
                n = i + 1
                break
        while n > 0 and row[n - 1] == pad_token_id and pad_token_id != eos_token_id:
            n -= 1
        total += n
    return total


def setup_threads() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
