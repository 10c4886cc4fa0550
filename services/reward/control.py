"""The raters the reward service's retraining loop has judged, from a shell: list them, release one.

    rlhf raters list                          # or: python -m services.reward.control list
    rlhf raters list --quarantined
    rlhf raters release alice --address 127.0.0.1:50053

Ask the reward replica that runs the retraining loop (RLHF_REWARD_LEARNER). Prints the answer as
JSON; exits 1 with the gRPC status on an error.
"""

from __future__ import annotations

import argparse
import json
import sys

import grpc
from google.protobuf.json_format import MessageToDict

from shared.pb import reward_pb2, reward_pb2_grpc


def main(argv: list[str] | None = None, prog: str = "python -m services.reward.control") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=(__doc__ or "").splitlines()[0])
    parser.add_argument("command", choices=["list", "release"])
    parser.add_argument("principal", nargs="?", help="the quarantined principal to release (release only)")
    parser.add_argument("--quarantined", action="store_true", help="list only the quarantined principals")
    parser.add_argument("--limit", type=int, default=100, help="most raters listed, 1 to 1000 (default %(default)s)")
    parser.add_argument(
        "--address", default="127.0.0.1:50053", help="host:port of the reward service (default %(default)s)"
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds")
    args = parser.parse_args(argv)
    if (args.command == "release") != bool(args.principal):
        parser.error("a principal is needed for release, and only for it")
    with grpc.insecure_channel(args.address) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        try:
            if args.command == "list":
                reply = stub.ListRaters(
                    reward_pb2.ListRatersRequest(quarantined_only=args.quarantined, limit=args.limit),
                    timeout=args.timeout,
                )
            else:
                reply = stub.ReleaseRater(
                    reward_pb2.ReleaseRaterRequest(principal=args.principal), timeout=args.timeout
                )
        except grpc.RpcError as exc:
            print(f"{args.command} failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(json.dumps(MessageToDict(reply, always_print_fields_with_no_presence=True), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
