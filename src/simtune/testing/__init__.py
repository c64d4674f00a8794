"""Test support shipped with the package: a stub OpenAI-compatible LLM server (stub_llm)
and the bad-input probe the servers are checked with (probe)."""
