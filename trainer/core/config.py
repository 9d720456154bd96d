"""Run configuration: dataclasses, TOML files, flag overrides and the resolved config.

A run is described by one :class:`RunConfig`. Values come, in increasing priority, from the
defaults below, the run directory's ``config.resolved.toml`` (when continuing a run), a
``--config`` TOML file and command-line flags (named flags and ``--set section.key=value``);
:func:`trainer.resolve.resolve` layers them (with a recipe's values and per-family defaults).
Unknown keys are rejected with their dotted name. Relative paths in a config file are resolved
against the file's folder, relative paths given as flags against the working directory.

What each key accepts is declared once, next to the field, as a :class:`Rule` in the field's
metadata (numbers are finite unless a rule says that NaN means "unused"; strings hold no control
or undecodable characters). :func:`check_fields` applies the rules — on construction
(``__post_init__``) and in :func:`validate`, which adds the few rules that relate several keys.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import tomllib

from ..stages import objectives
from .errors import UsageError

RESOLVED_NAME = "config.resolved.toml"

#: Characters no config string may hold: C0/C1 controls, line/paragraph separators, and lone
#: surrogates (undecodable bytes of a command-line argument; they cannot be written as UTF-8).
_BAD_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


@dataclass(frozen=True)
class Rule:
    """The values one config field accepts (lists: each item; tables: each value).

    ``ge``/``gt``/``le``/``lt`` bound numbers; every float must be finite unless ``unset_nan``
    (NaN then means "unused" or "automatic"). ``choices`` or ``pattern`` restrict strings
    (``pattern_help`` says what the pattern allows); ``nonempty`` and ``distinct`` apply to lists.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    unset_nan: bool = False
    choices: tuple[str, ...] | None = None
    pattern: str | None = None
    pattern_help: str = ""
    nonempty: bool = False
    distinct: bool = False

    def bounds(self) -> str:
        """The numeric range in words, e.g. ``in [0, 1)`` or ``> 0`` (empty when unbounded)."""
        lo = (f"[{self.ge:g}" if self.ge is not None else f"({self.gt:g}" if self.gt is not None else None)
        hi = (f"{self.le:g}]" if self.le is not None else f"{self.lt:g})" if self.lt is not None else None)
        if lo and hi:
            return f"in {lo}, {hi}"
        if lo:
            return f"≥ {self.ge:g}" if self.ge is not None else f"> {self.gt:g}"
        if hi:
            return f"≤ {self.le:g}" if self.le is not None else f"< {self.lt:g}"
        return ""

    def check(self, key: str, value: Any) -> None:
        """Raise :class:`UsageError` naming ``key`` unless ``value`` is allowed."""
        if isinstance(value, list):
            if self.nonempty and not value:
                raise UsageError(f"config key {key!r} must not be empty")
            if self.distinct and len(set(value)) != len(value):
                raise UsageError(f"config key {key!r} must not repeat an item, got {value!r}")
            for i, item in enumerate(value):
                self.check(f"{key}[{i}]", item)
            return
        if isinstance(value, dict):
            for k, v in value.items():
                _check_text(f"{key} (a key)", k)
                self.check(f"{key}.{k}", v)
            return
        if isinstance(value, str):
            _check_text(key, value)
            if self.choices is not None and value not in self.choices:
                raise UsageError(f"config key {key!r}: {value!r} is not one of {', '.join(self.choices)}")
            if self.pattern is not None and not re.fullmatch(self.pattern, value):
                raise UsageError(f"config key {key!r}: {value!r} is not {self.pattern_help or self.pattern}")
            return
        if isinstance(value, bool):
            return
        if isinstance(value, float):
            if math.isnan(value) and self.unset_nan:
                return
            if not math.isfinite(value):
                extra = ", or nan = unused" if self.unset_nan else ""
                what = f"{self.bounds()} (a finite number{extra})" if self.bounds() else f"a finite number{extra}"
                raise UsageError(f"config key {key!r} must be {what}, got {value!r}")
        if isinstance(value, (int, float)):
            ok = ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                  and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))
            if not ok:
                raise UsageError(f"config key {key!r} must be {self.bounds()}, got {value!r}")


def _check_text(key: str, value: str) -> None:
    m = _BAD_CHARS.search(value)
    if m:
        ch = m.group()
        kind = ("an undecodable character (not valid UTF-8)" if "\ud800" <= ch <= "\udfff"
                else "a control character")
        raise UsageError(f"config key {key!r} contains {kind} U+{ord(ch):04X} at position {m.start()}")


_ANY = Rule()


def _f(default: Any = dataclasses.MISSING, *, factory: Any = None, path: bool = False, **rule: Any) -> Any:
    """A config field with its :class:`Rule` (``path``: a filesystem path, resolved against the config file)."""
    meta: dict[str, Any] = {"rule": Rule(**rule) if rule else _ANY}
    if path:
        meta["path"] = True
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def check_fields(obj: Any, prefix: str = "", *, recurse: bool = True) -> None:
    """Apply every field's :class:`Rule` (sections too, when ``recurse``); raises naming the dotted key."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            if recurse:
                check_fields(value, f"{prefix}{f.name}.")
            continue
        f.metadata.get("rule", _ANY).check(f"{prefix}{f.name}", value)


class _Checked:
    """Dataclass mixin: a section checks its own fields when constructed.

    Values assigned later (``apply_mapping``, code) are checked by :func:`validate`.
    """

    _prefix: ClassVar[str] = ""

    def __post_init__(self) -> None:
        check_fields(self, self._prefix, recurse=False)


_POS = {"ge": 1}  # counts, sizes and steps: integers ≥ 1
_NONNEG = {"ge": 0}
_SIGMA = {"gt": 0.0, "le": 1.0}  # noise levels σ ∈ (0, 1]
_SEGMENTS = {"choices": ("txt", "img"), "distinct": True}


@dataclass
class PromptsConfig(_Checked):
    """Prompt files: one prompt per line, ``#`` starts a comment (see ``trainer.core.prompts``)."""

    _prefix: ClassVar[str] = "prompts."
    unsafe: str = _f("", path=True)  # prompts showing the concept to erase; "unsafe<TAB>anchor" lines allowed
    safe: str = _f("", path=True)  # prompts to preserve (also the safe side of head selection)
    anchors: str = _f("", path=True)  # optional: safe rewrites, line-aligned with `unsafe` (anchor objective)


@dataclass
class CollectConfig(_Checked):
    """Statistics collection (design §3.1)."""

    _prefix: ClassVar[str] = "collect."
    sigmas: list[float] = _f(factory=lambda: [1.0, 0.8, 0.6, 0.4], nonempty=True, **_SIGMA)  # noise levels observed
    # trajectory: Euler steps of the base model through `sigmas`; noise: random x0
    latents: str = _f("trajectory", choices=("trajectory", "noise"))
    samples_per_prompt: int = _f(1, **_POS)  # noise draws per prompt
    batch_size: int = _f(4, **_POS)
    segments: list[str] = _f(factory=lambda: ["txt"], **_SEGMENTS)  # token segments accumulated (txt, img)
    save_every: int = _f(8, **_POS)  # batches between resumable saves


@dataclass
class SelectConfig(_Checked):
    """Subspace rank and head selection (design §3.2-3.3). count/fraction/margin: 0 or absent = unused."""

    _prefix: ClassVar[str] = "select."
    rank: int = _f(4, **_POS)
    count: int = _f(8, **_NONNEG)  # keep the N best heads over all blocks
    fraction: float = _f(0.0, ge=0.0, le=1.0)  # keep this share of all heads
    margin: float = _f(float("nan"), unset_nan=True)  # keep heads with d ≥ margin (NaN = unused)
    # block kinds heads may come from; kinds the model lacks are skipped (at least one must remain). The
    # model family's own kinds: FLUX.1, Flux.2, Chroma, HunyuanImage: double, single; Qwen-Image: double;
    # Z-Image: context_refiner, noise_refiner, main
    kinds: list[str] = _f(factory=lambda: ["double", "single"], pattern=r"[a-z][a-z0-9_]{0,63}",
                          pattern_help="a block kind name (lower-case letters, digits, '_')", nonempty=True,
                          distinct=True)
    segment: str = _f("txt", choices=("txt", "img"))  # segment whose statistics score the heads and give the bases
    # contrast: top eigenvectors of G_u/n_u − w·G_s/n_s | unsafe: of G_u (the authors')
    basis: str = _f("contrast", choices=("contrast", "unsafe"))
    contrast_weight: float = _f(1.0, ge=0.0, le=1.0)  # w in [0, 1]: 1 = pure contrast, 0 = the unsafe Gram


@dataclass
class TrainConfig(_Checked):
    """Generator training (design §3.4)."""

    _prefix: ClassVar[str] = "train."
    steps: int = _f(300, **_POS)
    batch_size: int = _f(2, **_POS)
    lr: float = _f(5e-3, gt=0.0)
    weight_decay: float = _f(0.0, ge=0.0)
    # anchor (paired safe rewrites) | deviate (the authors') | none
    unlearn: str = _f("anchor", choices=objectives.choices("unlearn"))
    # distill (no images) | flow (image-caption folder) | none
    preserve: str = _f("distill", choices=objectives.choices("preserve"))
    lambda_unlearn: float = _f(1.0, ge=0.0)
    lambda_preserve: float = _f(1.0, ge=0.0)
    # τ stored in the adapter and used while training; NaN = calibrated on held-out prompts (trainer.stages.calibrate)
    threshold: float = _f(float("nan"), ge=0.0, lt=1.0, unset_nan=True)
    double_segments: list[str] = _f(factory=lambda: ["txt"], **_SEGMENTS)  # generators of double blocks
    single_segments: list[str] = _f(factory=lambda: ["txt"], **_SEGMENTS)  # generators of single blocks
    # generators per block kind, for any kind (wins over double/single_segments); a kind named in neither
    # gets text generators if it sees text tokens (Z-Image: context_refiner and main)
    segments: dict[str, list[str]] = _f(factory=dict, **_SEGMENTS)
    # W ~ N(0, init_std²); NaN = auto (0 = identity; deviate needs > 0: 0.1)
    init_std: float = _f(float("nan"), ge=0.0, unset_nan=True)
    unlearn_sigmas: list[float] = _f(factory=lambda: [0.75, 1.0], **_SIGMA)  # [min, max] noise level
    preserve_sigmas: list[float] = _f(factory=lambda: [0.25, 1.0], **_SIGMA)
    latents: str = _f("rollout", choices=("rollout", "noise"))  # rollout: base-model Euler steps from noise; noise: x0 ~ N(0, I)
    rollout_steps: int = _f(8, **_POS)  # Euler grid of the rollout (σ = k / rollout_steps)
    images: str = _f("", path=True)  # image-caption folder (x.png + x.txt) for preserve = "flow"
    checkpoint_every: int = _f(100, **_POS)
    keep_checkpoints: int = _f(3, **_POS)
    gradient_checkpointing: bool = False
    log_every: int = _f(10, **_POS)


@dataclass
class CalibrateConfig(_Checked):
    """Threshold calibration and the self-check on held-out prompts (trainer.stages.calibrate)."""

    _prefix: ClassVar[str] = "calibrate."
    holdout: float = _f(0.25, ge=0.0, lt=1.0)  # share of the unsafe and of the safe prompts kept out of collect/train
    min_prompts: int = _f(8, **_POS)  # a set with fewer prompts is not split (calibration then uses the training prompts)
    safe_share: float = _f(0.3, ge=0.0, lt=1.0)  # share of held-out safe prompts allowed a gated token at the calibrated τ
    margin: float = _f(0.02, ge=0.0, lt=1.0)  # added to the safe prompts' risk quantile
    min_unsafe: float = _f(0.5, ge=0.0, le=1.0)  # the self-check fails below this share of held-out unsafe prompts gated
    check: bool = True  # run the self-check after training


@dataclass
class EvaluateConfig(_Checked):
    """Generation-based evaluation (``trainer evaluate``)."""

    _prefix: ClassVar[str] = "evaluate."
    sets: dict[str, str] = _f(factory=dict, path=True)  # name -> prompt file ("prompt<TAB>key=value,…")
    adapters: list[str] = _f(factory=list, path=True)  # default: the run's adapter.safetensors
    seeds: list[int] = _f(factory=lambda: [0], nonempty=True)
    steps: int = _f(28, **_POS)
    strength: float = _f(1.0, ge=0.0)
    batch_size: int = _f(4, **_POS)
    save_images: bool = True
    scorers: list[str] = _f(factory=lambda: ["auto"])  # auto | none | names (nudenet, toy)
    clip: str = _f("", path=True)  # local CLIP folder (transformers CLIPModel): adds the `clip` scorer (CLIP score)
    limit: int = _f(0, ge=0)  # evaluate only the first N prompts of each set (0 = all)


@dataclass
class RunConfig(_Checked):
    """Everything one run needs. Top-level keys describe the model and the run directory."""

    model: str = ""  # local diffusers pipeline folder of a supported family, a hub id in the local cache, or "toy"
    recipe: str = ""  # shipped recipe name or recipe folder (trainer.recipes): prompts, concept, defaults
    out: str = _f("", path=True)  # run directory
    concepts: list[str] = field(default_factory=list)  # recorded in the adapter, e.g. ["nudity"]
    base_model: str = ""  # recorded in the adapter; default: the model's name
    seed: int = 0
    device: str = _f("auto", pattern=r"auto|cpu|mps|cuda(:[0-9]+)?", pattern_help="auto, cpu, cuda or cuda:N")
    dtype: str = _f("float32", choices=("float32", "bfloat16", "float16"))  # weights
    mixed_precision: str = _f("no", choices=("no", "fp16", "bf16"))  # Accelerate autocast
    max_sequence_length: int = _f(0, **_NONNEG)  # text tokens; 0 = the family's default (FLUX.1: T5's limit)
    height: int = _f(0, **_NONNEG)  # pixels; 0 = the VAE config's sample_size (none: the pipeline's default)
    width: int = _f(0, **_NONNEG)
    guidance: float = _f(3.5, ge=0.0)  # guidance embedding (FLUX.1-dev, Flux.2 dev); generation: the pipeline's scale
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)
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
    if tp is str:
        return "strings"
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
        _, item = typing.get_args(tp)
        if not isinstance(value, Mapping):
            raise UsageError(f"config key {key!r}: expected a table of {_type_name(item)}, got {value!r}")
        return {str(k): _coerce(f"{key}.{k}", v, item) for k, v in value.items()}
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


def validate(cfg: RunConfig) -> None:
    """Every field's :class:`Rule`, then the rules that relate several keys (shapes are checked
    against the model later). Raises :class:`UsageError` naming the key."""
    check_fields(cfg)
    if cfg.select.segment not in cfg.collect.segments:
        raise UsageError(f"config key 'select.segment' is {cfg.select.segment!r} but 'collect.segments' "
                         f"{cfg.collect.segments} does not collect it")
    if "txt" not in cfg.collect.segments:
        raise UsageError("config key 'collect.segments' must include 'txt' (the bases come from text tokens)")
    if not cfg.train.double_segments and not cfg.train.single_segments and not any(cfg.train.segments.values()):
        raise UsageError("config keys 'train.double_segments' and 'train.single_segments' are both empty")
    s = cfg.select
    if s.count == 0 and s.fraction == 0.0 and math.isnan(s.margin):
        raise UsageError("head selection needs 'select.count', 'select.fraction' or 'select.margin'")
    t = cfg.train
    for key, rng in (("train.unlearn_sigmas", t.unlearn_sigmas), ("train.preserve_sigmas", t.preserve_sigmas)):
        if len(rng) != 2 or not rng[0] <= rng[1]:
            raise UsageError(f"config key {key!r} must be [min, max] with 0 < min ≤ max ≤ 1, got {rng}")
    if not objectives.chosen(t.unlearn, t.preserve):
        raise UsageError("'train.unlearn' and 'train.preserve' are both 'none': nothing to train")
    if t.latents == "rollout":
        for key, rng in (("train.unlearn_sigmas", t.unlearn_sigmas), ("train.preserve_sigmas", t.preserve_sigmas)):
            if not rollout_grid(t.rollout_steps, rng):
                raise UsageError(f"config key {key!r} {rng} contains no rollout grid point k/{t.rollout_steps}")


def rollout_grid(steps: int, rng: list[float]) -> list[float]:
    """Grid noise levels ``k / steps`` (k = 1…steps) inside ``[rng[0], rng[1]]``, largest first."""
    eps = 1e-9
    return [k / steps for k in range(steps, 0, -1) if rng[0] - eps <= k / steps <= rng[1] + eps]


def init_std(cfg: TrainConfig) -> float:
    """The generator init scale: explicit, or the largest the chosen objectives need (``deviate``: 0.1, its
    gradient vanishes at the identity; the others: 0)."""
    if not math.isnan(cfg.init_std):
        return cfg.init_std
    return max((o.init_std for o in objectives.chosen(cfg.unlearn, cfg.preserve)), default=0.0)


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
        if isinstance(node, dict) and key in ("prompts", "collect", "select", "train", "calibrate"):
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
