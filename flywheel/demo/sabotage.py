"""A deliberately bad policy version, injected through the normal publish path (``bench_demo.py
--sabotage``): does progressive rollout keep it from the users?

    work = make_bad_policy(store, "policy-0001", tmp_dir)           # fine-tuned to answer sums wrongly, politely
    manifest = publish_candidate(store, work, "policy-0001", signer, publisher)   # as the trainer publishes

The bad policy is the stable version fine-tuned for a few steps (``sft``, flywheel/bootstrap) on
demonstrations of the task's "wrong" style: "3 plus 4 is 8. I hope this helps." -- polite and
concise, so the gold rater's thumb goes down only for the sum. It is published as a *candidate* on
the policy line, signed with the trainer's key and announced on rlhf.policy-candidates, exactly as
the trainer publishes a version its gate passed: the rollout service cannot tell it from one, and
must catch it on the live evidence of its canary.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

from flywheel.demo.task import respond, split_problems
from shared.logging import get_logger, log_event
from shared.model_store import Manifest, ModelStore

log = get_logger(__name__)

STYLE = "wrong"
"""The task's answer style the bad policy learns (flywheel/demo/task.py): the sum off by one or two."""


def write_bad_demonstrations(path: Path, seed: int = 0) -> int:
    """One demonstration per training problem, answered in STYLE; how many were written."""
    rng = random.Random(seed)
    train, _ = split_problems()
    with open(path, "w", encoding="utf-8") as f:
        for problem in train:
            f.write(json.dumps({"messages": problem.messages(), "response": respond(problem, STYLE, rng)}) + "\n")
    return len(train)


def make_bad_policy(
    store: ModelStore, base_version: str, work_dir: Path, *, epochs: int = 2, lr: float = 1e-3, seed: int = 0
) -> Path:
    """``base_version`` (verified) fine-tuned on wrong-but-polite answers, in ``work_dir/policy``."""
    from flywheel.bootstrap.sft import SFTSettings, sft
    from shared.models.loading import verified_dir

    out = Path(work_dir) / "policy"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(verified_dir(store, base_version), out, ignore=shutil.ignore_patterns("manifest.*"))
    demos = Path(work_dir) / "bad-demonstrations.jsonl"
    n = write_bad_demonstrations(demos, seed)
    result = sft(out, demos, SFTSettings(epochs=epochs, lr=lr, warmup=5, seed=seed))
    log_event(log, "made the bad policy", base=base_version, demonstrations=n, steps=len(result.losses))
    return out


def publish_candidate(
    store: ModelStore, src_dir: Path, parent: str, signer: Any, publisher: Any, extra: dict[str, Any] | None = None
) -> Manifest:
    """Publish ``src_dir`` as the policy line's next version and its candidate, signed with ``signer``
    (the trainer's key), and announce it on rlhf.policy-candidates (RuntimeError when Kafka does not
    acknowledge)."""
    from shared.version_line import POLICY_CANDIDATE, KafkaAnnouncer, VersionLine

    line = VersionLine(store, POLICY_CANDIDATE, KafkaAnnouncer(publisher, POLICY_CANDIDATE), signer=signer)
    manifest = line.publish(src_dir, parent=parent, extra={"kind": "sabotage", **(extra or {})})
    if line.announce_pending() is None:
        raise RuntimeError(f"Kafka did not acknowledge the announcement of {manifest.version}")
    log_event(log, "published a candidate", version=manifest.version, parent=parent, kind="sabotage")
    return manifest
