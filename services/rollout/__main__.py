"""`python -m services.rollout`: run the rollout service until SIGTERM."""

from services.rollout.app import RolloutApp
from services.rollout.config import RolloutConfig
from shared.service_main import run_service

if __name__ == "__main__":
    run_service("rollout", RolloutConfig, RolloutApp)
