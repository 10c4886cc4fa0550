"""Ratings: POST /v1/feedback over the feedback service, on the fast path in front of FastAPI."""
