"""SafeRoPE for diffusers transformers of every registered family: reversible QK-norm hooks.

    handle = apply_saferope(pipe.transformer, load_adapter("nudity.safetensors"), strength=1.0)
    image = pipe(prompt).images[0]   # protected
    handle.remove()                  # the transformer is exactly as before

The family comes from the transformer's class (:func:`saferope_engine.arch.detect_diffusers`);
its registry entry names the QK-norm modules whose outputs are the pre-RoPE queries and keys
(``attn.norm_q``, ``attn.norm_added_k`` …), the stream each sees and how joint sequences split.
SafeRoPE puts a forward hook on exactly those modules — no attention processor, block class or
forward is replaced, so any attention backend keeps working — plus a forward pre-hook and hook on
the transformer that open and check each call. Applying a second adapter stacks it after the
first on the same hooks; handles can be removed in any order.

Fail closed: an adapter of another family or other shapes raises before anything changes, and a
model call during which a patched site did not run (a processor that skips the norm, a block
skipped) raises :class:`~saferope_engine.errors.HookNotRunError`.

diffusers itself is never imported here: the hooks are plain ``torch.nn.Module`` hooks.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import arch as archs
from .adapter import SafeRoPEAdapter
from .errors import HookNotRunError, SafeRoPEError

logger = logging.getLogger(__name__)

__all__ = ["apply_saferope", "observe_qk", "SafeRoPEHandle", "model_shapes"]

#: ``fn(kind, index, which, x, txt_len, img_first)``: ``x`` is ``(B, H, L, D)`` after QK-norm and
#: after the adapters already applied at that site, before RoPE.
Observer = Callable[[str, int, str, Tensor, int, bool], None]


@dataclass(frozen=True, eq=False)
class _Layer:
    adapter: SafeRoPEAdapter
    strength: float
    threshold: float | None


@dataclass(eq=False)
class _Site:
    """One hooked QK-norm module and what runs after it."""

    kind: str
    index: int
    which: str
    stream: str
    layout: str
    host: archs.HostKind
    layers: list = field(default_factory=list)
    observers: list = field(default_factory=list)
    handle: Any = None

    @property
    def key(self) -> str:
        return f"{self.kind}.{self.index}.{self.which}:{self.stream}"


@dataclass(eq=False)
class _Context:
    """Per-transformer state of its SafeRoPE hooks (never shared between models)."""

    family: archs.Arch
    count: dict  # kind -> number of blocks
    sites: dict = field(default_factory=dict)  # (kind, index, path) -> _Site
    block_lengths: dict = field(default_factory=dict)  # (kind, index) -> split length from the block's argument
    call_lengths: dict = field(default_factory=dict)  # (source, kind, segment) -> length, of the call in progress
    ran: set = field(default_factory=set)
    hooks: list = field(default_factory=list)  # model- and block-level hook handles
    bypass: bool = False


_CONTEXTS: weakref.WeakKeyDictionary[torch.nn.Module, _Context] = weakref.WeakKeyDictionary()


def model_shapes(transformer: torch.nn.Module) -> archs.ModelShapes:
    """Family, head layout and block counts of a diffusers transformer (what adapters must match)."""
    family = archs.detect_diffusers(transformer)
    return archs.diffusers_shapes(family, transformer)


def _call_key(ln: archs.Length) -> tuple:
    return (ln.source, ln.kind, ln.segment)


def _split(ctx: _Context, site: _Site, L: int) -> int:
    """Text length of the ``L`` tokens ``site`` sees in this call."""
    if site.stream != "joint":
        return L if site.stream == "txt" else 0
    ln = site.host.length
    n = (ctx.block_lengths.get((site.kind, site.index)) if ln.source == "block_arg"
         else ctx.call_lengths.get(_call_key(ln)))  # kept after the call: checkpointed blocks re-run in backward
    if n is None or not 0 <= n <= L:
        raise HookNotRunError(f"SafeRoPE {site.key}: the split of the joint sequence is unknown in this call "
                              f"({ln.source} {ln.arg or ln.site or ''!s} gave {n}); refusing to run unprotected")
    return n if ln.segment == "txt" else L - n


def _site_hook(ctx: _Context, site: _Site):
    def hook(module: torch.nn.Module, args: tuple, output: Tensor) -> Tensor:
        x = output.transpose(1, 2) if site.layout == "BLHD" else output  # (B, L, H, D) -> (B, H, L, D) view
        L = int(x.shape[2])
        txt_len = _split(ctx, site, L)
        img_first = site.host.order == "img_first"
        if not ctx.bypass:
            for layer in site.layers:
                # the norm's output is a fresh tensor the attention alone consumes: rotate in place
                x = layer.adapter.apply(site.kind, site.index, site.which, x, txt_len=txt_len, img_first=img_first,
                                        strength=layer.strength, threshold=layer.threshold, inplace=True)
        for fn in site.observers:
            fn(site.kind, site.index, site.which, x, txt_len, img_first)
        ctx.ran.add(site.key)
        return x.transpose(1, 2) if site.layout == "BLHD" else x

    return hook


def _tensor_arg(args: tuple, kwargs: dict, name: str, index: int | None) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if index is not None and len(args) > index else None


def _block_pre_hook(ctx: _Context, host: archs.HostKind, index: int):
    ln = host.length

    def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        t = _tensor_arg(args, kwargs, ln.arg, ln.index)
        if not (isinstance(t, Tensor) and t.ndim == 3):  # (B, T, C)
            raise HookNotRunError(f"SafeRoPE: {ctx.family.name} {host.kind} block {index} was called without "
                                  f"its {ln.arg} (B, T, C); cannot split text from image tokens")
        ctx.block_lengths[(host.kind, index)] = int(t.shape[1])  # re-set when the block re-runs (checkpointing)

    return pre_hook


def _model_pre_hook(ctx: _Context):
    model_lengths = [hk.length for hk in ctx.family.diffusers.kinds if hk.length and hk.length.source == "model_arg"]
    check = ctx.family.diffusers.check_call

    def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if check is not None:
            check(args, kwargs)
        ctx.ran.clear()
        ctx.call_lengths.clear()
        for ln in model_lengths:
            t = _tensor_arg(args, kwargs, ln.arg, ln.index)
            if not (isinstance(t, Tensor) and t.ndim == 3):
                raise HookNotRunError(f"SafeRoPE: the {ctx.family.name} transformer was called without {ln.arg} "
                                      "(B, T, C); cannot split text from image tokens")
            ctx.call_lengths[_call_key(ln)] = int(t.shape[1])

    return pre_hook


def _model_post_hook(ctx: _Context):
    def post_hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
        missing = sorted({s.key for s in ctx.sites.values() if s.layers or s.observers} - ctx.ran)
        if missing:
            raise HookNotRunError(f"SafeRoPE: the QK-norm sites {missing[:12]}{' …' if len(missing) > 12 else ''} did "
                                  "not run during this call (an attention processor that skips the norm, or skipped "
                                  "blocks); the output would be unprotected")

    return post_hook


class SafeRoPEHandle:
    """Undo token of :func:`apply_saferope` / :func:`observe_qk`; handles may be removed in any order."""

    def __init__(self, transformer: torch.nn.Module, ctx: _Context, entries: list[tuple[_Site, str, Any]]) -> None:
        self._transformer, self._ctx, self._entries, self.removed = transformer, ctx, entries, False

    def remove(self) -> None:
        """Take this application's layers/observers off; the last one removes every hook."""
        if self.removed:
            return
        for site, what, item in self._entries:
            getattr(site, what).remove(item)
        ctx = self._ctx
        for key, site in list(ctx.sites.items()):
            if not site.layers and not site.observers:
                site.handle.remove()
                del ctx.sites[key]
        if not ctx.sites:
            for h in ctx.hooks:
                h.remove()
            ctx.hooks.clear()
            _CONTEXTS.pop(self._transformer, None)
        self.removed = True

    @contextlib.contextmanager
    def bypassed(self) -> Iterator[None]:
        """Temporarily run the patched transformer as the base model (every SafeRoPE layer off).

        The hooks still run (and are still checked), they just skip the transform; this is how
        training computes base-model targets without removing anything.
        """
        old, self._ctx.bypass = self._ctx.bypass, True
        try:
            yield
        finally:
            self._ctx.bypass = old

    def __enter__(self) -> SafeRoPEHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply_saferope(transformer: torch.nn.Module, adapter: SafeRoPEAdapter, *, strength: float = 1.0,
                   threshold: float | None = None) -> SafeRoPEHandle:
    """Protect a diffusers transformer of a registered family with an adapter; returns a removable handle.

    Args:
        strength: ``α`` (0 = off, 1 = as trained).
        threshold: overrides the adapter's ``τ`` when given.
    Raises:
        UnsupportedModelError: no registered family has this transformer class (nothing changed).
        IncompatibleAdapterError: the adapter is of another family or other shapes (nothing changed).
    """
    if not (strength >= 0.0 and strength == strength and strength != float("inf")):
        raise ValueError(f"strength must be finite and ≥ 0, got {strength}")
    if threshold is not None and not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    shapes = model_shapes(transformer)  # an unsupported model is named before anything else
    if not isinstance(adapter, SafeRoPEAdapter):
        raise TypeError(f"adapter must be a SafeRoPEAdapter (saferope_engine.load_adapter), got {type(adapter).__name__}")
    adapter.check_compatible(shapes)
    layer = _Layer(adapter, float(strength), threshold)
    handle = _install(transformer, set(adapter.block_keys()), "layers", layer)
    logger.debug("SafeRoPE applied to %s: %d blocks, %d heads, strength %.3g", type(transformer).__name__,
                 len(adapter.blocks), sum(b.heads.numel() for b in adapter.blocks.values()), strength)
    return handle


def observe_qk(transformer: torch.nn.Module, fn: Observer) -> SafeRoPEHandle:
    """Call ``fn(kind, index, which, x, txt_len, img_first)`` at every QK-norm site of every block.

    ``x`` is ``(B, H, L, D)`` (a view), after any adapters already applied there, before RoPE;
    ``txt_len`` text tokens lead it, or trail it with ``img_first``. This is how statistics are
    collected (design §3.1). Remove the returned handle (or use it as a context manager).
    """
    shapes = model_shapes(transformer)
    keys = {(kind, i) for kind, n in shapes.blocks.items() for i in range(n)}
    return _install(transformer, keys, "observers", fn)


def _install(transformer: torch.nn.Module, keys: set, what: str, item: Any) -> SafeRoPEHandle:
    family = archs.detect_diffusers(transformer)
    ctx = _CONTEXTS.get(transformer)
    fresh = ctx is None
    if fresh:
        ctx = _Context(family, dict(archs.diffusers_shapes(family, transformer).blocks))
    # Resolve every module before touching anything (a missing one raises with nothing changed).
    plan = []
    for host in family.diffusers.kinds:
        blocks = archs.resolve_attr(transformer, host.blocks)
        for index in range(len(blocks)):
            if (host.kind, index) not in keys:
                continue
            for norm in host.norms:
                try:
                    module = archs.resolve_attr(blocks[index], norm.path)
                except AttributeError:
                    raise SafeRoPEError(f"{family.name} {host.kind} block {index} has no {norm.path}") from None
                if not isinstance(module, torch.nn.Module):
                    raise SafeRoPEError(f"{family.name} {host.kind} block {index}: {norm.path} is not a module "
                                        "(QK-norm disabled?); SafeRoPE needs it")
                plan.append((host, index, norm, module))
    probes: dict[tuple, list[tuple]] = {}  # (kind, path) of a probe site -> call-length keys it sets
    for host in family.diffusers.kinds:
        ln = host.length
        if ln is not None and ln.source == "probe":
            probes.setdefault((ln.kind, ln.site), []).append(_call_key(ln))
    if fresh:
        ctx.hooks.append(transformer.register_forward_pre_hook(_model_pre_hook(ctx), with_kwargs=True))
        ctx.hooks.append(transformer.register_forward_hook(_model_post_hook(ctx)))
        for host in family.diffusers.kinds:
            if host.length is not None and host.length.source == "block_arg":
                for index, blk in enumerate(archs.resolve_attr(transformer, host.blocks)):
                    ctx.hooks.append(blk.register_forward_pre_hook(_block_pre_hook(ctx, host, index), with_kwargs=True))
        # probe sites must run even where no adapter patches them
        for (kind, path), lkeys in probes.items():
            host = next(h for h in family.diffusers.kinds if h.kind == kind)
            n = ctx.count.get(kind, 0)
            if n == 0:
                continue
            module = archs.resolve_attr(archs.resolve_attr(transformer, host.blocks)[n - 1], path)
            layout = next(ns.layout for ns in host.norms if ns.path == path)
            ctx.hooks.append(module.register_forward_hook(_probe_hook(ctx, lkeys, layout)))
        _CONTEXTS[transformer] = ctx
    entries = []
    for host, index, norm, module in plan:
        key = (host.kind, index, norm.path)
        site = ctx.sites.get(key)
        if site is None:
            site = _Site(host.kind, index, norm.which, norm.stream, norm.layout, host)
            site.handle = module.register_forward_hook(_site_hook(ctx, site))
            ctx.sites[key] = site
        getattr(site, what).append(item)
        entries.append((site, what, item))
    return SafeRoPEHandle(transformer, ctx, entries)


def _probe_hook(ctx: _Context, keys: list[tuple], layout: str):
    """The last block of a probe kind: its sequence length is a joint kind's split."""
    def hook(module: torch.nn.Module, args: tuple, output: Tensor) -> None:
        n = int(output.shape[1] if layout == "BLHD" else output.shape[2])  # tokens of this stream
        for key in keys:
            ctx.call_lengths[key] = n

    return hook
