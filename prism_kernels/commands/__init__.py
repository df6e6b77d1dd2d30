"""Subcommands of the `prism` command line tool.

Each module here (named in prism_kernels.cli.COMMANDS) exposes
``register(subparsers)``: it adds its parser and sets ``func`` (``func(args)``
returns the exit code, None meaning 0).
"""
