"""`python -m services.feedback`: run the feedback service until SIGTERM."""

from services.feedback.app import FeedbackApp
from services.feedback.config import FeedbackConfig
from shared.service_main import run_service

if __name__ == "__main__":
    run_service("feedback", FeedbackConfig, FeedbackApp)
