"""services/inference/weights.py: what may replace or join the served weights, from headers alone.
Full weights: the same architecture and tensors (check_compatible). Adapters: LoRA factors that fit
the base model's linear layers at the adapter's rank, within the engine's slots (check_adapter_fits)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from services.inference.weights import (
    IncompatibleWeights,
    check_adapter_fits,
    check_compatible,
    lora_shape_problem,
    lora_tensor_target,
)

Q = "model.layers.0.self_attn.q_proj.weight"
V = "model.layers.0.self_attn.v_proj.weight"


def base_dir(path: Path) -> Path:
    path.mkdir()
    save_file(
        {Q: torch.zeros(8, 16), V: torch.zeros(4, 16), "model.norm.weight": torch.zeros(16)}, path / "model.safetensors"
    )
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 16}))
    return path


def lora(module: str, factor: str) -> str:
    return f"base_model.model.{module.removesuffix('.weight')}.lora_{factor}.weight"


def adapter_dir(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir()
    save_file(tensors, path / "adapter_model.safetensors")
    return path


def good(rank: int = 2) -> dict[str, torch.Tensor]:
    return {
        lora(Q, "A"): torch.zeros(rank, 16),
        lora(Q, "B"): torch.zeros(8, rank),
        lora(V, "A"): torch.zeros(rank, 16),
        lora(V, "B"): torch.zeros(4, rank),
    }


def test_lora_tensor_names_map_to_the_base_weight_they_change():
    assert lora_tensor_target(lora(Q, "A")) == (Q, "A")
    assert lora_tensor_target(lora(V, "B")) == (V, "B")
    assert lora_tensor_target("model.layers.0.self_attn.q_proj.lora_B.weight") == (Q, "B")  # no PEFT prefix
    assert lora_tensor_target("base_model.model.model.embed_tokens.weight") is None
    assert lora_tensor_target("lora_A.weight") is None


def test_lora_shapes_are_rank_by_in_and_out_by_rank():
    assert lora_shape_problem("A", (4, 16), (8, 16), 4) is None
    assert lora_shape_problem("B", (8, 4), (8, 16), 4) is None
    assert "expected [4, 16]" in (lora_shape_problem("A", (4, 15), (8, 16), 4) or "")
    assert "expected [8, 4]" in (lora_shape_problem("B", (8, 2), (8, 16), 4) or "")
    assert "not a linear" in (lora_shape_problem("A", (4, 16), (16,), 4) or "")


def test_a_fitting_adapter_passes(tmp_path):
    check_adapter_fits(base_dir(tmp_path / "base"), adapter_dir(tmp_path / "a", good()), rank=2, max_rank=8)


@pytest.mark.parametrize(
    ("tensors", "rank", "max_rank", "expected"),
    [
        (good(), 2, 1, "exceeds the engine's slots"),
        (good(), 4, 8, "expected [4, 16]"),
        ({**good(), lora(Q, "A"): torch.zeros(2, 15)}, 2, 8, "expected [2, 16]"),
        ({k: v for k, v in good().items() if k != lora(V, "B")}, 2, 8, "only one LoRA factor"),
        ({**good(), lora("model.layers.9.mlp.up_proj.weight", "A"): torch.zeros(2, 16)}, 2, 8, "lacks"),
        ({**good(), "base_model.model.lm_head.weight": torch.zeros(4, 16)}, 2, 8, "not a LoRA factor"),
        ({k: v.to(torch.int32) for k, v in good().items()}, 2, 8, "not a float"),
        ({}, 2, 8, "no LoRA tensors"),
    ],
)
def test_adapters_that_do_not_fit_are_refused_naming_why(tmp_path, tensors, rank, max_rank, expected):
    base = base_dir(tmp_path / "base")
    if tensors:
        adapter = adapter_dir(tmp_path / "a", tensors)
    else:
        adapter = tmp_path / "a"
        adapter.mkdir()
        save_file({}, adapter / "adapter_model.safetensors")
    with pytest.raises(IncompatibleWeights, match=expected.replace("[", r"\[").replace("]", r"\]")):
        check_adapter_fits(base, adapter, rank=rank, max_rank=max_rank)


def test_a_garbage_safetensors_file_is_refused_not_crashed_on(tmp_path):
    adapter = tmp_path / "a"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(IncompatibleWeights, match="unreadable safetensors"):
        check_adapter_fits(base_dir(tmp_path / "base"), adapter, rank=2, max_rank=8)


def test_full_weights_of_another_shape_are_refused(tmp_path):
    base = base_dir(tmp_path / "base")
    other = tmp_path / "other"
    other.mkdir()
    save_file(
        {Q: torch.zeros(8, 8), V: torch.zeros(4, 16), "model.norm.weight": torch.zeros(16)}, other / "model.safetensors"
    )
    (other / "config.json").write_text((base / "config.json").read_text())
    with pytest.raises(IncompatibleWeights, match="q_proj"):
        check_compatible(base, other)
