"""`rlhf bootstrap` end to end on the shipped files, with a few steps of each stage (QUICK): it
publishes the SFT policy (policy-0001, the KL reference) and the first RM (rm-0001, trained by the
reward service's own train_first_rm on top of that policy), writes each step's loss curve, and
with a user's Hugging Face model directory it skips pretraining. Full-length timing is measured by
running `rlhf bootstrap` itself (see tests/benchmarks/bench_demo.py), not here."""

from __future__ import annotations

import json

import pytest
import torch

from flywheel.bootstrap.pipeline import QUICK, run_bootstrap
from shared.model_store import ModelStore

pytestmark = [pytest.mark.slow]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_bootstrap_publishes_the_sft_policy_and_the_first_rm(tmp_path):
    from transformers import AutoModelForCausalLM

    from shared.models.reward_model import load_version

    store = ModelStore(tmp_path / "models")
    result = run_bootstrap(store, report_dir=tmp_path / "report", settings=QUICK)

    assert (result.policy_version, result.rm_version) == ("policy-0001", "rm-0001")
    assert store.current("policy") == "policy-0001" and store.current("rm") == "rm-0001"
    policy = store.verify("policy-0001")
    assert policy.extra["kind"] == "sft" and policy.extra["kl_reference"] is True
    assert policy.metrics["pretrain_heldout_perplexity"] < result.summary["pretrain"]["heldout_perplexity_before"]
    rm = store.verify("rm-0001")
    assert rm.parent == "policy-0001" and rm.extra["rankings_file"] == "rankings.jsonl"
    assert 0.0 <= rm.metrics["heldout_accuracy"] <= 1.0

    # The published weights are what serving and the RM load: safetensors, the same architecture.
    model = AutoModelForCausalLM.from_pretrained(str(store.path("policy-0001")), use_safetensors=True)
    assert model.config.head_dim == 64
    assert load_version(store, "rm-0001").model.info["base_policy"] == "policy-0001"

    for step in ("step0_pretrain_loss", "step1_sft_loss", "step2_rm_loss"):
        assert (tmp_path / "report" / f"{step}.png").stat().st_size > 1000
        curves = json.loads((tmp_path / "report" / f"{step}.json").read_text())
        assert all(len(points) >= 1 for points in curves.values())
    pretrain_curve = json.loads((tmp_path / "report" / "step0_pretrain_loss.json").read_text())["train loss"]
    assert len(pretrain_curve) == QUICK.pretrain.steps and pretrain_curve[-1][1] < pretrain_curve[0][1]
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["policy_version"] == "policy-0001" and summary["seconds"]["total"] > 0


def test_a_given_hf_model_skips_pretraining(tmp_path):
    from shared.models.default_model import DefaultModelSpec, create_default_model

    hf_dir = tmp_path / "my-model"
    create_default_model(hf_dir, DefaultModelSpec(seed=5))
    store = ModelStore(tmp_path / "models")
    result = run_bootstrap(store, hf_model=hf_dir, report_dir=tmp_path / "report", settings=QUICK)
    assert "pretrain" not in result.summary and not (tmp_path / "report" / "step0_pretrain_loss.png").exists()
    assert store.manifest(result.policy_version).extra["base"] == str(hf_dir)
    assert result.rm_version == "rm-0001"


def test_pickle_weights_are_refused(tmp_path):
    from flywheel.bootstrap.pipeline import _copy_hf_model

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    (bad / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(ValueError, match="pickle"):
        _copy_hf_model(bad, tmp_path / "out")
