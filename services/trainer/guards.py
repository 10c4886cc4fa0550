"""Guards: checks of a candidate's held-out answers that do not move with the live reward model.

The publish gate compares candidate and baseline under the *live* RM, which the retraining loop
replaces every minute: a policy that learns to please one RM version is judged by the next one,
trained on ratings of answers like its own. Guards are fixed bars beside it, configured once
(``RLHF_TRAINER_GUARDS``, a comma-separated list, parsed at start):

    frozen_rm:<rm version>:<threshold>                  e.g. frozen_rm:rm-0001:0.05
    entry:<module>:<function>:<threshold>[:<tolerance>] e.g. entry:my_pkg.checks:sums:0.8

Each guard gives one number for a set of held-out answers (``value``) and judges the candidate's
number against the baseline's (``judge``: the version the candidate would replace, its answers kept
by the trainer):

- **frozen_rm** scores every answer with a reference reward model version that never changes
  (loaded in the trainer from the store, its signature and files verified; the reward service
  serves only its current version). Value: the mean score, an empty answer counting as the worst
  scored one (as the gate's held-out reward). Refused when ``candidate < baseline - threshold``
  (``frozen_rm_rule``); the first candidate (no baseline) passes.
- **entry** calls an operator's deterministic check ``function(prompts, answers) -> float in [0, 1]``
  (``prompts[i]``: the conversation answered by ``answers[i]``, a list of ``{"role", "content"}``
  dicts; one entry per answer, several answers per held-out prompt). Refused below
  ``min(threshold, baseline - tolerance)`` (``floor_rule``): the threshold is a floor, but a
  baseline already below it is the bar instead (minus ``tolerance``, default 0), so a policy that
  starts under the floor may still improve. A check that raises, or returns anything but a number
  in [0, 1], refuses the candidate (fail closed).

A guard's refusal blocks the candidate like the gate's own KL and reward bounds: it is never
published (so it never reaches a canary). Results go into the gate decision, the manifest's metrics
(``guard:<name>``), the trainer's Status, ``rlhf_trainer_gate_refused_total{reason=<guard name>}``
and the log.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from services.trainer.prompts import Prompt
from services.trainer.publishing import expand_prompts, fill_empty_scores
from shared.model_store import ModelStore, ModelStoreError, version_number

KINDS = ("frozen_rm", "entry")
SCORE_BATCH = 16
"""Answers per forward pass of a frozen reward model."""


class GuardConfigError(ValueError):
    """A guard that cannot be built as configured (the message names what is wrong)."""


@dataclass(frozen=True)
class GuardSpec:
    """One parsed item of RLHF_TRAINER_GUARDS."""

    kind: str
    """``frozen_rm`` or ``entry``."""
    target: str
    """The RM version (frozen_rm) or ``module:function`` (entry)."""
    threshold: float
    tolerance: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.target}"


@dataclass(frozen=True)
class GuardResult:
    name: str
    ok: bool
    value: float
    """The candidate's figure."""
    baseline: float | None
    """The baseline's figure (None: no baseline yet)."""
    bar: float | None
    """The lowest passing value (None: nothing to compare with)."""
    reason: str

    def to_json(self) -> dict[str, Any]:
        """As a dict for JSON (checkpoints, Status): a value that is not finite becomes None."""
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in asdict(self).items()}


class Guard(Protocol):
    name: str
    threshold: float

    def value(self, prompts: Sequence[Prompt], answers: Sequence[str]) -> float:
        """The guard's figure for ``answers[i]`` given to ``prompts[i]``."""

    def judge(self, value: float, baseline: float | None) -> GuardResult:
        """Whether a candidate with ``value`` passes against a baseline with ``baseline``."""


# --- pure rules -------------------------------------------------------------------------------


def parse_guard_spec(text: str) -> GuardSpec:
    """``frozen_rm:<rm-NNNN>:<threshold>`` or ``entry:<module>:<function>:<threshold>[:<tolerance>]``;
    ValueError naming what is wrong."""
    parts = [p.strip() for p in text.strip().split(":")]
    kind = parts[0]
    if kind == "frozen_rm":
        if len(parts) != 3:
            raise ValueError(f"{text!r}: expected frozen_rm:<rm version>:<threshold>")
        target, numbers = parts[1], parts[2:]
        try:
            ok = target.startswith("rm-") and version_number(target) > 0
        except ModelStoreError:
            ok = False
        if not ok:
            raise ValueError(f"{text!r}: {target!r} is not a reward model version (rm-NNNN)")
    elif kind == "entry":
        if len(parts) not in (4, 5):
            raise ValueError(f"{text!r}: expected entry:<module>:<function>:<threshold>[:<tolerance>]")
        module, function = parts[1], parts[2]
        if not module or not all(p.isidentifier() for p in module.split(".")) or not function.isidentifier():
            raise ValueError(f"{text!r}: {module}:{function} is not a module path and a function name")
        target, numbers = f"{module}:{function}", parts[3:]
    else:
        raise ValueError(f"{text!r}: unknown guard kind {kind!r} (known: {', '.join(KINDS)})")
    try:
        values = [float(n) for n in numbers]
    except ValueError:
        raise ValueError(f"{text!r}: threshold and tolerance must be numbers") from None
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{text!r}: threshold and tolerance must be finite")
    threshold, tolerance = values[0], (values[1] if len(values) > 1 else 0.0)
    if kind == "frozen_rm" and threshold < 0:
        raise ValueError(f"{text!r}: the threshold (the drop allowed) must not be negative")
    if kind == "entry" and not (0.0 <= threshold <= 1.0 and tolerance >= 0.0):
        raise ValueError(f"{text!r}: the threshold must be in [0, 1] and the tolerance not negative")
    return GuardSpec(kind, target, threshold, tolerance)


def parse_guards(items: Sequence[str]) -> list[GuardSpec]:
    """Every item parsed; a guard named twice is refused (its results would collide)."""
    specs = [parse_guard_spec(item) for item in items if item.strip()]
    names = [s.name for s in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"guards configured twice: {', '.join(twice)}")
    return specs


def frozen_rm_rule(name: str, value: float, baseline: float | None, threshold: float) -> GuardResult:
    """Passes when ``value >= baseline - threshold`` (a fall of at most ``threshold`` under a reward
    model that does not change); always when there is no baseline; never when not finite."""
    if not math.isfinite(value):
        return GuardResult(name, False, value, baseline, None, f"{name}: the candidate's score is not finite")
    if baseline is None:
        return GuardResult(name, True, value, None, None, f"{name}: {value:.4f} (no baseline)")
    bar = baseline - threshold
    ok = value >= bar
    verb = ">=" if ok else "<"
    return GuardResult(
        name, ok, value, baseline, bar, f"{name}: {value:.4f} {verb} baseline {baseline:.4f} - {threshold:.4f}"
    )


def floor_rule(name: str, value: float, baseline: float | None, threshold: float, tolerance: float) -> GuardResult:
    """Passes when ``value >= min(threshold, baseline - tolerance)`` (``threshold`` without a
    baseline); never for a value outside [0, 1] or not finite."""
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        return GuardResult(name, False, value, baseline, None, f"{name}: the check returned {value!r}, not in [0, 1]")
    if baseline is None or threshold <= baseline - tolerance:
        bar, why = threshold, f"threshold {threshold:.4f}"
    else:
        bar, why = baseline - tolerance, f"baseline {baseline:.4f} - {tolerance:.4f}"
    ok = value >= bar
    return GuardResult(name, ok, value, baseline, bar, f"{name}: {value:.4f} {'>=' if ok else '<'} {bar:.4f} ({why})")


def guard_metric_key(name: str) -> str:
    """The manifest metric that records a guard's value."""
    return f"guard:{name}"


# --- the guards ---------------------------------------------------------------------------------


class FrozenRmGuard:
    """Scores answers with a fixed reward model version (see the module docstring)."""

    def __init__(self, version: str, threshold: float, model: Any, tokenizer: Any):
        from shared.models.encoding import EncodingLimits

        self.name = f"frozen_rm:{version}"
        self.version = version
        self.threshold = threshold
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.limits = EncodingLimits()
        """The reward service's default truncation (RLHF_REWARD_MAX_TOKENS / _MAX_RESPONSE_TOKENS)."""

    @classmethod
    def load(cls, store: ModelStore, version: str, threshold: float, keys: Any = None) -> FrozenRmGuard:
        """``version`` from the store: its signature checked under the rm line's verify keys (when
        configured), every file against its manifest, then loaded. GuardConfigError otherwise."""
        from shared.models.loading import load_tokenizer
        from shared.models.reward_model import RewardModel, RewardModelError
        from shared.version_line import REWARD_MODEL, VersionLine, VersionRefused

        try:
            VersionLine(store, REWARD_MODEL, keys=keys).read_signed(version)
            store.verify(version)
            path = Path(store.path(version))
            return cls(version, threshold, RewardModel.load(path), load_tokenizer(path))
        except (ModelStoreError, VersionRefused, RewardModelError, OSError) as exc:
            raise GuardConfigError(f"frozen_rm:{version}: cannot load the reward model: {exc}") from None

    def value(self, prompts: Sequence[Prompt], answers: Sequence[str]) -> float:
        """Mean score of the answers; an empty answer counts as the worst scored one."""
        import torch

        from shared.models.encoding import encode_rm_input, pad_batch

        idx = [i for i, a in enumerate(answers) if a.strip()]
        scores: list[float | None] = [None] * len(answers)
        tok = self.tokenizer
        pad = next((t for t in (tok.pad_token_id, tok.eos_token_id) if t is not None), 0)
        encoded = {i: encode_rm_input(tok, prompts[i], answers[i], self.limits).input_ids for i in idx}
        order = sorted(idx, key=lambda i: len(encoded[i]))
        for start in range(0, len(order), SCORE_BATCH):
            chunk = order[start : start + SCORE_BATCH]
            ids, mask = pad_batch([encoded[i] for i in chunk], int(pad))
            with torch.no_grad():
                out = self.model(ids, mask).tolist()
            for i, s in zip(chunk, out, strict=True):
                scores[i] = float(s)
        filled = fill_empty_scores(scores)
        return sum(filled) / len(filled) if filled else math.nan

    def judge(self, value: float, baseline: float | None) -> GuardResult:
        return frozen_rm_rule(self.name, value, baseline, self.threshold)


class EntryPointGuard:
    """An operator's deterministic check, ``function(prompts, answers) -> float in [0, 1]``."""

    def __init__(self, target: str, function: Callable[..., Any], threshold: float, tolerance: float = 0.0):
        self.name = f"entry:{target}"
        self.function = function
        self.threshold = threshold
        self.tolerance = tolerance
        self.last_error = ""

    @staticmethod
    def resolve(target: str) -> Callable[..., Any]:
        """The callable ``module:function`` names (imported now); GuardConfigError otherwise."""
        module_name, _, function_name = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # noqa: BLE001 - an operator's module: any import error is a config error
            raise GuardConfigError(
                f"entry:{target}: cannot import {module_name}: {type(exc).__name__}: {exc}"
            ) from None
        function = getattr(module, function_name, None)
        if not callable(function):
            raise GuardConfigError(f"entry:{target}: {module_name} has no function {function_name}")
        return function

    def value(self, prompts: Sequence[Prompt], answers: Sequence[str]) -> float:
        """The check's figure; NaN when it raised or returned no number (the rule refuses NaN)."""
        conversations = [[{"role": m.role, "content": m.content} for m in p] for p in prompts]
        try:
            out = self.function(conversations, list(answers))
            self.last_error = ""
            return float(out)
        except Exception as exc:  # noqa: BLE001 - an operator's code: fail closed, never crash the loop
            self.last_error = f"{type(exc).__name__}: {exc}"
            return math.nan

    def judge(self, value: float, baseline: float | None) -> GuardResult:
        result = floor_rule(self.name, value, baseline, self.threshold, self.tolerance)
        if self.last_error and not result.ok:
            return GuardResult(**{**asdict(result), "reason": f"{self.name}: the check raised {self.last_error}"})
        return result


def build_guards(specs: Sequence[GuardSpec], store: ModelStore, rm_keys: Any = None) -> list[Guard]:
    """The configured guards, loaded (frozen reward models) and imported (entry points)."""
    guards: list[Guard] = []
    for spec in specs:
        if spec.kind == "frozen_rm":
            guards.append(FrozenRmGuard.load(store, spec.target, spec.threshold, rm_keys))
        else:
            guards.append(
                EntryPointGuard(spec.target, EntryPointGuard.resolve(spec.target), spec.threshold, spec.tolerance)
            )
    return guards


def run_guards(
    guards: Sequence[Guard],
    heldout: Sequence[Prompt],
    answers: Sequence[str],
    baseline_answers: Sequence[str] | None,
    baseline_values: dict[str, float],
) -> tuple[list[GuardResult], dict[str, float]]:
    """Each guard's result for the candidate's ``answers`` against the baseline, and the baseline's
    values (``baseline_values`` plus those computed now from ``baseline_answers``, for guards it
    lacked). No baseline answers: every guard judges without a baseline."""
    results, known = [], dict(baseline_values)
    prompts = expand_prompts(heldout, len(answers))
    for guard in guards:
        base: float | None = known.get(guard.name)
        if base is None and baseline_answers:
            base = guard.value(expand_prompts(heldout, len(baseline_answers)), baseline_answers)
            if math.isfinite(base):
                known[guard.name] = base
            else:
                base = None
        results.append(guard.judge(guard.value(prompts, answers), base))
    return results, known
