"""Policy inference: serves the current policy with vLLM and hot-swaps published versions."""
