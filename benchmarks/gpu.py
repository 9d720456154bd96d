"""SafeRoPE on a GPU at FLUX.1-dev size, one command. Prints JSON.

    python benchmarks/gpu.py                       # CUDA: FLUX.1-dev sizes, bf16, 1024² (about 5-7 minutes)
    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/gpu.py   # also through ComfyUI's comfy.model_base.Flux
    python benchmarks/gpu.py --small               # CPU smoke run of every stage at tiny sizes

Builds a randomly initialised transformer of FLUX.1-dev's configuration (19 double + 38 single
blocks, 24 heads × 128, joint attention dim 4096, pooled 768, guidance embedding; about 12 B
parameters, bf16; no weights are downloaded) and measures, at 1024×1024 (4,096 image + 512
text tokens), batch 1, in this order:

* ``step.eager``: one transformer call (one sampling step of FLUX.1-dev) without and with
  SafeRoPE — every head of every block, rank 5, both segments, τ = 0 (the device path costs the
  same whatever is gated) — through the diffusers integration (QK-norm forward hooks, one
  :func:`~saferope_engine.core.saferope_x` per tensor); median of the timed calls after
  warm-up, ``ratio`` = SafeRoPE / base, peak GPU memory of each, and the largest output
  difference (> 0: the transform acted);
* ``comfyui`` (with ``COMFYUI_PATH``): the same through ComfyUI's own ``comfy.model_base.Flux``
  and sampler with the node pack's patch (``apply_qk``, q and k in one fused pass, where
  ComfyUI's blocks hand both over), eager, per sampling step;
* ``train``: one training step at FLUX.1-dev size with and without gradient checkpointing
  (``benchmarks/train_step.py``, each variant in its own process: peak memory per variant);
* ``step.compiled``: the per-step comparison with ``torch.compile(transformer)``, each variant
  in its own process (compile time = its first call), with the graph breaks dynamo counted.

Each stage first checks the time left of ``--budget-s`` (default 420 s) against its rough cost
and is reported as skipped when it would not fit; a child process is stopped when the budget
runs out, so the command ends within about 8 minutes on an H100-class GPU. Without CUDA (and
without ``--small``) it prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

logger = logging.getLogger("saferope.gpu_benchmark")

#: Model and call sizes. ``img`` image tokens (2×2 latent patches: 1024² pixels -> 64×64 = 4096).
PRESETS = {
    "flux-dev": dict(heads=24, head_dim=128, double=19, single=38, joint=4096, pooled=768, in_channels=64,
                     pixels=1024, txt=512, rank=5, warmup=2, steps=5, train_steps=3),
    "small": dict(heads=2, head_dim=128, double=1, single=1, joint=64, pooled=32, in_channels=64,
                  pixels=128, txt=16, rank=5, warmup=1, steps=2, train_steps=1),
}
#: Rough seconds each stage needs at FLUX.1-dev size on an H100 (checked against the time left).
STAGE_COST_S = {"eager": 40, "compiled_base": 120, "compiled_saferope": 150, "train_plain": 80,
                "train_checkpointing": 80, "comfyui": 90}


class Deadline:
    """Seconds left of the budget; ``fits(stage)`` is false when the stage's rough cost exceeds them."""

    def __init__(self, budget_s: float, scale: float) -> None:
        self.t0, self.budget, self.scale = time.perf_counter(), budget_s, scale

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def fits(self, stage: str) -> bool:
        return self.left() >= STAGE_COST_S[stage] * self.scale

    def skipped(self, stage: str) -> dict:
        need = STAGE_COST_S[stage] * self.scale
        return {"skipped": f"time budget: {self.left():.0f} s left, the stage needs about {need:.0f} s"}


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """FLUX's RoPE split of a head (16, 56, 56 for 128): 1/8 index, the rest rows and columns, even sizes."""
    a = (head_dim // 8) // 2 * 2
    b = ((head_dim - a) // 2) // 2 * 2
    return a, b, head_dim - a - b


def image_tokens(p: dict) -> int:
    side = p["pixels"] // 16  # VAE factor 8, then 2×2 patches
    return side * side


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_calls(fn: Callable[[], Any], device: torch.device, warmup: int, steps: int, keep: list | None = None) -> dict:
    """Median / min seconds of ``steps`` calls after ``warmup`` (the first call's time too), peak memory;
    ``keep`` receives the last call's output."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        fn()
    sync(device)
    times, out_ = [], None
    for _ in range(steps):
        t0 = time.perf_counter()
        out_ = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    if keep is not None:
        keep.append(out_[0] if isinstance(out_, (tuple, list)) else out_)
    out = {"step_s": round(statistics.median(times), 5), "step_min_s": round(min(times), 5),
           "first_call_s": round(first, 3)}
    if device.type == "cuda":
        out["peak_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def build_diffusers(p: dict, device: torch.device, dtype: torch.dtype):
    """A randomly initialised ``FluxTransformer2DModel`` of preset ``p``, created on ``device`` in ``dtype``."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # parameters are created (and initialised) on the device
            model = FluxTransformer2DModel(
                patch_size=1, in_channels=p["in_channels"], num_layers=p["double"], num_single_layers=p["single"],
                attention_head_dim=p["head_dim"], num_attention_heads=p["heads"], joint_attention_dim=p["joint"],
                pooled_projection_dim=p["pooled"], guidance_embeds=True, axes_dims_rope=rope_axes(p["head_dim"]))
    finally:
        torch.set_default_dtype(old)
    return model.eval().requires_grad_(False)


def diffusers_inputs(p: dict, device: torch.device, dtype: torch.dtype) -> dict:
    n = image_tokens(p)
    side = p["pixels"] // 16
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(n, 3)
    ids[:, 1], ids[:, 2] = torch.arange(n) // side, torch.arange(n) % side
    cpu = dict(hidden_states=torch.randn(1, n, p["in_channels"], generator=g),
               encoder_hidden_states=torch.randn(1, p["txt"], p["joint"], generator=g),
               pooled_projections=torch.randn(1, p["pooled"], generator=g))
    out = {k: v.to(device, dtype) for k, v in cpu.items()}
    out.update(timestep=torch.tensor([1.0], device=device, dtype=dtype),
               guidance=torch.tensor([3.5], device=device, dtype=dtype),
               img_ids=ids.to(device, dtype), txt_ids=torch.zeros(p["txt"], 3, device=device, dtype=dtype),
               return_dict=False)
    return out


def every_head_adapter(p: dict, engine=None):
    """Every head of every block, rank ``p["rank"]``, both segments, τ = 0 (``engine``: the engine package to use)."""
    if engine is None:
        import saferope_engine as engine
    random_adapter = importlib.import_module(engine.__name__ + ".testing").random_adapter
    return random_adapter(num_heads=p["heads"], head_dim=p["head_dim"], model_blocks={"double": p["double"],
                          "single": p["single"]}, rank=p["rank"], threshold=0.0, scale=0.5, seed=0)


def graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))


def bench_diffusers(p: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Per-step time and peak memory, base vs SafeRoPE, eager (diffusers)."""
    from saferope_engine.diffusers import apply_saferope

    t0 = time.perf_counter()
    model = build_diffusers(p, device, dtype)
    inputs = diffusers_inputs(p, device, dtype)
    adapter = every_head_adapter(p)
    res: dict[str, Any] = {"build_s": round(time.perf_counter() - t0, 2),
                           "params_b": round(sum(t.numel() for t in model.parameters()) / 1e9, 3),
                           "image_tokens": image_tokens(p), "text_tokens": p["txt"],
                           "patched_heads": sum(b.heads.numel() for b in adapter.blocks.values()), "rank": p["rank"]}
    call = lambda: model(**inputs)  # noqa: E731
    w, s = p["warmup"], p["steps"]
    with torch.inference_mode():
        outs: list = []
        res["base"] = timed_calls(call, device, w, s, outs)
        handle = apply_saferope(model, adapter)
        res["saferope"] = timed_calls(call, device, w, s, outs)
        handle.remove()
    res["ratio"] = round(res["saferope"]["step_s"] / res["base"]["step_s"], 4)
    res["max_abs_diff_vs_base"] = _maxdiff(*outs)  # > 0: the transform acted
    return res  # the model goes with this frame; the caller frees the memory


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def compiled_child(p: dict, device: torch.device, dtype: torch.dtype, variant: str) -> dict:
    """One compiled variant (run in its own process, so that a slow compile can be stopped)."""
    from saferope_engine.diffusers import apply_saferope

    model = build_diffusers(p, device, dtype)
    inputs = diffusers_inputs(p, device, dtype)
    with torch.inference_mode():
        if variant == "saferope":
            apply_saferope(model, every_head_adapter(p))
            model(**inputs)  # fills the engine's caches eagerly: the compiled graph then finds them
        breaks = graph_breaks()
        compiled = torch.compile(model)
        out = timed_calls(lambda: compiled(**inputs), device, max(p["warmup"], 2), p["steps"])
    out["graph_breaks"] = graph_breaks() - breaks
    return out


def run_child(args: list[str], timeout: float) -> dict:
    """Run a stage in a fresh process; its last stdout line is its JSON result."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    try:
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"stopped after {timeout:.0f} s (time budget)"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": tail[:300]}  # e.g. out of memory
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_compiled(small: bool, deadline: Deadline) -> dict:
    out: dict[str, Any] = {}
    for variant in ("base", "saferope"):
        stage = f"compiled_{variant}"
        if not deadline.fits(stage):
            out[variant] = deadline.skipped(stage)
            continue
        args = [str(Path(__file__).resolve()), "--_compiled", variant] + (["--small"] if small else [])
        out[variant] = run_child(args, max(1.0, deadline.left()))
    steps = [out[v].get("step_s") for v in ("base", "saferope")]
    if all(steps):
        out["ratio"] = round(steps[1] / steps[0], 4)
    return out


def bench_train(p: dict, small: bool, device: torch.device, deadline: Deadline) -> dict:
    """``benchmarks/train_step.py`` per variant (its own process: peak memory per variant)."""
    out = {}
    base = ["--small"] if small else []
    base += ["--steps", str(p["train_steps"]), "--warmup", "1", "--device", device.type]
    for variant in ("plain", "checkpointing"):
        stage = f"train_{variant}"
        if not deadline.fits(stage):
            out[variant] = deadline.skipped(stage)
            continue
        out[variant] = run_child([str(ROOT / "benchmarks" / "train_step.py"), *base, "--variant", variant],
                                 max(1.0, deadline.left()))
    return out


# -- ComfyUI --------------------------------------------------------------------------------------

def _load_pack():
    """This repository as a ComfyUI custom-node package (its ``nodes`` use relative imports)."""
    name = "saferope_pack_benchmark"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def build_comfy(p: dict, device: torch.device, dtype: torch.dtype):
    """``comfy.model_base.Flux`` of preset ``p`` with random weights, in a ModelPatcher.

    ComfyUI detects the configuration from a state dict; it gets one of meta tensors (the keys
    and shapes of a diffusers model of the preset, mapped by ComfyUI's own key map), so no
    weights exist until the model is built on the device and initialised at random.
    """
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.utils

    meta = build_diffusers(p, torch.device("meta"), dtype)
    key_map = comfy.utils.flux_to_diffusers({"depth": p["double"], "depth_single_blocks": p["single"],
                                             "hidden_size": p["heads"] * p["head_dim"]})
    sd: dict[str, torch.Tensor] = {}
    fused: dict[str, list] = {}
    for name, value in meta.state_dict().items():
        target = key_map.get(name)
        if target is None:
            continue
        if isinstance(target, str):
            sd[target] = value
        elif target[1] is None:  # a converted copy (same shape)
            sd[target[0]] = value
        else:  # a slice of a fused weight: (dim, start, size)
            fused.setdefault(target[0], []).append((target[1][1], value))
    for name, pieces in fused.items():
        sd[name] = torch.cat([v for _, v in sorted(pieces, key=lambda t: t[0])], dim=0)
    cfg = comfy.model_detection.detect_unet_config(sd, "")
    # ComfyUI before 0.9 hard-codes FLUX.1's widths in the detection: state them (FLUX.1-dev's own at full size).
    cfg.update(hidden_size=p["heads"] * p["head_dim"], num_heads=p["heads"], context_in_dim=p["joint"], vec_in_dim=p["pooled"])
    model_config = comfy.model_detection.model_config_from_unet_config(cfg, sd)
    if model_config is None:
        raise RuntimeError("ComfyUI did not recognise the FLUX state dict")
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model(sd, "", device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, t in model.diffusion_model.named_parameters():
            if t.ndim >= 2:
                t.normal_(0.0, 0.02, generator=g)
            else:  # norm scales 1, biases 0
                t.fill_(1.0 if name.endswith(("scale", "norm.weight")) else 0.0)
    model.diffusion_model.to(device, dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


def bench_comfy(p: dict, device: torch.device, dtype: torch.dtype) -> dict:
    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path:
        return {"skipped": "COMFYUI_PATH is not set"}
    sys.path.insert(0, str(Path(comfy_path).resolve()))
    import comfy.cli_args  # ComfyUI's defaults (argument parsing stays off); the CPU run must say so first

    comfy.cli_args.args.cpu = device.type == "cpu"
    import comfy.sample
    import comfyui_version  # a ComfyUI tree is on the path

    pack = _load_pack()
    t0 = time.perf_counter()
    patcher = build_comfy(p, device, dtype)
    adapter = every_head_adapter(p, pack.saferope_engine)  # the pack's own engine (its adapter class)
    protected = pack.nodes.install.apply_saferope(patcher, adapter)
    info = pack.nodes.compat.comfy_model(patcher)
    side = p["pixels"] // 8
    g = torch.Generator().manual_seed(1)
    latent = torch.zeros(1, 16, side, side)
    noise = torch.randn(1, 16, side, side, generator=g)
    pos = [[torch.randn(1, p["txt"], p["joint"], generator=g), {"pooled_output": torch.randn(1, p["pooled"], generator=g),
                                                                 "guidance": 3.5}]]
    steps = p["steps"]

    def run(m) -> Callable[[], Any]:  # FLUX.1-dev: cfg 1, one transformer call per step
        return lambda: comfy.sample.sample(m, noise, steps, 1.0, "euler", "simple", pos, pos, latent, disable_pbar=True)

    res: dict[str, Any] = {"comfyui": comfyui_version.__version__, "build_s": round(time.perf_counter() - t0, 2),
                           "hook": "attn1_patch (apply_qk)" if info.attn1_patch else "QK-norm object patches (apply)"}
    outs: list = []
    with torch.inference_mode():
        for name, m in (("base", patcher), ("saferope", protected)):
            r = timed_calls(run(m), device, 1, 2, outs)
            r = {k: (round(v / steps, 5) if k in ("step_s", "step_min_s") else v) for k, v in r.items()}
            res[name] = r  # per sampling step (a call samples `steps` steps)
    res["ratio"] = round(res["saferope"]["step_s"] / res["base"]["step_s"], 4)
    res["max_abs_diff_vs_base"] = _maxdiff(*outs)  # > 0: the transform acted
    return res


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny sizes on the CPU (float32): a smoke run of every stage")
    ap.add_argument("--budget-s", type=float, default=420.0, help="seconds the stages may use in all (default 420)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile stages")
    ap.add_argument("--no-train", action="store_true", help="skip the training-step stages")
    ap.add_argument("--_compiled", choices=("base", "saferope"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.small:
        device, dtype, p = torch.device("cpu"), torch.float32, PRESETS["small"]
    else:
        if not torch.cuda.is_available():
            print(f"gpu.py: no CUDA device (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); "
                  "run it on a CUDA machine, or use --small for the CPU smoke run", file=sys.stderr)
            return 2
        device, dtype, p = torch.device("cuda"), torch.bfloat16, PRESETS["flux-dev"]
    if args._compiled:
        print(json.dumps(compiled_child(p, device, dtype, args._compiled)))
        return 0
    deadline = Deadline(args.budget_s, 0.0 if args.small else 1.0)
    report: dict[str, Any] = {
        "preset": "small" if args.small else "flux-dev", "device": torch.cuda.get_device_name(device)
        if device.type == "cuda" else "cpu", "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
        "config": {k: v for k, v in p.items() if k not in ("warmup", "steps", "train_steps")},
        "timing": {"warmup": p["warmup"], "steps": p["steps"], "statistic": "median"},
        "step": {"eager": bench_diffusers(p, device, dtype)}}
    _free(device)
    if not deadline.fits("comfyui"):
        report["comfyui"] = deadline.skipped("comfyui")
    else:
        try:
            report["comfyui"] = bench_comfy(p, device, dtype)
        except Exception as e:  # noqa: BLE001 - reported; the other figures stand
            report["comfyui"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        _free(device)
    report["train"] = {"skipped": "--no-train"} if args.no_train else bench_train(p, args.small, device, deadline)
    report["step"]["compiled"] = {"skipped": "--no-compile"} if args.no_compile else bench_compiled(args.small, deadline)
    report["elapsed_s"] = round(time.perf_counter() - deadline.t0, 1)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
