"""Retention: the rule as a pure function (what is kept and why), then the sweeper on a real model
store: pointers, announcements, rollback targets, pins, adapter bases, the last N and the grace age
are kept, the rest removed with the bytes counted; a store it cannot read whole loses nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.config import ConfigError, ModelStoreConfig, load_config
from shared.model_store import ModelStore
from shared.retention import (
    BYTES_HELD,
    VERSIONS_REMOVED,
    RetentionRule,
    RetentionSweeper,
    StoredVersion,
    kept_versions,
    pin_versions,
    read_pins,
    stale_temporaries,
    versions_to_remove,
)

DAY = 86_400.0
NOW = 100 * DAY


def chain(n: int, line: str = "policy", age: float = DAY) -> list[StoredVersion]:
    """``n`` versions, each the parent of the next, all published ``age`` seconds ago."""
    return [
        StoredVersion(f"{line}-{i:04d}", NOW - age, f"{line}-{i - 1:04d}" if i > 1 else None, None, 100)
        for i in range(1, n + 1)
    ]


def test_only_the_last_n_are_kept_when_nothing_else_matters():
    rule = RetentionRule(keep_last=3, keep_ancestors=0, grace_s=3600)
    assert versions_to_remove(chain(6), {}, [], rule, NOW) == ["policy-0001", "policy-0002", "policy-0003"]


def test_pointers_their_rollback_targets_and_pins_are_kept():
    rule = RetentionRule(keep_last=1, keep_ancestors=2, grace_s=3600)
    protected = {"policy-0006": "policy.current", "policy-0001": "pinned by trainer: KL reference"}
    kept = kept_versions(chain(10), protected, ["policy-0006"], rule, NOW)
    assert kept == {
        "policy-0006": "policy.current",
        "policy-0001": "pinned by trainer: KL reference",
        "policy-0005": "rollback target 1 behind policy-0006",
        "policy-0004": "rollback target 2 behind policy-0006",
        "policy-0010": "among the last 1",
    }
    assert versions_to_remove(chain(10), protected, ["policy-0006"], rule, NOW) == [
        "policy-0002",
        "policy-0003",
        "policy-0007",
        "policy-0008",
        "policy-0009",
    ]


def test_a_version_younger_than_the_grace_age_is_never_removed():
    rule = RetentionRule(keep_last=1, keep_ancestors=0, grace_s=3600)
    versions = [*chain(3), StoredVersion("policy-0004", NOW - 10, "policy-0003"), StoredVersion("policy-0005", NOW)]
    assert versions_to_remove(versions, {}, [], rule, NOW) == ["policy-0001", "policy-0002", "policy-0003"]


def test_the_base_of_a_kept_adapter_is_kept_and_of_a_removed_one_is_not():
    rule = RetentionRule(keep_last=1, keep_ancestors=0, grace_s=3600)
    versions = [
        StoredVersion("policy-0001", NOW - DAY),
        StoredVersion("policy-0002", NOW - DAY),
        StoredVersion("policy-0003", NOW - DAY, base_version="policy-0002"),
        StoredVersion("policy-0004", NOW - DAY, base_version="policy-0001"),
    ]
    assert versions_to_remove(versions, {}, [], rule, NOW) == ["policy-0002", "policy-0003"]


def test_protected_names_that_are_not_in_the_store_change_nothing():
    rule = RetentionRule(keep_last=1, keep_ancestors=3, grace_s=3600)
    assert versions_to_remove(chain(2), {"policy-0042": "pinned"}, ["policy-0042"], rule, NOW) == ["policy-0001"]


def test_retention_settings_are_checked_with_their_variable_names():
    with pytest.raises(ConfigError) as err:
        load_config(
            ModelStoreConfig,
            {"RLHF_MODEL_STORE_KEEP_LAST": "0", "RLHF_MODEL_STORE_RETENTION_GRACE_S": "5"},
        )
    assert "RLHF_MODEL_STORE_KEEP_LAST" in str(err.value) and "RLHF_MODEL_STORE_RETENTION_GRACE_S" in str(err.value)
    cfg = load_config(ModelStoreConfig, {"RLHF_MODEL_STORE_RETENTION_INTERVAL_S": "0"})
    assert RetentionRule.of(cfg) == RetentionRule(5, 2, 3600.0) and cfg.retention_interval_s == 0


# --- the sweeper on a real store ---------------------------------------------------------------------


def publish(store: ModelStore, line: str, n: int, tmp_path: Path, *, adapter_of: str | None = None) -> str:
    src = tmp_path / f"src-{line}-{n}"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"w" * 1000)
    extra = {"adapter": {"kind": "lora", "base_version": adapter_of}} if adapter_of else {}
    parent = store.latest(line)
    return store.publish(line, src, parent=parent, extra=extra).version


def age_all(store: ModelStore, seconds: float) -> None:
    """Make every version look published ``seconds`` earlier (rewrites created_at in the manifests)."""
    for path in store.root.glob("*-[0-9][0-9][0-9][0-9]/manifest.json"):
        doc = json.loads(path.read_bytes())
        doc["created_at"] -= seconds
        path.write_text(json.dumps(doc))


def test_the_sweeper_removes_what_no_one_needs_and_reports_the_bytes(tmp_path):
    store = ModelStore(tmp_path / "store")
    versions = [publish(store, "policy", n, tmp_path) for n in range(1, 11)]
    store.set_current("policy", "policy-0006")  # a rollback: 0007..0010 are newer than current
    store.set_pointer("policy", "canary", "policy-0009")
    store.write_line_record("policy", "announced", {"version": "policy-0005"})
    pin_versions(store, "policy", "trainer", {"policy-0001": "KL reference"})
    age_all(store, 2 * DAY)
    sweeper = RetentionSweeper(store, "policy", RetentionRule(keep_last=2, keep_ancestors=1, grace_s=3600))
    before = VERSIONS_REMOVED.labels("policy")._value.get()
    removed = sweeper.sweep()
    # kept: 0001 pin, 0005 announced (+0004 behind it), 0006 current, 0009 canary (+0008), 0009-0010 last 2
    assert removed == ["policy-0002", "policy-0003", "policy-0007"]
    assert store.versions("policy") == [v for v in versions if v not in removed]
    assert VERSIONS_REMOVED.labels("policy")._value.get() == before + 3
    held = sum(store.version_bytes(v) for v in store.versions("policy"))
    assert BYTES_HELD.labels("policy")._value.get() == held > 7 * 1000
    assert sweeper.sweep() == []  # idempotent


def test_a_new_version_and_an_adapters_base_survive_and_other_lines_are_untouched(tmp_path):
    store = ModelStore(tmp_path / "store")
    for n in range(1, 4):
        publish(store, "policy", n, tmp_path)
    publish(store, "rm", 1, tmp_path)
    publish(store, "policy", 4, tmp_path, adapter_of="policy-0001")
    age_all(store, 2 * DAY)
    publish(store, "policy", 5, tmp_path)  # just published: inside the grace age
    sweeper = RetentionSweeper(store, "policy", RetentionRule(keep_last=1, keep_ancestors=0, grace_s=3600))
    store.set_current("policy", "policy-0004")
    assert sweeper.sweep() == ["policy-0002", "policy-0003"]
    assert store.versions("policy") == ["policy-0001", "policy-0004", "policy-0005"]
    assert store.versions("rm") == ["rm-0001"]


def test_a_malformed_pin_record_stops_the_sweep_before_anything_is_removed(tmp_path):
    store = ModelStore(tmp_path / "store")
    for n in range(1, 5):
        publish(store, "policy", n, tmp_path)
    age_all(store, 2 * DAY)
    (store.root / "policy.pinned").write_text('{"pins": ["policy-0001"]}')
    sweeper = RetentionSweeper(store, "policy", RetentionRule(keep_last=1, keep_ancestors=0, grace_s=3600))
    assert sweeper.sweep() == [] and len(store.versions("policy")) == 4
    (store.root / "policy.pinned").write_text('{"pins": {"policy-0001": "the SFT model, for audits"}}')
    assert read_pins(store, "policy") == {"policy-0001": "pinned by operator: the SFT model, for audits"}
    assert sweeper.sweep() == ["policy-0002", "policy-0003"]


def test_the_sweeper_thread_sweeps_at_start_and_stops(tmp_path):
    store = ModelStore(tmp_path / "store")
    for n in range(1, 4):
        publish(store, "rm", n, tmp_path)
    age_all(store, 2 * DAY)
    sweeper = RetentionSweeper(store, "rm", RetentionRule(keep_last=1, keep_ancestors=0, grace_s=3600))
    sweeper.start(interval_s=3600)
    try:
        for _ in range(100):
            if store.versions("rm") == ["rm-0003"]:
                break
            sweeper._stop.wait(0.05)
        assert store.versions("rm") == ["rm-0003"]
    finally:
        sweeper.stop()
    assert sweeper._thread is not None and not sweeper._thread.is_alive()


def test_only_temporaries_untouched_for_the_grace_age_are_stale():
    entries = {".tmp-a": NOW - 3600, ".tmp-b.current": NOW - 3599, ".tmp-c.removed-policy-0002": NOW - DAY}
    entries["policy-0001"] = NOW - DAY  # a version, never a temporary
    assert stale_temporaries(entries, 3600, NOW) == [".tmp-a", ".tmp-c.removed-policy-0002"]


def test_a_sweep_deletes_a_crashed_publishs_leftovers_but_not_one_still_writing(tmp_path):
    import os
    import time

    store = ModelStore(tmp_path / "store")
    publish(store, "policy", 1, tmp_path)
    crashed = store.root / ".tmp-dead"
    (crashed / "sub").mkdir(parents=True)
    (crashed / "sub" / "model.safetensors").write_bytes(b"x" * 5000)
    record = store.root / ".tmp-dead2.current"
    record.write_text("{}")
    writing = store.root / ".tmp-live"
    writing.mkdir()
    (writing / "model.safetensors").write_bytes(b"y" * 10)
    old = time.time() - 2 * 3600
    for p in (crashed, crashed / "sub", crashed / "sub" / "model.safetensors", record, writing):
        os.utime(p, (old, old))  # the live one's file was just written: its newest time is now
    sweeper = RetentionSweeper(store, "policy", RetentionRule(keep_last=5, keep_ancestors=1, grace_s=3600))
    assert sweeper.sweep() == []
    assert not crashed.exists() and not record.exists()
    assert (writing / "model.safetensors").read_bytes() == b"y" * 10
    assert store.versions("policy") == ["policy-0001"]
