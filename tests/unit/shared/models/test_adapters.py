"""shared/models/adapters.py: the adapter format contract. Parsing ``extra["adapter"]``, the
problems a loader must refuse (unknown kind, missing or foreign base, an adapter as base, no
safetensors, pickle files, a config that disagrees with the manifest), on a real temp store with
stand-in files (the format is checked, not PEFT's numbers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shared.model_store import Manifest, ModelStore
from shared.models.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterError,
    AdapterInfo,
    adapter_config_problem,
    adapter_extra,
    adapter_info,
    adapter_problem,
    parse_adapter_extra,
)

GOOD = {"kind": "lora", "base_version": "policy-0001", "rank": 4, "alpha": 8.0, "target_modules": ["v_proj", "q_proj"]}


def peft_config(rank: int = 4, alpha: float = 8.0, modules: Any = ("q_proj", "v_proj")) -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": list(modules) if not isinstance(modules, str) else modules,
    }


def full_dir(path: Path) -> Path:
    path.mkdir()
    (path / "model.safetensors").write_bytes(b"full weights")
    (path / "config.json").write_text("{}")
    return path


def adapter_dir(path: Path, config: dict[str, Any] | None = None) -> Path:
    path.mkdir()
    (path / ADAPTER_WEIGHTS).write_bytes(b"adapter weights")
    (path / ADAPTER_CONFIG).write_text(json.dumps(config or peft_config()))
    return path


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    store = ModelStore(tmp_path / "store")
    store.publish("policy", full_dir(tmp_path / "base"))  # policy-0001: full weights
    return store


def test_full_weight_version_has_no_adapter(store: ModelStore) -> None:
    assert adapter_info(store.manifest("policy-0001")) is None
    assert "not an adapter version" in (adapter_problem(store.manifest("policy-0001"), store=store) or "")


def test_published_adapter_round_trips_and_passes(store: ModelStore, tmp_path: Path) -> None:
    extra = adapter_extra(base_version="policy-0001", rank=4, alpha=8, target_modules=["v_proj", "q_proj"])
    manifest = store.publish("policy", adapter_dir(tmp_path / "a"), parent="policy-0001", extra={"adapter": extra})
    info = adapter_info(store.manifest(manifest.version))
    assert info == AdapterInfo("lora", "policy-0001", 4, 8.0, ("q_proj", "v_proj"))
    assert info.scaling == 2.0
    assert store.manifest(manifest.version).extra["adapter"]["target_modules"] == ["q_proj", "v_proj"]
    assert adapter_problem(manifest, store=store, version_dir=store.path(manifest.version)) is None


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"kind": "ia3"}, "kind"),
        ({"base_version": "../policy-0001"}, "base_version"),
        ({"rank": 0}, "rank"),
        ({"rank": True}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"alpha": 0}, "alpha"),
        ({"alpha": "8"}, "alpha"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": "q_proj"}, "target_modules"),
        ({"target_modules": ["q_proj", ""]}, "target_modules"),
    ],
)
def test_malformed_fields_are_named(change: dict[str, Any], field: str) -> None:
    with pytest.raises(AdapterError, match=f"adapter.{field}"):
        parse_adapter_extra({**GOOD, **change})


def test_not_an_object_is_refused() -> None:
    with pytest.raises(AdapterError, match="JSON object"):
        parse_adapter_extra(["lora"])


def manifest_with(files: dict[str, Any], adapter: Any, version: str = "policy-0002") -> Manifest:
    return Manifest(version, "policy", "policy-0001", 0.0, files, {}, {"adapter": adapter})


@pytest.mark.parametrize(
    ("files", "adapter", "version", "expected"),
    [
        ([ADAPTER_WEIGHTS, ADAPTER_CONFIG], {**GOOD, "kind": "dora"}, "policy-0002", "unknown"),
        ([ADAPTER_CONFIG], GOOD, "policy-0002", f"missing {ADAPTER_WEIGHTS}"),
        ([ADAPTER_WEIGHTS], GOOD, "policy-0002", f"missing {ADAPTER_CONFIG}"),
        ([ADAPTER_WEIGHTS, ADAPTER_CONFIG, "adapter_model.bin"], GOOD, "policy-0002", "pickle"),
        ([ADAPTER_WEIGHTS, ADAPTER_CONFIG], {**GOOD, "base_version": "rm-0001"}, "policy-0002", "not of line policy"),
        ([ADAPTER_WEIGHTS, ADAPTER_CONFIG], {**GOOD, "base_version": "policy-0002"}, "policy-0002", "not an earlier"),
    ],
)
def test_adapter_problem_without_store(files: list[str], adapter: Any, version: str, expected: str) -> None:
    problem = adapter_problem(manifest_with(dict.fromkeys(files), adapter, version))
    assert problem is not None
    assert version in problem
    assert expected in problem


def test_missing_base_is_refused(store: ModelStore) -> None:
    manifest = manifest_with(dict.fromkeys([ADAPTER_WEIGHTS, ADAPTER_CONFIG]), {**GOOD, "base_version": "policy-0009"})
    manifest = Manifest("policy-0010", "policy", None, 0.0, manifest.files, {}, manifest.extra)
    assert adapter_problem(manifest) is None  # the store is what knows the base is missing
    assert "policy-0009 is not in the store" in (adapter_problem(manifest, store=store) or "")


def test_an_adapter_as_base_is_refused(store: ModelStore, tmp_path: Path) -> None:
    first = store.publish("policy", adapter_dir(tmp_path / "a"), extra={"adapter": GOOD})  # policy-0002
    manifest = manifest_with(
        dict.fromkeys([ADAPTER_WEIGHTS, ADAPTER_CONFIG]), {**GOOD, "base_version": first.version}, "policy-0003"
    )
    assert "is itself an adapter" in (adapter_problem(manifest, store=store) or "")


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (peft_config(rank=8), "r=8"),
        (peft_config(alpha=16), "lora_alpha=16"),
        (peft_config(modules=("q_proj",)), "target_modules"),
        ({**peft_config(), "peft_type": "IA3"}, "peft_type"),
    ],
)
def test_config_disagreeing_with_manifest_is_refused(
    store: ModelStore, tmp_path: Path, config: dict[str, Any], expected: str
) -> None:
    manifest = store.publish("policy", adapter_dir(tmp_path / "a", config), extra={"adapter": GOOD})
    assert adapter_problem(manifest, store=store) is None  # files not read without version_dir
    problem = adapter_problem(manifest, store=store, version_dir=store.path(manifest.version))
    assert problem is not None
    assert expected in problem


def test_config_problem_accepts_single_module_string() -> None:
    info = parse_adapter_extra({**GOOD, "target_modules": ["q_proj"]})
    assert adapter_config_problem(peft_config(modules="q_proj"), info) is None
    assert adapter_config_problem("not a dict", info) == f"{ADAPTER_CONFIG} is not a JSON object"


def test_adapter_extra_refuses_bad_values() -> None:
    with pytest.raises(AdapterError, match="rank"):
        adapter_extra(base_version="policy-0001", rank=0, alpha=8, target_modules=["q_proj"])
