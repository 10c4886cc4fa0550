"""safetensors files written and read in one pass over their bytes, hashed on the way.

The full-weight publish path moves every byte of a model twice at most: the trainer writes the file
once (hashing the same bytes from memory while the file is flushed, so the store never reads the
file back for its manifest), and a replica reads it once (into one buffer, hashed, then the tensors are views of that
buffer: the bytes checked are the bytes loaded, with no private copy on disk).

    digest = write_safetensors(path, model.state_dict(), "blake3")   # (hex, bytes), file fsynced
    buf = read_verified(path, digest.hex, digest.bytes, "blake3")    # CorruptFile if it differs
    tensors = tensors_from_buffer(buf)                               # name -> view into buf

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N,
N bytes of JSON header (``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{str: str}}``, padded with spaces to a multiple of 8), then the tensors' bytes back to back in the
order of their offsets. Tensors are written widest element first (as safetensors itself orders
them), so that every tensor starts at a multiple of its element size and reads back as a view.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.durable_files import HASH_CHUNK, new_digest

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""safetensors dtype names of the tensors this module reads and writes."""
NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 100 << 20
"""A header longer than this is refused (safetensors' own limit)."""


class SafetensorsError(ValueError):
    """A safetensors buffer whose header does not describe its bytes."""


class CorruptFile(ValueError):
    """A file whose size or digest is not the expected one."""


def written_dtype(t: torch.Tensor, cast: torch.dtype | None) -> torch.dtype:
    """The dtype ``t`` is written as: ``cast`` for floating-point tensors (as ``Module.to(cast)``
    converts them), its own otherwise."""
    return cast if cast is not None and t.is_floating_point() else t.dtype


def header_bytes(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, cast: torch.dtype | None = None
) -> bytes:
    """The length prefix and JSON header of ``tensors``, laid out in ``layout`` order."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in layout(tensors, cast):
        t = tensors[name]
        dtype = written_dtype(t, cast)
        if dtype not in NAMES:
            raise SafetensorsError(f"{name}: dtype {dtype} has no safetensors name")
        size = t.numel() * _itemsize(dtype)
        header[name] = {"dtype": NAMES[dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def layout(tensors: Mapping[str, torch.Tensor], cast: torch.dtype | None = None) -> list[str]:
    """The order tensors are written in: widest element first, then by name. With a header padded
    to 8 bytes, every tensor then starts at a multiple of its own element size."""
    return sorted(tensors, key=lambda name: (-_itemsize(written_dtype(tensors[name], cast)), name))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def write_safetensors(
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    algorithm: str,
    metadata: Mapping[str, str] | None = None,
    cast: torch.dtype | None = None,
) -> tuple[str, int]:
    """Write ``tensors`` (views sharing storage are written as separate tensors; floating-point ones
    as ``cast`` when given, one tensor converted at a time) to ``path`` as one safetensors file,
    fsynced, and return (hex digest under ``algorithm``, bytes). The file is never read back: its
    bytes are hashed from the same memory they were written from, while the kernel flushes them to
    disk (the fsync waits on the device; the hash needs the CPU: together they take about as long
    as the fsync alone, where hashing inline before each write added its full time on a busy CPU).
    The tensors must not change until it returns."""
    head = header_bytes(tensors, metadata, cast)
    digest = new_digest(algorithm)
    size = 0
    with open(path, "wb") as f:
        for chunk in _chunks(head, tensors, cast):
            f.write(chunk)
            size += len(chunk)
        f.flush()
        flushed: list[BaseException] = []

        def fsync() -> None:
            try:
                os.fsync(f.fileno())
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread below
                flushed.append(exc)

        syncing = threading.Thread(target=fsync, name="fsync-weights")
        syncing.start()
        try:
            for chunk in _chunks(head, tensors, cast):
                digest.update(chunk)
        finally:
            syncing.join()
        if flushed:
            raise flushed[0]
    return digest.hexdigest(), size


def _chunks(head: bytes, tensors: Mapping[str, torch.Tensor], cast: torch.dtype | None) -> Any:
    yield head
    for name in layout(tensors, cast):
        t = tensors[name].detach()
        t = t.to(device="cpu", dtype=written_dtype(t, cast))
        flat = t.contiguous().reshape(-1).view(torch.uint8).numpy()
        for start in range(0, len(flat), HASH_CHUNK):
            yield flat[start : start + HASH_CHUNK].data


def read_verified(path: Path, expected_hex: str, expected_bytes: int, algorithm: str) -> np.ndarray:
    """The bytes of ``path`` in one buffer (read once, not zero-filled first), checked against the
    expected size and digest: CorruptFile names the difference. The bytes returned are the bytes
    hashed: nothing rereads the file. A thread reads while this one hashes what has arrived (the
    read waits on the device when the file is not in the page cache; the hash needs the CPU)."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if size != expected_bytes:
            raise CorruptFile(f"{path.name} has {size} bytes, the manifest says {expected_bytes}")
        buf = np.empty(size, dtype=np.uint8)
        view = buf.data
        progress = threading.Condition()
        state: dict[str, Any] = {"read": 0, "error": None, "done": False}

        def read() -> None:
            try:
                done = 0
                while done < size:
                    n = f.readinto(view[done : done + HASH_CHUNK])
                    if not n:
                        raise CorruptFile(f"{path.name} ended after {done} of {size} bytes")
                    done += n
                    with progress:
                        state["read"] = done
                        progress.notify()
                if f.read(1):
                    raise CorruptFile(f"{path.name} grew while it was read")
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread below
                state["error"] = exc
            finally:
                with progress:
                    state["done"] = True
                    progress.notify()

        reader = threading.Thread(target=read, name="read-weights")
        reader.start()
        digest = new_digest(algorithm)
        hashed = 0
        try:
            while True:
                with progress:
                    while state["read"] <= hashed and not state["done"]:
                        progress.wait()
                    available, finished = state["read"], state["done"]
                if available > hashed:
                    digest.update(view[hashed:available])
                    hashed = available
                elif finished:
                    break
        finally:
            reader.join()
        if state["error"] is not None:
            raise state["error"]
    if digest.hexdigest() != expected_hex:
        raise CorruptFile(f"{path.name} does not match its {algorithm} digest in the manifest")
    return buf


def tensors_from_buffer(buf: np.ndarray) -> dict[str, torch.Tensor]:
    """name -> tensor of a safetensors file's bytes, each a view into ``buf`` (copied only where a
    tensor does not start at a multiple of its element size). SafetensorsError unless the header
    is JSON naming known dtypes, shapes whose sizes match the offsets, and offsets that tile the
    data exactly, in order, without gaps or overlaps."""
    if len(buf) < 8:
        raise SafetensorsError("shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", buf[:8].tobytes())
    if n > MAX_HEADER_BYTES or 8 + n > len(buf):
        raise SafetensorsError(f"header length {n} does not fit the {len(buf)} bytes")
    try:
        header = json.loads(buf[8 : 8 + n].tobytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise SafetensorsError("header is not a JSON object")
    header.pop("__metadata__", None)
    data = torch.from_numpy(buf[8 + n :])
    entries = []
    for name, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = [int(d) for d in entry["shape"]]
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{name}: not a tensor entry with a known dtype: {entry!r}") from None
        if any(d < 0 for d in shape):
            raise SafetensorsError(f"{name}: negative dimension in {shape}")
        itemsize = _itemsize(dtype)
        if end - begin != math.prod(shape) * itemsize:
            raise SafetensorsError(f"{name}: {end - begin} bytes for shape {shape} of {entry['dtype']}")
        entries.append((begin, end, name, dtype, shape))
    entries.sort()
    position = 0
    tensors: dict[str, torch.Tensor] = {}
    for begin, end, name, dtype, shape in entries:
        if begin != position:
            raise SafetensorsError(f"{name}: starts at byte {begin}, the previous tensor ended at {position}")
        raw = data[begin:end]
        if begin % _itemsize(dtype):
            raw = raw.clone()  # not aligned to its element size: a view of another dtype is refused
        tensors[name] = raw.view(dtype).reshape(shape)
        position = end
    if position != len(data):
        raise SafetensorsError(f"the tensors cover {position} of the {len(data)} data bytes")
    return tensors
