"""Test assets built inside the ComfyUI process: tiny-Flux weights and SafeRoPE adapters.

Adapters are built the way the product builds them (design §3), on the tiny model: queries/keys of
the synthetic "trigger" tokens are observed in the diffusers twin of the model, their Gram
matrices give each head's unsafe basis, and random skew generators rotate inside it. The
trigger tokens then score an LRS near 1 and every other token far below the threshold, so the
gate fires exactly on "unsafe" prompts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

RANK = 2
THRESHOLD = 0.5
TRIGGERS = 3
CONCEPT = 3.0


@dataclass
class Assets:
    spec: object
    diffusers: torch.nn.Module
    comfy_sd: dict
    weights: Path
    adapters: dict  # name -> SafeRoPEAdapter
    adapter_dir: Path


def pack_latent(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2·w/2, C·4), ComfyUI's and diffusers' Flux patchification."""
    B, C, h, w = x.shape
    return x.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (h // 2) * (w // 2), C * 4)


def unpack_latent(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_latent`."""
    B, _, CC = x.shape
    return x.view(B, h // 2, w // 2, CC // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, CC // 4, h, w)


def image_ids(h: int, w: int) -> torch.Tensor:
    """(h/2·w/2, 3) position ids [0, row, col] of the latent patches."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


def diffusers_call(model, x, sigma, context, pooled, guidance) -> torch.Tensor:
    """One forward of the diffusers model on ComfyUI-layout inputs; returns (B, 16, h, w)."""
    h, w = x.shape[-2:]
    with torch.no_grad():
        out = model(hidden_states=pack_latent(x), encoder_hidden_states=context, pooled_projections=pooled,
                    timestep=sigma, img_ids=image_ids(h, w), txt_ids=torch.zeros(context.shape[1], 3),
                    guidance=guidance, return_dict=False)[0]
    return unpack_latent(out, h, w)


def build(work: Path, tinyflux: ModuleType, engine: ModuleType) -> Assets:
    """Weights file + adapters in ``work/assets`` (written as .safetensors)."""
    from safetensors.torch import save_file

    sub = __import__(engine.__name__ + ".subspace", fromlist=["x"])
    dif = __import__(engine.__name__ + ".diffusers", fromlist=["x"])
    spec = tinyflux.TinyFluxSpec()
    model = tinyflux.diffusers_model(spec, seed=0)
    comfy_sd = tinyflux.diffusers_to_comfy(model.state_dict(), spec)
    root = work / "assets"
    (root / "adapters").mkdir(parents=True, exist_ok=True)
    weights = root / "tinyflux.safetensors"
    save_file({k: v.contiguous() for k, v in comfy_sd.items()}, str(weights))

    acc = sub.GramAccumulator(spec.heads, spec.head_dim)
    for s in range(6):
        L = 10 + s
        cond = tinyflux.conditioning(100 + s, L, concept=CONCEPT, triggers=TRIGGERS, spec=spec)
        mask = torch.zeros(1, L, dtype=torch.bool)
        mask[0, 1:1 + TRIGGERS] = True

        def observe(kind, idx, which, x, txt_len, img_first, mask=mask):
            if txt_len:  # the text stream of a double block, or the joint sequence of a single block
                acc.add(kind, idx, which, x, txt_len=txt_len, img_first=img_first, txt_mask=mask, segments=("txt",))

        with dif.observe_qk(model, observe):
            g = torch.Generator().manual_seed(s)
            diffusers_call(model, torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.3 + 0.1 * s]),
                           cond[0][0], cond[0][1]["pooled_output"], torch.tensor([3.5]))

    gen = torch.Generator().manual_seed(7)

    def skew(n: int, scale: float) -> torch.Tensor:
        w = torch.randn(n, RANK, RANK, generator=gen, dtype=torch.float64)
        a = w - w.transpose(-1, -2)
        return (a / torch.linalg.matrix_norm(a)[:, None, None] * scale).float()  # ‖A‖ = scale

    def block(kind: str, idx: int, scale: float, img: bool, cols: tuple[int, ...] = tuple(range(RANK))):
        heads = torch.arange(spec.heads)
        Uq = sub.top_basis(acc.grams[(kind, idx, "q", "txt")], max(cols) + 1)[..., list(cols)]  # (H, D, r)
        Uk = sub.top_basis(acc.grams[(kind, idx, "k", "txt")], max(cols) + 1)[..., list(cols)]
        return engine.BlockAdapter(kind, idx, heads, Uq, Uk, skew(spec.heads, scale),
                                   skew(spec.heads, scale) if img else None)

    def adapter(blocks, *, heads=spec.heads, concepts=("red",)):
        meta = engine.AdapterMeta(num_heads=heads, head_dim=spec.head_dim,
                                  blocks={"double": spec.depth, "single": spec.depth_single}, rank=RANK, threshold=THRESHOLD,
                                  concepts=concepts, base_model="tiny-flux-test")
        return engine.SafeRoPEAdapter(meta, blocks)

    dbl = [block("double", i, 3.0, False) for i in range(spec.depth)]
    sgl = [block("single", i, 3.0, True) for i in range(spec.depth_single)]
    # another plane through the top direction: rotations of the two adapters do not commute
    second = [block("double", spec.depth - 1, 2.0, False, (0, 2)), block("single", 0, 2.0, True, (0, 2))]
    adapters = {
        "main.safetensors": adapter(dbl + sgl),
        "double_only.safetensors": adapter(dbl),
        "single_only.safetensors": adapter(sgl),
        "second.safetensors": adapter(second, concepts=("blue",)),
    }
    bad = engine.SafeRoPEAdapter(engine.AdapterMeta(
        num_heads=spec.heads * 2, head_dim=spec.head_dim, blocks={"double": spec.depth, "single": spec.depth_single},
        rank=RANK, threshold=THRESHOLD, concepts=("red",)),
        [engine.BlockAdapter("double", 0, torch.arange(2), dbl[0].U_q, dbl[0].U_k, dbl[0].A_txt)])
    adapters["wrong_heads.safetensors"] = bad
    for name, a in adapters.items():
        a.save(root / "adapters" / name)
        adapters[name] = engine.load_adapter(root / "adapters" / name)  # as the loader node sees them
    (root / "adapters" / "corrupt.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json" + os.urandom(64))
    save_file({"double.0.heads": torch.arange(2)}, str(root / "adapters" / "no_metadata.safetensors"))
    dangling = root / "adapters" / "dangling.safetensors"  # a broken symbolic link
    if dangling.is_symlink():
        dangling.unlink()
    dangling.symlink_to(root / "moved" / "adapter.safetensors")
    return Assets(spec, model, comfy_sd, weights, adapters, root / "adapters")
