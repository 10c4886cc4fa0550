"""`rlhf config` documents every setting: each service's, `rlhf up`'s and the demo's."""

from flywheel.cli import OTHER_CONFIGS, SERVICES, main


def test_config_lists_every_section_with_its_variables(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    for name in [*SERVICES, *OTHER_CONFIGS]:
        assert f"## {name}\n" in out
    for variable in (
        "RLHF_TRAINER_KL_BOUND",
        "RLHF_PPO_KL_COEF",
        "RLHF_REWARD_GATE_TOLERANCE",
        "RLHF_UP_SERVICES",
        "RLHF_UP_BOOTSTRAP",
        "RLHF_DEMO_GATEWAY_URL",
        "RLHF_ROLLOUT_CANARY_SHARE",
    ):
        assert f"`{variable}`" in out, variable
