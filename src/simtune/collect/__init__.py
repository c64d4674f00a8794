"""Collecting decisions while a simulation runs: the in-process Recorder, the recording
proxy (no code change in the simulation) and the call rules both apply."""
