"""Serving adapters OpenAI-compatibly: which models a name means (models), the batching
engine (engine), the HTTP server (server) and the vLLM launcher (vllm)."""
