"""`rlhf bootstrap`: InstructGPT's offline steps, then publish the first policy and reward model.

    step 0  pretrain the built-in small model on a text corpus   (skipped for a user's HF model)
    step 1  SFT on demonstrations (JSONL: messages -> response)
    step 2  the first RM from K-way rankings (JSONL), by services/reward/offline.py's train_first_rm,
            the same code path as the live reward learner

It publishes the SFT model as the next policy version (``policy-0001`` on an empty store; it is also
the KL reference of PPO) and the RM as the next ``rm`` version, and writes each step's loss curve
(PNG + JSON) and a summary.json to ``report_dir``. Both versions are signed with the lines' keys
(``--policy-signing-key`` / ``--rm-signing-key``, or RLHF_VERSIONS_POLICY_SIGNING_KEY_FILE and
RLHF_VERSIONS_RM_SIGNING_KEY_FILE; see shared/signing.py), which followers that have verify keys
require. Defaults are the files the project ships:

    shared/data/corpus.txt               pretraining text (its tokenizer is trained on it too)
    flywheel/bootstrap/data/demonstrations.jsonl  the built-in arithmetic task's demonstrations (flywheel/demo/make_data.py)
    flywheel/bootstrap/data/rankings.jsonl        its rankings

    python -m flywheel.bootstrap.pipeline [--model HF_DIR] [--demonstrations F] [--rankings F] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flywheel.bootstrap.common import write_loss_curve
from flywheel.bootstrap.options import DEMONSTRATIONS, RANKINGS, add_arguments
from flywheel.bootstrap.pretrain import PretrainSettings, pretrain
from flywheel.bootstrap.sft import SFTSettings, sft
from shared.logging import get_logger, log_event
from shared.model_store import PICKLE_SUFFIXES, ModelStore
from shared.models.default_model import DEFAULT_CORPUS, DefaultModelSpec, create_default_model
from shared.signing import SigningKey
from shared.version_line import POLICY, VersionLine

log = get_logger(__name__)


@dataclass(frozen=True)
class BootstrapSettings:
    pretrain: PretrainSettings = field(default_factory=PretrainSettings)
    """Step 0 (built-in model only)."""
    sft: SFTSettings = field(default_factory=SFTSettings)
    """Step 1."""
    rm_epochs: int = 7
    """Step 2: passes over the rankings (services/reward/offline.py's trainer). Telling a right sum
    from a wrong one is what the tiny RM learns last: on held-out problems it picked the right sum
    in 59% of (right, wrong) pairs after 4 passes over the old rankings file, 79% after 4 passes
    over the current one and 91% after 7 (130 s on 2 quiet cores)."""
    rm_heldout_fraction: float = 0.2
    """Step 2: share of rankings held out for the RM's accuracy."""
    spec: DefaultModelSpec = field(default_factory=DefaultModelSpec)
    """Shape of the built-in model."""
    torch_threads: int = 1
    """CPU threads for torch. One is the fastest for this tiny model on a shared 2-core machine:
    two threads spin against each other and any other process (measured 0.24 s vs 0.5 s a step)."""


QUICK = BootstrapSettings(pretrain=PretrainSettings(steps=40, warmup=5), sft=SFTSettings(epochs=1), rm_epochs=1)
"""A few steps of each: checks the pipeline end to end in about a minute (tests, smoke runs)."""


@dataclass(frozen=True)
class BootstrapResult:
    policy_version: str
    rm_version: str
    summary: dict
    report_dir: Path


def run_bootstrap(
    store: ModelStore,
    *,
    hf_model: Path | None = None,
    corpus: Path = DEFAULT_CORPUS,
    demonstrations: Path = DEMONSTRATIONS,
    rankings: Path = RANKINGS,
    report_dir: Path = Path("var/bootstrap"),
    settings: BootstrapSettings = BootstrapSettings(),
    policy_signer: SigningKey | None = None,
    rm_signer: SigningKey | None = None,
) -> BootstrapResult:
    """Run steps 0-2 and publish the SFT policy and the first RM, signed with the lines' keys (None:
    unsigned); returns their versions."""
    import torch

    torch.set_num_threads(settings.torch_threads)
    started, cpu_started = time.monotonic(), time.process_time()
    report_dir = _writable_report_dir(Path(report_dir))
    summary: dict = {
        "corpus": str(corpus),
        "demonstrations": str(demonstrations),
        "rankings": str(rankings),
        "hf_model": str(hf_model) if hf_model else None,
        "seconds": {},
    }
    with tempfile.TemporaryDirectory(prefix="rlhf-bootstrap-") as tmp:
        work = Path(tmp) / "model"
        if hf_model is None:
            summary["pretrain"] = _step0_pretrain(work, corpus, settings, report_dir, summary["seconds"])
        else:
            _copy_hf_model(Path(hf_model), work)
            log_event(log, "step 0 skipped: starting from a given model", model=str(hf_model))
        summary["sft"] = _step1_sft(work, demonstrations, settings, report_dir, summary["seconds"])
        policy = _publish_sft_policy(
            store,
            work,
            summary,
            hf_model=hf_model,
            corpus=corpus,
            demonstrations=demonstrations,
            signer=policy_signer,
        )
    rm = _step2_first_rm(store, policy, rankings, settings, report_dir, summary["seconds"], rm_signer)
    summary["rm"] = dict(rm.metrics)
    summary["seconds"]["total"] = round(time.monotonic() - started, 1)
    # Wall time depends on what else runs on the machine; CPU time of this process much less so.
    summary["cpu_seconds"] = round(time.process_time() - cpu_started, 1)
    summary.update(
        policy_version=policy,
        rm_version=rm.version,
        settings=json.loads(json.dumps(dataclasses.asdict(settings), default=str)),
    )
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    log_event(
        log,
        "bootstrap done",
        policy=policy,
        rm=rm.version,
        seconds=summary["seconds"]["total"],
        cpu_seconds=summary["cpu_seconds"],
        report=str(report_dir),
    )
    return BootstrapResult(policy, rm.version, summary, report_dir)


def _step0_pretrain(
    work: Path, corpus: Path, settings: BootstrapSettings, report_dir: Path, seconds: dict
) -> dict[str, Any]:
    """Create the default model in ``work`` and pretrain it on ``corpus``; its loss curve and summary."""
    t = time.monotonic()
    n_params = create_default_model(work, settings.spec, corpus)
    result = pretrain(work, corpus, settings.pretrain)
    write_loss_curve(
        report_dir / "step0_pretrain_loss.png",
        {
            "train loss": result.losses,
            "held-out loss (log perplexity)": [(s, math.log(p)) for s, p in result.heldout],
        },
        "Step 0: pretraining on the corpus",
    )
    seconds["step0_pretrain"] = round(time.monotonic() - t, 1)
    return {
        "params": n_params,
        "final_loss": result.losses[-1][1],
        "heldout_perplexity_before": result.heldout[0][1],
        "heldout_perplexity": result.heldout[-1][1],
        "tokens": result.tokens_seen,
    }


def _step1_sft(
    work: Path, demonstrations: Path, settings: BootstrapSettings, report_dir: Path, seconds: dict
) -> dict[str, Any]:
    """Fine-tune the model in ``work`` on the demonstrations; its loss curve and summary."""
    t = time.monotonic()
    result = sft(work, demonstrations, settings.sft)
    write_loss_curve(
        report_dir / "step1_sft_loss.png",
        {"train loss": result.losses, "held-out loss": result.validation},
        "Step 1: SFT on demonstrations (response tokens)",
    )
    seconds["step1_sft"] = round(time.monotonic() - t, 1)
    return {
        "final_loss": result.losses[-1][1],
        "heldout_loss": result.validation[-1][1] if result.validation else None,
        "demonstrations": result.demonstrations,
    }


def _publish_sft_policy(
    store: ModelStore,
    work: Path,
    summary: dict,
    *,
    hf_model: Path | None,
    corpus: Path,
    demonstrations: Path,
    signer: SigningKey | None,
) -> str:
    """Publish the SFT policy (offline: nothing is announced) with its metrics; its version."""
    metrics = {"sft_loss": summary["sft"]["final_loss"]}
    if summary["sft"]["heldout_loss"] is not None:
        metrics["sft_heldout_loss"] = summary["sft"]["heldout_loss"]
    if "pretrain" in summary:
        metrics["pretrain_heldout_perplexity"] = summary["pretrain"]["heldout_perplexity"]
    extra = {
        "kind": "sft",
        "kl_reference": True,
        "demonstrations_file": Path(demonstrations).name,
        "base": str(hf_model) if hf_model else "default-model-pretrained",
        "corpus_file": Path(corpus).name if hf_model is None else None,
    }
    policy = VersionLine(store, POLICY, signer=signer).publish(work, metrics=metrics, extra=extra).version
    log_event(log, "published the SFT policy", version=policy)
    return policy


def _step2_first_rm(
    store: ModelStore,
    policy: str,
    rankings: Path,
    settings: BootstrapSettings,
    report_dir: Path,
    seconds: dict,
    signer: SigningKey | None,
) -> Any:
    """Train and publish the first reward model on the SFT policy's backbone; its OfflineResult."""
    from services.reward.offline import OFFLINE_SETTINGS, train_first_rm

    t = time.monotonic()
    rm = train_first_rm(
        store,
        rankings,
        base_policy_version=policy,
        epochs=settings.rm_epochs,
        settings=OFFLINE_SETTINGS,
        heldout_fraction=settings.rm_heldout_fraction,
        signer=signer,
    )
    write_loss_curve(
        report_dir / "step2_rm_loss.png",
        {
            "train loss": [(e.epoch, e.loss) for e in rm.history],
            "train pairwise accuracy": [(e.epoch, e.accuracy) for e in rm.history],
        },
        f"Step 2: first reward model (held-out accuracy {rm.metrics.get('heldout_accuracy', math.nan):.2f})",
        xlabel="epoch",
        ylabel="loss / accuracy",
    )
    seconds["step2_rm"] = round(time.monotonic() - t, 1)
    return rm


def _writable_report_dir(wanted: Path) -> Path:
    """``wanted``, or a fresh temporary directory when it cannot be created (a read-only root
    filesystem, as in the Helm chart's bootstrap Job): the curves are a by-product, not worth failing for."""
    try:
        wanted.mkdir(parents=True, exist_ok=True)
        return wanted
    except OSError as exc:
        fallback = Path(tempfile.mkdtemp(prefix="rlhf-bootstrap-report-"))
        log_event(
            log,
            "cannot write the bootstrap report where asked; writing it to a temporary directory",
            level=logging.WARNING,
            wanted=str(wanted),
            error=str(exc),
            report=str(fallback),
        )
        return fallback


def _copy_hf_model(src: Path, dst: Path) -> None:
    """Copy a Hugging Face model directory (safetensors weights only) to ``dst``."""
    if not (src / "config.json").is_file():
        raise ValueError(f"{src} is not a Hugging Face model directory (no config.json)")
    pickled = [p.name for p in src.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if pickled:
        raise ValueError(f"{src} holds pickle weights {pickled}; only safetensors are accepted")
    if not any(src.glob("*.safetensors")):
        raise ValueError(f"{src} has no .safetensors weights")
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".*"))


def main(argv: list[str] | None = None) -> int:
    import argparse

    from shared.config import ModelStoreConfig, load_config
    from shared.logging import setup_logging

    parser = argparse.ArgumentParser(prog="rlhf bootstrap", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging("bootstrap")
    return run_from_args(args, load_config(ModelStoreConfig).root)


def signers_from_args(args: argparse.Namespace) -> tuple[SigningKey | None, SigningKey | None]:
    """(policy key, rm key): the command line's files, else RLHF_VERSIONS_{POLICY,RM}_SIGNING_KEY*."""
    from shared.config import VersionTrustConfig, load_config

    trust = load_config(VersionTrustConfig)
    policy, rm = getattr(args, "policy_signing_key", None), getattr(args, "rm_signing_key", None)
    # A file on the command line replaces that line's key from the environment.
    if policy is not None:
        trust = dataclasses.replace(trust, policy_signing_key_file=policy, policy_signing_key="")
    if rm is not None:
        trust = dataclasses.replace(trust, rm_signing_key_file=rm, rm_signing_key="")
    return trust.signer("policy"), trust.signer("rm")


def run_from_args(args: argparse.Namespace, default_root: Path) -> int:
    from shared.models.default_model import ensure_default_policy

    store = ModelStore(args.store or default_root)
    policy_signer, rm_signer = signers_from_args(args)
    if policy_signer is None or rm_signer is None:
        log_event(
            log,
            "publishing without a signing key: replicas that verify signatures will refuse these versions",
            level=logging.WARNING,
            policy_signed=policy_signer is not None,
            rm_signed=rm_signer is not None,
        )
    if args.publish_only:
        if args.model:
            manifest = VersionLine(store, POLICY, signer=policy_signer).publish(
                Path(args.model), extra={"kind": "imported", "source": str(args.model)}
            )
            print(f"published {manifest.version} from {args.model}")
        else:
            print(f"current policy: {ensure_default_policy(store, signer=policy_signer)}")
        return 0
    if store.versions("policy") and not args.force:
        print(
            f"the model store {store.root} already has a policy ({store.current('policy')}); "
            "nothing to do (--force publishes new versions anyway)"
        )
        return 0
    result = run_bootstrap(
        store,
        hf_model=args.model,
        corpus=args.corpus,
        demonstrations=args.demonstrations,
        rankings=args.rankings,
        report_dir=args.report_dir,
        settings=QUICK if args.quick else BootstrapSettings(),
        policy_signer=policy_signer,
        rm_signer=rm_signer,
    )
    print(
        f"published {result.policy_version} (SFT policy, KL reference) and {result.rm_version} (first RM) "
        f"in {result.summary['seconds']['total']:.0f} s; loss curves in {result.report_dir}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
