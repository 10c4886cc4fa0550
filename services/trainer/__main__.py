"""`python -m services.trainer`: run the PPO trainer service until SIGTERM."""

from services.trainer.app import TrainerApp
from services.trainer.config import TrainerConfig
from shared.service_main import run_service

if __name__ == "__main__":
    run_service("trainer", TrainerConfig, TrainerApp)
