"""Run configuration: dataclasses, TOML files, flag overrides and the resolved config.

A run is described by one :class:`RunConfig`. Values come, in increasing priority, from the
defaults below, the run directory's ``config.resolved.toml`` (when continuing a run), a
``--config`` TOML file and command-line flags (named flags and ``--set section.key=value``).
Unknown keys are rejected with their dotted name. Relative paths in a config file are resolved
against the file's folder, relative paths given as flags against the working directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import UsageError

RESOLVED_NAME = "config.resolved.toml"


def _path(default: str = "") -> Any:
    """A string field holding a filesystem path (resolved against the config file's folder)."""
    return field(default=default, metadata={"path": True})


def _paths(factory: Any) -> Any:
    """A list or table field whose values are filesystem paths."""
    return field(default_factory=factory, metadata={"path": True})


@dataclass
class PromptsConfig:
    """Prompt files: one prompt per line, ``#`` starts a comment (see ``trainer.prompts``)."""

    unsafe: str = _path()  # prompts showing the concept to erase; "unsafe<TAB>anchor" lines allowed
    safe: str = _path()  # prompts to preserve (also the safe side of head selection)
    anchors: str = _path()  # optional: safe rewrites, line-aligned with `unsafe` (anchor objective)


@dataclass
class CollectConfig:
    """Statistics collection (design §3.1)."""

    sigmas: list[float] = field(default_factory=lambda: [1.0, 0.8, 0.6, 0.4])  # noise levels observed
    latents: str = "trajectory"  # trajectory: Euler steps of the base model through `sigmas`; noise: random x0
    samples_per_prompt: int = 1  # noise draws per prompt
    batch_size: int = 4
    segments: list[str] = field(default_factory=lambda: ["txt"])  # token segments accumulated (txt, img)
    save_every: int = 8  # batches between resumable saves


@dataclass
class SelectConfig:
    """Subspace rank and head selection (design §3.2-3.3). count/fraction/margin: 0 or absent = unused."""

    rank: int = 4
    count: int = 8  # keep the N best heads over all blocks
    fraction: float = 0.0  # keep this share of all heads
    margin: float = float("nan")  # keep heads with d ≥ margin (NaN = unused)
    kinds: list[str] = field(default_factory=lambda: ["double", "single"])
    segment: str = "txt"  # segment whose statistics score the heads and give the bases
    basis: str = "contrast"  # contrast: top eigenvectors of G_u/n_u − w·G_s/n_s | unsafe: of G_u (the authors')
    contrast_weight: float = 1.0  # w in [0, 1]: 1 = pure contrast, 0 = the unsafe Gram


@dataclass
class TrainConfig:
    """Generator training (design §3.4)."""

    steps: int = 300
    batch_size: int = 2
    lr: float = 5e-3
    weight_decay: float = 0.0
    unlearn: str = "anchor"  # anchor (paired safe rewrites) | deviate (the authors') | none
    preserve: str = "distill"  # distill (no images) | flow (image-caption folder) | none
    lambda_unlearn: float = 1.0
    lambda_preserve: float = 1.0
    threshold: float = 0.5  # τ stored in the adapter and used while training
    double_segments: list[str] = field(default_factory=lambda: ["txt"])  # generators of double blocks
    single_segments: list[str] = field(default_factory=lambda: ["txt"])  # generators of single blocks
    init_std: float = float("nan")  # W ~ N(0, init_std²); NaN = auto (0 = identity; deviate needs > 0: 0.1)
    unlearn_sigmas: list[float] = field(default_factory=lambda: [0.75, 1.0])  # [min, max] noise level
    preserve_sigmas: list[float] = field(default_factory=lambda: [0.25, 1.0])
    latents: str = "rollout"  # rollout: base-model Euler steps from noise; noise: x0 ~ N(0, I)
    rollout_steps: int = 8  # Euler grid of the rollout (σ = k / rollout_steps)
    images: str = _path()  # image-caption folder (x.png + x.txt) for preserve = "flow"
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    gradient_checkpointing: bool = False
    log_every: int = 10


@dataclass
class EvaluateConfig:
    """Generation-based evaluation (``trainer evaluate``)."""

    sets: dict[str, str] = _paths(dict)  # name -> prompt file ("prompt<TAB>key=value,…")
    adapters: list[str] = _paths(list)  # default: the run's adapter.safetensors
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 28
    strength: float = 1.0
    batch_size: int = 4
    save_images: bool = True
    scorers: list[str] = field(default_factory=lambda: ["auto"])  # auto | none | names (nudenet, toy)
    clip: str = _path()  # local CLIP folder (transformers CLIPModel): adds the `clip` scorer (CLIP score)
    limit: int = 0  # evaluate only the first N prompts of each set (0 = all)


@dataclass
class RunConfig:
    """Everything one run needs. Top-level keys describe the model and the run directory."""

    model: str = ""  # local diffusers FLUX folder, a hub id in the local cache, or "toy"
    recipe: str = ""  # shipped recipe name or recipe folder (trainer.recipes): prompts, concept, defaults
    out: str = _path()  # run directory
    concepts: list[str] = field(default_factory=list)  # recorded in the adapter, e.g. ["nudity"]
    base_model: str = ""  # recorded in the adapter; default: the model's name
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"  # weights: float32 | bfloat16 | float16
    mixed_precision: str = "no"  # Accelerate autocast: no | fp16 | bf16
    max_sequence_length: int = 0  # T5 tokens; 0 = tokenizer_2's limit
    height: int = 0  # pixels; 0 = the VAE config's sample_size
    width: int = 0
    guidance: float = 3.5  # guidance embedding (FLUX.1-dev); ignored by models without one
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    # -- conversion ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section(self, name: str) -> dict[str, Any]:
        return dataclasses.asdict(getattr(self, name))


# ---------------------------------------------------------------------------------------------
# Parsing and validation
# ---------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` (int/float/str/bool/list[X]/dict[str, str])."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise UsageError(f"config key {key!r}: expected a list of {_type_name(item)}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise UsageError(f"config key {key!r}: expected a table of strings, got {value!r}")
        return {str(k): _coerce(f"{key}.{k}", v, str) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise UsageError(f"config key {key!r}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"config key {key!r}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"config key {key!r}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UsageError(f"config key {key!r}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r}")  # pragma: no cover - programming error


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def apply_mapping(cfg: Any, data: Mapping[str, Any], *, base_dir: Path | None, prefix: str = "") -> None:
    """Set fields of dataclass ``cfg`` from ``data`` (nested tables for sections).

    Raises :class:`UsageError` naming the first unknown key or ill-typed value.
    """
    hints = _hints(type(cfg))
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise UsageError(f"unknown config key {dotted!r} (known here: {known})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise UsageError(f"config key {dotted!r} must be a table ([{dotted}])")
            apply_mapping(getattr(cfg, key), value, base_dir=base_dir, prefix=f"{dotted}.")
            continue
        value = _coerce(dotted, value, tp)
        if fields[key].metadata.get("path") and value and base_dir is not None:
            value = _resolve_paths(value, base_dir)
        setattr(cfg, key, value)


def _resolve_paths(value: Any, base_dir: Path) -> Any:
    if isinstance(value, list):
        return [_resolve_paths(v, base_dir) for v in value]
    if isinstance(value, dict):
        return {k: _resolve_paths(v, base_dir) for k, v in value.items()}
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else base_dir / p)


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file; a missing or malformed file is a one-line :class:`UsageError`."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file {str(p)!r} not found")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"config file {str(p)!r}: {str(e).splitlines()[0]}") from None


def parse_value(text: str) -> Any:
    """A ``--set`` value: TOML syntax when it parses (``3``, ``0.5``, ``true``, ``["a"]``), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def dotted_to_nested(pairs: Mapping[str, Any]) -> dict[str, Any]:
    """``{"train.lr": 1e-3}`` -> ``{"train": {"lr": 1e-3}}``."""
    out: dict[str, Any] = {}
    for key, value in pairs.items():
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UsageError(f"config key {key!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def resolve(*, run_config: Path | None = None, config_file: str | None = None,
            overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Defaults ← recipe ← run dir's resolved config ← ``config_file`` ← flag ``overrides`` (dotted keys).

    A recipe (``recipe`` key, see :mod:`trainer.recipes`) named in this command that differs from
    the run directory's sits above the resolved config instead.
    """
    from .recipes import recipe_layers  # lazy: trainer.recipes imports this module

    cfg = RunConfig()
    stored = read_toml(run_config) if run_config is not None and run_config.is_file() else None
    file_data = read_toml(config_file) if config_file else None
    file_dir = Path(config_file).resolve().parent if config_file else None
    layers = recipe_layers(stored, file_data, file_dir, overrides)
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


_CHOICES = {
    "device": None, "dtype": ("float32", "bfloat16", "float16"), "mixed_precision": ("no", "fp16", "bf16"),
    "collect.latents": ("trajectory", "noise"), "select.segment": ("txt", "img"),
    "select.basis": ("contrast", "unsafe"),
    "train.unlearn": ("anchor", "deviate", "none"), "train.preserve": ("distill", "flow", "none"),
    "train.latents": ("rollout", "noise"),
}


def validate(cfg: RunConfig) -> None:
    """Value checks that need no model (shapes are checked against the model later)."""
    def choice(key: str, value: str) -> None:
        allowed = _CHOICES[key]
        if allowed and value not in allowed:
            raise UsageError(f"config key {key!r}: {value!r} is not one of {', '.join(allowed)}")

    for key in _CHOICES:
        obj = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        choice(key, obj)
    if not (cfg.device in ("auto", "cpu", "cuda", "mps") or cfg.device.startswith("cuda:")):
        raise UsageError(f"config key 'device': {cfg.device!r} is not auto, cpu, cuda or cuda:N")
    positive = {"collect.samples_per_prompt": cfg.collect.samples_per_prompt,
                "collect.batch_size": cfg.collect.batch_size, "collect.save_every": cfg.collect.save_every,
                "select.rank": cfg.select.rank, "train.steps": cfg.train.steps,
                "train.batch_size": cfg.train.batch_size, "train.rollout_steps": cfg.train.rollout_steps,
                "train.checkpoint_every": cfg.train.checkpoint_every,
                "train.keep_checkpoints": cfg.train.keep_checkpoints, "train.log_every": cfg.train.log_every,
                "evaluate.steps": cfg.evaluate.steps, "evaluate.batch_size": cfg.evaluate.batch_size}
    for key, v in positive.items():
        if v < 1:
            raise UsageError(f"config key {key!r} must be ≥ 1, got {v}")
    for key, v in (("max_sequence_length", cfg.max_sequence_length), ("height", cfg.height), ("width", cfg.width),
                   ("select.count", cfg.select.count), ("evaluate.limit", cfg.evaluate.limit)):
        if v < 0:
            raise UsageError(f"config key {key!r} must be ≥ 0, got {v}")
    if not 0.0 <= cfg.select.contrast_weight <= 1.0:
        raise UsageError(f"config key 'select.contrast_weight' must be in [0, 1], got {cfg.select.contrast_weight}")
    if not cfg.collect.sigmas or any(not 0.0 < s <= 1.0 for s in cfg.collect.sigmas):
        raise UsageError(f"config key 'collect.sigmas' must be a non-empty list in (0, 1], got {cfg.collect.sigmas}")
    for seg_key, segs in (("collect.segments", cfg.collect.segments), ("train.double_segments", cfg.train.double_segments),
                          ("train.single_segments", cfg.train.single_segments)):
        bad = [s for s in segs if s not in ("txt", "img")]
        if bad or len(set(segs)) != len(segs):
            raise UsageError(f"config key {seg_key!r}: segments must be distinct values of txt, img, got {segs}")
    if cfg.select.segment not in cfg.collect.segments:
        raise UsageError(f"config key 'select.segment' is {cfg.select.segment!r} but 'collect.segments' "
                         f"{cfg.collect.segments} does not collect it")
    if "txt" not in cfg.collect.segments:
        raise UsageError("config key 'collect.segments' must include 'txt' (the bases come from text tokens)")
    if not cfg.train.double_segments and not cfg.train.single_segments:
        raise UsageError("config keys 'train.double_segments' and 'train.single_segments' are both empty")
    bad_kinds = [k for k in cfg.select.kinds if k not in ("double", "single")]
    if bad_kinds or not cfg.select.kinds:
        raise UsageError(f"config key 'select.kinds' must list double and/or single, got {cfg.select.kinds}")
    s = cfg.select
    if not (0.0 <= s.fraction <= 1.0):
        raise UsageError(f"config key 'select.fraction' must be in [0, 1], got {s.fraction}")
    if s.count == 0 and s.fraction == 0.0 and math.isnan(s.margin):
        raise UsageError("head selection needs 'select.count', 'select.fraction' or 'select.margin'")
    t = cfg.train
    if not 0.0 <= t.threshold < 1.0:
        raise UsageError(f"config key 'train.threshold' must be in [0, 1), got {t.threshold}")
    if t.lr <= 0 or t.weight_decay < 0:
        raise UsageError(f"config keys 'train.lr' must be > 0 and 'train.weight_decay' ≥ 0, got {t.lr}, {t.weight_decay}")
    for key, rng in (("train.unlearn_sigmas", t.unlearn_sigmas), ("train.preserve_sigmas", t.preserve_sigmas)):
        if len(rng) != 2 or not 0.0 < rng[0] <= rng[1] <= 1.0:
            raise UsageError(f"config key {key!r} must be [min, max] with 0 < min ≤ max ≤ 1, got {rng}")
    if t.unlearn == "none" and t.preserve == "none":
        raise UsageError("'train.unlearn' and 'train.preserve' are both 'none': nothing to train")
    if t.latents == "rollout":
        for key, rng in (("train.unlearn_sigmas", t.unlearn_sigmas), ("train.preserve_sigmas", t.preserve_sigmas)):
            if not rollout_grid(t.rollout_steps, rng):
                raise UsageError(f"config key {key!r} {rng} contains no rollout grid point k/{t.rollout_steps}")
    if not math.isnan(t.init_std) and t.init_std < 0:
        raise UsageError(f"config key 'train.init_std' must be ≥ 0, got {t.init_std}")
    if cfg.evaluate.strength < 0:
        raise UsageError(f"config key 'evaluate.strength' must be ≥ 0, got {cfg.evaluate.strength}")
    if not cfg.evaluate.seeds:
        raise UsageError("config key 'evaluate.seeds' is empty")


def rollout_grid(steps: int, rng: list[float]) -> list[float]:
    """Grid noise levels ``k / steps`` (k = 1…steps) inside ``[rng[0], rng[1]]``, largest first."""
    eps = 1e-9
    return [k / steps for k in range(steps, 0, -1) if rng[0] - eps <= k / steps <= rng[1] + eps]


def init_std(cfg: TrainConfig) -> float:
    """The generator init scale: explicit, or 0.1 for ``deviate`` (its gradient vanishes at identity), else 0."""
    if not math.isnan(cfg.init_std):
        return cfg.init_std
    return 0.1 if cfg.unlearn == "deviate" else 0.0


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")  # pragma: no cover


def to_toml(cfg: RunConfig) -> str:
    """Serialise a config as TOML (read back by :func:`resolve` to the same values)."""
    data = cfg.to_dict()
    lines = ["# Resolved SafeRoPE trainer configuration (defaults + config file + flags)."]
    tables = []
    for k, v in data.items():
        if isinstance(v, dict):
            tables.append((k, v))
        else:
            lines.append(f"{k} = {_toml_value(v)}")
    for name, table in tables:
        lines.append("")
        lines.append(f"[{name}]")
        subtables = []
        for k, v in table.items():
            if isinstance(v, dict):
                subtables.append((k, v))
            else:
                lines.append(f"{k} = {_toml_value(v)}")
        for k, v in subtables:
            lines.append("")
            lines.append(f"[{name}.{k}]")
            lines.extend(f"{json.dumps(kk)} = {_toml_value(vv)}" for kk, vv in v.items())
    return "\n".join(lines) + "\n"


def fingerprint(cfg: RunConfig, keys: list[str]) -> dict[str, Any]:
    """The values of dotted ``keys`` (sections expand to all their keys), to detect config changes."""
    data = cfg.to_dict()
    out: dict[str, Any] = {}
    for key in keys:
        node: Any = data
        for part in key.split("."):
            node = node[part]
        if isinstance(node, dict) and key in ("prompts", "collect", "select", "train"):
            for k, v in node.items():
                out[f"{key}.{k}"] = v
        else:
            out[key] = node
    return jsonable(out)


def jsonable(value: Any) -> Any:
    """A copy with NaN/inf floats replaced by ``None`` (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def diff_fingerprints(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two fingerprints."""
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
