"""MLflow: run tracking (tracker), the offline outbox and its sync (outbox), the local
model registry (registry), registered-model aliases (aliases: `models promote`), traces
<-> decision records (traces: `data import-traces`, `data mirror-traces`), and the
pyfunc flavour registered models load through (pyfunc)."""
