"""The gateway: OpenAI-compatible proxy, admission, placement, metrics and tracing."""
