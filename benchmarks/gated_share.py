"""Time of the SafeRoPE transform (q and k of one block) by share of gated tokens. Prints JSON.

    python benchmarks/gated_share.py                 # FLUX.1-dev-shaped: 24×128 heads, 1024 img + 256 txt tokens
    python benchmarks/gated_share.py --small         # a quick smoke run

Every head selected, rank 5, both segments, fp32 on the CPU as shipped (the host shortcuts on:
inputs returned when nothing is gated, gathered update of few tokens, dense pass otherwise). For
each share the threshold is set to that quantile of the inputs' own risk scores, so about that
share of the q and k vectors is gated; reports the best and median of the repeats, the share
actually gated and which path ran (``gathered`` or ``dense``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saferope_engine import core, saferope_qk  # noqa: E402
from saferope_engine.testing import random_adapter  # noqa: E402

PRESETS = {"flux-dev": dict(heads=24, head_dim=128, img=1024, txt=256), "small": dict(heads=4, head_dim=32, img=64, txt=16)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="flux-dev")
    ap.add_argument("--small", action="store_const", const="small", dest="preset", help="alias of --preset small")
    ap.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.01, 0.05, 0.2, 1.0],
                    help="shares of gated vectors to time (default 0 0.01 0.05 0.2 1)")
    ap.add_argument("--repeats", type=int, default=15, help="timed calls per share (default 15)")
    args = ap.parse_args()
    if any(not 0.0 <= s <= 1.0 for s in args.shares) or args.repeats < 1:
        ap.error("shares must lie in [0, 1] and --repeats must be ≥ 1")

    p = PRESETS[args.preset]
    H, D, L, txt = p["heads"], p["head_dim"], p["img"] + p["txt"], p["txt"]
    block = random_adapter(num_heads=H, head_dim=D, model_blocks={"double": 1, "single": 0}, rank=5,
                           blocks=[("double", 0)], threshold=0.0, scale=0.5).block("double", 0)
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, H, L, D, generator=g), torch.randn(1, H, L, D, generator=g)  # (B, H, L, D)
    with torch.no_grad():
        _, _, risk = saferope_qk(q, k, block, txt_len=txt, threshold=0.0, return_risk=True)
    rho = torch.cat([risk.rho_q.flatten(), risk.rho_k.flatten()]).double()

    calls = []
    real_sparse = core._sparse

    def spy(*a):
        calls.append(1)
        return real_sparse(*a)

    rows = []
    core._sparse = spy
    try:
        for share in args.shares:
            tau = 0.0 if share >= 1.0 else 0.999 if share == 0.0 else min(float(rho.quantile(1.0 - share)), 0.999)
            with torch.no_grad():
                _, _, r = saferope_qk(q, k, block, txt_len=txt, threshold=tau, return_risk=True)
                gated = float(torch.cat([r.gated_q.flatten(), r.gated_k.flatten()]).float().mean())
                calls.clear()
                saferope_qk(q, k, block, txt_len=txt, threshold=tau)
                path = "none gated" if gated == 0 else ("gathered" if calls else "dense")
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    saferope_qk(q, k, block, txt_len=txt, threshold=tau)
                    times.append(time.perf_counter() - t0)
            rows.append({"share": share, "gated": round(gated, 4), "path": path, "best_ms": round(1e3 * min(times), 2),
                         "median_ms": round(1e3 * statistics.median(times), 2)})
    finally:
        core._sparse = real_sparse
    print(json.dumps({"preset": args.preset, **p, "rank": 5, "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
