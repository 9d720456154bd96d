"""The configuration a command works with: every layer of values, resolved into one :class:`RunConfig`.

Layers, in increasing priority: the trainer's defaults (:class:`~trainer.core.config.RunConfig`),
the model family's own needs (:attr:`trainer.families.base.Family.defaults`: Z-Image's block kinds,
say), a recipe (:mod:`trainer.recipes`: its prompts, concept and the ``[defaults.<family>]`` table
of the model's family), the run directory's stored ``config.resolved.toml``, a ``--config`` file
and the command-line flags. Unknown keys are rejected by name; relative paths in a file are relative to it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .core.config import RunConfig, apply_mapping, dotted_to_nested, read_toml, validate
from .recipes import recipe_layers


def resolve(*, run_config: Path | None = None, config_file: str | None = None,
            overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Defaults ← family ← recipe ← run dir's resolved config ← ``config_file`` ← flag ``overrides`` (dotted keys).

    A recipe (``recipe`` key, see :mod:`trainer.recipes`) named in this command that differs from
    the run directory's sits above the resolved config instead.
    """
    cfg = RunConfig()
    stored = read_toml(run_config) if run_config is not None and run_config.is_file() else None
    file_data = read_toml(config_file) if config_file else None
    file_dir = Path(config_file).resolve().parent if config_file else None
    layers = recipe_layers(stored, file_data, file_dir, overrides)
    apply_mapping(cfg, family_layer(stored, file_data, overrides), base_dir=None)
    for data, base in layers.below:
        apply_mapping(cfg, data, base_dir=base)
    if stored is not None:
        apply_mapping(cfg, stored, base_dir=None)
    for data, base in layers.above:
        apply_mapping(cfg, data, base_dir=base)
    if file_data is not None:
        apply_mapping(cfg, file_data, base_dir=file_dir)
    if overrides:
        apply_mapping(cfg, dotted_to_nested(overrides), base_dir=Path.cwd())
    if layers.spec:
        cfg.recipe = layers.spec  # the shipped name or the folder's absolute path
    validate(cfg)
    return cfg


def family_layer(stored: Mapping[str, Any] | None, file_data: Mapping[str, Any] | None,
                 overrides: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The config values the model's family needs (empty without a model, or when a run's stored config —
    which holds every value — is the base)."""
    if stored is not None:
        return {}
    model = (overrides or {}).get("model") or (file_data or {}).get("model") or ""
    if not isinstance(model, str) or not model:
        return {}
    from .families.models import family_of, resolve_model

    info = resolve_model(model, need=("transformer",))
    return family_of(info).config_defaults(info)
