"""Prometheus metrics of the feedback service."""

from prometheus_client import Counter, Gauge, Histogram

ACCEPTED = Counter("rlhf_feedback_accepted_total", "Ratings acknowledged by Kafka", ["kind"])
DUPLICATES = Counter("rlhf_feedback_duplicates_total", "Submissions that changed nothing (retries, same vote)")
SUPERSEDED = Counter("rlhf_feedback_superseding_total", "Ratings that replaced a user's earlier vote")
REJECTED = Counter("rlhf_feedback_rejected_total", "Refused submissions", ["reason"])
WRONG_PRINCIPAL = Counter(
    "rlhf_feedback_wrong_principal_total",
    "Ratings refused because a feedback token was issued to another principal (or to none)",
)
UNAVAILABLE = Counter("rlhf_feedback_unavailable_total", "Submissions refused because Kafka did not acknowledge")
ACK_SECONDS = Histogram(
    "rlhf_feedback_ack_seconds",
    "From a valid submission to Kafka's acknowledgement",
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
)
BATCH_SIZE = Histogram(
    "rlhf_feedback_batch_size",
    "Submissions per SubmitFeedbackBatch call",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000),
)
LEDGER_VOTES = Gauge(
    "rlhf_feedback_ledger_votes", "Ratings the ledger holds (those received within the feedback token lifetime)"
)
LEDGER_CAPACITY = Gauge(
    "rlhf_feedback_ledger_capacity", "Most ratings the ledger holds (RLHF_FEEDBACK_LEDGER_MAX_VOTES)"
)
LEDGER_EXPIRED = Counter(
    "rlhf_feedback_ledger_expired_total", "Ratings the ledger forgot because every token they could carry has expired"
)
LEDGER_EVICTED = Counter(
    "rlhf_feedback_ledger_evicted_total",
    "Ratings evicted from a full ledger before they expired (the next vote on an unknown target is numbered above them)",
)
DLQ_DROPPED = Counter(
    "rlhf_feedback_dlq_dropped_total",
    "Refused submissions not copied to rlhf.feedback.dlq, by the limit that dropped them (rate, bytes)",
    ["limit"],
)
