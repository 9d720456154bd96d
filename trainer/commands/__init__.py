"""The commands of ``python -m trainer``: one module per command, listed once in :data:`COMMANDS`.

Each module has ``register(sub)``, which adds its subparser (with ``set_defaults(func=…)``).
Command modules import shared pieces from :mod:`.base` (the parser class, ``add_command``, the
named flags) and never from :mod:`trainer.cli`, which takes this table.
"""

from __future__ import annotations

from . import build, collect, convert, demo, evaluate, generate, inspect, recipes, select, train

#: Every command, in the order ``--help`` lists them (the only place that knows them).
COMMANDS = (demo, build, collect, select, train, evaluate, generate, convert, inspect, recipes)

__all__ = ["COMMANDS"]
