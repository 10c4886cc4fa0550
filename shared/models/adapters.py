"""Adapter versions: a policy version that holds a LoRA adapter instead of full weights.

THE ADAPTER FORMAT CONTRACT (the trainer publishes it, inference serves it):

An adapter version is a normal store version (shared/model_store.py: manifest, a digest per file,
optional signature) whose files are PEFT's ``save_pretrained(safe_serialization=True)`` output::

    policy-0007/  manifest.json  manifest.sig  adapter_model.safetensors  adapter_config.json

(nothing else is required; a tokenizer beside them is allowed and ignored) and whose manifest's
``extra`` has::

    "adapter": {"kind": "lora", "base_version": "policy-0003", "rank": 8, "alpha": 16.0,
                "target_modules": ["q_proj", "v_proj"]}

``base_version`` is a full-weight version of the same line (itself not an adapter) present in the
store; a loader checks that before it loads the adapter (``adapter_problem(manifest, store=...)``).
A version without ``extra["adapter"]`` is a full-weight version (``adapter_info`` returns None).

    info = adapter_info(manifest)          # None: full weights; AdapterInfo: an adapter
    problem = adapter_problem(manifest, store=store)   # None when it may be loaded
    extra = {"adapter": adapter_extra(base_version="policy-0003", rank=8, alpha=16.0,
                                      target_modules=("q_proj", "v_proj"))}

Nothing here imports torch or peft: a service that only checks versions needs neither.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.model_store import PICKLE_SUFFIXES, InvalidNameError, ModelStoreError, UnknownVersionError, version_number

if TYPE_CHECKING:
    from shared.model_store import Manifest, ModelStore

EXTRA_KEY = "adapter"
"""The key of the manifest's ``extra`` that makes a version an adapter version."""
LORA = "lora"
ADAPTER_KINDS = frozenset({LORA})
"""Adapter kinds a loader knows; any other kind is refused (``adapter_problem``)."""
ADAPTER_WEIGHTS = "adapter_model.safetensors"
"""PEFT's adapter weights file (``save_pretrained(safe_serialization=True)``)."""
ADAPTER_CONFIG = "adapter_config.json"
"""PEFT's adapter config (``peft_type``, ``r``, ``lora_alpha``, ``target_modules``, ...)."""
ADAPTER_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG)
"""The files every adapter version has."""


class AdapterError(ValueError):
    """A manifest's ``extra["adapter"]`` is malformed; the message names the field."""


@dataclass(frozen=True)
class AdapterInfo:
    """``extra["adapter"]`` of an adapter version's manifest, parsed."""

    kind: str
    """The adapter kind: ``lora`` (the only one known; see ADAPTER_KINDS)."""
    base_version: str
    """The full-weight version of the same line the adapter was trained on (and is applied to)."""
    rank: int
    """LoRA rank r (at least 1)."""
    alpha: float
    """LoRA alpha: the update is scaled by alpha / r."""
    target_modules: tuple[str, ...]
    """Names of the modules the adapter wraps (e.g. q_proj, v_proj), sorted."""

    @property
    def scaling(self) -> float:
        """alpha / rank: the factor of LoRA's update ``W x + (alpha / r) B A x``."""
        return self.alpha / self.rank

    def to_extra(self) -> dict[str, Any]:
        """The JSON object stored as the manifest's ``extra["adapter"]``."""
        return {
            "kind": self.kind,
            "base_version": self.base_version,
            "rank": self.rank,
            "alpha": self.alpha,
            "target_modules": list(self.target_modules),
        }


def adapter_extra(
    *, base_version: str, rank: int, alpha: float, target_modules: Iterable[str], kind: str = LORA
) -> dict[str, Any]:
    """The manifest's ``extra["adapter"]`` for an adapter of ``base_version`` (checked: AdapterError
    when a field is not what ``adapter_info`` accepts)."""
    doc = AdapterInfo(kind, base_version, rank, float(alpha), tuple(sorted(target_modules))).to_extra()
    parse_adapter_extra(doc)
    return doc


def parse_adapter_extra(doc: Any) -> AdapterInfo:
    """``extra["adapter"]`` parsed and checked field by field; AdapterError naming the bad field.

    Rules: an object; ``kind`` a known kind; ``base_version`` a version name (``<line>-<NNNN>``);
    ``rank`` an integer >= 1; ``alpha`` a finite number > 0; ``target_modules`` a non-empty list of
    non-empty strings.
    """
    if not isinstance(doc, Mapping):
        raise AdapterError(f"extra.{EXTRA_KEY} must be a JSON object, got {type(doc).__name__}")
    kind = doc.get("kind")
    if kind not in ADAPTER_KINDS:
        raise AdapterError(f"extra.{EXTRA_KEY}.kind {kind!r} is unknown: expected one of {sorted(ADAPTER_KINDS)}")
    base = doc.get("base_version")
    try:
        version_number(base if isinstance(base, str) else "")
    except InvalidNameError:
        raise AdapterError(f"extra.{EXTRA_KEY}.base_version {base!r} is not a version name (<line>-<NNNN>)") from None
    rank = doc.get("rank")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise AdapterError(f"extra.{EXTRA_KEY}.rank must be an integer >= 1, got {rank!r}")
    alpha = doc.get("alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < float("inf"):
        raise AdapterError(f"extra.{EXTRA_KEY}.alpha must be a finite number > 0, got {alpha!r}")
    modules = doc.get("target_modules")
    if not isinstance(modules, list) or not modules or not all(isinstance(m, str) and m for m in modules):
        raise AdapterError(
            f"extra.{EXTRA_KEY}.target_modules must be a non-empty list of module names, got {modules!r}"
        )
    return AdapterInfo(str(kind), str(base), int(rank), float(alpha), tuple(sorted(modules)))


def adapter_info(manifest: Manifest) -> AdapterInfo | None:
    """The adapter a version holds, or None when it is a full-weight version (no ``extra["adapter"]``).

    AdapterError when ``extra["adapter"]`` is present but malformed (``adapter_problem`` reports it
    as a string instead)."""
    if EXTRA_KEY not in manifest.extra:
        return None
    return parse_adapter_extra(manifest.extra[EXTRA_KEY])


def adapter_files_problem(files: Iterable[str]) -> str | None:
    """Why a set of version files (POSIX paths relative to the version directory) is not an
    adapter version's, or None: every file of ADAPTER_FILES at the top level, no pickle file."""
    names = set(files)
    pickled = sorted(rel for rel in names if Path(rel).suffix.lower() in PICKLE_SUFFIXES)
    if pickled:
        return f"pickle-based files are not allowed in an adapter version: {', '.join(pickled)}"
    missing = [name for name in ADAPTER_FILES if name not in names]
    if missing:
        return f"an adapter version must have {', '.join(ADAPTER_FILES)}; missing {', '.join(missing)}"
    return None


def adapter_config_problem(config: Any, info: AdapterInfo) -> str | None:
    """Why PEFT's ``adapter_config.json`` (parsed) disagrees with the manifest's adapter, or None.

    Checked: ``peft_type`` is LORA, ``r`` == rank, ``lora_alpha`` == alpha, and the set of
    ``target_modules`` equals the manifest's (PEFT may write a list or a regex string; a string
    must equal the single listed name)."""
    if not isinstance(config, Mapping):
        return f"{ADAPTER_CONFIG} is not a JSON object"
    if str(config.get("peft_type", "")).upper() != info.kind.upper():
        return f"{ADAPTER_CONFIG}: peft_type {config.get('peft_type')!r} is not {info.kind.upper()}"
    if config.get("r") != info.rank:
        return f"{ADAPTER_CONFIG}: r={config.get('r')!r} but the manifest says rank {info.rank}"
    alpha = config.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or float(alpha) != info.alpha:
        return f"{ADAPTER_CONFIG}: lora_alpha={alpha!r} but the manifest says alpha {info.alpha}"
    modules = config.get("target_modules")
    listed = (modules,) if isinstance(modules, str) else tuple(modules) if isinstance(modules, list) else None
    if listed is None or set(listed) != set(info.target_modules):
        return f"{ADAPTER_CONFIG}: target_modules {modules!r} but the manifest says {list(info.target_modules)}"
    return None


def adapter_problem(
    manifest: Manifest, *, store: ModelStore | None = None, version_dir: Path | None = None
) -> str | None:
    """Why the adapter version ``manifest`` describes may not be loaded, or None when it may.

    Always checked: ``extra["adapter"]`` parses (known kind, fields well formed; see
    ``parse_adapter_extra``), the manifest lists ADAPTER_FILES and no pickle file, and
    ``base_version`` is an earlier version of the manifest's own line. With ``store``: the base
    version is in the store and is a full-weight version (its manifest has no adapter). With
    ``version_dir`` (the directory about to be loaded, already verified against the manifest): its
    ``adapter_config.json`` agrees with the manifest (``adapter_config_problem``).

    A full-weight manifest (no ``extra["adapter"]``) is reported as a problem too: the caller asked
    about an adapter.
    """
    try:
        info = adapter_info(manifest)
    except AdapterError as exc:
        return f"{manifest.version}: {exc}"
    if info is None:
        return f"{manifest.version} is not an adapter version (its manifest has no extra.{EXTRA_KEY})"
    problem = adapter_files_problem(manifest.files)
    if problem:
        return f"{manifest.version}: {problem}"
    base_line = info.base_version.rsplit("-", 1)[0]
    if base_line != manifest.line:
        return f"{manifest.version}: base version {info.base_version} is not of line {manifest.line}"
    if version_number(info.base_version) >= version_number(manifest.version):
        return f"{manifest.version}: base version {info.base_version} is not an earlier version of the line"
    if store is not None:
        try:
            base_manifest = store.manifest(info.base_version)
        except UnknownVersionError:
            return f"{manifest.version}: base version {info.base_version} is not in the store"
        except ModelStoreError as exc:
            return f"{manifest.version}: base version {info.base_version} is unreadable: {exc}"
        if EXTRA_KEY in base_manifest.extra:
            return f"{manifest.version}: base version {info.base_version} is itself an adapter, not full weights"
    if version_dir is not None:
        try:
            config = json.loads((Path(version_dir) / ADAPTER_CONFIG).read_bytes())
        except (OSError, ValueError) as exc:
            return f"{manifest.version}: {ADAPTER_CONFIG} is unreadable: {exc}"
        problem = adapter_config_problem(config, info)
        if problem:
            return f"{manifest.version}: {problem}"
    return None
