"""The command line: `main` builds the parser and dispatches; one module per command
group (train/models/ui live in main)."""
