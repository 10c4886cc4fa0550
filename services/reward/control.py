"""The raters the reward service's retraining loop has judged, from a shell: list them, release one.

    rlhf raters list                          # or: python -m services.reward.control list
    rlhf raters list --quarantined
    rlhf raters release alice --address 127.0.0.1:50053

Ask the reward replica that runs the retraining loop (RLHF_REWARD_LEARNER). Calls carry the
operator's credential and use TLS when configured (see shared/operator_cli.py). Prints the answer
as JSON; exits 1 with the gRPC status on an error, 2 on bad settings.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from shared.operator_cli import operator_parser, run_operator_call
from shared.pb import reward_pb2, reward_pb2_grpc


def main(argv: list[str] | None = None, prog: str = "python -m services.reward.control") -> int:
    parser = operator_parser(prog, __doc__, default_address="127.0.0.1:50053", default_timeout=30.0)
    parser.add_argument("command", choices=["list", "release"])
    parser.add_argument("principal", nargs="?", help="the quarantined principal to release (release only)")
    parser.add_argument("--quarantined", action="store_true", help="list only the quarantined principals")
    parser.add_argument("--limit", type=int, default=100, help="most raters listed, 1 to 1000 (default %(default)s)")
    args = parser.parse_args(argv)
    if (args.command == "release") != bool(args.principal):
        parser.error("a principal is needed for release, and only for it")
    return run_operator_call(args, lambda channel: _call(args, reward_pb2_grpc.RewardServiceStub(channel)))


def _call(args: argparse.Namespace, stub: Any) -> Any:
    if args.command == "list":
        request = reward_pb2.ListRatersRequest(quarantined_only=args.quarantined, limit=args.limit)
        return stub.ListRaters(request, timeout=args.timeout)
    return stub.ReleaseRater(reward_pb2.ReleaseRaterRequest(principal=args.principal), timeout=args.timeout)


if __name__ == "__main__":
    sys.exit(main())
