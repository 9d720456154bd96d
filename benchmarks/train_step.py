"""Time and peak memory of one SafeRoPE training step, with and without gradient checkpointing.

One step is what ``trainer train`` does per objective: a base-model forward without gradients
(the target, ``handle.bypassed()``), a forward with the adapter, the backward pass into the
generators ``W`` only, and an AdamW update — through the trainer's own code (generators bound
as ``A = W − Wᵀ``, ``apply_saferope``, the checkpointing wrapper). A full ``anchor`` + ``distill``
step costs about twice this plus the rollout forwards.

The transformer is a randomly initialised ``FluxTransformer2DModel`` of the given dimensions
(FLUX.1-dev by default: 24 heads × 128, 19 double + 38 single blocks, 512 text tokens, 1024×1024
pixels = 4096 image tokens); text embeddings are random. τ = 0 gates every token (worst case).
Each variant runs in its own process so peak memory is per variant.

    python benchmarks/train_step.py                 # FLUX.1-dev dims (needs a large GPU)
    python benchmarks/train_step.py --small         # a CPU-sized preset
    python benchmarks/train_step.py --small --json  # machine-readable
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FLUX_DEV = dict(heads=24, head_dim=128, double=19, single=38, text_tokens=512, pixels=1024, joint_dim=4096,
                pooled_dim=768, in_channels=64, batch=1, patched_blocks=16, heads_per_block=4, rank=4)
SMALL = dict(heads=4, head_dim=32, double=2, single=4, text_tokens=64, pixels=256, joint_dim=128,
             pooled_dim=64, in_channels=64, batch=1, patched_blocks=4, heads_per_block=2, rank=4)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="CPU-sized preset instead of FLUX.1-dev dimensions")
    for key, value in FLUX_DEV.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=f"(FLUX.1-dev: {value})")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16")
    p.add_argument("--threshold", type=float, default=0.0, help="τ (0 gates every token)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default; 1 helps on busy machines)")
    p.add_argument("--variant", choices=("plain", "checkpointing"), help="run one variant in this process")
    p.add_argument("--json", action="store_true", help="print JSON")
    args = p.parse_args(argv)
    preset = SMALL if args.small else FLUX_DEV
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_variant(args: argparse.Namespace) -> dict:
    import torch
    from diffusers import FluxTransformer2DModel

    from saferope_engine import AdapterMeta, BlockAdapter, SafeRoPEAdapter
    from saferope_engine.diffusers import apply_saferope, model_shapes
    from trainer.families import family
    from trainer.families.base import ModelInfo, TextBatch
    from trainer.stages.train import bind, make_generators

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(0)
    D, H = args.head_dim, args.heads
    a = (D // 8) // 2 * 2
    b = ((D - a) // 2) // 2 * 2
    rope = (a, b, D - a - b)  # even RoPE axes summing to D; FLUX: (16, 56, 56) for D = 128
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):  # parameters are created (and randomly initialised) on the device
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=args.in_channels, num_layers=args.double, num_single_layers=args.single,
            attention_head_dim=D, num_attention_heads=H, joint_attention_dim=args.joint_dim,
            pooled_projection_dim=args.pooled_dim, guidance_embeds=True, axes_dims_rope=rope)
    torch.set_default_dtype(old)
    transformer.requires_grad_(False).eval()
    params_b = sum(p.numel() for p in transformer.parameters()) / 1e9

    # A synthetic adapter: the first patched_blocks blocks (double first), heads_per_block heads each.
    keys = ([("double", i) for i in range(args.double)] + [("single", i) for i in range(args.single)])[:args.patched_blocks]
    blocks = []
    g = torch.Generator().manual_seed(1)
    n = min(args.heads_per_block, H)
    for kind, idx in keys:
        Uq = torch.linalg.qr(torch.randn(n, D, args.rank, generator=g))[0]
        Uk = torch.linalg.qr(torch.randn(n, D, args.rank, generator=g))[0]
        blocks.append(BlockAdapter(kind, idx, torch.arange(n), Uq.contiguous(), Uk.contiguous(),
                                   torch.zeros(n, args.rank, args.rank), None))
    meta = AdapterMeta(num_heads=H, head_dim=D, blocks={"double": args.double, "single": args.single},
                       rank=args.rank, threshold=max(args.threshold, 0.0))
    adapter = SafeRoPEAdapter(meta, blocks)
    params = make_generators(adapter, 0.05, 0, device)
    bind(adapter, params)
    handle = apply_saferope(transformer, adapter, threshold=args.threshold)
    if args.variant == "checkpointing":
        transformer.enable_gradient_checkpointing()  # as `trainer train --gradient-checkpointing`
    opt = torch.optim.AdamW(list(params.values()), lr=1e-3)

    # what the trainer reads off a pipeline folder: the transformer's config and shapes, a VAE of 8 pixels per cell
    info = ModelInfo(spec="synthetic", path=Path("."), name="synthetic", family="flux1", pipeline="FluxPipeline",
                     components={}, shapes=model_shapes(transformer), transformer_config=dict(transformer.config),
                     vae_config={"block_out_channels": [128, 256, 512, 512], "sample_size": args.pixels})
    caller = family("flux1").caller(transformer, info, args.pixels, args.pixels, 3.5, device, dtype)
    B, T = args.batch, args.text_tokens

    def random_text() -> TextBatch:
        return TextBatch({"embeds": torch.randn(B, T, args.joint_dim), "pooled": torch.randn(B, args.pooled_dim),
                          "mask": torch.ones(B, T, dtype=torch.bool)}).to(device, dtype)

    text, target_text = random_text(), random_text()
    gen = torch.Generator().manual_seed(2)

    def step() -> float:
        x = caller.noise(B, gen)
        sigma = torch.full((B,), 1.0)
        with torch.no_grad(), handle.bypassed():
            target = caller.velocity(x, sigma, target_text)
        bind(adapter, params)
        pred = caller.velocity(x, sigma, text)
        loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    rss_before = _rss_mib()  # CPU: peak RSS growth from here covers warm-up and timed steps
    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated() / 2**20
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        mem = {"peak_allocated_mib": round(peak, 1), "weights_and_state_mib": round(base_mem, 1),
               "step_extra_mib": round(peak - base_mem, 1)}
    else:
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
        mem = {"peak_rss_mib": round(peak_rss, 1), "rss_model_mib": round(rss_before, 1),
               "step_extra_mib": round(max(0.0, peak_rss - rss_before), 1)}
    handle.remove()
    return {"variant": args.variant, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "transformer_params_b": round(params_b, 3), "image_tokens": caller.latent_shape[0], "text_tokens": T,
            "batch": B, "patched_heads": n * len(keys), "rank": args.rank,
            "step_s_median": round(statistics.median(times), 4), "step_s_min": round(min(times), 4), **mem}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args)))
        return 0
    rows = []
    base = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--json"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for variant in ("plain", "checkpointing"):
        proc = subprocess.run([sys.executable, __file__, *base, "--variant", variant], capture_output=True,
                              text=True, env=env)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            return proc.returncode
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    r0 = rows[0]
    print(f"SafeRoPE train step ({'small preset' if args.small else 'FLUX.1-dev dims'}): "
          f"{r0['transformer_params_b']} B params, {r0['dtype']} on {r0['device']}, batch {r0['batch']}, "
          f"{r0['text_tokens']} text + {r0['image_tokens']} image tokens, {r0['patched_heads']} heads at rank {r0['rank']}")
    for r in rows:
        mem = {k: v for k, v in r.items() if k.endswith("_mib")}
        print(f"  {r['variant']:<14} step {r['step_s_median']:.4f} s (min {r['step_s_min']:.4f})  "
              + "  ".join(f"{k} {v}" for k, v in mem.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
