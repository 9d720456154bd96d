"""``generate``: one image from a prompt with adapters applied exactly as the nodes apply them.

The model's pipeline runs normally; each ``--adapter`` is applied with
:func:`saferope_engine.diffusers.apply_saferope` (stacked in the given order, each with its own
``--strength``). Latent noise comes from a CPU generator seeded with ``--seed``, so an image is
the same on any device for the same seed.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..core.errors import UsageError
from ..core.rundir import atomic_save_image, check_output_dir
from ..evaluation.generation import applied, check_strengths, generate_images, load_adapters, strengths_for
from ..families.models import image_size, load_pipeline, max_sequence_length, resolve_model
from .base import add_command

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def register(sub) -> None:
    p = add_command(sub, "generate", summary="one image with SafeRoPE adapters applied (same math as the nodes)",
                    description="Generate one image with the model's own pipeline (its family's), with zero or\n"
                                "more adapters applied "
                                "through the diffusers integration (each with its own strength). Without --adapter it\n"
                                "shows the base model, for comparison at the same seed.",
                    example='python -m trainer generate --model toy --adapter runs/red/adapter.safetensors \\\n'
                            '    --prompt "a red circle on a plain background" --seed 3 --out red-protected.png')
    p.add_argument("--model", "-m", required=True,
                   help="diffusers pipeline folder (any supported family), cached hub id, or `toy`")
    p.add_argument("--adapter", "-a", action="append", default=[], metavar="FILE",
                   help="adapter .safetensors (repeatable: applied in order)")
    p.add_argument("--strength", action="append", type=float, default=None, metavar="A",
                   help="strength α per adapter, or one for all (default 1)")
    p.add_argument("--threshold", type=float, default=None, metavar="T", help="override the adapters' τ")
    p.add_argument("--prompt", "-p", required=True, help="the prompt")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--steps", type=int, default=28, help="denoising steps (default 28; schnell: 4)")
    p.add_argument("--guidance", type=float, default=3.5,
                   help="guidance scale, as the family's pipeline takes it (FLUX.1: the embedding; Qwen-Image: true CFG; "
                        "default 3.5)")
    p.add_argument("--height", type=int, default=0, help="pixels (default: the VAE's sample size)")
    p.add_argument("--width", type=int, default=0, help="pixels (default: the VAE's sample size)")
    p.add_argument("--max-sequence-length", type=int, default=0, help="text tokens (default: the family's length)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="weights dtype")
    p.add_argument("--out", "-o", required=True, help="image file to write (.png, .jpg, .webp)")
    p.add_argument("--force", action="store_true", help="overwrite an existing image")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..core.runtime import make_runtime

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
        image = generate_images(info, pipe, [args.prompt], [args.seed], steps=args.steps, guidance=args.guidance,
                                height=h, width=w, max_len=max_len)[0]
    atomic_save_image(image, out)
    print(f"wrote {out} ({w}×{h}, seed {args.seed}, {len(adapters)} adapter(s))")
    return 0
