"""The ``python -m trainer`` command line: the root parser, logging, one-line errors.

The subcommands come from the table :data:`trainer.commands.COMMANDS` (one module per command,
each with ``register(sub)``); the flags they share are in :mod:`trainer.commands.base`. No
command module imports this one.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from .commands import COMMANDS
from .commands.base import Parser
from .core.errors import TrainerError

logger = logging.getLogger("trainer")

PROG = "python -m trainer"

OVERVIEW = """\
SafeRoPE trainer: turn prompt lists and a diffusers model (FLUX.1, Flux.2, Chroma, HunyuanImage 2.1,
Qwen-Image, Z-Image) into SafeRoPE adapters (.safetensors)
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

Models (--model): a local diffusers pipeline folder of a supported family (FluxPipeline, Flux2Pipeline,
Flux2KleinPipeline, ChromaPipeline, HunyuanImagePipeline, QwenImagePipeline, ZImagePipeline; the family is
read from model_index.json and the transformer class), a hub id already in the local Hugging Face cache,
or `toy`. Nothing is downloaded. Multi-GPU: `accelerate launch -m trainer build …`.
"""


def build_parser(commands: Sequence[ModuleType] | None = None) -> argparse.ArgumentParser:
    """The root parser with one subcommand per module of ``commands`` (default: :data:`trainer.commands.COMMANDS`).

    Each command module has ``register(sub)``; none of them imports this module.
    """
    parser = Parser(prog=PROG, description=OVERVIEW, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (and tracebacks)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for module in COMMANDS if commands is None else commands:
        module.register(sub)
    return parser


def setup_logging(verbose: bool, quiet: bool) -> None:
    """Console logging (``trainer: …`` on stderr). Of several launched processes only the main one logs
    progress; the others log warnings and errors, prefixed with their rank (``-v``: everything)."""
    from .core.runtime import launched_processes

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
    from .core.runtime import launched_processes

    rank = launched_processes()[0]
    prefix = f"trainer[rank {rank}]: error: " if rank else "trainer: error: "
    sys.stderr.write(prefix + " ".join(message.split()) + "\n")
