"""The `rlhf` command: run the loop, bootstrap models, run one service, regenerate stubs.

rlhf up                     # broker (embedded if none configured) + every service
rlhf bootstrap [--model D]  # pretrain (built-in model only), SFT, first RM: publish policy-0001 and rm-0001
rlhf train-rm [--rankings F]  # the first reward model from a JSONL file of K-way rankings
rlhf demo                   # simulated users chat and rate; writes a report folder
rlhf eval [--a V] [--b V]   # win rate of policy B over A on held-out prompts (gold rater), perplexity
rlhf trainer status         # control a running trainer: status|pause|resume|publish|rollback V
rlhf raters list            # the raters the reward model learns from: list [--quarantined] | release NAME
rlhf rollout status         # progressive rollout: status|promote V|rollback V|pause|resume|mode auto|manual
rlhf serve inference        # one service in the foreground
rlhf config [service]       # every environment variable, its default and meaning
rlhf protos                 # regenerate shared/pb from protos/rlhf/v1
"""

from __future__ import annotations

import argparse
import importlib
import runpy
import sys

from shared.config import ConfigBase, ConfigError, load_config
from shared.logging import setup_logging

SERVICES = {
    "inference": "services.inference.config:InferenceConfig",
    "gateway": "services.gateway.config:GatewayConfig",
    "feedback": "services.feedback.config:FeedbackConfig",
    "reward": "services.reward.config:RewardConfig",
    "trainer": "services.trainer.config:TrainerConfig",
    "rollout": "services.rollout.config:RolloutConfig",
}
# Settings that are not a service's: `rlhf up` itself and the demo's simulated users (loaded by name,
# so that nothing here imports the demo package and its hidden rater).
OTHER_CONFIGS = {
    "up": "flywheel.launcher:UpConfig",
    "demo": "flywheel.demo.run:DemoConfig",
}


def _config_class(spec: str) -> type[ConfigBase]:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def cmd_up(args: argparse.Namespace) -> int:
    from flywheel.launcher import UpConfig, run_up

    setup_logging("up", load_config(UpConfig).log)
    return run_up()


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from flywheel.bootstrap.pipeline import run_from_args
    from shared.config import ModelStoreConfig

    setup_logging("bootstrap")
    return run_from_args(args, load_config(ModelStoreConfig).root)


def cmd_demo(args: argparse.Namespace) -> int:
    from flywheel.demo.run import main as demo_main

    return demo_main()


def cmd_eval(args: argparse.Namespace) -> int:
    from flywheel.demo.evaluate import main as eval_main

    return eval_main(args.rest)


def cmd_train_rm(args: argparse.Namespace) -> int:
    from services.reward.offline import main as train_rm_main

    setup_logging("reward")
    train_rm_main(args.rest)
    return 0


def cmd_trainer(args: argparse.Namespace) -> int:
    from services.trainer.control import main as control_main

    return control_main(args.rest, prog="rlhf trainer")


def cmd_raters(args: argparse.Namespace) -> int:
    from services.reward.control import main as raters_main

    return raters_main(args.rest, prog="rlhf raters")


def cmd_rollout(args: argparse.Namespace) -> int:
    from services.rollout.control import main as rollout_main

    return rollout_main(args.rest, prog="rlhf rollout")


def cmd_serve(args: argparse.Namespace) -> int:
    sys.argv = [f"services.{args.service}"]
    runpy.run_module(f"services.{args.service}", run_name="__main__", alter_sys=True)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from shared.config import format_env_table

    configs = {**SERVICES, **OTHER_CONFIGS}
    names = [args.service] if args.service else list(configs)
    for name in names:
        print(f"## {name}\n\n{format_env_table(_config_class(configs[name]))}\n")
    return 0


def cmd_protos(args: argparse.Namespace) -> int:
    from flywheel.protogen import main

    main([])  # sys.argv is the rlhf command line here, not protogen's
    return 0


PASS_THROUGH = {
    "train-rm": cmd_train_rm,
    "eval": cmd_eval,
    "trainer": cmd_trainer,
    "raters": cmd_raters,
    "rollout": cmd_rollout,
}
"""Commands whose arguments go unparsed to the module that implements them."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf", description="RLHF Flywheel: online RLHF serving loop")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="run the whole loop on this machine").set_defaults(func=cmd_up)
    p = sub.add_parser("bootstrap", help="offline steps (pretrain, SFT, first RM) when the store has no policy")
    from flywheel.bootstrap.options import add_arguments as bootstrap_arguments

    bootstrap_arguments(p)
    p.set_defaults(func=cmd_bootstrap)
    sub.add_parser(
        "demo", help="simulated users chat with the loop and rate it (RLHF_DEMO_*); writes a report"
    ).set_defaults(func=cmd_demo)
    p = sub.add_parser("eval", help="win rate of one policy version over another on held-out prompts", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of python -m flywheel.demo.evaluate (--help)")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("train-rm", help="train the first reward model from K-way rankings (JSONL)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of python -m services.reward.offline (--help)")
    p.set_defaults(func=cmd_train_rm)
    p = sub.add_parser(
        "trainer", help="control a running trainer: status, pause, resume, publish, rollback V", add_help=False
    )
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of python -m services.trainer.control (--help)")
    p.set_defaults(func=cmd_trainer)
    p = sub.add_parser(
        "raters", help="list the raters the reward model learns from; release a quarantined one", add_help=False
    )
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of python -m services.reward.control (--help)")
    p.set_defaults(func=cmd_raters)
    p = sub.add_parser(
        "rollout",
        help="progressive rollout: status, promote V, rollback V, pause, resume, mode auto|manual",
        add_help=False,
    )
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of python -m services.rollout.control (--help)")
    p.set_defaults(func=cmd_rollout)
    p = sub.add_parser("serve", help="run one service in the foreground")
    p.add_argument("service", choices=sorted(SERVICES))
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("config", help="list the environment variables of the services")
    p.add_argument("service", nargs="?", choices=sorted({**SERVICES, **OTHER_CONFIGS}))
    p.set_defaults(func=cmd_config)
    sub.add_parser("protos", help="regenerate the gRPC stubs").set_defaults(func=cmd_protos)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in PASS_THROUGH:
        # Their options (--help included) belong to the module that parses them, not to this parser.
        args = argparse.Namespace(func=PASS_THROUGH[argv[0]], rest=argv[1:])
    else:
        args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"rlhf: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
