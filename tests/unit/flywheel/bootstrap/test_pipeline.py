"""Pieces of the bootstrap pipeline that need no training."""

from __future__ import annotations

from flywheel.bootstrap.pipeline import _writable_report_dir


def test_report_dir_falls_back_to_a_temporary_one_when_it_cannot_be_created(tmp_path):
    assert _writable_report_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert (tmp_path / "a" / "b").is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    fallback = _writable_report_dir(blocker / "report")  # a read-only root filesystem fails the same way
    assert fallback.is_dir() and fallback != blocker / "report"
    fallback.rmdir()
