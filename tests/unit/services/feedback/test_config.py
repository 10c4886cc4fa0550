"""FeedbackConfig: the ledger's and the dead-letter copy's bounds are checked, named by variable."""

import pytest

from services.feedback.config import FeedbackConfig
from shared.config import ConfigError, load_config

BASE = {"RLHF_FEEDBACK_TOKEN_SECRET": "s" * 32, "RLHF_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092"}


def test_defaults_bound_the_ledger_and_the_dead_letter_copies():
    cfg = load_config(FeedbackConfig, BASE)
    assert cfg.ledger_max_votes == 500_000 and cfg.ledger_slack_s == 300.0
    assert (cfg.dlq_rate_per_s, cfg.dlq_burst, cfg.dlq_bytes_per_s) == (50.0, 200, 262_144)


@pytest.mark.parametrize(
    "env, words",
    [
        ({"RLHF_FEEDBACK_LEDGER_MAX_VOTES": "0"}, "RLHF_FEEDBACK_LEDGER_MAX_VOTES=0"),
        ({"RLHF_FEEDBACK_LEDGER_SLACK_S": "-1"}, "RLHF_FEEDBACK_LEDGER_SLACK_S=-1"),
        ({"RLHF_FEEDBACK_DLQ_BURST": "-1"}, "RLHF_FEEDBACK_DLQ_BURST"),
        ({"RLHF_FEEDBACK_DLQ_BYTES_PER_S": "-5"}, "RLHF_FEEDBACK_DLQ_BYTES_PER_S"),
    ],
)
def test_bad_bounds_are_named(env, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        load_config(FeedbackConfig, {**BASE, **env})
