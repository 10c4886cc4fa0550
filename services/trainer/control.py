"""Control a running trainer from a shell: status, pause, resume, publish now, rollback.

    rlhf trainer status                       # or: python -m services.trainer.control status
    rlhf trainer rollback policy-0002 --address 127.0.0.1:50054

Calls carry the operator's credential (RLHF_OPERATOR_TOKEN, or the file RLHF_OPERATOR_TOKEN_FILE,
default var/operator-token, which `rlhf up` writes) and use TLS when RLHF_OPERATOR_TLS_CA_FILE is set.
Prints the answer as JSON; exits 1 with the gRPC status on an error, 2 on bad settings.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict

from shared.config import ConfigError, OperatorConfig, load_config
from shared.grpc_channels import ClientCredentials, sync_channel
from shared.pb import trainer_pb2, trainer_pb2_grpc


def main(argv: list[str] | None = None, prog: str = "python -m services.trainer.control") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["status", "pause", "resume", "publish", "rollback"])
    parser.add_argument("version", nargs="?", help="the policy version to roll back to (rollback only)")
    parser.add_argument("--address", default="127.0.0.1:50054", help="host:port of the trainer (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds (publish and rollback may take long)")
    parser.add_argument(
        "--token-file", type=Path, help="file holding the operator token (default: $RLHF_OPERATOR_TOKEN_FILE)"
    )
    args = parser.parse_args(argv)
    if (args.command == "rollback") != bool(args.version):
        parser.error("a version is needed for rollback, and only for it")
    try:
        overrides = {"token_file": args.token_file} if args.token_file else {}
        creds = ClientCredentials.of_operator(load_config(OperatorConfig, **overrides))
        channel = sync_channel(args.address, creds)
    except ConfigError as exc:
        print(f"{args.command}: {exc}", file=sys.stderr)
        return 2
    with channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        calls = {
            "status": lambda: stub.Status(trainer_pb2.StatusRequest(), timeout=args.timeout),
            "pause": lambda: stub.Pause(trainer_pb2.PauseRequest(), timeout=args.timeout),
            "resume": lambda: stub.Resume(trainer_pb2.ResumeRequest(), timeout=args.timeout),
            "publish": lambda: stub.PublishNow(trainer_pb2.PublishNowRequest(), timeout=args.timeout),
            "rollback": lambda: stub.Rollback(
                trainer_pb2.RollbackRequest(policy_version=args.version), timeout=args.timeout
            ),
        }
        try:
            reply = calls[args.command]()
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


if __name__ == "__main__":
    sys.exit(main())
