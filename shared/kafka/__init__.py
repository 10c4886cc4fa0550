"""The Kafka layer: topic names, versioned event envelopes, a reliable producer, an
at-least-once consumer, topic administration and the embedded broker for one machine.

Everything speaks only the Kafka protocol through kafka-python, so any Kafka works.
"""
