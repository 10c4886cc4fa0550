"""`rlhf raters`: its arguments, and a clear failure when no reward service answers (the calls
themselves are tested over gRPC in tests/integration/test_reward_quarantine.py)."""

from __future__ import annotations

import socket

import pytest

from flywheel.cli import main as rlhf
from services.reward.control import main


@pytest.mark.parametrize("argv", [["release"], ["list", "alice"], ["ban", "alice"]])
def test_bad_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2


def test_no_reward_service_is_a_failure_with_the_status(capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert rlhf(["raters", "list", "--address", f"127.0.0.1:{port}", "--timeout", "2"]) == 1
    err = capsys.readouterr().err
    assert "list failed: UNAVAILABLE" in err or "list failed: DEADLINE_EXCEEDED" in err
