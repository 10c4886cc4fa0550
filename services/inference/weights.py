"""Checks that a new policy version can be loaded in place of the served one.

In-place reload keeps the engine's model object, so the new checkpoint must have exactly the same
architecture and tensor names, shapes and dtypes. Checked from config.json and the safetensors
headers alone, before the engine is touched.
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


def tensor_signature(model_dir: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) of every tensor in the directory's safetensors files (headers only)."""
    sig: dict[str, tuple[tuple[int, ...], str]] = {}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise IncompatibleWeights(f"{model_dir.name}: no safetensors files")
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has keys(), not __iter__
                sl = f.get_slice(name)
                sig[name] = (tuple(sl.get_shape()), str(sl.get_dtype()))
    return sig


def check_compatible(served_dir: Path, new_dir: Path) -> None:
    """Raise IncompatibleWeights naming the first difference that prevents an in-place reload."""
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
    served, new = tensor_signature(served_dir), tensor_signature(new_dir)
    if served.keys() != new.keys():
        diff = sorted(served.keys() ^ new.keys())[:3]
        raise IncompatibleWeights(f"{new_dir.name}: tensor names differ (e.g. {diff})")
    for name, (shape, dtype) in served.items():
        if new[name] != (shape, dtype):
            raise IncompatibleWeights(f"{new_dir.name}: tensor {name} is {new[name]}, served is {(shape, dtype)}")
