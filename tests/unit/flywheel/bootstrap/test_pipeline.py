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


def test_offline_publishes_are_signed_with_the_given_key_and_verifiable(tmp_path, monkeypatch):
    import argparse

    from flywheel.bootstrap.pipeline import run_from_args, signers_from_args
    from shared.model_store import ModelStore
    from shared.signing import write_key_pair
    from shared.version_line import POLICY, VersionLine

    env_key = write_key_pair(tmp_path / "env.pem", tmp_path / "env.pub")
    cli_key = write_key_pair(tmp_path / "cli.pem", tmp_path / "cli.pub")
    monkeypatch.setenv("RLHF_VERSIONS_POLICY_SIGNING_KEY_FILE", str(tmp_path / "env.pem"))
    monkeypatch.setenv("RLHF_VERSIONS_RM_SIGNING_KEY_FILE", str(tmp_path / "env.pem"))
    args = argparse.Namespace(policy_signing_key=tmp_path / "cli.pem", rm_signing_key=None)
    policy, rm = signers_from_args(args)
    assert policy.key_id == cli_key.key_id and rm.key_id == env_key.key_id  # the command line wins
    # `rlhf bootstrap --publish-only`: the default policy, signed, with a signed settled record.
    store = ModelStore(tmp_path / "models")
    args = argparse.Namespace(
        publish_only=True, model=None, store=store.root, policy_signing_key=None, rm_signing_key=None
    )
    assert run_from_args(args, store.root) == 0
    line = VersionLine(store, POLICY, keys=env_key.verify_keys())
    assert line.trusted_record().version == "policy-0001"
    assert line.read_signed("policy-0001").manifest.extra["kind"] == "default-random-init"
