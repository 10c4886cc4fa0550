"""Offline start: train the first reward model version from a JSONL file of K-way rankings.

One ranking per line:

    {"prompt": [{"role": "user", "content": "What is 2 plus 3?"}] | "What is 2 plus 3?",
     "responses": ["2 plus 3 is 5.", "I do not know."],
     "ranking": [0, 1]}                      # indices into responses, best first

A string prompt is one user message. ``ranking`` lists at least two distinct indices; responses it
leaves out are not used. Each line becomes one comparison group with all C(K,2) pairs (the K-wise
loss, losses.py) and goes through the same trainer as the live learner (training.py).

What ``train_first_rm`` does:

1. the backbone is a policy version (default: the store's current policy), verified first;
2. a seeded slice of the rankings (``heldout_fraction``) is held out; the rest is trained on
   with AdamW for ``epochs`` passes, one log line per epoch with its rate;
3. held-out pairwise accuracy is measured before and after training;
4. normalisation (InstructGPT: "the RM is normalised so that the reference responses score 0 on
   average"): the reference responses are *every distinct (prompt, response) of the file*, train and
   held out, i.e. responses like the ones the policy is scored on, so rewards are centred on them;
5. the RM is published as the next ``rm`` version with parent = the policy version and metrics
   {heldout_accuracy, heldout_accuracy_before, heldout_loss, train_loss, train_accuracy, ...};
   the result carries those metrics and the per-epoch history (the loss curve).

    python -m services.reward.offline --rankings services/reward/data/example_rankings.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

from services.reward.comparisons import ComparisonGroup, Sample, TrainingExamples, ranking_pairs
from services.reward.training import EpochStats, RewardTrainer, TrainSettings, publish_reward_model
from shared.events import Message
from shared.jsonl import read_jsonl
from shared.logging import get_logger, log_event
from shared.model_store import Manifest, ModelStore
from shared.models.encoding import EncodingLimits
from shared.models.loading import load_tokenizer, verified_dir
from shared.models.reward_model import RewardModel
from shared.signing import SigningKey
from shared.version_line import REWARD_MODEL, VersionLine

log = get_logger(__name__)

EXAMPLE_RANKINGS = Path(__file__).parent / "data" / "example_rankings.jsonl"
ROLES = ("system", "user", "assistant")
OFFLINE_SETTINGS = TrainSettings(epochs=8, lr=3e-4, batch_size=8)
"""Defaults of the offline start, sized for the default (tiny, randomly initialised) policy."""


class RankingsFileError(ValueError):
    """A rankings file line that cannot be used; the message names the file and line."""


def parse_ranking(doc: object) -> ComparisonGroup:
    """One JSONL record -> a comparison group of Samples (raises ValueError saying what is wrong)."""
    if not isinstance(doc, dict):
        raise ValueError("expected a JSON object")
    prompt = doc.get("prompt")
    if isinstance(prompt, str):
        messages: tuple[Message, ...] = (Message("user", prompt),)
    elif isinstance(prompt, list) and prompt:
        parsed: list[Message] = []
        for m in prompt:
            if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
                raise ValueError(f"prompt messages need a role in {ROLES} and string content, got {m!r}")
            parsed.append(Message(m["role"], m["content"]))
        messages = tuple(parsed)
    else:
        raise ValueError("prompt must be a non-empty string or list of messages")
    if not any(m.role == "user" and m.content.strip() for m in messages):
        raise ValueError("prompt needs a non-empty user message")
    responses = doc.get("responses")
    if not (isinstance(responses, list) and all(isinstance(r, str) and r.strip() for r in responses)):
        raise ValueError("responses must be a list of non-empty strings")
    ranking = doc.get("ranking")
    if not (isinstance(ranking, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ranking)):
        raise ValueError("ranking must be a list of response indices, best first")
    if len(ranking) < 2 or len(set(ranking)) != len(ranking) or not all(0 <= i < len(responses) for i in ranking):
        raise ValueError(f"ranking must hold at least 2 distinct indices below {len(responses)}, got {ranking}")
    samples = tuple(Sample(messages, responses[i]) for i in ranking)
    return ComparisonGroup(samples, ranking_pairs(len(samples)), "offline")


def read_rankings(path: Path) -> list[ComparisonGroup]:
    """Every ranking of a JSONL file; blank lines are skipped, any bad line raises RankingsFileError."""
    return read_jsonl(path, parse_ranking, RankingsFileError, "rankings")


def split_heldout_rankings(
    groups: list[ComparisonGroup], fraction: float, seed: int
) -> tuple[list[ComparisonGroup], list[ComparisonGroup]]:
    """(train, held out): a seeded shuffle; at least one of each when there are two or more rankings."""
    if not 0 <= fraction < 1:
        raise ValueError("heldout_fraction must be in [0, 1)")
    shuffled = list(groups)
    random.Random(seed).shuffle(shuffled)
    n_held = 0 if fraction == 0 or len(groups) < 2 else min(len(groups) - 1, max(1, round(fraction * len(groups))))
    return shuffled[n_held:], shuffled[:n_held]


@dataclass(frozen=True)
class OfflineResult:
    manifest: Manifest
    metrics: dict[str, float]
    history: tuple[EpochStats, ...]
    """One entry per training epoch (mean loss, pairwise accuracy on the training pairs, ...)."""

    @property
    def version(self) -> str:
        return self.manifest.version


def train_first_rm(
    store: ModelStore,
    rankings_jsonl: Path,
    base_policy_version: str | None = None,
    *,
    epochs: int | None = None,
    settings: TrainSettings = OFFLINE_SETTINGS,
    heldout_fraction: float = 0.2,
    make_current: bool = True,
    signer: SigningKey | None = None,
) -> OfflineResult:
    """Train an RM on ``rankings_jsonl`` from a policy version's backbone and publish it (rm-NNNN),
    signed with ``signer`` (the rm line's key; None: unsigned, which followers with keys refuse)."""
    started = time.monotonic()
    rankings_jsonl = Path(rankings_jsonl)
    base = base_policy_version or store.current("policy")
    if not base:
        raise ValueError(f"no policy version in the model store at {store.root}; run `rlhf bootstrap`")
    base_dir = verified_dir(store, base)
    groups = read_rankings(rankings_jsonl)
    train, held = split_heldout_rankings(groups, heldout_fraction, settings.seed)
    model = RewardModel.from_policy_dir(base_dir, seed=settings.seed)
    tokenizer = load_tokenizer(base_dir)
    trainer = RewardTrainer(model, tokenizer, settings)
    acc_before, _ = trainer.evaluate(held)
    n_epochs = settings.epochs if epochs is None else epochs
    log_event(
        log,
        "training the first reward model",
        base=base,
        rankings=len(groups),
        train=len(train),
        heldout=len(held),
        pairs=sum(len(g.pairs) for g in train),
        epochs=n_epochs,
    )
    history = trainer.fit(TrainingExamples(groups=train), epochs=n_epochs)
    acc, held_loss = trainer.evaluate(held)
    train_acc, _ = trainer.evaluate(train)
    reference = [s for g in groups for s in g.responses]
    offset = trainer.normalise(reference, f"every distinct response of {rankings_jsonl.name}")
    metrics = {
        "heldout_accuracy": acc,
        "heldout_accuracy_before": acc_before,
        "heldout_loss": held_loss,
        "train_loss": history[-1].loss if history else math.nan,
        "train_accuracy": train_acc,
        "train_rankings": len(train),
        "heldout_rankings": len(held),
        "heldout_pairs": sum(len(g.pairs) for g in held),
        "epochs": n_epochs,
        "offset": offset,
        "train_seconds": round(time.monotonic() - started, 2),
    }
    extra = _record_provenance(model, base, rankings_jsonl, settings)
    # Published offline (no announcer): nothing is owed; the signed record tells replicas that start later.
    manifest = publish_reward_model(
        VersionLine(store, REWARD_MODEL, signer=signer),
        model,
        tokenizer,
        parent=base,
        metrics=metrics,
        extra=extra,
        make_current=make_current,
    )
    metrics = dict(manifest.metrics)
    log_event(
        log,
        "published reward model",
        version=manifest.version,
        parent=base,
        heldout_accuracy=round(acc, 3) if not math.isnan(acc) else "n/a",
        before=round(acc_before, 3) if not math.isnan(acc_before) else "n/a",
        seconds=round(time.monotonic() - started, 1),
    )
    return OfflineResult(manifest, metrics, tuple(history))


def _record_provenance(model: RewardModel, base: str, rankings_jsonl: Path, settings: TrainSettings) -> dict:
    """Write what the RM was trained on and with into its reward_head.json (``model.info``); the
    manifest's ``extra`` with the same facts and the rankings file's sha256."""
    model.info.update(
        {
            "base_policy": base,
            "trained_on": rankings_jsonl.name,
            "trained_max_tokens": settings.limits.max_tokens,
            "trained_max_response_tokens": settings.limits.max_response_tokens,
        }
    )
    return {
        "kind": "offline-rankings",
        "base_policy": base,
        "rankings_file": rankings_jsonl.name,
        "rankings_sha256": hashlib.sha256(rankings_jsonl.read_bytes()).hexdigest(),
        "offset_reference": model.info["offset_reference"],
        "lr": settings.lr,
        "batch_size": settings.batch_size,
        "seed": settings.seed,
    }


def main(argv: list[str] | None = None) -> None:
    from shared.config import ModelStoreConfig, VersionTrustConfig, load_config
    from shared.logging import setup_logging

    parser = argparse.ArgumentParser(description="Train the first reward model from a JSONL file of rankings.")
    parser.add_argument("--rankings", type=Path, default=EXAMPLE_RANKINGS, help="JSONL rankings file")
    parser.add_argument("--store", type=Path, default=None, help="model store root (default RLHF_MODEL_STORE_ROOT)")
    parser.add_argument("--base-policy", default=None, help="policy version to start from (default: current)")
    parser.add_argument("--epochs", type=int, default=OFFLINE_SETTINGS.epochs)
    parser.add_argument("--lr", type=float, default=OFFLINE_SETTINGS.lr)
    parser.add_argument("--heldout-fraction", type=float, default=0.2)
    parser.add_argument("--max-tokens", type=int, default=EncodingLimits().max_tokens)
    parser.add_argument("--max-response-tokens", type=int, default=EncodingLimits().max_response_tokens)
    parser.add_argument(
        "--signing-key",
        type=Path,
        default=None,
        help="PEM private key that signs the rm version (default RLHF_VERSIONS_RM_SIGNING_KEY_FILE / _KEY)",
    )
    args = parser.parse_args(argv)
    setup_logging("reward")
    root = args.store or load_config(ModelStoreConfig).root
    settings = TrainSettings(
        epochs=args.epochs,
        lr=args.lr,
        batch_size=OFFLINE_SETTINGS.batch_size,
        limits=EncodingLimits(args.max_tokens, args.max_response_tokens),
    )
    trust = load_config(VersionTrustConfig, rm_signing_key_file=args.signing_key) if args.signing_key else None
    signer = (trust or load_config(VersionTrustConfig)).signer("rm")
    result = train_first_rm(
        ModelStore(root),
        args.rankings,
        args.base_policy,
        settings=settings,
        heldout_fraction=args.heldout_fraction,
        signer=signer,
    )
    print(json.dumps({"version": result.version, "metrics": result.metrics}, indent=2))


if __name__ == "__main__":
    main()
