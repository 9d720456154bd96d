"""``inspect``: print an adapter's metadata, blocks, heads, rank and generator norms.

Whatever the file holds, the output is printable and ``--json`` is strict JSON (RFC 8259): a
non-finite number becomes the string ``"NaN"``, ``"Infinity"`` or ``"-Infinity"``, and a lone
surrogate (text that is not valid Unicode) or a control character in a text field is written as
its escape (``\\udc80``, ``\\x00``), visibly, instead of crashing the output.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from typing import Any

from saferope_engine import load_adapter

from .base import add_command


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


_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_NON_FINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible_text(value: Any, *, numbers: bool = False) -> Any:
    """A copy of ``value`` whose strings (keys too) have lone surrogates and control characters replaced
    by their escapes; ``numbers``: non-finite floats become strings too."""
    if isinstance(value, str):
        return _UNPRINTABLE.sub(_escape, value)
    if isinstance(value, float) and numbers and not math.isfinite(value):
        return "NaN" if math.isnan(value) else _NON_FINITE[value]
    if isinstance(value, dict):
        return {visible_text(k, numbers=numbers) if isinstance(k, str) else k: visible_text(v, numbers=numbers)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [visible_text(v, numbers=numbers) for v in value]
    return value


def to_json(summary: dict) -> str:
    """Strict JSON of a summary (``allow_nan=False``: nothing non-finite can slip through)."""
    return json.dumps(visible_text(summary, numbers=True), indent=2, sort_keys=True, allow_nan=False)


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
    print(to_json(summary) if args.json else describe(visible_text(summary)))
    return 0
