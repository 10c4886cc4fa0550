"""`python -m services.inference`: run the inference service until SIGTERM."""

from services.inference.app import InferenceApp
from services.inference.config import InferenceConfig
from shared.service_main import run_service

# vLLM spawns worker processes that re-import the main module: keep the guard.
if __name__ == "__main__":
    run_service("inference", InferenceConfig, InferenceApp)
