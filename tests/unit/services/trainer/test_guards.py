"""Guards that do not move with the live reward model: the RLHF_TRAINER_GUARDS syntax, the two rules,
a frozen reward model loaded only when signed and intact, an operator's entry point (fail closed),
and the baseline's values computed once from its answers."""

from __future__ import annotations

import math
import shutil
import textwrap

import pytest

from services.trainer.guards import (
    EntryPointGuard,
    FrozenRmGuard,
    GuardConfigError,
    GuardSpec,
    build_guards,
    floor_rule,
    frozen_rm_rule,
    parse_guard_spec,
    parse_guards,
    run_guards,
)
from shared.events import Message
from shared.model_store import ModelStore
from shared.version_line import REWARD_MODEL, VersionLine
from tests.conftest import test_signing_key, test_versions

PROMPTS = [(Message("user", f"What is {a} plus {a}?"),) for a in (1, 2)]


@pytest.mark.parametrize(
    "text, spec",
    [
        ("frozen_rm:rm-0001:0.05", GuardSpec("frozen_rm", "rm-0001", 0.05)),
        (" frozen_rm : rm-0012 : 0 ", GuardSpec("frozen_rm", "rm-0012", 0.0)),
        ("entry:my_pkg.checks:sums:0.8", GuardSpec("entry", "my_pkg.checks:sums", 0.8)),
        ("entry:checks:sums:0.8:0.05", GuardSpec("entry", "checks:sums", 0.8, 0.05)),
    ],
)
def test_guard_specs_parse(text, spec):
    assert parse_guard_spec(text) == spec
    assert spec.name == f"{spec.kind}:{spec.target}"


@pytest.mark.parametrize(
    "text, words",
    [
        ("frozen_rm:rm-0001", "expected frozen_rm:<rm version>:<threshold>"),
        ("frozen_rm:policy-0001:0.1", "not a reward model version"),
        ("frozen_rm:rm-x:0.1", "not a reward model version"),
        ("frozen_rm:rm-0001:-0.1", "must not be negative"),
        ("frozen_rm:rm-0001:nan", "finite"),
        ("entry:checks:0.8", "expected entry:<module>:<function>"),
        ("entry:my-pkg:sums:0.8", "not a module path"),
        ("entry:checks:sums:1.5", "in [0, 1]"),
        ("entry:checks:sums:0.5:-1", "tolerance not negative"),
        ("entry:checks:sums:high", "must be numbers"),
        ("magic:rm-0001:0.1", "unknown guard kind 'magic'"),
    ],
)
def test_malformed_guard_specs_are_refused_with_the_reason(text, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("(", r"\(")):
        parse_guard_spec(text)


def test_a_guard_named_twice_is_refused():
    assert [s.name for s in parse_guards(["frozen_rm:rm-0001:0.1", " ", "entry:a:b:0.5"])] == [
        "frozen_rm:rm-0001",
        "entry:a:b",
    ]
    with pytest.raises(ValueError, match="configured twice: frozen_rm:rm-0001"):
        parse_guards(["frozen_rm:rm-0001:0.1", "frozen_rm:rm-0001:0.2"])


@pytest.mark.parametrize(
    "value, baseline, ok, bar",
    [
        (0.95, 1.0, True, 0.9),
        (0.9, 1.0, True, 0.9),  # exactly the drop allowed
        (0.89, 1.0, False, 0.9),
        (-5.0, None, True, None),  # the first candidate: nothing to compare with
        (math.nan, 1.0, False, None),
    ],
)
def test_frozen_rm_rule(value, baseline, ok, bar):
    r = frozen_rm_rule("frozen_rm:rm-0001", value, baseline, 0.1)
    assert r.ok is ok and r.bar == (None if bar is None else pytest.approx(bar))
    assert r.reason.startswith("frozen_rm:rm-0001: ")


@pytest.mark.parametrize(
    "value, baseline, ok, bar",
    [
        (0.8, None, True, 0.8),
        (0.79, None, False, 0.8),
        (0.79, 0.95, False, 0.8),  # a baseline above the floor: the floor is the bar
        (0.56, 0.6, True, 0.55),  # a baseline under the floor: the baseline minus the tolerance is the bar
        (0.54, 0.6, False, 0.55),
        (1.5, None, False, None),  # not a share
        (math.nan, 0.6, False, None),
    ],
)
def test_floor_rule(value, baseline, ok, bar):
    r = floor_rule("entry:c:f", value, baseline, 0.8, 0.05)
    assert r.ok is ok and r.bar == (None if bar is None else pytest.approx(bar))


@pytest.fixture()
def checks_module(tmp_path, monkeypatch):
    """An operator's module on sys.path: share of answers that contain the right sum, and two broken checks."""
    (tmp_path / "op_checks_for_test.py").write_text(
        textwrap.dedent(
            """
            import re

            def sums(prompts, answers):
                right = 0
                for conversation, answer in zip(prompts, answers):
                    a, b = map(int, re.findall(r"\\d+", conversation[-1]["content"]))
                    right += str(a + b) in answer
                return right / len(answers)

            def broken(prompts, answers):
                raise RuntimeError("the check itself is broken")

            def not_a_number(prompts, answers):
                return "fine"

            def out_of_range(prompts, answers):
                return 2.5

            NOT_CALLABLE = 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "op_checks_for_test"


def test_an_entry_point_gets_one_conversation_per_answer(checks_module):
    guard = EntryPointGuard(f"{checks_module}:sums", EntryPointGuard.resolve(f"{checks_module}:sums"), threshold=0.8)
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    assert guard.value(prompts, ["2", "it is 2", "4", "five"]) == 0.75
    assert not guard.judge(0.75, None).ok and guard.judge(0.75, 0.7).ok  # under the floor, better than baseline


@pytest.mark.parametrize(
    "target, words",
    [
        ("no_such_module_for_rlhf_tests:f", "cannot import no_such_module_for_rlhf_tests: ModuleNotFoundError"),
        ("{m}:missing", "has no function missing"),
        ("{m}:NOT_CALLABLE", "has no function NOT_CALLABLE"),
    ],
)
def test_an_entry_point_that_cannot_be_loaded_is_a_config_error(checks_module, target, words):
    with pytest.raises(GuardConfigError, match=words):
        EntryPointGuard.resolve(target.format(m=checks_module))


@pytest.mark.parametrize(
    "function, words",
    [("broken", "raised RuntimeError"), ("not_a_number", "raised ValueError"), ("out_of_range", "not in [0, 1]")],
)
def test_a_check_that_fails_refuses_the_candidate(checks_module, function, words):
    target = f"{checks_module}:{function}"
    guard = EntryPointGuard(target, EntryPointGuard.resolve(target), threshold=0.0)
    value = guard.value(PROMPTS, ["2", "4"])
    result = guard.judge(value, 0.5)
    assert not result.ok and words in result.reason
    assert math.isnan(value) or value == 2.5


# --- the frozen reward model --------------------------------------------------------------------


@pytest.fixture()
def rm_store(trainer_store, tmp_path):
    """A store with the session's reward model published as rm-0001, signed with the test rm key."""
    store = ModelStore(tmp_path / "models")
    src = tmp_path / "src-rm"
    shutil.copytree(trainer_store.path(trainer_store.rm), src, ignore=shutil.ignore_patterns("manifest.*"))
    VersionLine(store, REWARD_MODEL, signer=test_signing_key("rm")).publish(src)
    return store


def test_a_frozen_rm_scores_the_same_answers_the_same_and_others_differently(rm_store, one_thread):
    guard = FrozenRmGuard.load(rm_store, "rm-0001", 0.1, test_versions().verify_keys("rm"))
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    answers = ["2", "The answer is 2.", "4", "It is four, I hope this helps."]
    a = guard.value(prompts, answers)
    assert a == guard.value(prompts, list(answers)) and math.isfinite(a)
    assert guard.value(prompts, ["2", "2", "4", "4"]) != a
    # An empty answer counts as the worst scored answer of the set, never as a free pass.
    scores = [guard.value([p], [x]) for p, x in zip(prompts, answers)]
    assert guard.value(prompts, ["", *answers[1:]]) == pytest.approx((min(scores[1:]) + sum(scores[1:])) / 4)


def test_a_frozen_rm_is_loaded_only_signed_by_a_trusted_key_and_intact(rm_store, trainer_store, one_thread):
    with pytest.raises(GuardConfigError, match="frozen_rm:rm-0001: cannot load .*not trusted"):
        FrozenRmGuard.load(rm_store, "rm-0001", 0.1, test_versions().verify_keys("policy"))
    with pytest.raises(GuardConfigError, match="rm-0009"):
        FrozenRmGuard.load(rm_store, "rm-0009", 0.1, None)
    weights = rm_store.path("rm-0001") / "model.safetensors"
    weights.chmod(0o644)
    with open(weights, "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    with pytest.raises(GuardConfigError, match="cannot load"):
        FrozenRmGuard.load(rm_store, "rm-0001", 0.1, test_versions().verify_keys("rm"))


def test_build_guards_in_the_configured_order(rm_store, checks_module, one_thread):
    specs = parse_guards([f"entry:{checks_module}:sums:0.5", "frozen_rm:rm-0001:0.05"])
    guards = build_guards(specs, rm_store, test_versions().verify_keys("rm"))
    assert [g.name for g in guards] == [f"entry:{checks_module}:sums", "frozen_rm:rm-0001"]
    assert [g.threshold for g in guards] == [0.5, 0.05]


# --- running them -------------------------------------------------------------------------------


class CountingGuard:
    """Value: share of answers equal to "good"; counts its calls."""

    name = "entry:count:good"
    threshold = 0.5

    def __init__(self):
        self.calls = 0

    def value(self, prompts, answers):
        self.calls += 1
        assert len(prompts) == len(answers)
        return sum(a == "good" for a in answers) / len(answers)

    def judge(self, value, baseline):
        return floor_rule(self.name, value, baseline, self.threshold, 0.0)


def test_run_guards_computes_a_missing_baseline_value_once():
    guard = CountingGuard()
    # Four answers per prompt for the candidate, one per prompt for an older baseline: both lay out.
    results, known = run_guards([guard], PROMPTS, ["good"] * 6 + ["bad"] * 2, ["good", "bad"], {})
    assert known == {guard.name: 0.5} and guard.calls == 2
    [r] = results
    assert r.ok and r.value == 0.75 and r.baseline == 0.5
    results, _ = run_guards([guard], PROMPTS, ["bad"] * 8, ["good", "bad"], known)
    assert guard.calls == 3 and not results[0].ok and results[0].bar == 0.5
    results, known = run_guards([guard], PROMPTS, ["good"] * 2, None, {})
    assert known == {} and results[0].baseline is None and results[0].ok
    with pytest.raises(ValueError, match="do not divide"):
        run_guards([guard], PROMPTS, ["good"] * 3, None, {})
