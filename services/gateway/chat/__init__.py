"""Chat completions and models (OpenAI schema) over the inference service, and the chat page."""
