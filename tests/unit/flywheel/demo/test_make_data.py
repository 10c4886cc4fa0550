"""The shipped data generated from the task and its gold rater (flywheel/demo/make_data.py)."""

from __future__ import annotations

import json

from flywheel.demo import gold_rater
from flywheel.demo.make_data import main as make_data
from flywheel.demo.task import DEMONSTRATION_MIX, split_problems


def test_shipped_data_is_what_the_generator_writes(tmp_path):
    from flywheel.demo.make_data import BOOTSTRAP_DATA, DEMO_DATA

    make_data(["--demo-data", str(tmp_path / "demo"), "--bootstrap-data", str(tmp_path / "bootstrap")])
    for shipped, fresh in (
        (DEMO_DATA / "prompts.jsonl", tmp_path / "demo" / "prompts.jsonl"),
        (DEMO_DATA / "heldout_prompts.jsonl", tmp_path / "demo" / "heldout_prompts.jsonl"),
        (BOOTSTRAP_DATA / "demonstrations.jsonl", tmp_path / "bootstrap" / "demonstrations.jsonl"),
        (BOOTSTRAP_DATA / "rankings.jsonl", tmp_path / "bootstrap" / "rankings.jsonl"),
    ):
        assert shipped.read_bytes() == fresh.read_bytes(), f"{shipped} is stale: run python -m flywheel.demo.make_data"


def test_shipped_data_keeps_heldout_prompts_out_and_leaves_room_to_improve():
    from flywheel.demo.make_data import BOOTSTRAP_DATA, DEMO_DATA

    def prompts(path, key):
        return {json.loads(ln)[key][0]["content"] for ln in path.read_text().splitlines()}

    held = prompts(DEMO_DATA / "heldout_prompts.jsonl", "messages")
    assert held == {p.prompt for p in split_problems()[1]}
    assert not held & prompts(DEMO_DATA / "prompts.jsonl", "messages")
    assert not held & prompts(BOOTSTRAP_DATA / "demonstrations.jsonl", "messages")
    assert not held & prompts(BOOTSTRAP_DATA / "rankings.jsonl", "prompt")
    demos = [json.loads(ln) for ln in (BOOTSTRAP_DATA / "demonstrations.jsonl").read_text().splitlines()]
    good = sum(gold_rater.judge(d["messages"][0]["content"], d["response"]).thumb_up for d in demos) / len(demos)
    assert abs(good - DEMONSTRATION_MIX["good"]) < 0.05, "about half the demonstrations are what the rater likes"
    assert "answer" not in (DEMO_DATA / "prompts.jsonl").read_text(), "prompt files must not leak the gold answer"


def test_rankings_are_strict_gold_orders_in_the_offline_rm_format():
    from flywheel.demo.make_data import BOOTSTRAP_DATA
    from services.reward.offline import read_rankings

    groups = read_rankings(BOOTSTRAP_DATA / "rankings.jsonl")
    assert len(groups) > 300
    for line in (BOOTSTRAP_DATA / "rankings.jsonl").read_text().splitlines()[:200]:
        doc = json.loads(line)
        scores = [gold_rater.judge(doc["prompt"][0]["content"], doc["responses"][i]).score for i in doc["ranking"]]
        assert all(a > b for a, b in zip(scores, scores[1:]))
