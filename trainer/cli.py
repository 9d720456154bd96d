"""The ``python -m trainer`` command line: subcommands, shared flags, one-line errors.

Every subcommand module registers itself with :func:`add_command`. Config-driven commands share
the flag table :data:`FLAGS`, which maps each named flag onto a dotted config key (any key can
also be set with ``--set section.key=value``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

from .config import parse_value
from .errors import TrainerError, UsageError

logger = logging.getLogger("trainer")

PROG = "python -m trainer"

OVERVIEW = """\
SafeRoPE trainer: turn prompt lists and a FLUX model into SafeRoPE adapters (.safetensors)
that the ComfyUI nodes and the diffusers integration load.

The usual way: write a config file and run `build`, then `evaluate` and `inspect` the result.

commands (each has --help with an example):
  demo      erase 'red' from the shipped toy FLUX: build, benchmark, report (the main demo)
              python -m trainer demo --out demo_out
  build     collect → select → train from one config file; writes OUT/adapter.safetensors
              python -m trainer build --config red.toml --out runs/red
              python -m trainer build --recipe nudity --model ./FLUX.1-dev --out runs/nudity
  recipes   list the shipped concept recipes (nudity, violence, van-gogh, mickey-mouse) and their sizes
              python -m trainer recipes
  collect   Gram statistics of queries/keys on unsafe and safe prompts (resumable)
              python -m trainer collect --model ./FLUX.1-dev --unsafe unsafe.txt --safe safe.txt --out runs/n
  select    head discrimination scores, chosen heads, heatmap PNG and table
              python -m trainer select --out runs/n --rank 4 --count 8
  train     learn the rotation generators of the chosen heads (checkpoints, --resume latest)
              python -m trainer train --out runs/n --steps 300 --unlearn anchor --preserve distill
  evaluate  generate prompt sets with and without adapters at fixed seeds; metrics
              python -m trainer evaluate --model toy --adapter runs/red/adapter.safetensors --prompts red=red.txt --out runs/red
              python -m trainer evaluate --out runs/nudity --recipe nudity --limit 25
  generate  one image with adapters applied exactly as the nodes do
              python -m trainer generate --model toy --adapter red.safetensors --prompt "a red circle" --out img.png
  convert   the authors' rotary_adapter_s_param.pth → adapter .safetensors
              python -m trainer convert rotary_adapter_s_param.pth nudity.safetensors
  inspect   print an adapter's metadata, blocks, heads, rank and generator norms
              python -m trainer inspect runs/red/adapter.safetensors

Models (--model): a local diffusers FLUX folder (FLUX.1-dev/schnell layout), a hub id already in the
local Hugging Face cache, or `toy`. Nothing is downloaded. Multi-GPU: `accelerate launch -m trainer build …`.
"""


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
    Flag(("--model", "-m"), "model", "str", "FLUX folder, cached hub id, or `toy`", _ALL - {"select"}, "MODEL"),
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
    Flag(("--adapter", "-a"), "evaluate.adapters", "strs", "adapter file to evaluate (repeatable)", frozenset({"evaluate"}), "FILE"),
    Flag(("--seeds",), "evaluate.seeds", "ints", "seeds, e.g. 0,1,2", frozenset({"evaluate"}), "LIST"),
    Flag(("--steps",), "evaluate.steps", "int", "denoising steps per image", frozenset({"evaluate"}), "N"),
    Flag(("--strength",), "evaluate.strength", "float", "adapter strength α (1 = as trained)", frozenset({"evaluate"}), "A"),
    Flag(("--scorer",), "evaluate.scorers", "strs", "auto | none | nudenet | toy (repeatable)", frozenset({"evaluate"}), "NAME"),
    Flag(("--clip",), "evaluate.clip", "str", "local CLIP folder (transformers CLIPModel): adds CLIP score",
         frozenset({"evaluate"}), "DIR"),
    Flag(("--limit",), "evaluate.limit", "int", "only the first N prompts of each set (0 = all)",
         frozenset({"evaluate"}), "N"),
    Flag(("--guidance",), "guidance", "float", "guidance embedding scale (FLUX.1-dev)", _ALL - {"select"}, "G"),
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


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``trainer: error: …``, exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"trainer: error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(2)


_COMMANDS: list[Callable[[Any], None]] = []


def build_parser() -> argparse.ArgumentParser:
    from . import convert, demo, evaluate, generate, inspect, recipes, stages

    parser = _Parser(prog=PROG, description=OVERVIEW, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (and tracebacks)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in (demo, stages, evaluate, generate, convert, inspect, recipes):
        module.register(sub)
    return parser


def add_command(sub, name: str, *, summary: str, description: str, example: str) -> argparse.ArgumentParser:
    """A subcommand parser whose help ends with an example."""
    return sub.add_parser(name, help=summary, description=description,
                          epilog="example:\n  " + example.strip().replace("\n", "\n  "),
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def setup_logging(verbose: bool, quiet: bool) -> None:
    """Console logging (``trainer: …`` on stderr). Of several launched processes only the main one logs
    progress; the others log warnings and errors, prefixed with their rank (``-v``: everything)."""
    from .runtime import launched_processes

    level = logging.DEBUG if verbose else (logging.WARNING if quiet else logging.INFO)
    rank = launched_processes()[0]
    handler = logging.StreamHandler(sys.stderr)
    if rank != 0:
        level = logging.DEBUG if verbose else logging.WARNING
        handler.setFormatter(logging.Formatter(f"trainer[rank {rank}]: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("trainer: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_trainer", False):
            root.removeHandler(h)
    handler._trainer = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    handler.setLevel(level)
    for name in ("diffusers", "transformers", "accelerate", "huggingface_hub", "PIL", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.ERROR)


def quiet_libraries() -> None:
    """Offline mode, no library progress bars or chatter (set before diffusers/transformers load)."""
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS",
                "DIFFUSERS_NO_ADVISORY_WARNINGS", "TRANSFORMERS_NO_ADVISORY_WARNINGS"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 runtime error, 2 bad input)."""
    quiet_libraries()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if not args.command:
        parser.print_help()
        return 2
    setup_logging(args.verbose, args.quiet)
    from saferope_engine.errors import SafeRoPEError

    try:
        return int(args.func(args) or 0)
    except TrainerError as e:
        _one_line(str(e))
        return e.exit_code
    except SafeRoPEError as e:
        _one_line(str(e))
        return 1
    except KeyboardInterrupt:
        _one_line("interrupted (resume with --resume latest)")
        return 130
    except OSError as e:  # a file that could not be read or written while running: name it
        logger.debug("traceback", exc_info=True)
        where = f"{e.filename}: " if e.filename else ""
        _one_line(f"{where}{e.strerror or e} ({type(e).__name__}; run with -v for the traceback)")
        return 1
    except Exception as e:  # unexpected: one line, traceback in the log file / with -v
        logger.debug("traceback", exc_info=True)
        _one_line(f"unexpected {type(e).__name__}: {e} (run with -v for the traceback)")
        return 1


def _one_line(message: str) -> None:
    from .runtime import launched_processes

    rank = launched_processes()[0]
    prefix = f"trainer[rank {rank}]: error: " if rank else "trainer: error: "
    sys.stderr.write(prefix + " ".join(message.split()) + "\n")
