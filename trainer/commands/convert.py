"""``convert``: the authors' ``rotary_adapter_s_param.pth`` → a format-v1 ``.safetensors`` adapter.

Reads the checkpoint with ``torch.load(weights_only=True)`` (nothing else is unpickled) through
:func:`saferope_engine.authors.load_authors_checkpoint`, prints what the import changed (symmetric
parts dropped, bases re-orthonormalised, empty heads dropped) and writes the adapter atomically.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from saferope_engine.authors import load_authors_checkpoint

from ..core.errors import UsageError
from .base import add_command


def register(sub) -> None:
    p = add_command(sub, "convert", summary="convert the authors' rotary_adapter_s_param.pth to .safetensors",
                    description="Import a checkpoint of the SafeRoPE authors' RotaryAdapter (deng12yx/SafeRoPE) into\n"
                                "the adapter format the nodes load. Their generators S become A = skew part of S^T;\n"
                                "their single-block generators [0] and [1] map to image and text tokens by default.",
                    example="python -m trainer convert rotary_adapter_s_param.pth nudity.safetensors --threshold 0.7")
    p.add_argument("checkpoint", help="the authors' .pth state dict (read with weights_only=True)")
    p.add_argument("output", help="adapter .safetensors to write (refuses to overwrite without --force)")
    p.add_argument("--threshold", type=float, default=0.7, help="default τ stored in the adapter (authors: 0.7)")
    p.add_argument("--single-segments", default="img,txt", metavar="SEG0,SEG1",
                   help="segments of S_param_Single[i][0] and [1] (default img,txt)")
    p.add_argument("--concept", action="append", default=None, help="concept name (repeatable; default nudity)")
    p.add_argument("--base-model", default="FLUX.1-dev", help="base model recorded in the adapter")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    src, out = Path(args.checkpoint), Path(args.output)
    if not src.is_file():
        raise UsageError(f"checkpoint {str(src)!r} not found")
    if out.exists() and not args.force:
        raise UsageError(f"{str(out)!r} exists; add --force to overwrite it")
    if out.suffix != ".safetensors":
        raise UsageError(f"output {str(out)!r} must end in .safetensors")
    segs = tuple(s.strip() for s in args.single_segments.split(","))
    if sorted(segs) != ["img", "txt"]:
        raise UsageError(f"--single-segments must be img,txt or txt,img, got {args.single_segments!r}")
    if not 0.0 <= args.threshold < 1.0:
        raise UsageError(f"--threshold must be in [0, 1), got {args.threshold}")
    adapter, report = load_authors_checkpoint(src, threshold=args.threshold, single_segments=segs,
                                              concepts=tuple(args.concept or ["nudity"]), base_model=args.base_model)
    adapter.save(out)
    for line in report.lines():
        print(f"import: {line}")
    print(f"wrote {out}: {len(adapter.blocks)} blocks, "
          f"{sum(b.heads.numel() for b in adapter.blocks.values())} heads, rank {adapter.meta.rank}")
    return 0
