"""The ``ftrecycle`` command line (the only code that prints or exits).

``main`` looks the subcommand up in :data:`ftrecycle.cli.app.COMMANDS`, a table filled by one
module per command group: ``models`` (transfer, diff, apply, inspect, export-lora), ``training``
(finetune, recycle-finetune, iterate), ``evaluation`` (eval), ``diagnosis`` (diagnose) and ``lab``
(lab, demo). The transfer-family flags are generated (:func:`ftrecycle.cli.args.add_group`) from
the option groups declared in :mod:`ftrecycle.options`.
"""

from ftrecycle.cli.app import COMMANDS, INTERNAL_ERROR_EXIT, build_parser, main

__all__ = ["COMMANDS", "INTERNAL_ERROR_EXIT", "build_parser", "main"]
