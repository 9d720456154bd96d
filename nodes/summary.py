"""The STRING summary of the LRS visualizer: max risk, top tokens, gated share per block."""

from __future__ import annotations

from dataclasses import dataclass

from .layer import SafeRoPELayer
from .risk import RiskReport

TOP_TOKENS = 5


@dataclass
class Setting:
    """Where the evaluation ran."""

    noise_level: float
    sigma: float
    width: int
    height: int
    labels_note: str


def summarize(report: RiskReport, layers: list[SafeRoPELayer], labels: list[str], s: Setting) -> str:
    """Plain text, one fact per line."""
    lines = [f"SafeRoPE LRS at noise level {s.noise_level:.2f} (sigma {s.sigma:.4g}), {s.width}x{s.height}: "
             f"{report.txt_len} text tokens, {report.img_len} image tokens"]
    for n, layer in enumerate(layers):
        tag = f"{chr(65 + n % 26)}: " if len(layers) > 1 else ""
        state = ("active at this noise level" if layer.active_at([s.sigma])
                 else "INACTIVE at this noise level (outside its start/end range): scores shown, nothing rotated")
        concepts = ", ".join(layer.adapter.meta.concepts) or "unspecified"
        lines.append(f"{tag}adapter {layer.name} (concepts: {concepts}), threshold {layer.tau:.3g}, "
                     f"strength {layer.strength:.3g}, sampling range {layer.start_percent:.2f}-{layer.end_percent:.2f}: {state}")
    if not report.columns:
        lines.append("no risk scores were recorded (the model call reached no patched block)")
        return "\n".join(lines)

    def name(i: int) -> str:
        return f"#{i} '{labels[i]}'" if i < len(labels) and labels[i] else f"#{i}"

    best = max(report.columns, key=lambda c: float(c.txt_rho.nan_to_num(-1.0).max()) if c.txt_rho.numel() else -1.0)
    if best.txt_rho.numel():
        i = int(best.txt_rho.nan_to_num(-1.0).argmax())
        lines.append(f"max text risk {float(best.txt_rho[i]):.3f} at token {name(i)} in block {best.label}")
    tok = report.token_max()
    if tok.numel():
        gated = set()
        for c in report.columns:
            gated.update(int(i) for i in c.txt_gated.nonzero().flatten().tolist())
        top = tok.argsort(descending=True)[:TOP_TOKENS].tolist()
        lines.append("top tokens: " + ", ".join(
            f"{name(i)} {float(tok[i]):.3f}{' (gated)' if i in gated else ''}" for i in top))
        lines.append(f"text tokens gated in any block: {len(gated)} of {report.txt_len}")
    lines.append("gated share per block (text / image): " + "; ".join(
        f"{c.label} {c.txt_gated_share:.1%} / {c.img_gated_share:.1%}" for c in report.columns))
    share = report.image_share()
    if share.numel():
        lines.append(f"image tokens gated anywhere: {int((share > 0).sum())} of {share.numel()}")
    lines.append(s.labels_note)
    return "\n".join(lines)
