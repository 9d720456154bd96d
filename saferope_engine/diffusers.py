"""SafeRoPE for diffusers' ``FluxTransformer2DModel``: reversible attention-processor swap.

    handle = apply_saferope(pipe.transformer, load_adapter("nudity.safetensors"), strength=1.0)
    image = pipe(prompt).images[0]   # protected
    handle.remove()                  # the exact previous processors are back

Each patched block gets a :class:`SafeRoPEFluxAttnProcessor`, which computes FLUX attention
like diffusers' ``FluxAttnProcessor`` (projections, QK-RMSNorm, text tokens first, RoPE,
attention) with the SafeRoPE transform inserted after the QK-norm and before RoPE. Applying a
second adapter stacks it after the first in the same processor; handles are removed in reverse
order. Fail closed: an incompatible adapter or an unknown processor on a patched block raises
before anything changes, and a model call during which a patched block did not run its
processor raises :class:`~saferope_engine.errors.HookNotRunError`.

diffusers is imported lazily (on first use), so this module imports with torch alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from .adapter import SafeRoPEAdapter
from .errors import HookNotRunError, SafeRoPEError

logger = logging.getLogger(__name__)

__all__ = ["apply_saferope", "observe_qk", "SafeRoPEHandle", "SafeRoPEFluxAttnProcessor", "flux_shapes"]


@dataclass(frozen=True)
class _Layer:
    adapter: SafeRoPEAdapter
    strength: float
    threshold: float | None


@dataclass
class _CallContext:
    """Per-transformer state shared by its SafeRoPE processors and hooks (not by other models)."""

    txt_len: int | None = None
    ran: set = field(default_factory=set)
    expected: set = field(default_factory=set)
    hooks: list = field(default_factory=list)
    bypass: bool = False


class SafeRoPEFluxAttnProcessor:
    """FLUX attention with SafeRoPE applied to queries and keys between QK-norm and RoPE."""

    def __init__(self, kind: str, index: int, layers: tuple[_Layer, ...], ctx: _CallContext, base: Any,
                 observers: tuple[Callable, ...] = ()) -> None:
        self.kind, self.index, self.layers, self.ctx, self.base = kind, index, layers, ctx, base
        self.observers = observers
        # Keep the attention backend chosen for the processor we replace.
        self._attention_backend = getattr(base, "_attention_backend", None)
        self._parallel_config = getattr(base, "_parallel_config", None)

    @property
    def key(self) -> str:
        return f"{self.kind}.{self.index}"

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, image_rotary_emb: Any = None) -> Any:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb

        def heads(t: Tensor) -> Tensor:  # (B, L, H·D) -> (B, L, H, D)
            return t.unflatten(-1, (-1, attn.head_dim)) if hasattr(attn, "head_dim") else t.unflatten(-1, (attn.heads, -1))

        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k, v = heads(q), heads(k), heads(v)
        q, k = attn.norm_q(q), attn.norm_k(k)
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if joint:  # double block: text stream has its own projections and norms
            if getattr(attn, "fused_projections", False) and hasattr(attn, "to_added_qkv"):
                eq, ek, ev = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                eq, ek, ev = (attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                              attn.add_v_proj(encoder_hidden_states))
            eq, ek, ev = heads(eq), heads(ek), heads(ev)
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            txt_len = eq.shape[1]
            q, k, v = torch.cat([eq, q], dim=1), torch.cat([ek, k], dim=1), torch.cat([ev, v], dim=1)  # text first
        else:  # single block: the sequence is already [text, image]; the model hook knows the split
            txt_len = self.ctx.txt_len
            if txt_len is None:
                raise HookNotRunError(f"SafeRoPE {self.key}: text length unknown (the transformer's forward "
                                      "pre-hook did not run); refusing to run unprotected")

        qh, kh = q.transpose(1, 2), k.transpose(1, 2)  # (B, L, H, D) -> (B, H, L, D) views
        if not self.ctx.bypass:
            for layer in self.layers:
                # q and k were made by this call (QK-norm outputs, or their text+image concatenation)
                qh, kh = layer.adapter.apply_qk(self.kind, self.index, qh, kh, txt_len=txt_len,
                                                strength=layer.strength, threshold=layer.threshold, inplace=True)
        for fn in self.observers:
            fn(self.kind, self.index, qh, kh, txt_len)
        q, k = qh.transpose(1, 2), kh.transpose(1, 2)  # back to (B, L, H, D)
        self.ctx.ran.add(self.key)

        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        extra = {"parallel_config": self._parallel_config} if self._parallel_config is not None else {}
        out = dispatch_attention_fn(q, k, v, attn_mask=attention_mask, backend=self._attention_backend, **extra)
        out = out.flatten(2, 3).to(q.dtype)  # (B, L, H, D) -> (B, L, H·D)
        if joint:
            enc, out = out.split_with_sizes([txt_len, out.shape[1] - txt_len], dim=1)
            out = attn.to_out[1](attn.to_out[0](out.contiguous()))
            enc = attn.to_add_out(enc.contiguous())
            return out, enc
        return out


def flux_shapes(transformer) -> dict[str, int]:
    """``num_heads``, ``head_dim``, ``num_double_blocks``, ``num_single_blocks`` of a FluxTransformer2DModel."""
    cfg = transformer.config
    return {"num_heads": int(cfg.num_attention_heads), "head_dim": int(cfg.attention_head_dim),
            "num_double_blocks": len(transformer.transformer_blocks),
            "num_single_blocks": len(transformer.single_transformer_blocks)}


def _attn_module(transformer, kind: str, index: int):
    blocks = transformer.transformer_blocks if kind == "double" else transformer.single_transformer_blocks
    return blocks[index].attn


class SafeRoPEHandle:
    """Undo token of :func:`apply_saferope`. Remove handles in reverse order of application."""

    def __init__(self, transformer, installed: dict, previous: dict, ctx: _CallContext, owns_hooks: bool) -> None:
        self._transformer, self._installed, self._previous = transformer, installed, previous
        self._ctx, self._owns_hooks, self.removed = ctx, owns_hooks, False

    def remove(self) -> None:
        """Restore the exact processors that were in place before this application."""
        if self.removed:
            return
        for (kind, idx), proc in self._installed.items():
            if _attn_module(self._transformer, kind, idx).processor is not proc:
                raise SafeRoPEError(f"cannot remove SafeRoPE from {kind}.{idx}: its processor was replaced since "
                                    "(remove later SafeRoPE handles first)")
        for (kind, idx), proc in self._previous.items():
            _attn_module(self._transformer, kind, idx).set_processor(proc)
            self._ctx.expected.discard(f"{kind}.{idx}")
        for (kind, idx), proc in self._previous.items():
            if isinstance(proc, SafeRoPEFluxAttnProcessor):
                self._ctx.expected.add(proc.key)
        if self._owns_hooks:
            for h in self._ctx.hooks:
                h.remove()
            self._ctx.hooks.clear()
        self.removed = True

    @contextlib.contextmanager
    def bypassed(self) -> Iterator[None]:
        """Temporarily run the patched transformer as the base model (every SafeRoPE layer off).

        The processors still run (and are still checked), they just skip the transform; this is
        how training computes base-model targets without swapping processors.
        """
        old, self._ctx.bypass = self._ctx.bypass, True
        try:
            yield
        finally:
            self._ctx.bypass = old

    def __enter__(self) -> "SafeRoPEHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply_saferope(transformer, adapter: SafeRoPEAdapter, *, strength: float = 1.0,
                   threshold: float | None = None) -> SafeRoPEHandle:
    """Patch a diffusers ``FluxTransformer2DModel`` with an adapter; returns a removable handle.

    Args:
        strength: ``α`` (0 = off, 1 = as trained).
        threshold: overrides the adapter's ``τ`` when given.
    Raises:
        IncompatibleAdapterError: the adapter was built for other shapes (nothing is changed).
        SafeRoPEError: a patched block runs a processor SafeRoPE cannot wrap (nothing is changed).
    """
    if not (strength >= 0.0 and strength == strength):
        raise ValueError(f"strength must be ≥ 0, got {strength}")
    if threshold is not None and not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    adapter.check_compatible(**flux_shapes(transformer))
    handle = _install(transformer, adapter.block_keys(), layer=_Layer(adapter, float(strength), threshold))
    logger.debug("SafeRoPE applied: %d blocks, %d heads, strength %.3g", len(adapter.blocks),
                sum(b.heads.numel() for b in adapter.blocks.values()), strength)
    return handle


def observe_qk(transformer, fn: Callable[[str, int, Tensor, Tensor, int], None]) -> SafeRoPEHandle:
    """Call ``fn(kind, index, q, k, txt_len)`` in every attention block, between QK-norm and RoPE.

    ``q``/``k`` are ``(B, H, L, D)`` views, text tokens first, after any SafeRoPE adapters already
    applied to that block. This is how statistics are collected (design §3.1). Remove the
    returned handle (or use it as a context manager) to restore the processors.
    """
    keys = [("double", i) for i in range(len(transformer.transformer_blocks))]
    keys += [("single", i) for i in range(len(transformer.single_transformer_blocks))]
    return _install(transformer, keys, observer=fn)


def _install(transformer, keys: list[tuple[str, int]], *, layer: _Layer | None = None,
             observer: Callable | None = None) -> SafeRoPEHandle:
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    current = {key: _attn_module(transformer, *key).processor for key in keys}
    for (kind, idx), proc in current.items():
        if not isinstance(proc, (FluxAttnProcessor, SafeRoPEFluxAttnProcessor)):
            raise SafeRoPEError(f"{kind} block {idx} runs {type(proc).__name__}; SafeRoPE only wraps "
                                "FluxAttnProcessor (remove other attention processors first)")
    ctx = _find_ctx(transformer) or _CallContext()
    installed = {}
    for (kind, idx), proc in current.items():
        layers, observers, base = (), (), proc
        if isinstance(proc, SafeRoPEFluxAttnProcessor):
            layers, observers, base = proc.layers, proc.observers, proc.base
        installed[(kind, idx)] = SafeRoPEFluxAttnProcessor(
            kind, idx, layers + ((layer,) if layer else ()), ctx, base, observers + ((observer,) if observer else ()))
    owns_hooks = not ctx.hooks
    if owns_hooks:
        ctx.hooks.append(transformer.register_forward_pre_hook(_make_pre_hook(ctx), with_kwargs=True))
        ctx.hooks.append(transformer.register_forward_hook(_make_post_hook(ctx)))
        # Each single block also reports the text length it is called with, so that a block re-run
        # later (gradient checkpointing recomputes during backward) still sees its own call's split.
        for blk in transformer.single_transformer_blocks:
            ctx.hooks.append(blk.register_forward_pre_hook(_make_block_pre_hook(ctx), with_kwargs=True))
    for (kind, idx), new in installed.items():
        _attn_module(transformer, kind, idx).set_processor(new)
        ctx.expected.add(new.key)
    return SafeRoPEHandle(transformer, installed, current, ctx, owns_hooks)


def _find_ctx(transformer) -> _CallContext | None:
    for blocks in (transformer.transformer_blocks, transformer.single_transformer_blocks):
        for blk in blocks:
            p = blk.attn.processor
            if isinstance(p, SafeRoPEFluxAttnProcessor):
                return p.ctx
    return None


def _make_pre_hook(ctx: _CallContext):
    def pre_hook(module, args, kwargs):
        enc = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        if enc is None:
            raise HookNotRunError("SafeRoPE: the FLUX transformer was called without encoder_hidden_states")
        ctx.ran.clear()
        return None

    return pre_hook


def _make_block_pre_hook(ctx: _CallContext):
    def block_pre_hook(module, args, kwargs):
        enc = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        if not (isinstance(enc, Tensor) and enc.ndim == 3):  # (B, T, C): diffusers ≥ 0.35 passes it separately
            raise HookNotRunError("SafeRoPE: a FLUX single block was called without its text stream "
                                  "(encoder_hidden_states); cannot split text from image tokens")
        ctx.txt_len = int(enc.shape[1])  # the only writer: a re-run block (checkpointing) sees its own split
        return None

    return block_pre_hook


def _make_post_hook(ctx: _CallContext):
    def post_hook(module, args, output):
        missing = ctx.expected - ctx.ran
        if missing:
            raise HookNotRunError(f"SafeRoPE: patched blocks {sorted(missing)} did not run their SafeRoPE "
                                  "processor during this call (processors replaced or blocks skipped); "
                                  "the output would be unprotected")
        ctx.txt_len = None  # a single block run outside a model call must not reuse this call's split
        return None

    return post_hook
