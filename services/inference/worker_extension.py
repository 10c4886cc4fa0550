"""What runs inside vLLM's model worker (the process that holds the weights): full-weight versions
read from the model store once, checked, and loaded from the bytes that were checked.

A full-weight swap used to copy the version into a private directory (one read of the store, one
write) and then have vLLM read the copy (a second read): three passes over every byte. Now the
worker reads each weight file of the version straight from the store into one buffer, hashing it
as it reads (``read_verified``), and loads the tensors as views of that buffer: one read, and the
bytes loaded are the bytes whose digest matched the signed manifest, whatever happens to the file
afterwards. Nothing is written.

It runs in two steps so that users are not held while the bytes are read:

    stage(token, files)       # returns at once; a thread reads + hashes + parses (engine keeps stepping)
    staged(token)             # {"done": ..., "error": ..., "signature": ...}: poll until done
    load_staged(token, sig)   # (engine paused by the caller) compare the signature, copy into the model

``services/inference/engine.py`` names this class as vLLM's ``worker_extension_cls``, which vLLM
mixes into its Worker, so the methods are called by name through ``collective_rpc``. At most one
version is staged at a time (a new stage drops the previous one): the bound is one model's bytes,
shown by the service as ``rlhf_inference_staged_weight_bytes``.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shared.models.safetensors_io import NAMES, CorruptFile, SafetensorsError, read_verified, tensors_from_buffer

Signature = dict[str, tuple[tuple[int, ...], str]]
"""Tensor name -> (shape, safetensors dtype name), as services/inference/weights.py's tensor_signature."""


class WeightsRefused(Exception):
    """Staged weights that must not be loaded; ``reason`` is the refusal's metric label."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class StagedWeights:
    """One version's weight files read, checked and parsed in memory (the buffers are kept alive by
    the tensors that view them)."""

    token: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    error: WeightsRefused | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def signature(self) -> Signature:
        return {name: (tuple(t.shape), NAMES[t.dtype]) for name, t in self.tensors.items()}


def read_weight_files(files: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Every tensor of ``files`` (each ``{"path", "hex", "bytes", "algorithm"}``: a weight file of
    a version and its digest in the signed manifest), read once and checked. WeightsRefused
    ("corrupt") when a file differs from its digest, is not safetensors, or repeats a tensor name."""
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        path = Path(f["path"])
        try:
            buf = read_verified(path, str(f["hex"]), int(f["bytes"]), str(f["algorithm"]))
            part = tensors_from_buffer(buf)
        except (CorruptFile, SafetensorsError, OSError) as exc:
            raise WeightsRefused("corrupt", f"{path.name}: {exc}") from None
        repeated = part.keys() & tensors.keys()
        if repeated:
            raise WeightsRefused("corrupt", f"{path.name}: tensor {sorted(repeated)[0]} is in another file too")
        tensors.update(part)
    return tensors


def check_signature(signature: Signature, expected: Signature) -> None:
    """WeightsRefused ("incompatible") naming the first tensor whose name, shape or dtype differs
    from the weights the engine holds: an in-place reload needs exactly the same tensors."""
    if signature.keys() != expected.keys():
        diff = sorted(signature.keys() ^ expected.keys())[:3]
        raise WeightsRefused("incompatible", f"tensor names differ from the served weights (e.g. {diff})")
    for name, want in expected.items():
        if tuple(signature[name]) != tuple(want):
            raise WeightsRefused("incompatible", f"tensor {name} is {signature[name]}, served is {want}")


def signature_from_json(text: str) -> Signature:
    return {name: (tuple(shape), str(dtype)) for name, (shape, dtype) in json.loads(text).items()}


def signature_to_json(signature: Signature) -> str:
    return json.dumps({name: [list(shape), dtype] for name, (shape, dtype) in signature.items()})


class VerifiedWeightsWorker:
    """Mixed into vLLM's Worker (``worker_extension_cls``); called through ``collective_rpc``. Every
    method returns plain JSON-able values (the call crosses a process boundary)."""

    _rlhf_staged: StagedWeights | None = None

    def rlhf_stage(self, token: str, files: list[dict[str, Any]]) -> None:
        """Start reading ``files`` in a thread (dropping anything staged before); returns at once."""
        staged = StagedWeights(token)
        self._rlhf_staged = staged

        def read() -> None:
            try:
                staged.tensors = read_weight_files(files)
            except WeightsRefused as exc:
                staged.error = exc
            except Exception as exc:  # noqa: BLE001 - reported to the caller, who refuses the version
                staged.error = WeightsRefused("corrupt", f"{type(exc).__name__}: {exc}")
            finally:
                staged.done.set()

        threading.Thread(target=read, name="rlhf-stage-weights", daemon=True).start()

    def rlhf_staged(self, token: str) -> dict[str, Any]:
        """Whether ``token``'s read has finished, and its refusal if any."""
        staged = self._rlhf_staged
        if staged is None or staged.token != token:
            return {"done": True, "reason": "lost", "error": f"weights {token} are not staged here"}
        if not staged.done.is_set():
            return {"done": False}
        if staged.error is not None:
            return {"done": True, "reason": staged.error.reason, "error": str(staged.error)}
        return {"done": True, "signature": signature_to_json(staged.signature())}

    def rlhf_add_lora(self, name: str, slot_id: int, path: str) -> dict[str, Any]:
        """vLLM's ``add_lora`` for the adapter at ``path``, timed in here. The engine calls it between
        two steps, in its own loop, so ``held_s`` is how long every other request of the engine
        waited for this adapter: the swap's pause, measured where it happens rather than from the
        gaps between tokens that a client sees (which vary by a step's length on a busy CPU).
        ``listed``: the worker's LoRA cache holds ``slot_id`` afterwards (asked here, in the same call,
        rather than in another round trip through the engine's loop, which waits a step on a busy
        engine). ``{"added": bool, "listed": bool, "held_s": float}``."""
        from vllm.lora.request import LoRARequest

        started = time.perf_counter()
        added = self.add_lora(LoRARequest(lora_name=name, lora_int_id=slot_id, lora_path=path))  # type: ignore[attr-defined]  # vLLM's Worker
        listed = slot_id in self.list_loras()  # type: ignore[attr-defined]  # vLLM's Worker
        return {"added": bool(added), "listed": listed, "held_s": time.perf_counter() - started}

    def rlhf_load_staged(self, token: str, expected: str) -> dict[str, Any]:
        """Load ``token``'s weights in place if their tensors match ``expected`` (the served
        weights' signature, JSON); the staged buffers are released either way. ``{"loaded": True,
        "load_s": seconds vLLM's reload took in here}`` or ``{"loaded": False, "reason", "error"}``:
        a refusal leaves the model's weights untouched."""
        staged, self._rlhf_staged = self._rlhf_staged, None
        if staged is None or staged.token != token or not staged.done.is_set():
            return {"loaded": False, "reason": "lost", "error": f"weights {token} are not staged here"}
        try:
            if staged.error is not None:
                raise staged.error
            check_signature(staged.signature(), signature_from_json(expected))
        except WeightsRefused as exc:
            return {"loaded": False, "reason": exc.reason, "error": str(exc)}
        tensors, staged.tensors = staged.tensors, {}
        started = time.perf_counter()
        self.reload_weights(weights_iterator=iter(tensors.items()))  # type: ignore[attr-defined]  # vLLM's Worker
        return {"loaded": True, "load_s": time.perf_counter() - started}
