"""MLflow: run tracking (tracker), the offline outbox and its sync (outbox), the local
model registry (registry), and the
pyfunc flavour registered models load through (pyfunc)."""
