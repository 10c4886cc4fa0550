"""`python -m services.reward`: run the reward service until SIGTERM."""

from services.reward.app import RewardApp
from services.reward.config import RewardConfig
from shared.service_main import run_service

if __name__ == "__main__":
    run_service("reward", RewardConfig, RewardApp)
