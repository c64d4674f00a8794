"""Subcommand groups of the CLI that live outside cli.py (collect, data, sims).

Each module exposes ``register(sub)``: it adds its parser(s) to the top-level
subparsers and sets ``handler=`` on them via ``set_defaults``. Modules import nothing
heavy at import time (the CLI must start fast); handlers import what they need.
"""
