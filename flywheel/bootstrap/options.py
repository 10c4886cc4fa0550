"""Command-line options of `rlhf bootstrap`, kept free of heavy imports (torch, transformers) so that
the `rlhf` parser stays fast; flywheel/bootstrap/pipeline.py runs them."""

from __future__ import annotations

import argparse
from pathlib import Path

DATA = Path(__file__).parent / "data"
DEMONSTRATIONS = DATA / "demonstrations.jsonl"
RANKINGS = DATA / "rankings.jsonl"
DEFAULT_CORPUS = Path(__file__).parents[2] / "shared" / "data" / "corpus.txt"
"""shared.models.default_model.DEFAULT_CORPUS (not imported from there: that module imports torch)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="a Hugging Face model directory (safetensors) to fine-tune instead of the built-in "
        "model; step 0 is skipped",
    )
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="pretraining text (step 0)")
    parser.add_argument("--demonstrations", type=Path, default=DEMONSTRATIONS, help="SFT demonstrations (JSONL)")
    parser.add_argument("--rankings", type=Path, default=RANKINGS, help="K-way rankings for the first RM (JSONL)")
    parser.add_argument(
        "--report-dir", type=Path, default=Path("var/bootstrap"), help="where the loss curves and summary.json go"
    )
    parser.add_argument("--store", type=Path, default=None, help="model store root (default RLHF_MODEL_STORE_ROOT)")
    parser.add_argument("--quick", action="store_true", help="a few steps of each (smoke test, not a usable model)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="run even when the store already has a policy (publishes the next versions)",
    )
    parser.add_argument(
        "--policy-signing-key",
        type=Path,
        default=None,
        help="PEM private key that signs the policy version (default RLHF_VERSIONS_POLICY_SIGNING_KEY_FILE / _KEY)",
    )
    parser.add_argument(
        "--rm-signing-key",
        type=Path,
        default=None,
        help="PEM private key that signs the rm version (default RLHF_VERSIONS_RM_SIGNING_KEY_FILE / _KEY)",
    )
    parser.add_argument(
        "--publish-only",
        action="store_true",
        help="publish --model (or the random-init default model) as is, without training",
    )
