"""The rollout service: each policy version's lifecycle, candidate -> canary -> promoted or rolled back,
decided on live users' ratings with always-valid sequential tests (see confidence.py)."""
