"""Aten operations per patched block call of the SafeRoPE transform (issue #12). Prints JSON.

    python benchmarks/op_count.py            # FLUX.1-dev shape: 24 heads × 128, 1024 image + 256 text tokens
    python benchmarks/op_count.py --small    # a small shape (what tests/test_engine_ops.py asserts)

On a GPU every aten operation that computes is (at least) one kernel launch, and FLUX.1-dev runs
57 patched blocks per step, so the count of operations matters as much as their FLOPs. Counted
with ``torch.profiler`` on the CPU (counts do not depend on the device; they are deterministic):

* ``top_level``: aten operations called directly by the engine (not those nested inside them);
* ``computing``: the top-level ones that allocate, cast, copy or compute, i.e. every one except
  pure views and metadata (``slice``, ``select``, ``unsqueeze``, ``view``, ``view_as_complex``,
  ``unflatten``, ``alias``, ``transpose``, ``expand``…); a composite such as ``reshape``, ``to``
  or ``contiguous`` counts as computing only when it copies (has a computing operation nested).

Cases (rank 5, both segments, every head selected, every token gated, τ = 0, fp32 unless named):

* ``qk_device``: ``apply_qk`` through the device path, the one CUDA runs (no host reads);
* ``qk_device_bf16``: the same with bfloat16 q and k (the transform computes in float32);
* ``qk_device_subset``: the same with a third of the heads selected (gathered and scattered back);
* ``qk_cpu``: ``apply_qk`` on the CPU as shipped (it reads the gate on the host: it returns the
  inputs when nothing is gated and gathers the gated tokens when they are few);
* ``qk_cpu_none_gated`` / ``qk_cpu_few_gated``: the CPU path when nothing / a few text tokens are gated;
* ``x_device`` / ``x_device_inplace``: one tensor through ``apply`` (hosts that normalise q and k
  separately: the diffusers integration, some ComfyUI sites), out of place / in place.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saferope_engine import core  # noqa: E402
from saferope_engine.testing import random_adapter  # noqa: E402

#: Views and metadata: operations that never allocate, copy or compute.
METADATA = frozenset(f"aten::{n}" for n in (
    "view", "_unsafe_view", "_reshape_alias", "reshape", "flatten", "unflatten", "slice", "select", "narrow",
    "unsqueeze", "squeeze", "view_as_complex", "view_as_real", "alias", "transpose", "t", "permute", "movedim",
    "expand", "expand_as", "as_strided", "unbind", "split", "split_with_sizes", "chunk", "detach", "lift_fresh",
    "resolve_conj", "resolve_neg", "real", "imag", "diagonal", "to", "contiguous", "type_as", "result_type",
    "is_floating_point", "is_complex", "size", "stride", "numel", "dim", "_has_compatible_shallow_copy_type"))

PRESETS = {
    "flux-dev": dict(heads=24, head_dim=128, img=1024, txt=256),
    "small": dict(heads=3, head_dim=16, img=24, txt=8),
}


@dataclass
class OpCount:
    """Top-level aten operations of one call, and which of them compute."""

    top_level: int = 0
    computing: int = 0
    names: Counter = field(default_factory=Counter)  # computing operations by name

    def as_dict(self) -> dict:
        return {"top_level": self.top_level, "computing": self.computing, "computing_ops": dict(sorted(self.names.items()))}


def _computes(event) -> bool:
    """An event computes when it, or anything nested in it, is not a view or metadata operation."""
    return event.name not in METADATA or any(_computes(c) for c in event.cpu_children)


def count_ops(fn: Callable[[], object]) -> OpCount:
    """Run ``fn`` once under the profiler and count its top-level aten operations."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    out = OpCount()
    for ev in prof.events():
        if ev.cpu_parent is not None or not ev.name.startswith("aten::"):
            continue
        out.top_level += 1
        if _computes(ev):
            out.computing += 1
            out.names[ev.name.removeprefix("aten::")] += 1
    return out


@contextmanager
def device_path() -> Iterator[None]:
    """Run the engine's device path (what CUDA runs: no host reads of the gate) on the CPU."""
    old = core.HOST_SHORTCUTS
    core.HOST_SHORTCUTS = False
    try:
        yield
    finally:
        core.HOST_SHORTCUTS = old


def build(p: dict, *, rank: int = 5, heads: list[int] | None = None, seed: int = 0):
    """A one-block adapter and ``(B, H, L, D)`` q, k of preset ``p``."""
    adapter = random_adapter(num_heads=p["heads"], head_dim=p["head_dim"], model_blocks={"double": 1, "single": 0},
                             rank=rank, blocks=[("double", 0)], heads=heads, threshold=0.0, scale=0.5, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    L = p["img"] + p["txt"]
    q = torch.randn(1, p["heads"], L, p["head_dim"], generator=g)
    k = torch.randn(1, p["heads"], L, p["head_dim"], generator=g)
    return adapter, q, k


def measure(p: dict) -> dict:
    """Op counts of every case of the module docstring (each call warmed up once first: caches filled)."""
    txt = p["txt"]
    adapter, q, k = build(p)
    sub_adapter, _, _ = build(p, heads=list(range(0, p["heads"], 3)))
    qb, kb = q.bfloat16(), k.bfloat16()
    few = adapter.meta.threshold  # placeholder, replaced below

    def qk(a=adapter, qq=q, kk=k, tau=0.0):
        return lambda: a.apply_qk("double", 0, qq, kk, txt_len=txt, threshold=tau)

    # A threshold that gates a few text tokens only: between the top few risk scores.
    rho = core.latent_risk(q[:, :, :txt], adapter.block("double", 0).U_q)[0].flatten().sort(descending=True).values
    few = float(rho[min(8, rho.numel() - 1)])
    cases: dict[str, tuple[Callable, bool]] = {
        "qk_device": (qk(), True),
        "qk_device_bf16": (qk(qq=qb, kk=kb), True),
        "qk_device_subset": (qk(a=sub_adapter), True),
        "qk_cpu": (qk(), False),
        "qk_cpu_none_gated": (qk(tau=0.999), False),
        "qk_cpu_few_gated": (qk(tau=few), False),
        "x_device": (lambda: adapter.apply("double", 0, "q", q, txt_len=txt, threshold=0.0), True),
        "x_device_inplace": (lambda: adapter.apply("double", 0, "q", q.clone(), txt_len=txt, threshold=0.0,
                                                   inplace=True), True),
    }
    out = {}
    with torch.inference_mode():
        for name, (fn, on_device) in cases.items():
            ctx = device_path() if on_device else _nullcontext()
            with ctx:
                fn()  # warm-up: the runtime caches are built on the first call
                if name == "x_device_inplace":
                    clone = q.clone()  # counted outside the call
                    count = count_ops(lambda: adapter.apply("double", 0, "q", clone, txt_len=txt,  # noqa: B023
                                                            threshold=0.0, inplace=True))
                else:
                    count = count_ops(fn)
            out[name] = count.as_dict()
    return out


@contextmanager
def _nullcontext() -> Iterator[None]:
    yield


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="flux-dev")
    ap.add_argument("--small", action="store_const", const="small", dest="preset", help="alias of --preset small")
    ap.add_argument("--names", action="store_true", help="also list the computing operations by name")
    args = ap.parse_args()
    torch.set_num_threads(1)
    p = PRESETS[args.preset]
    counts = measure(p)
    if not args.names:
        counts = {k: {kk: vv for kk, vv in v.items() if kk != "computing_ops"} for k, v in counts.items()}
    print(json.dumps({"preset": args.preset, **p, "rank": 5, "torch": torch.__version__, "counts": counts}, indent=2))


if __name__ == "__main__":
    main()
