"""The operator command lines' shared part: options, exit codes and messages."""

from __future__ import annotations

import grpc

from shared.operator_cli import operator_parser, run_operator_call


def parse(*argv: str):
    parser = operator_parser("rlhf x", "Do x.\nMore.", default_address="127.0.0.1:1", default_timeout=3.0)
    parser.add_argument("command")
    return parser, parser.parse_args(list(argv))


def test_every_operator_command_has_the_address_timeout_and_token_options(tmp_path):
    parser, args = parse("status", "--token-file", str(tmp_path / "t"))
    assert parser.description == "Do x."
    assert (args.address, args.timeout, args.token_file) == ("127.0.0.1:1", 3.0, tmp_path / "t")


def test_a_refused_call_exits_1_with_its_grpc_status(capsys, monkeypatch):
    monkeypatch.setenv("RLHF_OPERATOR_TOKEN", "x" * 32)
    _, args = parse("status", "--timeout", "1")

    def failing(channel):
        raise _Refused()

    assert run_operator_call(args, failing) == 1
    assert "status failed: UNAVAILABLE: nobody there" in capsys.readouterr().err


def test_bad_operator_settings_exit_2_naming_the_variable(capsys, monkeypatch):
    monkeypatch.setenv("RLHF_OPERATOR_NOPE", "1")
    _, args = parse("status")
    assert run_operator_call(args, lambda channel: None) == 2
    assert "RLHF_OPERATOR_NOPE" in capsys.readouterr().err


class _Refused(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "nobody there"
