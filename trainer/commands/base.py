"""What every command module shares: the parser class, ``add_command``, and the table of named flags.

Config-driven commands share :data:`FLAGS`, which maps each named flag onto a dotted config key
(any key can also be set with ``--set section.key=value``). Command modules import from here,
never from :mod:`trainer.cli` (which imports them through :data:`trainer.commands.COMMANDS`).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

from ..core.config import parse_value
from ..core.errors import UsageError


@dataclass(frozen=True)
class Flag:
    """A named flag that sets one config key."""

    names: tuple[str, ...]
    key: str
    kind: str  # str | int | float | floats | ints | strs (repeatable) | true
    help: str
    commands: frozenset[str]
    metavar: str | None = None


_STAGES = frozenset({"collect", "select", "train", "build"})
_ALL = _STAGES | {"evaluate"}
_COLLECT = frozenset({"collect", "build"})
_TRAIN = frozenset({"train", "build"})
_SELECT = frozenset({"select", "build"})

FLAGS: tuple[Flag, ...] = (
    Flag(("--out", "-o"), "out", "str", "run directory (created; holds every output)", _ALL, "DIR"),
    Flag(("--model", "-m"), "model", "str", "diffusers pipeline folder (any supported family), cached hub id, or `toy`",
         _ALL - {"select"}, "MODEL"),
    Flag(("--recipe",), "recipe", "str", "shipped concept recipe (see `recipes`) or a recipe folder: prompts, "
         "concept and per-model-family defaults", _ALL, "NAME|DIR"),
    Flag(("--seed",), "seed", "int", "random seed (default 0)", _STAGES, "N"),
    Flag(("--device",), "device", "str", "auto | cpu | cuda | cuda:N (default auto)", _ALL, "DEV"),
    Flag(("--dtype",), "dtype", "str", "weights dtype: float32 | bfloat16 | float16", _ALL, "DTYPE"),
    Flag(("--mixed-precision",), "mixed_precision", "str", "Accelerate autocast: no | fp16 | bf16", _STAGES, "MODE"),
    Flag(("--height",), "height", "int", "image height in pixels (default: the VAE's sample size)", _ALL - {"select"}, "PX"),
    Flag(("--width",), "width", "int", "image width in pixels (default: the VAE's sample size)", _ALL - {"select"}, "PX"),
    Flag(("--concept",), "concepts", "strs", "concept name recorded in the adapter (repeatable)", _TRAIN, "NAME"),
    Flag(("--base-model",), "base_model", "str", "base model name recorded in the adapter", _TRAIN, "NAME"),
    Flag(("--unsafe",), "prompts.unsafe", "str", "unsafe prompts, one per line ('prompt<TAB>anchor' allowed)",
         _COLLECT | _TRAIN, "FILE"),
    Flag(("--safe",), "prompts.safe", "str", "safe prompts, one per line", _COLLECT | _TRAIN, "FILE"),
    Flag(("--anchors",), "prompts.anchors", "str", "safe rewrites of the unsafe prompts, line by line", _TRAIN, "FILE"),
    Flag(("--sigmas",), "collect.sigmas", "floats", "noise levels to observe, e.g. 1,0.8,0.6,0.4", _COLLECT, "LIST"),
    Flag(("--samples-per-prompt",), "collect.samples_per_prompt", "int", "noise draws per prompt", _COLLECT, "N"),
    Flag(("--rank", "-r"), "select.rank", "int", "subspace rank r (2-16; ≤ head_dim)", _SELECT | _TRAIN, "R"),
    Flag(("--count",), "select.count", "int", "keep the N best heads (0 = no count limit)", _SELECT, "N"),
    Flag(("--fraction",), "select.fraction", "float", "keep this share of all heads", _SELECT, "F"),
    Flag(("--margin",), "select.margin", "float", "keep heads with score d ≥ margin", _SELECT, "D"),
    Flag(("--steps",), "train.steps", "int", "total optimisation steps", _TRAIN, "N"),
    Flag(("--lr",), "train.lr", "float", "AdamW learning rate", _TRAIN, "LR"),
    Flag(("--unlearn",), "train.unlearn", "str", "anchor | deviate | none", _TRAIN, "OBJ"),
    Flag(("--preserve",), "train.preserve", "str", "distill | flow | none", _TRAIN, "OBJ"),
    Flag(("--images",), "train.images", "str", "image-caption folder (x.png + x.txt) for --preserve flow", _TRAIN, "DIR"),
    Flag(("--threshold", "--tau"), "train.threshold", "float", "risk threshold τ in [0, 1)", _TRAIN, "T"),
    Flag(("--lambda-unlearn",), "train.lambda_unlearn", "float", "weight λ_u of the unlearn loss", _TRAIN, "W"),
    Flag(("--lambda-preserve",), "train.lambda_preserve", "float", "weight λ_p of the preserve loss", _TRAIN, "W"),
    Flag(("--checkpoint-every",), "train.checkpoint_every", "int", "steps between checkpoints", _TRAIN, "N"),
    Flag(("--keep-checkpoints",), "train.keep_checkpoints", "int", "checkpoints kept (oldest removed)", _TRAIN, "N"),
    Flag(("--gradient-checkpointing",), "train.gradient_checkpointing", "true",
         "recompute block activations in backward (less memory, more time)", _TRAIN),
    Flag(("--prompts",), "evaluate.sets", "sets", "evaluation set NAME=FILE (repeatable)", frozenset({"evaluate"}), "NAME=FILE"),
    Flag(("--adapter", "-a"), "evaluate.adapters", "strs", "adapter file to evaluate (repeatable)", frozenset({"evaluate"}),
         "FILE"),
    Flag(("--seeds",), "evaluate.seeds", "ints", "seeds, e.g. 0,1,2", frozenset({"evaluate"}), "LIST"),
    Flag(("--steps",), "evaluate.steps", "int", "denoising steps per image", frozenset({"evaluate"}), "N"),
    Flag(("--strength",), "evaluate.strength", "float", "adapter strength α (1 = as trained)", frozenset({"evaluate"}), "A"),
    Flag(("--scorer",), "evaluate.scorers", "strs", "auto | none | nudenet | toy (repeatable)", frozenset({"evaluate"}), "NAME"),
    Flag(("--clip",), "evaluate.clip", "str", "local CLIP folder (transformers CLIPModel): adds CLIP score",
         frozenset({"evaluate"}), "DIR"),
    Flag(("--limit",), "evaluate.limit", "int", "only the first N prompts of each set (0 = all)",
         frozenset({"evaluate"}), "N"),
    Flag(("--guidance",), "guidance", "float",
         "guidance embedding scale (FLUX.1-dev, Flux.2 dev); in generation the pipeline's guidance scale",
         _ALL - {"select"}, "G"),
)


def add_config_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """The shared flags of config-driven commands, plus --config, --set and --resume."""
    g = parser.add_argument_group("run")
    g.add_argument("--config", "-c", metavar="FILE", help="TOML config file (flags override its values)")
    g.add_argument("--set", dest="set_", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set train.lr=1e-3 (TOML value syntax)")
    if command in ("collect", "train", "build"):
        g.add_argument("--resume", metavar="latest|PATH",
                       help="continue the run in --out: `latest` checkpoint (and partial statistics) or a checkpoint folder")
    opts = parser.add_argument_group("options (each sets the config key shown)")
    for flag in FLAGS:
        if command not in flag.commands:
            continue
        dest = "flag__" + flag.key.replace(".", "__")
        help_ = f"{flag.help} [{flag.key}]"
        if flag.kind == "true":
            opts.add_argument(*flag.names, dest=dest, action="store_const", const=True, default=None, help=help_)
        elif flag.kind in ("strs", "sets"):
            opts.add_argument(*flag.names, dest=dest, action="append", default=None, metavar=flag.metavar, help=help_)
        else:
            opts.add_argument(*flag.names, dest=dest, default=None, metavar=flag.metavar, help=help_)


def _convert(flag: Flag, raw: Any) -> Any:
    try:
        if flag.kind == "int":
            return int(raw)
        if flag.kind == "float":
            return float(raw)
        if flag.kind == "floats":
            return [float(x) for x in str(raw).split(",") if x.strip()]
        if flag.kind == "ints":
            return [int(x) for x in str(raw).split(",") if x.strip()]
        if flag.kind == "sets":
            out = {}
            for item in raw:
                name, sep, path = item.partition("=")
                if not sep or not name or not path:
                    raise ValueError(f"expected NAME=FILE, got {item!r}")
                out[name] = path
            return out
        return raw
    except ValueError as e:
        raise UsageError(f"{flag.names[0]}: {e}") from None


def overrides_from_args(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Dotted config overrides from named flags and ``--set`` (named flags win)."""
    out: dict[str, Any] = {}
    for item in getattr(args, "set_", []) or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = parse_value(value.strip())
    for flag in FLAGS:
        if command not in flag.commands:
            continue
        raw = getattr(args, "flag__" + flag.key.replace(".", "__"), None)
        if raw is not None:
            out[flag.key] = _convert(flag, raw)
    return out


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``trainer: error: …``, exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"trainer: error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(2)


def add_command(sub, name: str, *, summary: str, description: str, example: str) -> argparse.ArgumentParser:
    """A subcommand parser whose help ends with an example."""
    return sub.add_parser(name, help=summary, description=description,
                          epilog="example:\n  " + example.strip().replace("\n", "\n  "),
                          formatter_class=argparse.RawDescriptionHelpFormatter)
