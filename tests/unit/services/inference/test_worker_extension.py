"""The worker side of a full-weight swap: store files read once, checked, staged, then loaded only
if they are exactly the served tensors. vLLM's own ``reload_weights`` is replaced by a recorder
here (the real engine runs in tests/integration/test_hot_swap.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from services.inference.worker_extension import (
    VerifiedWeightsWorker,
    WeightsRefused,
    check_signature,
    read_weight_files,
    signature_from_json,
    signature_to_json,
)
from shared.models.safetensors_io import write_safetensors


class RecordingWorker(VerifiedWeightsWorker):
    """The extension as vLLM mixes it in, with the Worker's ``reload_weights`` recording its input."""

    def __init__(self) -> None:
        self.loaded: dict[str, torch.Tensor] | None = None

    def reload_weights(self, weights_iterator) -> None:
        self.loaded = dict(weights_iterator)


def weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"embed.weight": torch.randn(8, 4, generator=g), "norm.weight": torch.randn(4, generator=g)}


def described(tmp_path, tensors, name="model.safetensors"):
    path = tmp_path / name
    hex_, size = write_safetensors(path, tensors, "blake3")
    return {"path": str(path), "hex": hex_, "bytes": size, "algorithm": "blake3"}


def wait_staged(worker: VerifiedWeightsWorker, token: str) -> dict:
    deadline = time.monotonic() + 10
    while not (status := worker.rlhf_staged(token))["done"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return status


def test_staged_weights_load_when_they_match_the_served_tensors(tmp_path):
    new = weights(1)
    worker = RecordingWorker()
    worker.rlhf_stage("t1", [described(tmp_path, new)])
    status = wait_staged(worker, "t1")
    served = signature_from_json(status["signature"])
    assert served == {"embed.weight": ((8, 4), "F32"), "norm.weight": ((4,), "F32")}
    loaded = worker.rlhf_load_staged("t1", signature_to_json(served))
    assert loaded["loaded"] is True and loaded["load_s"] >= 0
    assert worker.loaded is not None and all(torch.equal(worker.loaded[k], v) for k, v in new.items())
    # released after the load: a second load of the same token finds nothing
    assert worker.rlhf_load_staged("t1", signature_to_json(served))["reason"] == "lost"


def test_a_file_changed_after_the_manifest_is_refused_and_nothing_is_loaded(tmp_path):
    f = described(tmp_path, weights(1))
    path = Path(f["path"])
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x40
    path.write_bytes(bytes(raw))
    worker = RecordingWorker()
    worker.rlhf_stage("t1", [f])
    status = wait_staged(worker, "t1")
    assert status["reason"] == "corrupt" and "blake3 digest" in status["error"]
    result = worker.rlhf_load_staged("t1", signature_to_json({}))
    assert result["loaded"] is False and result["reason"] == "corrupt"
    assert worker.loaded is None


def test_tensors_that_differ_from_the_served_ones_are_refused(tmp_path):
    worker = RecordingWorker()
    worker.rlhf_stage("t1", [described(tmp_path, {"embed.weight": torch.zeros(9, 4), "norm.weight": torch.zeros(4)})])
    wait_staged(worker, "t1")
    served = {"embed.weight": ((8, 4), "F32"), "norm.weight": ((4,), "F32")}
    result = worker.rlhf_load_staged("t1", signature_to_json(served))
    assert result == {"loaded": False, "reason": "incompatible", "error": result["error"]}
    assert "embed.weight" in result["error"] and worker.loaded is None


def test_a_newer_stage_replaces_the_older_one(tmp_path):
    worker = RecordingWorker()
    worker.rlhf_stage("old", [described(tmp_path, weights(1), "a.safetensors")])
    worker.rlhf_stage("new", [described(tmp_path, weights(2), "b.safetensors")])
    assert worker.rlhf_staged("old")["reason"] == "lost"
    assert "signature" in wait_staged(worker, "new")


def test_a_tensor_in_two_files_is_refused(tmp_path):
    files = [described(tmp_path, weights(1), "a.safetensors"), described(tmp_path, weights(2), "b.safetensors")]
    with pytest.raises(WeightsRefused, match="in another file too"):
        read_weight_files(files)


def test_check_signature_names_the_difference():
    served = {"a": ((2,), "F32")}
    check_signature({"a": ((2,), "F32")}, served)
    with pytest.raises(WeightsRefused, match="tensor a is"):
        check_signature({"a": ((2,), "BF16")}, served)
    with pytest.raises(WeightsRefused, match="names differ"):
        check_signature({"b": ((2,), "F32")}, served)


class AddingWorker(VerifiedWeightsWorker):
    """The extension with the Worker's ``add_lora`` recording its request and taking ``seconds``."""

    def __init__(self, seconds: float, result: bool = True, keeps: bool = True) -> None:
        self.seconds, self.result, self.keeps = seconds, result, keeps
        self.requests: list = []
        self.cache: set[int] = set()

    def add_lora(self, lora_request) -> bool:
        self.requests.append(lora_request)
        time.sleep(self.seconds)
        if self.keeps:
            self.cache.add(lora_request.lora_int_id)
        return self.result

    def list_loras(self) -> set[int]:
        return set(self.cache)


def test_an_adapter_is_added_by_vllm_and_the_time_it_held_the_engine_is_returned():
    worker = AddingWorker(0.05)
    out = worker.rlhf_add_lora("policy-0007", 7, "/copies/policy-0007")
    assert out["added"] is True and out["listed"] is True and 0.05 <= out["held_s"] < 1.0
    (req,) = worker.requests
    assert (req.lora_name, req.lora_int_id, req.lora_path) == ("policy-0007", 7, "/copies/policy-0007")
    # already there (vLLM's add returns False): listed all the same
    again = AddingWorker(0.0, result=False)
    again.cache.add(8)
    assert again.rlhf_add_lora("policy-0008", 8, "/x") == {
        "added": False,
        "listed": True,
        "held_s": pytest.approx(0, abs=0.5),
    }
    # vLLM said nothing was added and the cache does not hold it: not listed
    assert AddingWorker(0.0, result=False, keeps=False).rlhf_add_lora("policy-0009", 9, "/x")["listed"] is False
