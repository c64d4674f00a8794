"""Collecting decisions while a simulation runs: the in-process Recorder, the recording
proxy (no code change in the simulation), the call rules both apply, and a LiteLLM
callback (litellm) for simulations that call their models through LiteLLM."""
