"""HTTP gateway: OpenAI-compatible chat API, feedback endpoints and a chat page."""
