"""The Kafka layer: topic names, versioned event envelopes, a reliable producer, an
at-least-once consumer, topic administration and the embedded broker for one machine.

Everything speaks only the Kafka protocol, so any Kafka works: through kafka-python, and through
confluent-kafka (librdkafka) on the feedback service's hot path (AsyncPublisher, its ledger reader).
"""
