"""The raters the reward service's retraining loop has judged, from a shell: list them, release one.

    rlhf raters list                          # or: python -m services.reward.control list
    rlhf raters list --quarantined
    rlhf raters release alice --address 127.0.0.1:50053

Ask the reward replica that runs the retraining loop (RLHF_REWARD_LEARNER). Calls carry the
operator's credential (RLHF_OPERATOR_TOKEN, or the file RLHF_OPERATOR_TOKEN_FILE, default
var/operator-token, which `rlhf up` writes) and use TLS when RLHF_OPERATOR_TLS_CA_FILE is set.
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
    parser.add_argument(
        "--token-file", type=Path, help="file holding the operator token (default: $RLHF_OPERATOR_TOKEN_FILE)"
    )
    args = parser.parse_args(argv)
    if (args.command == "release") != bool(args.principal):
        parser.error("a principal is needed for release, and only for it")
    try:
        overrides = {"token_file": args.token_file} if args.token_file else {}
        creds = ClientCredentials.of_operator(load_config(OperatorConfig, **overrides))
        channel = sync_channel(args.address, creds)
    except ConfigError as exc:
        print(f"{args.command}: {exc}", file=sys.stderr)
        return 2
    with channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        try:
            if args.command == "list":
                request = reward_pb2.ListRatersRequest(quarantined_only=args.quarantined, limit=args.limit)
                reply = stub.ListRaters(request, timeout=args.timeout)
            else:
                reply = stub.ReleaseRater(
                    reward_pb2.ReleaseRaterRequest(principal=args.principal), timeout=args.timeout
                )
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
