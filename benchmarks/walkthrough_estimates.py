"""The README walkthrough's time and GPU-memory estimates for FLUX.1-dev, computed from first principles.

No GPU was available to this project, so every figure of the walkthrough is an estimate. This
script computes them so that anyone can check or redo them (or replace the assumed throughput
with a measured one):

* **parameters** of the FLUX.1-dev transformer, T5-XXL encoder, CLIP-L text encoder and VAE:
  counted exactly from their architectures (built on the ``meta`` device, no weights), × 2 bytes
  for bf16;
* **FLOPs per transformer call** of one sample with ``L`` tokens: 2 × (weights applied per token)
  × L for the matmuls + 4 · L² · 3072 per block for attention (QKᵀ and AV); the per-sample
  adaLN modulation weights are excluded, they see one vector per sample;
* **activations kept for backward**, *measured* on the CPU: one real FLUX.1-dev double block and
  one single block (random weights, float32) run forward at the walkthrough's size with the
  input requiring grad; ``torch.autograd.graph.saved_tensors_hooks`` sums the bytes autograd
  keeps (each storage once, parameters excluded, scaled to bf16). Attention goes through the
  flash kernel, which keeps O(L) per head like the GPU kernels do;
* **stage times** = transformer calls × FLOPs / an assumed sustained throughput (default 400
  TFLOP/s: ~40% of an H100 SXM's 989 dense bf16 TFLOP/s; pass ``--tflops`` with yours).

    python benchmarks/walkthrough_estimates.py            # the README's table (about a minute here)
    python benchmarks/walkthrough_estimates.py --json
    python benchmarks/walkthrough_estimates.py --tflops 125   # e.g. an A100 at ~40% of its 312
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HIDDEN, HEADS, HEAD_DIM, DOUBLE, SINGLE, T5_TOKENS = 3072, 24, 128, 19, 38, 512
GB = 1e9


def count_parameters() -> dict[str, int]:
    """Exact parameter counts of FLUX.1-dev's parts (architectures from the release's configs)."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device("meta"):
        tr = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=DOUBLE, num_single_layers=SINGLE,
                                    attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=4096,
                                    pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                     feed_forward_proj="gated-gelu"))
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                            projection_dim=768))
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                            layers_per_block=2, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)

    def n(m) -> int:
        return sum(p.numel() for p in m.parameters())

    dbl, sgl = tr.transformer_blocks[0], tr.single_transformer_blocks[0]
    per_token = (DOUBLE * (n(dbl) - n(dbl.norm1.linear) - n(dbl.norm1_context.linear)) // 2  # one stream per token
                 + SINGLE * (n(sgl) - n(sgl.norm.linear)))
    return {"transformer": n(tr), "t5": n(t5), "clip": n(clip), "vae": n(vae), "transformer_per_token": per_token}


def flops_per_call(tokens: int, per_token: int) -> float:
    """FLOPs of one transformer call on one sample of ``tokens`` tokens (text + image)."""
    return 2.0 * per_token * tokens + (DOUBLE + SINGLE) * 4.0 * tokens ** 2 * HIDDEN


def saved_bytes(img_tokens: int, txt_tokens: int, batch: int) -> dict[str, float]:
    """Bytes autograd keeps for backward in one double and one single block (bf16, measured in float32)."""
    import torch
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed, FluxSingleTransformerBlock, FluxTransformerBlock
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    out: dict[str, float] = {}
    ids = torch.zeros(txt_tokens + img_tokens, 3)
    side = int(math.isqrt(img_tokens))
    ids[txt_tokens:, 1] = torch.arange(side).repeat_interleave(side).float()
    ids[txt_tokens:, 2] = torch.arange(side).repeat(side).float()
    rope = FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(ids)
    temb = torch.randn(batch, HIDDEN)
    for kind in ("double", "single"):
        block = (FluxTransformerBlock(HIDDEN, HEADS, HEAD_DIM) if kind == "double"
                 else FluxSingleTransformerBlock(HIDDEN, HEADS, HEAD_DIM)).requires_grad_(False)
        params = {p.untyped_storage().data_ptr() for p in block.parameters()}
        img = torch.randn(batch, img_tokens, HIDDEN, requires_grad=True)
        txt = torch.randn(batch, txt_tokens, HIDDEN, requires_grad=True)
        storages: dict[int, int] = {}
        quadratic = []

        def pack(t, params=params, storages=storages, quadratic=quadratic):  # this iteration's records
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params and t.is_floating_point():
                storages[ptr] = max(storages.get(ptr, 0), t.untyped_storage().nbytes())
                if t.ndim >= 2 and t.shape[-1] == t.shape[-2] == txt_tokens + img_tokens:
                    quadratic.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            block(hidden_states=img, encoder_hidden_states=txt, temb=temb, image_rotary_emb=rope)
        if quadratic:
            raise SystemExit(f"attention kept an L×L tensor {quadratic[0]}: not the flash kernel")
        out[kind] = sum(storages.values()) / 2  # float32 -> bf16
        del block
    return out


def adapter_megabytes(heads: int, rank: int) -> dict:
    """Size of an adapter file of that shape (a random one, written and measured), 4 heads per block."""
    import tempfile

    from saferope_engine.testing import random_adapter

    blocks = [("double", i) for i in range(DOUBLE)] + [("single", i) for i in range(SINGLE)]
    per_block = 4
    n_blocks = math.ceil(heads / per_block)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "a.safetensors"
        a = random_adapter(num_heads=HEADS, head_dim=HEAD_DIM, model_blocks={"double": DOUBLE, "single": SINGLE},
                           rank=rank, blocks=blocks[:n_blocks], heads=range(per_block), segments=("txt",))
        a.save(path)
        total = path.stat().st_size * heads / (n_blocks * per_block)
    return {"heads": heads, "rank": rank, "mb": total / 1e6}


def estimates(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    p = count_parameters()
    img_tokens = (args.size // 16) ** 2  # VAE /8, 2x2 packing
    L = img_tokens + T5_TOKENS
    L_full = (1024 // 16) ** 2 + T5_TOKENS
    per_call, per_call_full = flops_per_call(L, p["transformer_per_token"]), flops_per_call(L_full, p["transformer_per_token"])
    rate = args.tflops * 1e12
    act = saved_bytes(img_tokens, T5_TOKENS, args.train_batch)
    bf16 = {k: 2.0 * v for k, v in p.items() if k != "transformer_per_token"}
    n_unsafe, n_benign = args.unsafe, args.benign
    # Collect: the trajectory latents call the transformer once per noise level (1, .8, .6, .4).
    collect_calls = (n_unsafe + n_benign) * 4
    # Train, per step (rollout_steps 8): unlearn σ∈[0.75,1] → rollout of 1 call on average, the base target 1, the
    # patched forward + backward 3 (backward into activations only ≈ 1 forward, checkpointing recomputes 1);
    # preserve σ∈[0.25,1] → rollout 3 calls on average, target 1, patched 3. Times the batch.
    train_calls_per_step = (1 + 1 + 3 + 3 + 1 + 3) * args.train_batch
    activations_plain = DOUBLE * act["double"] + SINGLE * act["single"]
    block_inputs = (DOUBLE + SINGLE) * args.train_batch * L * HIDDEN * 2  # what checkpointing keeps per block
    gc_peak_extra = block_inputs + max(act["double"], act["single"])
    eval_images = args.eval_prompts * 2  # base + adapter, one seed
    t5_flops = 2.0 * p["t5"] * T5_TOKENS * (2 * n_unsafe + n_benign)  # unsafe, anchors, benign
    res = {
        "assumed_tflops": args.tflops, "size": args.size, "tokens": L, "train_batch": args.train_batch, "params": p,
        "adapter_mb": adapter_megabytes(args.heads, args.rank),
        "weights_bf16_gb": {k: v / GB for k, v in bf16.items()},
        "flops_per_call": per_call, "flops_per_call_1024": per_call_full,
        "s_per_call": per_call / rate, "s_per_call_1024": per_call_full / rate,
        "saved_per_block_gb": {k: v / GB for k, v in act.items()},
        "stages": {
            "encode": {"prompts": 2 * n_unsafe + n_benign, "s": t5_flops / rate,
                       "gpu_gb": (bf16["t5"] + bf16["clip"]) / GB,
                       "cache_gb": (2 * n_unsafe + n_benign) * T5_TOKENS * 4096 * 2 / GB},
            "collect": {"calls": collect_calls, "s": collect_calls * per_call / rate,
                        "gpu_gb": bf16["transformer"] / GB,
                        "gram_gb": (DOUBLE + SINGLE) * 2 * HEADS * HEAD_DIM ** 2 * 8 / GB},
            "train": {"steps": args.steps, "calls_per_step": train_calls_per_step,
                      "s": args.steps * train_calls_per_step * per_call / rate,
                      "gpu_gb_checkpointing": (bf16["transformer"] + gc_peak_extra) / GB,
                      "gpu_gb_plain": (bf16["transformer"] + activations_plain) / GB},
            "evaluate": {"images": eval_images, "steps": 28, "s": eval_images * 28 * per_call / rate,
                         "gpu_gb": sum(bf16.values()) / GB},
            "comfyui": {"steps": 20, "s": 20 * per_call_full / rate, "gpu_gb": bf16["transformer"] / GB},
        },
        "measure_s": time.perf_counter() - t0,
    }
    return res


def table(r: dict) -> str:
    s = r["stages"]
    w = r["weights_bf16_gb"]
    act = r["saved_per_block_gb"]
    lines = [
        f"parameters: transformer {r['params']['transformer']:,} ({w['transformer']:.1f} GB bf16), "
        f"T5-XXL {r['params']['t5']:,} ({w['t5']:.1f} GB), CLIP-L {r['params']['clip']:,} ({w['clip']:.2f} GB), "
        f"VAE {r['params']['vae']:,} ({w['vae']:.2f} GB); weights applied per token {r['params']['transformer_per_token']:,}",
        f"{r['size']}x{r['size']}: {r['tokens']} tokens, {r['flops_per_call']:.3g} FLOPs per call = "
        f"{r['s_per_call'] * 1e3:.0f} ms at {r['assumed_tflops']:.0f} TFLOP/s; 1024x1024: {r['flops_per_call_1024']:.3g} "
        f"FLOPs = {r['s_per_call_1024'] * 1e3:.0f} ms",
        f"kept for backward (measured, bf16, batch {r['train_batch']}): double block "
        f"{act['double']:.3f} GB, single block {act['single']:.3f} GB",
        f"adapter file ({r['adapter_mb']['heads']} heads, rank {r['adapter_mb']['rank']}, text generators; measured): "
        f"{r['adapter_mb']['mb']:.2f} MB",
        f"encode:   {s['encode']['prompts']} prompts, {s['encode']['s']:.0f} s, GPU {s['encode']['gpu_gb']:.1f} GB "
        f"weights, cache {s['encode']['cache_gb']:.1f} GB on disk",
        f"collect:  {s['collect']['calls']} calls, {s['collect']['s'] / 60:.1f} min, GPU {s['collect']['gpu_gb']:.1f} GB "
        f"weights + {s['collect']['gram_gb']:.2f} GB Gram accumulators + activations of one batch",
        f"train:    {s['train']['steps']} steps x {s['train']['calls_per_step']} calls, {s['train']['s'] / 60:.1f} min, "
        f"GPU {s['train']['gpu_gb_checkpointing']:.1f} GB with gradient checkpointing, "
        f"{s['train']['gpu_gb_plain']:.1f} GB without",
        f"evaluate: {s['evaluate']['images']} images x 28 steps, {s['evaluate']['s'] / 60:.1f} min, GPU "
        f"{s['evaluate']['gpu_gb']:.1f} GB weights (whole pipeline)",
        f"comfyui:  1024x1024, 20 steps, {s['comfyui']['s']:.1f} s sampling, GPU {s['comfyui']['gpu_gb']:.1f} GB "
        f"transformer weights (bf16)",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tflops", type=float, default=400.0, help="assumed sustained bf16 TFLOP/s of the GPU")
    ap.add_argument("--size", type=int, default=512, help="training/evaluation image size (the recipes' flux1 default)")
    ap.add_argument("--unsafe", type=int, default=360, help="unsafe prompts (each with an anchor)")
    ap.add_argument("--benign", type=int, default=1200, help="benign prompts")
    ap.add_argument("--steps", type=int, default=600, help="training steps (nudity recipe: 600)")
    ap.add_argument("--train-batch", type=int, default=2, help="training batch size")
    ap.add_argument("--eval-prompts", type=int, default=100, help="evaluated prompts (--limit 25 over 4 sets)")
    ap.add_argument("--heads", type=int, default=68, help="adapter heads (nudity recipe: 5%% of 1,368)")
    ap.add_argument("--rank", type=int, default=8, help="adapter rank (nudity recipe: 8)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for the activation measurement")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    r = estimates(args)
    print(json.dumps(r, indent=2) if args.json else table(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
