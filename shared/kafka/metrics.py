"""Metrics of the Kafka layer, shared by every service that produces or consumes."""

from prometheus_client import Counter, Gauge

EVENTS_PUBLISHED = Counter("rlhf_kafka_events_published_total", "Events acknowledged by Kafka (acks=all)", ["topic"])
PUBLISH_FAILURES = Counter(
    "rlhf_kafka_publish_failures_total", "Failed publish attempts (each is retried while the process lives)", ["topic"]
)
OUTBOX_SIZE = Gauge("rlhf_kafka_outbox_events", "Events waiting to be acknowledged by Kafka")
OUTBOX_BYTES = Gauge(
    "rlhf_kafka_outbox_bytes", "Bytes of the events waiting to be acknowledged (in memory, or in the spill journal)"
)
EVENTS_DROPPED = Counter(
    "rlhf_kafka_events_dropped_total", "Events dropped because the outbox was full (logged as errors)", ["topic"]
)
OUTBOX_MOVED_ASIDE = Counter(
    "rlhf_kafka_outbox_moved_aside_total",
    "Events that kept failing while later ones were accepted, moved aside (the spill dir's aside.seg; logged)",
    ["topic"],
)
EVENTS_CONSUMED = Counter("rlhf_kafka_events_consumed_total", "Events handled by consumers", ["topic", "group"])
BAD_RECORDS = Counter("rlhf_kafka_bad_records_total", "Records that are not valid envelopes (skipped)", ["topic"])
HANDLER_FAILURES = Counter(
    "rlhf_kafka_handler_failures_total",
    "Handler errors (the record is retried, offsets not committed)",
    ["topic", "group"],
)
RECREATED = Counter(
    "rlhf_kafka_topics_recreated_total",
    "Partitions a reader found recreated (their topic's identity changed) and read again from the start",
    ["topic"],
)
