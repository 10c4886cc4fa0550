"""Data-parallel PPO: torchrun with 2 gloo processes makes the same update as 1 process on the same data.

The worker below is this file run as a script, launched exactly as in production: by torchrun
(``--standalone --nproc_per_node 2``) for the data-parallel run, and plainly (no torch.distributed)
for the reference run. Both build a PPOLearner from the same model-store versions, take two PPO
steps on the same 7 rollouts (uneven on purpose: minibatches of 3, 3 and 1 rows, one process gets
no row of the last one; pretraining batches of 3 rows; one stale rollout with behaviour logprobs)
with PPO-ptx on, and write their final policy and value weights as safetensors.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CONFIG = {
    "lr": 1e-3,
    "epochs": 2,
    "minibatch_size": 3,
    "kl_coef": 0.1,
    "ptx_coef": 0.5,
    "ptx_batch_size": 3,
    "ptx_seq_len": 16,
    "ent_coef": 0.01,
    "forward_batch_size": 2,
    "seed": 7,
}


def _worker(args: argparse.Namespace) -> None:
    import torch
    from safetensors.torch import save_file

    from services.trainer import distributed
    from services.trainer.learner import PPOLearner
    from services.trainer.ppo_config import PPOConfig
    from services.trainer.rollout_batch import Rollout
    from shared.model_store import ModelStore

    torch.set_num_threads(1)
    ctx = distributed.init_from_env()
    spec = json.loads(Path(args.data).read_text())
    store = ModelStore(Path(spec["store"]))
    learner = PPOLearner.from_store(store, spec["policy"], spec["policy"], spec["rm"], PPOConfig(**spec["config"]))
    base = [Rollout(**r) for r in spec["rollouts"]]
    for step in range(2):
        # Every rollout but the stale one was sampled by the weights the learner holds now.
        rollouts = [
            r
            if r.behaviour_logprobs is not None
            else Rollout(**{**r.__dict__, "policy_version": learner.weights_version})
            for r in base
        ]
        stats = learner.step(rollouts)
        print(
            f"rank {ctx.rank}/{ctx.world_size} step {step}: loss {stats.policy_loss:.5f} "
            f"ptx {stats.ptx_loss:.4f} updates {stats.minibatch_updates}",
            flush=True,
        )
    tensors = {f"policy.{k}": v for k, v in learner.policy_state().items()}
    tensors.update({f"value.{k}": v.detach().clone() for k, v in learner.value.state_dict().items()})
    save_file(tensors, str(Path(args.out) / f"rank{ctx.rank}-of-{ctx.world_size}.safetensors"))
    distributed.barrier(ctx)


@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory) -> Path:
    """A model store (default policy + an RM made from it) and 7 fixed rollouts, as a JSON spec."""
    from transformers import AutoTokenizer

    from shared.model_store import ModelStore
    from shared.models.default_model import ensure_default_policy
    from shared.models.reward_model import RewardModel

    root = tmp_path_factory.mktemp("ddp")
    store = ModelStore(root / "models")
    policy = ensure_default_policy(store)
    tokenizer = AutoTokenizer.from_pretrained(str(store.path(policy)))
    with tempfile.TemporaryDirectory() as tmp:
        RewardModel.from_policy_dir(store.path(policy), seed=3).save(Path(tmp), tokenizer)
        rm = store.publish("rm", Path(tmp), parent=policy).version

    rng = random.Random(0)
    rollouts = []
    for i in range(7):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"What is {i} plus {i * 3}?" + " Why?" * i}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        length = rng.randint(2, 12)
        response = [rng.randint(7, len(tokenizer) - 1) for _ in range(length)]
        if i % 2 == 0:
            response[-1] = tokenizer.eos_token_id
        stale = i == 4
        rollouts.append(
            {
                "messages": [],
                "prompt_token_ids": list(prompt),
                "response_token_ids": response,
                "behaviour_logprobs": [-rng.uniform(6.0, 9.0) for _ in response] if stale else None,
                "policy_version": "policy-0000" if stale else policy,
                "finish_reason": "stop" if i % 2 == 0 else "length",
                "score": rng.uniform(-1, 1),
            }
        )
    data = root / "spec.json"
    data.write_text(
        json.dumps({"store": str(store.root), "policy": policy, "rm": rm, "config": CONFIG, "rollouts": rollouts})
    )
    return data


def _run(cmd: list[str], out: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        cmd + ["--worker", "--data", str(out.parent / "spec.json"), "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def test_two_gloo_processes_make_the_same_update_as_one(ddp_data):
    import torch
    from safetensors.torch import load_file

    out = ddp_data.parent / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    script = str(Path(__file__).resolve())
    single_log = _run([sys.executable, script], out)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script]
    ddp_log = _run(torchrun, out)
    assert "rank 0/1 step 1" in single_log
    assert "rank 0/2 step 1" in ddp_log and "rank 1/2 step 1" in ddp_log

    single = load_file(str(out / "rank0-of-1.safetensors"))
    rank0 = load_file(str(out / "rank0-of-2.safetensors"))
    rank1 = load_file(str(out / "rank1-of-2.safetensors"))
    initial = load_file(str(next((ddp_data.parent / "models" / "policy-0001").glob("*.safetensors"))))
    assert single.keys() == rank0.keys() == rank1.keys()
    for name in single:
        assert torch.equal(rank0[name], rank1[name]), f"{name}: the two processes diverged"
        torch.testing.assert_close(
            rank0[name], single[name], atol=2e-5, rtol=1e-4, msg=f"{name} differs from 1 process"
        )
    # The update is real: the weights moved far more than the tolerance.
    moved = max((single[f"policy.{k}"] - v).abs().max().item() for k, v in initial.items())
    assert moved > 1e-3


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    _worker(parser.parse_args())
