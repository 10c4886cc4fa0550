"""Control the progressive rollout from a shell: status, promote, rollback, pause, resume, mode.

    rlhf rollout status                       # or: python -m services.rollout.control status
    rlhf rollout promote policy-0008          # the version in canary, to every user now
    rlhf rollout rollback policy-0008         # its traffic back to the stable version
    rlhf rollout pause | resume
    rlhf rollout mode manual                  # only operators decide (auto: the live gate does)

Calls carry the operator's credential and use TLS when configured (see shared/operator_cli.py).
Prints the answer as JSON; exits 1 with the gRPC status on an error, 2 on bad settings.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from shared.operator_cli import operator_parser, run_operator_call
from shared.pb import rollout_pb2, rollout_pb2_grpc

NEEDS_ARGUMENT = {"promote": "a version", "rollback": "a version", "mode": "auto or manual"}


def main(argv: list[str] | None = None, prog: str = "python -m services.rollout.control") -> int:
    parser = operator_parser(prog, __doc__, default_address="127.0.0.1:50055", default_timeout=30.0)
    parser.add_argument("command", choices=["status", "promote", "rollback", "pause", "resume", "mode"])
    parser.add_argument("argument", nargs="?", help="the version in canary (promote, rollback); auto|manual (mode)")
    args = parser.parse_args(argv)
    needs = NEEDS_ARGUMENT.get(args.command)
    if bool(needs) != bool(args.argument):
        parser.error(f"{args.command} needs {needs}" if needs else f"{args.command} takes no argument")
    if args.command == "mode" and args.argument not in ("auto", "manual"):
        parser.error(f"mode must be auto or manual, not {args.argument!r}")
    return run_operator_call(args, lambda channel: _call(args, rollout_pb2_grpc.RolloutServiceStub(channel)))


def _call(args: argparse.Namespace, stub: Any) -> Any:
    t = args.timeout
    if args.command == "status":
        return stub.Status(rollout_pb2.RolloutStatusRequest(), timeout=t)
    if args.command == "promote":
        return stub.Promote(rollout_pb2.RolloutVersionRequest(version=args.argument), timeout=t)
    if args.command == "rollback":
        return stub.Rollback(rollout_pb2.RolloutVersionRequest(version=args.argument), timeout=t)
    if args.command == "pause":
        return stub.Pause(rollout_pb2.RolloutPauseRequest(), timeout=t)
    if args.command == "resume":
        return stub.Resume(rollout_pb2.RolloutResumeRequest(), timeout=t)
    return stub.SetMode(rollout_pb2.RolloutModeRequest(mode=args.argument), timeout=t)


if __name__ == "__main__":
    sys.exit(main())
