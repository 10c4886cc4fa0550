"""CheckpointStore: a model + Adam state round-trips exactly; interrupted or corrupted checkpoints
are skipped and the previous good one is loaded; old ones are pruned; nothing is pickled."""

from __future__ import annotations

import json

import pytest
import torch

from services.trainer.checkpoint import (
    MANIFEST_FILE,
    STATE_FILE,
    TENSORS_FILE,
    CheckpointError,
    CheckpointStore,
    flatten_state,
    unflatten_state,
)


def trained_model_and_optimiser(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    for _ in range(3):
        loss = model(torch.randn(5, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt


def test_flatten_round_trip_keeps_types_keys_and_tensors():
    a = torch.arange(6.0).reshape(2, 3)
    state = {
        "w": a,
        "tied": a,
        3: {"step": torch.tensor(7.0), "betas": (0.9, 0.95)},
        "lst": [1, 2.5, None, "x", True],
        "view": a[1],
    }
    tensors, skeleton = flatten_state(state)
    json.dumps(skeleton)  # the skeleton is plain JSON
    assert len(tensors) == 3  # "tied" is stored once; a view with another offset is its own tensor
    back = unflatten_state(json.loads(json.dumps(skeleton)), tensors)
    assert set(back) == {"w", "tied", 3, "lst", "view"}
    assert torch.equal(back["w"], a) and torch.equal(back["tied"], a) and torch.equal(back["view"], a[1])
    assert back[3]["betas"] == (0.9, 0.95) and back["lst"] == [1, 2.5, None, "x", True]


def test_flatten_refuses_objects_it_cannot_store_without_pickle():
    with pytest.raises(TypeError, match="object"):
        flatten_state({"x": object()})


def test_model_and_adam_state_resume_exactly(tmp_path):
    model, opt = trained_model_and_optimiser()
    store = CheckpointStore(tmp_path)
    store.save(3, {"model": model.state_dict(), "optimizer": opt.state_dict(), "counters": {"step": 3}})

    loaded = store.load_latest()
    assert loaded is not None and loaded.step == 3 and loaded.state["counters"] == {"step": 3}
    model2, opt2 = trained_model_and_optimiser(seed=1)  # different weights and moments
    model2.load_state_dict(loaded.state["model"])
    opt2.load_state_dict(loaded.state["optimizer"])

    # One more identical step on both: resumed training equals uninterrupted training.
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (model2, opt2)):
        loss = m(x).pow(2).mean()
        o.zero_grad()
        loss.backward()
        o.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert opt2.state_dict()["param_groups"][0]["betas"] == (0.9, 0.95)


def test_interrupted_save_is_ignored_and_the_previous_checkpoint_loads(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(1, {"x": torch.ones(2)})
    store.save(2, {"x": torch.full((2,), 2.0)})
    (store.path(2) / MANIFEST_FILE).unlink()  # as if the process died before the manifest
    loaded = store.load_latest()
    assert loaded is not None and loaded.step == 1 and torch.equal(loaded.state["x"], torch.ones(2))
    with pytest.raises(CheckpointError, match="interrupted"):
        store.load(2)


@pytest.mark.parametrize("victim", [TENSORS_FILE, STATE_FILE])
def test_corrupted_file_fails_its_hash_and_is_skipped(tmp_path, victim):
    store = CheckpointStore(tmp_path)
    store.save(1, {"x": torch.ones(2), "n": 1})
    store.save(2, {"x": torch.zeros(2), "n": 2})
    path = store.path(2) / victim
    raw = bytearray(path.read_bytes())
    raw[-2] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="sha256"):
        store.verify(2)
    assert store.load_latest().step == 1


def test_temp_dirs_of_crashed_saves_are_never_loaded_and_get_removed(tmp_path):
    store = CheckpointStore(tmp_path)
    (tmp_path / ".tmp-deadbeef").mkdir()
    (tmp_path / ".tmp-deadbeef" / STATE_FILE).write_text("{}")
    assert store.load_latest() is None
    assert store.remove_leftovers() == 1
    assert not (tmp_path / ".tmp-deadbeef").exists()


def test_keeps_only_the_newest_checkpoints(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for step in (1, 2, 3, 4):
        store.save(step, {"x": torch.tensor([float(step)])})
    assert store.steps() == [3, 4]
    store.save(4, {"x": torch.tensor([40.0])})  # re-saving a step replaces it
    assert torch.equal(store.load_latest().state["x"], torch.tensor([40.0]))


def test_no_pickle_in_a_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path)
    model, opt = trained_model_and_optimiser()
    path = store.save(1, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert sorted(p.name for p in path.iterdir()) == sorted([TENSORS_FILE, STATE_FILE, MANIFEST_FILE])
    json.loads((path / STATE_FILE).read_text())


def loop_state(head="policy-0002", reference="policy-0001", rm="rm-0001"):
    return {
        "x": torch.ones(1),
        "loop": {"lineage": ["policy-0001", head], "reference_version": reference, "value_rm_version": rm},
    }


def test_checkpoints_are_stamped_with_their_store_and_another_store_starts_fresh(tmp_path):
    from services.trainer import metrics

    a = CheckpointStore(tmp_path, keep=2, store_id="a" * 32)
    a.save(5, loop_state())
    assert json.loads((a.path(5) / MANIFEST_FILE).read_text())["store_id"] == "a" * 32
    assert a.load_latest().step == 5

    b = CheckpointStore(tmp_path, keep=2, store_id="b" * 32)
    assert b.load_latest() is None, "a checkpoint of store A is never restored against store B"
    assert b.steps() == [], "set aside: it can no longer shadow B's own checkpoints or outlive them"
    (aside,) = (tmp_path / ".set-aside").iterdir()
    assert aside.name.startswith("ckpt-00000005-") and (aside / MANIFEST_FILE).is_file()
    b.save(1, loop_state())
    assert b.load_latest().step == 1
    assert metrics.CHECKPOINTS_KEPT._value.get() == 1
    assert metrics.CHECKPOINT_BYTES._value.get() == b.held_bytes() > 0


def test_a_checkpoint_naming_versions_the_store_lacks_is_set_aside(tmp_path):
    from services.trainer.checkpoint import missing_versions

    store = CheckpointStore(tmp_path, store_id="a" * 32)
    store.save(3, loop_state())
    store.save(4, loop_state(head="policy-0004"))
    present = {"policy-0001", "policy-0002", "rm-0001"}
    loaded = store.load_latest(check=lambda c: missing_versions(c.state, present.__contains__))
    assert loaded is not None and loaded.step == 3, "the newest names policy-0004: the one before it is used"
    assert store.steps() == [3]
    assert store.load_latest(check=lambda c: "refused") is None and store.steps() == []


def test_unstamped_checkpoints_of_before_store_ids_are_still_used(tmp_path):
    CheckpointStore(tmp_path).save(2, loop_state())
    assert CheckpointStore(tmp_path, store_id="a" * 32).load_latest().step == 2


def test_set_aside_checkpoints_are_bounded_too(tmp_path):
    for n, owner in enumerate("cdefg"):
        CheckpointStore(tmp_path, keep=10, store_id=owner * 32).save(n + 1, loop_state())
    CheckpointStore(tmp_path, keep=2, store_id="a" * 32).load_latest()
    kept = sorted(p.name[:13] for p in (tmp_path / ".set-aside").iterdir())
    assert kept == ["ckpt-00000004", "ckpt-00000005"], "the newest two of the five set aside"


def test_versions_needed_are_the_head_the_reference_and_the_value_rm():
    from services.trainer.checkpoint import missing_versions, versions_needed

    assert versions_needed(loop_state()) == ["policy-0002", "policy-0001", "rm-0001"]
    assert versions_needed({}) == []
    assert missing_versions(loop_state(), {"policy-0001"}.__contains__) == (
        "it names policy-0002, rm-0001, which the model store does not have"
    )
