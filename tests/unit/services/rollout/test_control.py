"""`rlhf rollout`: its arguments, and a clear failure when no rollout service answers (the calls
themselves are tested over gRPC in tests/integration/test_rollout.py)."""

from __future__ import annotations

import socket

import pytest

from flywheel.cli import main as rlhf
from services.rollout.control import main


@pytest.mark.parametrize(
    "argv", [["promote"], ["rollback"], ["mode"], ["mode", "sometimes"], ["status", "policy-0002"], ["ship"]]
)
def test_bad_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2


def test_no_rollout_service_is_a_failure_with_the_status(capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert rlhf(["rollout", "status", "--address", f"127.0.0.1:{port}", "--timeout", "2"]) == 1
    err = capsys.readouterr().err
    assert "status failed: UNAVAILABLE" in err or "status failed: DEADLINE_EXCEEDED" in err
