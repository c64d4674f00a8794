"""Command line of simtune (`simtune.cli.main`).

The subcommand groups outside main.py each expose ``register(sub)``: it adds its
parser(s) to the top-level subparsers, with flags generated from the command's args
class (`simtune.config.add_cli_args`), and sets ``handler=`` on them via
``set_defaults``. Modules import nothing heavy at import time (the CLI must start fast);
handlers import what they need.
"""
