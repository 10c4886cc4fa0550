"""The Kafka layer: topic names (topics.py), versioned event envelopes (envelope.py), publishers with
acks=all and an outbox (publishers.py), a group reader and an assigned reader (readers.py), topic
administration (admin.py) and the embedded broker for one machine (embedded.py).

Everything speaks only the Kafka protocol, so any Kafka works: through kafka-python, the project's
client, and through confluent-kafka (librdkafka) behind the same interfaces where one process moves
thousands of records a second (the feedback service's publisher and its ledger reader).
"""
