"""What every operator command line shares (`rlhf trainer`, `rlhf raters`, `rlhf rollout`): the
credential and TLS options, one authenticated channel, the call, the answer as JSON, and errors as
exit codes (1: the gRPC status, 2: bad settings).

    parser = operator_parser("rlhf trainer", __doc__, default_address="127.0.0.1:50054", default_timeout=600)
    parser.add_argument("command", choices=[...])
    args = parser.parse_args(argv)
    return run_operator_call(args, lambda channel: Stub(channel).Status(Request(), timeout=args.timeout))

Calls carry the operator's credential (RLHF_OPERATOR_TOKEN, or the file RLHF_OPERATOR_TOKEN_FILE,
default var/operator-token, which `rlhf up` writes; or --token-file) and use TLS when
RLHF_OPERATOR_TLS_CA_FILE is set.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from shared.config import ConfigError, OperatorConfig, load_config
from shared.grpc_channels import ClientCredentials, sync_channel


def operator_parser(
    prog: str, doc: str | None, *, default_address: str, default_timeout: float
) -> argparse.ArgumentParser:
    """An argument parser with the options every operator command has."""
    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").splitlines()[0])
    parser.add_argument("--address", default=default_address, help="host:port of the service (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=default_timeout, help="seconds (default %(default)s)")
    parser.add_argument(
        "--token-file", type=Path, help="file holding the operator token (default: $RLHF_OPERATOR_TOKEN_FILE)"
    )
    return parser


def run_operator_call(args: argparse.Namespace, call: Callable[[grpc.Channel], Any]) -> int:
    """Open the operator's channel to ``args.address``, make ``call``, print its answer as JSON."""
    try:
        overrides = {"token_file": args.token_file} if args.token_file else {}
        creds = ClientCredentials.of_operator(load_config(OperatorConfig, **overrides))
        channel = sync_channel(args.address, creds)
    except ConfigError as exc:
        print(f"{args.command}: {exc}", file=sys.stderr)
        return 2
    with channel:
        try:
            reply = call(channel)
        except grpc.RpcError as exc:
            print(f"{args.command} failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED and not creds.token:
                print(
                    "no operator credential: set RLHF_OPERATOR_TOKEN or RLHF_OPERATOR_TOKEN_FILE "
                    "(`rlhf up` writes var/operator-token)",
                    file=sys.stderr,
                )
            return 1
    print(json.dumps(MessageToDict(reply, always_print_fields_with_no_presence=True), indent=2))
    return 0
