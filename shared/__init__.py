"""Code every RLHF Flywheel service shares: config, logging, metrics, Kafka, model store, gRPC glue."""
