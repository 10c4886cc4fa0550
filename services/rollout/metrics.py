"""Prometheus metrics of the rollout service. Labels are bounded: stages, actions, roles (stable,
canary), signals and refusal reasons are fixed sets; versions appear only in VERSION_INFO, which
holds the two versions served now (cleared on every change)."""

from prometheus_client import Counter, Gauge

TRANSITIONS = Counter(
    "rlhf_rollout_transitions_total",
    "Rollout steps emitted on rlhf.rollout, by stage (candidate, canary, promoted, rolled_back, superseded, "
    "paused, resumed, mode)",
    ["stage"],
)
DECISIONS = Counter(
    "rlhf_rollout_decisions_total",
    "Canaries ended, by action (promote, rollback) and by whom (gate, operator)",
    ["action", "by"],
)
VERDICTS = Counter(
    "rlhf_rollout_gate_verdicts_total",
    "Live gate verdicts on a canary, by action (promote, rollback, continue), acted on or not (paused, manual)",
    ["action"],
)
CANARY_SHARE = Gauge("rlhf_rollout_canary_share", "Share of principals routed to the canary (0 when none runs)")
CANARY_AGE = Gauge("rlhf_rollout_canary_age_seconds", "Seconds since the canary started (0 when none runs)")
PAUSED = Gauge("rlhf_rollout_paused", "1 while an operator has paused rollout decisions")
MANUAL = Gauge("rlhf_rollout_manual", "1 in manual mode (only operators promote and roll back)")
QUEUED = Gauge("rlhf_rollout_queued", "1 while a candidate waits for the canary slot")
SEQUENCE = Gauge("rlhf_rollout_sequence", "Sequence number of the last rollout step")
VERSION_INFO = Gauge(
    "rlhf_rollout_version_info", "1 for the version each group serves now (role stable or canary)", ["role", "version"]
)
SIGNAL_MEAN = Gauge(
    "rlhf_rollout_signal_mean",
    "Live signal of each group since the canary started, by role (stable, canary) and signal "
    "(thumbs_up_rate, likert_mean, error_rate, latency_p50_s, mean_tokens); NaN without data",
    ["role", "signal"],
)
SIGNAL_COUNT = Gauge(
    "rlhf_rollout_signal_count",
    "Observations behind each live signal since the canary started, by role and signal (thumbs, likerts, completions)",
    ["role", "signal"],
)
INTERVAL = Gauge(
    "rlhf_rollout_difference_bound",
    "Always-valid interval of canary minus stable on each tested signal (bound low or high) at the last verdict",
    ["signal", "bound"],
)
CANDIDATES = Counter("rlhf_rollout_candidates_total", "Candidate versions taken from rlhf.policy-candidates")
CANDIDATES_IGNORED = Counter(
    "rlhf_rollout_candidates_ignored_total",
    "Candidate announcements not taken, by reason (not_newer, rollback, bad_signature, wrong_event, wrong_line, "
    "replayed, manifest_mismatch, store errors)",
    ["reason"],
)
EVIDENCE_EVENTS = Counter(
    "rlhf_rollout_evidence_events_total", "Events read as live evidence, by topic (before any filtering)", ["topic"]
)
EVIDENCE_FAILURES = Counter(
    "rlhf_rollout_evidence_failures_total", "Evidence records whose handling failed (logged, skipped)", ["topic"]
)
VOTES_HELD = Gauge("rlhf_rollout_votes_held", "Live votes remembered for revisions (bounded by RLHF_ROLLOUT_MAX_VOTES)")
VOTES_FORGOTTEN = Gauge(
    "rlhf_rollout_votes_forgotten", "Live votes forgotten because the bound was reached (since the canary started)"
)
EMIT_FAILURES = Counter(
    "rlhf_rollout_emit_failures_total", "Rollout steps Kafka did not acknowledge at the first attempt (retried)"
)
POINTERS_OWED = Gauge("rlhf_rollout_pointer_announcements_owed", "Pointer announcements not yet acknowledged by Kafka")
