"""Prometheus metrics of the trainer service."""

from prometheus_client import Counter, Gauge, Histogram

ITERATIONS = Counter("rlhf_trainer_iterations_total", "PPO iterations done (one learner step each)")
ROLLOUTS = Counter("rlhf_trainer_rollouts_total", "Rollouts trained on")
ROLLOUTS_DROPPED = Counter("rlhf_trainer_rollouts_dropped_total", "Sampled rollouts not trained on", ["reason"])
LIVE_PROMPTS = Counter("rlhf_trainer_live_prompts_total", "New distinct user prompts taken from rlhf.completions")
LIVE_PROMPTS_BUFFERED = Gauge("rlhf_trainer_live_prompts_buffered", "Distinct live user prompts in the buffer")
LIVE_PROMPTS_LEFT_OUT = Counter(
    "rlhf_trainer_live_prompts_left_out_total",
    "Live user prompts not buffered or evicted early, by reason (principal_cap: a principal's own oldest "
    "prompt evicted to keep it within its share; heldout; duplicate: already buffered; invalid)",
    ["reason"],
)
LIVE_PROMPTS_LARGEST_SHARE = Gauge(
    "rlhf_trainer_live_prompts_largest_share", "Largest share of one principal in the live prompt buffer"
)
STEP = Gauge("rlhf_trainer_step", "PPO iterations done since the first start (restored from checkpoints)")
MEAN_REWARD = Gauge("rlhf_trainer_mean_reward", "Mean RM score of the last iteration's rollouts")
KL = Gauge(
    "rlhf_trainer_kl",
    "Mean KL of the learner's weights to the reference per response in the last iteration (nats): what "
    "the penalty restrains",
)
BEHAVIOUR_KL = Gauge(
    "rlhf_trainer_behaviour_kl",
    "Mean KL of the policy that sampled the last iteration's rollouts to the reference per response (nats)",
)
OLDEST_ROLLOUT_STEPS = Gauge(
    "rlhf_trainer_oldest_rollout_steps",
    "Learner steps since the weights that sampled the oldest rollout of the last iteration",
)
REVERTS = Counter(
    "rlhf_trainer_reverts_total",
    "Returns of the learner to the last published weights, by reason (refusals: refused candidates in a "
    "row; kl_bound: the learner's held-out KL to the reference passed the bound)",
    ["reason"],
)
ENTROPY = Gauge("rlhf_trainer_entropy", "Mean policy entropy per token in the last iteration")
HELDOUT_REWARD = Gauge("rlhf_trainer_heldout_reward", "Held-out reward of the last evaluated candidate")
HELDOUT_KL = Gauge("rlhf_trainer_heldout_kl", "KL to the reference of the last evaluated candidate")
PAUSED = Gauge("rlhf_trainer_paused", "1 while training is paused")
PUBLISHED = Counter("rlhf_trainer_published_total", "Policy versions published")
GATE_REFUSED = Counter(
    "rlhf_trainer_gate_refused_total",
    "Candidates the publish gate refused, by the check that refused (kl, reward, not_finite, rm_changed, "
    "or a guard's name such as frozen_rm:rm-0001)",
    ["reason"],
)
GATE_COMPARED = Counter(
    "rlhf_trainer_gate_compared_total", "Candidates whose held-out figure was compared with a baseline's (same RM)"
)
GATE_SAME_AS_BASELINE = Counter(
    "rlhf_trainer_gate_same_as_baseline_total",
    "Compared candidates whose held-out figure equalled the baseline's (the gate could not tell them apart)",
)
GUARD_VALUE = Gauge("rlhf_trainer_guard_value", "A guard's figure for the last candidate it checked", ["guard"])
ROLLBACKS = Counter("rlhf_trainer_rollbacks_total", "Rollbacks to an earlier version")
ITERATION_FAILURES = Counter(
    "rlhf_trainer_iteration_failures_total", "Iterations that failed and were retried", ["kind"]
)
CHECKPOINTS = Counter("rlhf_trainer_checkpoints_total", "Checkpoints written")
CHECKPOINTS_KEPT = Gauge("rlhf_trainer_checkpoints_kept", "Checkpoints on disk (at most RLHF_TRAINER_CHECKPOINTS_KEPT)")
CHECKPOINT_BYTES = Gauge(
    "rlhf_trainer_checkpoint_bytes", "Bytes held by the trainer's checkpoint directory (set-aside ones included)"
)
ITERATION_SECONDS = Histogram(
    "rlhf_trainer_iteration_seconds",
    "One iteration: sampling, scoring and the PPO step",
    ["phase"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
POLICY_INFO = Gauge("rlhf_trainer_policy_info", "1 for the published version the trainer builds on", ["version"])

# --- yielding to users (user_load.py) ------------------------------------------------------------
USER_WAIT_SECONDS = Counter(
    "rlhf_trainer_user_wait_seconds_total",
    "Time the trainer sent no rollouts, by reason (users: the serving load was over its threshold; "
    "idle_budget: nobody used the system and the idle budget paused it)",
    ["reason"],
)
USER_LOAD_STATE = Gauge(
    "rlhf_trainer_user_load_state",
    "1 for what the serving load lets the trainer do now (full, slowed, yielding, idle, unknown)",
    ["state"],
)
ROLLOUTS_CANCELLED = Counter(
    "rlhf_trainer_rollouts_cancelled_total",
    "Rollouts cancelled while running because users needed the capacity (sampled again later)",
)
ROLLOUT_CONCURRENCY = Gauge("rlhf_trainer_rollout_concurrency", "Rollouts the trainer last sent at once")
ROLLOUTS_PER_SECOND = Gauge(
    "rlhf_trainer_rollouts_per_second",
    "Rollouts sampled per second in the last iteration's sampling (waits for users included)",
)
USER_LOAD_ERRORS = Counter(
    "rlhf_trainer_user_load_errors_total", "Failed reads of the serving load (GetLoad), by gRPC code", ["code"]
)
