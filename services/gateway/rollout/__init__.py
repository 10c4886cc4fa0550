"""Several policy versions served at once: the routing state the rollout service publishes on
rlhf.rollout (feed.py), the assignment of each request to the stable or the canary version
(routing.py), and the read-only /flywheel page with its JSON (board.py, api_router.py)."""
