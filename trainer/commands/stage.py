"""What the four stage commands (``collect``, ``select``, ``train``, ``build``) share.

Each of them resolves the run's configuration (a run directory's stored config is the base for
later commands), checks every input (:func:`trainer.stages.run.preflight`) and then runs its
stages (:func:`trainer.stages.run.execute`).
"""

from __future__ import annotations

import argparse
import functools

from ..core.config import RunConfig
from ..core.errors import UsageError
from ..core.rundir import RunDir
from .base import add_command, add_config_flags, overrides_from_args


def register_stage(sub, name: str, *, summary: str, description: str, example: str) -> None:
    """The subcommand ``name`` with the shared config flags, running :func:`run_stage`."""
    p = add_command(sub, name, summary=summary, description=description, example=example)
    add_config_flags(p, name)
    p.set_defaults(func=functools.partial(run_stage, name))


def load_config(args: argparse.Namespace, command: str) -> tuple[RunConfig, RunDir]:
    """Resolve the config; a run directory's stored config is the base for later commands."""
    from ..resolve import resolve

    overrides = overrides_from_args(args, command)
    cfg = resolve(config_file=args.config, overrides=overrides)
    if not cfg.out:
        raise UsageError("no run directory: give --out DIR (or `out` in the config file)")
    run = RunDir(cfg.out)
    if run.has_run():
        cfg = resolve(run_config=run.config, config_file=args.config, overrides=overrides)
    return cfg, run


def run_stage(command: str, args: argparse.Namespace) -> int:
    """Resolve, check, run (the stages of ``command``); returns the exit code."""
    from ..stages.run import execute, preflight

    cfg, run = load_config(args, command)
    plan = preflight(command, cfg, run, getattr(args, "resume", None))
    execute(plan)
    return 0
