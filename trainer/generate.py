"""``generate``: one image from a prompt with adapters applied exactly as the nodes apply them.

The FluxPipeline runs normally; each ``--adapter`` is applied with
:func:`saferope_engine.diffusers.apply_saferope` (stacked in the given order, each with its own
``--strength``). Latent noise comes from a CPU generator seeded with ``--seed``, so an image is
the same on any device for the same seed.
"""

from __future__ import annotations

import argparse
import contextlib
import math
from pathlib import Path
from typing import Sequence

import torch

from saferope_engine import SafeRoPEAdapter, load_adapter

from .cli import add_command
from .errors import UsageError
from .models import ModelInfo, image_size, load_pipeline, max_sequence_length, resolve_model
from .rundir import atomic_save_image, check_output_dir

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def register(sub) -> None:
    p = add_command(sub, "generate", summary="one image with SafeRoPE adapters applied (same math as the nodes)",
                    description="Generate one image with the model's FluxPipeline, with zero or more adapters applied\n"
                                "through the diffusers integration (each with its own strength). Without --adapter it\n"
                                "shows the base model, for comparison at the same seed.",
                    example='python -m trainer generate --model toy --adapter runs/red/adapter.safetensors \\\n'
                            '    --prompt "a red circle on a plain background" --seed 3 --out red-protected.png')
    p.add_argument("--model", "-m", required=True, help="FLUX folder, cached hub id, or `toy`")
    p.add_argument("--adapter", "-a", action="append", default=[], metavar="FILE",
                   help="adapter .safetensors (repeatable: applied in order)")
    p.add_argument("--strength", action="append", type=float, default=None, metavar="A",
                   help="strength α per adapter, or one for all (default 1)")
    p.add_argument("--threshold", type=float, default=None, metavar="T", help="override the adapters' τ")
    p.add_argument("--prompt", "-p", required=True, help="the prompt")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--steps", type=int, default=28, help="denoising steps (default 28; schnell: 4)")
    p.add_argument("--guidance", type=float, default=3.5, help="guidance scale (FLUX.1-dev; default 3.5)")
    p.add_argument("--height", type=int, default=0, help="pixels (default: the VAE's sample size)")
    p.add_argument("--width", type=int, default=0, help="pixels (default: the VAE's sample size)")
    p.add_argument("--max-sequence-length", type=int, default=0, help="T5 tokens (default: the tokenizer's limit)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="weights dtype")
    p.add_argument("--out", "-o", required=True, help="image file to write (.png, .jpg, .webp)")
    p.add_argument("--force", action="store_true", help="overwrite an existing image")
    p.set_defaults(func=run)


def load_adapters(paths: Sequence[str], info: ModelInfo) -> list[SafeRoPEAdapter]:
    """Load and check each adapter against the model's shapes (before any model is loaded)."""
    adapters = []
    for path in paths:
        adapter = load_adapter(path)
        adapter.check_compatible(info.shapes)
        adapters.append(adapter)
    return adapters


def check_strengths(given: Sequence[float] | None) -> None:
    """Every ``--strength`` must be a finite number ≥ 0."""
    if given and any(not (math.isfinite(s) and s >= 0) for s in given):
        raise UsageError(f"--strength must be a finite number ≥ 0, got {', '.join(map(str, given))}")


def strengths_for(adapters: Sequence[SafeRoPEAdapter], given: Sequence[float] | None) -> list[float]:
    check_strengths(given)
    if not given:
        return [1.0] * len(adapters)
    if len(given) == 1:
        return [given[0]] * len(adapters)
    if len(given) != len(adapters):
        raise UsageError(f"{len(given)} --strength values for {len(adapters)} adapters (give one, or one per adapter)")
    return list(given)


@contextlib.contextmanager
def applied(transformer, adapters: Sequence[SafeRoPEAdapter], strengths: Sequence[float], threshold: float | None):
    """Apply adapters in order; remove them in reverse order on exit."""
    from saferope_engine.diffusers import apply_saferope

    handles = []
    try:
        for adapter, s in zip(adapters, strengths):
            handles.append(apply_saferope(transformer, adapter, strength=s, threshold=threshold))
        yield handles
    finally:
        for h in reversed(handles):
            h.remove()


def generate_images(pipe, prompts: Sequence[str], seeds: Sequence[int], *, steps: int, guidance: float,
                    height: int, width: int, max_len: int) -> list:
    """PIL images for ``prompts[i]`` with noise seed ``seeds[i]`` (CPU generators: device-independent)."""
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    with torch.no_grad():
        out = pipe(prompt=list(prompts), generator=gens, num_inference_steps=steps, guidance_scale=guidance,
                   height=height, width=width, max_sequence_length=max_len, output_type="pil")
    return list(out.images)


def run(args: argparse.Namespace) -> int:
    from .runtime import make_runtime

    out = Path(args.out)
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise UsageError(f"--out {str(out)!r}: use one of {', '.join(IMAGE_SUFFIXES)}")
    if out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a directory; give an image file name")
    if out.exists() and not args.force:
        raise UsageError(f"{str(out)!r} exists; add --force to overwrite it")
    check_output_dir(out.parent, "--out's folder")
    if not args.prompt.strip():
        raise UsageError("--prompt is empty")
    if args.steps < 1:
        raise UsageError(f"--steps must be ≥ 1, got {args.steps}")
    if args.threshold is not None and not 0.0 <= args.threshold < 1.0:
        raise UsageError(f"--threshold must be in [0, 1), got {args.threshold}")
    check_strengths(args.strength)
    if not (math.isfinite(args.guidance) and args.guidance >= 0):
        raise UsageError(f"--guidance must be a finite number ≥ 0, got {args.guidance}")
    for flag, v in (("--height", args.height), ("--width", args.width),
                    ("--max-sequence-length", args.max_sequence_length)):
        if v < 0:
            raise UsageError(f"{flag} must be ≥ 0, got {v}")
    info = resolve_model(args.model)
    adapters = load_adapters(args.adapter, info)
    strengths = strengths_for(adapters, args.strength)
    h, w = image_size(info, args.height, args.width)
    max_len = max_sequence_length(info, args.max_sequence_length)
    runtime = make_runtime(args.device, "no")
    pipe = load_pipeline(info, args.dtype, runtime.device)
    with applied(pipe.transformer, adapters, strengths, args.threshold):
        image = generate_images(pipe, [args.prompt], [args.seed], steps=args.steps, guidance=args.guidance,
                                height=h, width=w, max_len=max_len)[0]
    atomic_save_image(image, out)
    print(f"wrote {out} ({w}×{h}, seed {args.seed}, {len(adapters)} adapter(s))")
    return 0
