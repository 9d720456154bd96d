"""Errors the trainer reports as one line (``trainer: error: …``) with a non-zero exit code."""

from __future__ import annotations


class TrainerError(Exception):
    """A failure the user can act on; reported as one line, exit code 1 (runtime)."""

    exit_code = 1


class UsageError(TrainerError):
    """Bad input (flags, config file, prompt files, model folder): exit code 2, nothing written."""

    exit_code = 2
