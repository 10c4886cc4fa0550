"""The committed stubs in shared/pb must equal a fresh `rlhf protos` run."""

import filecmp

from flywheel.protogen import OUT_DIR, generate


def test_generated_stubs_are_up_to_date(tmp_path):
    generate(tmp_path)
    fresh = sorted(p.name for p in tmp_path.iterdir())
    committed = sorted(p.name for p in OUT_DIR.iterdir() if p.is_file() and p.suffix in (".py", ".pyi"))
    assert fresh == committed, "stub files differ: run `rlhf protos`"
    stale = [name for name in fresh if not filecmp.cmp(tmp_path / name, OUT_DIR / name, shallow=False)]
    assert not stale, f"stale stubs {stale}: run `rlhf protos` and commit shared/pb"
