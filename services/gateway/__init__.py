"""HTTP gateway: OpenAI-compatible chat API, the feedback endpoint and a chat page.

app.py builds the ASGI app (create_app). One folder per feature, each with schema.py (pydantic
models), serving.py (the work, no HTTP) and its HTTP entry: chat/api_router.py (FastAPI routes),
feedback/fast_path.py (POST /v1/feedback ahead of FastAPI). Shared by every route: middleware.py
(413; admission: 401, 429; metrics), identity.py (who is asking: API keys, sessions, anonymous
principals), rate_limit.py (token buckets per principal), session_router.py (/v1/session),
errors.py (every error response), ops_router.py (/healthz, /metrics).
uvicorn_single_write.py is the HTTP protocol `python -m services.gateway` runs uvicorn with.
"""
