"""Checks that a new policy version can be loaded in place of the served one.

In-place reload keeps the engine's model object, so the new checkpoint must have exactly the same
architecture and tensor names, shapes and dtypes. Checked from config.json and the safetensors
headers alone, before the engine is touched.

An adapter version (LoRA) is checked against the base weights the engine holds instead
(``check_adapter_fits``): only LoRA factors, of linear weights the base has, in shapes that fit them
at the adapter's rank, within the engine's slot rank.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

# Fields of config.json that decide tensor shapes or the forward pass.
_ARCH_FIELDS = (
    "architectures",
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rope_theta",
    "tie_word_embeddings",
)


class IncompatibleWeights(ValueError):
    """The new checkpoint cannot replace the served one in place."""


Signature = dict[str, tuple[tuple[int, ...], str]]
"""Tensor name -> (shape, safetensors dtype name)."""


def is_weight_file(rel: str) -> bool:
    """A model directory's weight file (what the engine loads): a top-level ``*.safetensors``."""
    return "/" not in rel and rel.endswith(".safetensors")


def tensor_signature(model_dir: Path) -> Signature:
    """name -> (shape, dtype) of every tensor in the directory's safetensors files (headers only)."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise IncompatibleWeights(f"{model_dir.name}: no safetensors files")
    return files_signature(files)


def files_signature(files: list[Path]) -> Signature:
    """name -> (shape, dtype) of every tensor in ``files`` (safetensors headers only)."""
    sig: Signature = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has keys(), not __iter__
                sl = f.get_slice(name)
                sig[name] = (tuple(sl.get_shape()), str(sl.get_dtype()))
    return sig


def check_compatible(
    served_dir: Path,
    new_dir: Path,
    *,
    served_signature: Signature | None = None,
    new_signature: Signature | None = None,
) -> None:
    """Raise IncompatibleWeights naming the first difference that prevents an in-place reload.
    ``served_signature`` / ``new_signature``: the tensors when they are not (all) in the
    directories (weights read from the store at load time: services/inference/worker_extension.py
    checks the bytes it loads against the served signature again)."""
    served_cfg = json.loads((served_dir / "config.json").read_text())
    try:
        new_cfg = json.loads((new_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise IncompatibleWeights(f"{new_dir.name}: unreadable config.json ({exc})") from None
    for key in _ARCH_FIELDS:
        if served_cfg.get(key) != new_cfg.get(key):
            raise IncompatibleWeights(
                f"{new_dir.name}: config {key}={new_cfg.get(key)!r} differs from served {served_cfg.get(key)!r}"
            )
    served = served_signature if served_signature is not None else tensor_signature(served_dir)
    new = new_signature if new_signature is not None else tensor_signature(new_dir)
    if served.keys() != new.keys():
        diff = sorted(served.keys() ^ new.keys())[:3]
        raise IncompatibleWeights(f"{new_dir.name}: tensor names differ (e.g. {diff})")
    for name, (shape, dtype) in served.items():
        if new[name] != (shape, dtype):
            raise IncompatibleWeights(f"{new_dir.name}: tensor {name} is {new[name]}, served is {(shape, dtype)}")


# --- adapters (LoRA) ---------------------------------------------------------------------------

PEFT_PREFIX = "base_model.model."
"""What PEFT puts before the base model's module names in an adapter's tensor names."""
LORA_FACTORS = {"lora_A": "A", "lora_B": "B"}


def lora_tensor_target(name: str) -> tuple[str, str] | None:
    """``(base weight name, "A" | "B")`` for a PEFT LoRA tensor name, or None for any other tensor.

    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` ->
    ``("model.layers.0.self_attn.q_proj.weight", "A")`` (PEFT's prefix dropped, the factor's name
    replaced by the base weight's).
    """
    parts = name.removeprefix(PEFT_PREFIX).split(".")
    if len(parts) < 3 or parts[-1] != "weight" or parts[-2] not in LORA_FACTORS:
        return None
    return ".".join([*parts[:-2], "weight"]), LORA_FACTORS[parts[-2]]


def lora_shape_problem(factor: str, shape: tuple[int, ...], base_shape: tuple[int, ...], rank: int) -> str | None:
    """Why a LoRA factor cannot apply to a base weight of ``base_shape`` = (out, in), or None.

    LoRA adds ``B @ A`` to the weight: A is (rank, in), B is (out, rank)."""
    if len(base_shape) != 2:
        return f"the base tensor is {len(base_shape)}-dimensional, not a linear layer's weight"
    out_features, in_features = base_shape
    expected = (rank, in_features) if factor == "A" else (out_features, rank)
    if shape != expected:
        return f"lora_{factor} is {list(shape)}, expected {list(expected)} for rank {rank} on {list(base_shape)}"
    return None


def check_adapter_fits(
    base_dir: Path, adapter_dir: Path, rank: int, max_rank: int, base_signature: Signature | None = None
) -> None:
    """Raise IncompatibleWeights unless the adapter's tensors are LoRA factors of rank ``rank``
    (at most ``max_rank``, the engine's slots) for linear weights the base model has, in shapes that
    fit them, both factors of every module present. Read from the safetensors headers alone: an
    adapter that would fail inside the engine (a shape that does not fit its slot) is refused before
    the engine sees it."""
    if rank > max_rank:
        raise IncompatibleWeights(f"{adapter_dir.name}: LoRA rank {rank} exceeds the engine's slots (max {max_rank})")
    try:
        adapter = tensor_signature(adapter_dir)
    except IncompatibleWeights:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types on a corrupt header
        raise IncompatibleWeights(f"{adapter_dir.name}: unreadable safetensors ({type(exc).__name__}: {exc})") from None
    base = base_signature if base_signature is not None else tensor_signature(base_dir)
    factors: dict[str, set[str]] = {}
    for name, (shape, dtype) in sorted(adapter.items()):
        target = lora_tensor_target(name)
        if target is None:
            raise IncompatibleWeights(f"{adapter_dir.name}: {name} is not a LoRA factor (lora_A / lora_B)")
        weight, factor = target
        if weight not in base:
            raise IncompatibleWeights(f"{adapter_dir.name}: {name} targets {weight}, which the base model lacks")
        if dtype not in ("F32", "F16", "BF16"):
            raise IncompatibleWeights(f"{adapter_dir.name}: {name} has dtype {dtype}, not a float")
        problem = lora_shape_problem(factor, shape, base[weight][0], rank)
        if problem:
            raise IncompatibleWeights(f"{adapter_dir.name}: {name}: {problem}")
        factors.setdefault(weight, set()).add(factor)
    if not factors:
        raise IncompatibleWeights(f"{adapter_dir.name}: the adapter has no LoRA tensors")
    lone = sorted(weight for weight, have in factors.items() if have != {"A", "B"})
    if lone:
        raise IncompatibleWeights(f"{adapter_dir.name}: only one LoRA factor for {lone[0]}")
