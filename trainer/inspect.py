"""``inspect``: print an adapter's metadata, blocks, heads, rank and generator norms."""

from __future__ import annotations

import argparse
import json

from saferope_engine import load_adapter

from .cli import add_command


def register(sub) -> None:
    p = add_command(sub, "inspect", summary="print an adapter's metadata, blocks, heads, rank and generator norms",
                    description="Load and validate a SafeRoPE adapter file and describe it: target model shapes,\n"
                                "concepts, base model, rank, threshold, each patched block's heads and segments,\n"
                                "the Frobenius norm of every head's generator, and how it was built.",
                    example="python -m trainer inspect runs/red/adapter.safetensors\n"
                            "python -m trainer inspect nudity.safetensors --json > nudity.json")
    p.add_argument("adapter", help="adapter .safetensors file")
    p.add_argument("--json", action="store_true", help="print the full description as JSON")
    p.set_defaults(func=run)


def _model_line(s: dict) -> str:
    kv = f", {s['num_kv_heads']} key heads" if s.get("num_kv_heads") else ""
    blocks = " + ".join(f"{n} {kind}" for kind, n in s["blocks_in_model"].items())
    return f"{s['num_heads']} heads × {s['head_dim']}{kv}, {blocks} blocks"


def describe(summary: dict) -> str:
    """Human-readable text of ``SafeRoPEAdapter.summary()``."""
    s = summary
    lines = [
        f"adapter      {s['source']}",
        f"concepts     {', '.join(s['concepts']) or '-'}",
        f"family       {s['family']} ({s['arch']})",
        f"base model   {s['base_model'] or '-'} ({_model_line(s)})",
        f"rank         {s['rank']}",
        f"threshold    {s['threshold']}",
        f"patched      {s['num_heads_patched']} heads in {s['num_blocks_patched']} blocks, "
        f"{s['num_parameters']} generator parameters",
        "",
        f"{'block':<11} {'segments':<9} heads: ‖A‖ per head",
    ]
    for b in s["blocks"]:
        segs = ",".join(b["segments"])
        norms = "; ".join(f"{seg}: " + " ".join(f"{h}:{n:.4g}" for h, n in zip(b["heads"], b["generator_norms"][seg]))
                          for seg in b["segments"])
        lines.append(f"{b['block']:<11} {segs:<9} {norms}")
    cfg = s.get("config")
    if cfg:
        lines.append("")
        built = cfg.get("config", {}) if isinstance(cfg, dict) else {}
        train = built.get("train", {}) if isinstance(built, dict) else {}
        if train:
            lines.append(f"built by     {cfg.get('builder', '?')} {cfg.get('version', '')}: model {built.get('model')!r}, "
                         f"{train.get('steps')} steps, unlearn {train.get('unlearn')}, preserve {train.get('preserve')}")
        else:
            lines.append("config       " + json.dumps(cfg, sort_keys=True))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    adapter = load_adapter(args.adapter)
    summary = adapter.summary()
    print(json.dumps(summary, indent=2, sort_keys=True) if args.json else describe(summary))
    return 0
