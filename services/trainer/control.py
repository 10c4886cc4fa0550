"""Control a running trainer from a shell: status, pause, resume, publish now, rollback.

    rlhf trainer status                       # or: python -m services.trainer.control status
    rlhf trainer rollback policy-0002 --address 127.0.0.1:50054

Calls carry the operator's credential and use TLS when configured (see shared/operator_cli.py).
Prints the answer as JSON; exits 1 with the gRPC status on an error, 2 on bad settings.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from shared.operator_cli import operator_parser, run_operator_call
from shared.pb import trainer_pb2, trainer_pb2_grpc


def main(argv: list[str] | None = None, prog: str = "python -m services.trainer.control") -> int:
    parser = operator_parser(prog, __doc__, default_address="127.0.0.1:50054", default_timeout=600.0)
    parser.add_argument("command", choices=["status", "pause", "resume", "publish", "rollback"])
    parser.add_argument("version", nargs="?", help="the policy version to roll back to (rollback only)")
    args = parser.parse_args(argv)
    if (args.command == "rollback") != bool(args.version):
        parser.error("a version is needed for rollback, and only for it")
    return run_operator_call(args, lambda channel: _call(args, trainer_pb2_grpc.TrainerServiceStub(channel)))


def _call(args: argparse.Namespace, stub: Any) -> Any:
    t = args.timeout
    if args.command == "status":
        return stub.Status(trainer_pb2.StatusRequest(), timeout=t)
    if args.command == "pause":
        return stub.Pause(trainer_pb2.PauseRequest(), timeout=t)
    if args.command == "resume":
        return stub.Resume(trainer_pb2.ResumeRequest(), timeout=t)
    if args.command == "publish":
        return stub.PublishNow(trainer_pb2.PublishNowRequest(), timeout=t)
    return stub.Rollback(trainer_pb2.RollbackRequest(policy_version=args.version), timeout=t)


if __name__ == "__main__":
    sys.exit(main())
