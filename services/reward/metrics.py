"""Prometheus metrics of the reward service."""

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("rlhf_reward_score_requests_total", "Score requests", ["outcome"])
ITEMS = Counter("rlhf_reward_scored_items_total", "(conversation, response) items scored")
TOKENS = Counter("rlhf_reward_scored_tokens_total", "Tokens read by the reward model (padding excluded)")
TRUNCATED = Counter("rlhf_reward_truncated_items_total", "Items whose prompt or response was cut to the limits")
FORWARD_BATCH = Histogram(
    "rlhf_reward_forward_batch_size", "Sequences per forward pass", buckets=(1, 2, 4, 8, 16, 32, 64, 128)
)
REQUEST_SECONDS = Histogram(
    "rlhf_reward_score_seconds",
    "Score request duration (validation to scores)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
SCORES = Histogram(
    "rlhf_reward_score_value",
    "Rewards returned (normalised: reference responses average 0)",
    buckets=(-8, -4, -2, -1, -0.5, 0, 0.5, 1, 2, 4, 8),
)
RM_VERSION = Gauge("rlhf_reward_model_info", "1 for the reward model version scoring now", ["version"])
SWAPS = Counter("rlhf_reward_swaps_total", "Hot-swaps to a new reward model version")
SWAP_REFUSED = Counter("rlhf_reward_swap_refused_total", "Reward model versions refused", ["reason"])
LOAD_SECONDS = Histogram(
    "rlhf_reward_load_seconds",
    "Verifying and loading a reward model version",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)

# --- the continual learner (learner.py) ---------------------------------------------------------
LEARNER_EVENTS = Counter("rlhf_reward_learner_events_total", "Events the learner stored", ["kind"])
COMPARISONS_TRAINED = Counter(
    "rlhf_reward_learner_comparisons_trained_total",
    "New comparisons (groups and lone thumbs) in published reward models",
)
COMPARISONS_REPLAYED = Counter(
    "rlhf_reward_learner_comparisons_replayed_total",
    "Older comparisons mixed into training rounds from the replay buffer",
)
VOTES_PENDING = Gauge("rlhf_reward_learner_votes_pending", "Live votes waiting for their completions")
VOTES_UNUSED = Gauge(
    "rlhf_reward_learner_votes_unused",
    "Live votes that give no training example, by reason "
    "(pairwise ties, all-tied rankings, Likert scores without contrast, malformed; "
    "identical_response_pairs counts pairs of word-for-word equal answers)",
    ["reason"],
)
VOTES_DROPPED = Counter(
    "rlhf_reward_learner_votes_dropped_total",
    "Votes dropped because a rated completion never arrived within the pending timeout",
)
ROUNDS = Counter("rlhf_reward_learner_rounds_total", "Training rounds by outcome", ["outcome"])
HELDOUT_ACCURACY = Gauge(
    "rlhf_reward_learner_heldout_accuracy", "Held-out pairwise accuracy of the last round", ["model"]
)
TRAIN_LOSS = Gauge("rlhf_reward_learner_train_loss", "Mean batch loss of the last training epoch")
ROUND_SECONDS = Histogram(
    "rlhf_reward_learner_round_seconds",
    "One training round (load, train, gate, publish)",
    buckets=(1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
)
RATING_TO_RM_SECONDS = Histogram(
    "rlhf_reward_learner_rating_to_rm_seconds",
    "From a rating's arrival (feedback received_at) to the first published RM trained on it",
    buckets=(1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200),
)
CONSUMER_LAG = Gauge("rlhf_reward_learner_consumer_lag", "Records on the topic not yet read by the learner", ["topic"])

# --- caps per principal and rater quality (raters.py) -------------------------------------------
HELD_BACK = Gauge(
    "rlhf_reward_learner_comparisons_held_back",
    "Comparisons the last round left out, by reason (capped: over its principal's cap, waiting for a "
    "later round; quarantined: a quarantined principal's) and slice (train, heldout)",
    ["reason", "slice"],
)
LARGEST_SHARE = Gauge(
    "rlhf_reward_learner_largest_principal_share",
    "Largest share of one principal in the last round's new comparisons (train) or held-out slice",
    ["slice"],
)
RATERS = Gauge(
    "rlhf_reward_learner_raters", "Principals with ratings, by status (ok, quarantined, released)", ["status"]
)
QUARANTINES = Counter(
    "rlhf_reward_learner_quarantines_total",
    "Principals quarantined, by what judged them (peers: other raters; rm: the reward model)",
    ["judge"],
)
RELEASES = Counter("rlhf_reward_learner_rater_releases_total", "Quarantined principals released by an operator")
RM_VERDICTS = Counter(
    "rlhf_reward_learner_rm_verdicts_total", "Comparisons the current RM scored to judge their raters"
)
