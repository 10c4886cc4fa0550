"""The RLHF Flywheel services, one package each."""
