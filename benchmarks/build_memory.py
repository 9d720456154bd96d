"""GPU memory a ``build`` needs, per model family — computed, not measured (no GPU was available).

A build runs in three phases, and the trainer never holds a text encoder and the transformer at
the same time (``trainer.families.text``: every prompt list is encoded once, cached, and the text
encoders freed before the transformer is loaded), so its peak is the largest of:

* **encode**: the text encoders' bf16 weights (parameters × 2 bytes) + ``OVERHEAD_GB``
  (activations of a no-grad batch of 8 prompts are far below that);
* **collect**: the transformer's bf16 weights + the Gram accumulators on the device (every block
  × q and k × heads × head_dim² × 8 bytes, float64, text segment) + one no-grad block's
  activations at the collect batch + ``OVERHEAD_GB``;
* **train** with gradient checkpointing (the recipes' default): the transformer's weights + each
  block's input kept for backward (blocks × batch × tokens × hidden × 2 bytes) + one block's
  activations while it is recomputed + ``OVERHEAD_GB``. Without checkpointing every block's
  activations are kept instead.

One block's activations kept for backward are ``ACT_PER_TOKEN_HIDDEN`` × batch × tokens × hidden ×
2 bytes: the factor is calibrated on the FLUX.1-dev blocks that ``walkthrough_estimates.py``
measures on the CPU (0.228 GB per double block, 0.209 GB per single block at batch 2, 1,536 tokens,
hidden 3,072: 12.1 and 11.1), and applied to every family — a family whose blocks are wider (MLP
ratio) or narrower differs by that much. Tokens: the image tokens at the training size
(``--size``, 512 as in the recipes) plus the text length the family's pipeline encodes to by
default (an upper bound for Qwen-Image, HunyuanImage and Z-Image, which keep only the real
tokens of each batch's longest prompt).

Inputs stated here (``MODELS``): the parameter counts published for each release (model cards;
FLUX.1-dev's is counted exactly by ``walkthrough_estimates.py``), and the architecture numbers
of ``saferope_engine.arch``'s ``models`` lines (heads × head_dim = hidden, blocks), the VAE's
downsampling and the transformer's patch size. Flux.2 Klein is not tabulated: its block counts
are not recorded in the registry.

    python benchmarks/build_memory.py            # the README's table
    python benchmarks/build_memory.py --json
    python benchmarks/build_memory.py --size 1024 --batch 1
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GB = 1e9
BF16 = 2  # bytes per weight / activation
OVERHEAD_GB = 1.0  # CUDA context, allocator slack, transients of no-grad calls
ACT_PER_TOKEN_HIDDEN = 12.0  # saved activations of one block per (sample · token · hidden), bf16 values


@dataclass(frozen=True)
class Model:
    family: str  # engine registry id
    name: str
    transformer_b: float  # parameters, billions (published)
    text: tuple[tuple[str, float], ...]  # text encoders: (name, parameters in billions, published)
    heads: int
    head_dim: int
    blocks: int  # every block that runs attention over the joint sequence
    vae_factor: int  # pixels per latent cell
    patch: int  # latent cells per token side
    text_tokens: int  # the pipeline's default text length (diffusers 0.42)


MODELS = (
    Model("flux1", "FLUX.1-dev", 11.901, (("T5-XXL encoder", 4.762), ("CLIP-L", 0.123)), 24, 128, 19 + 38, 8, 2, 512),
    Model("chroma", "Chroma1-HD", 8.9, (("T5-XXL encoder", 4.762),), 24, 128, 19 + 38, 8, 2, 512),
    Model("flux2", "FLUX.2-dev", 32.0, (("Mistral Small 3.1 24B", 24.0),), 48, 128, 8 + 48, 8, 2, 512),
    Model("hunyuan_image", "HunyuanImage-2.1", 17.0, (("Qwen2.5-VL-7B", 8.29), ("ByT5-small encoder (glyphs)", 0.22)),
          28, 128, 20 + 40, 32, 1, 1000 + 128),
    Model("qwen_image", "Qwen-Image", 20.4, (("Qwen2.5-VL-7B", 8.29),), 24, 128, 60, 8, 2, 512),
    Model("z_image", "Z-Image-Turbo", 6.15, (("Qwen3-4B", 4.02),), 30, 128, 2 + 30, 8, 2, 512),
)


def estimate(m: Model, *, size: int, batch: int, collect_batch: int) -> dict:
    hidden = m.heads * m.head_dim
    img = (size // (m.vae_factor * m.patch)) ** 2
    tokens = img + m.text_tokens
    weights = m.transformer_b * 1e9 * BF16 / GB
    text_weights = sum(p for _, p in m.text) * 1e9 * BF16 / GB
    block = ACT_PER_TOKEN_HIDDEN * tokens * hidden * BF16 / GB  # one sample's activations in one block
    grams = m.blocks * 2 * m.heads * m.head_dim ** 2 * 8 / GB
    encode = text_weights + OVERHEAD_GB
    collect = weights + grams + collect_batch * block + OVERHEAD_GB
    inputs = m.blocks * batch * tokens * hidden * BF16 / GB
    train = weights + inputs + batch * block + OVERHEAD_GB
    train_plain = weights + m.blocks * batch * block + OVERHEAD_GB
    phases = {"encode": encode, "collect": collect, "train": train}
    return {**asdict(m), "hidden": hidden, "image_tokens": img, "tokens": tokens,
            "transformer_gb": round(weights, 2), "text_encoders_gb": round(text_weights, 2),
            "grams_gb": round(grams, 3), "block_inputs_gb": round(inputs, 2),
            "encode_gb": round(encode, 1), "collect_gb": round(collect, 1), "train_gb": round(train, 1),
            "train_no_checkpointing_gb": round(train_plain, 1),
            "peak_gb": round(max(phases.values()), 1), "peak_phase": max(phases, key=phases.get),
            "together_gb": round(weights + text_weights + OVERHEAD_GB, 1)}


def table(rows: list[dict], args: argparse.Namespace) -> str:
    head = (f"estimate (computed, not measured: no GPU) — build at {args.size}×{args.size}, train batch {args.batch}, "
            f"collect batch {args.collect_batch}, bf16, gradient checkpointing\n\n"
            "| family | model | transformer bf16 | text encoders bf16 (freed before the transformer) | encode | collect "
            "| train | **build peak** | train without checkpointing | transformer + text encoders together |\n"
            "|---|---|---:|---|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    for r in rows:
        text = " + ".join(f"{n} {p * BF16:.1f}" for n, p in r["text"])
        lines.append(f"| `{r['family']}` | {r['name']} | {r['transformer_gb']:.1f} GB | {text} GB | {r['encode_gb']:.1f} "
                     f"| {r['collect_gb']:.1f} | {r['train_gb']:.1f} | **{r['peak_gb']:.0f} GB** | "
                     f"{r['train_no_checkpointing_gb']:.0f} GB | {r['together_gb']:.0f} GB |")
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512, help="training image size in pixels (recipes: 512)")
    p.add_argument("--batch", type=int, default=2, help="train batch size (recipes: 2)")
    p.add_argument("--collect-batch", type=int, default=4, help="collect batch size (recipes: 4)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from saferope_engine import arch

    missing = sorted(set(arch.ids()) - {m.family for m in MODELS})
    if missing:  # a registry family without a row here
        raise SystemExit(f"no model inputs for {missing}: add them to MODELS")
    rows = [estimate(m, size=args.size, batch=args.batch, collect_batch=args.collect_batch) for m in MODELS]
    if args.json:
        print(json.dumps({"size": args.size, "batch": args.batch, "collect_batch": args.collect_batch,
                          "overhead_gb": OVERHEAD_GB, "act_per_token_hidden": ACT_PER_TOKEN_HIDDEN, "models": rows},
                         indent=1))
    else:
        print(table(rows, args), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
