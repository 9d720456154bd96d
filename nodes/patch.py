"""The hook objects that put SafeRoPE between ComfyUI's QK-norm and RoPE, and fail closed.

Two ways in (see :mod:`.install`), with every family-specific fact from the engine's registry
(:mod:`saferope_engine.arch`):

* ``attn1`` (on request) — :class:`Attn1Patch`, registered with ``clone.set_model_attn1_patch``. Where the
  family's blocks call it (Flux-style blocks from ComfyUI 0.17, Qwen-Image's attention by 0.20) it
  runs right after QK-norm, before RoPE, with joint ``(B, H, L, D)`` q/k (text tokens first) and
  ``extra_options`` holding ``block_type``, ``block_index`` and ``img_slice = [txt_len, L]``.
* ``object`` (the default) — :class:`NormPatch`, a per-clone object patch of one QK-norm module's ``forward``
  (e.g. Flux ``double_blocks.i.txt_attn.norm``, Qwen-Image ``….attn.norm_added_q``, Z-Image
  ``layers.j.attention.q_norm``), on every ComfyUI and family.
  A module that sees one stream is transformed on its own (the transform is per token, so this
  is the same math); a module that sees the joint sequence learns its split from a *probe*: the
  length seen by the last block of the kind the registry names (e.g. the text stream of Flux's
  last double block is exactly the text entering the single blocks), and its token order from
  the model (:meth:`.compat.ComfyModel.img_first`). Where the heads are in a norm's output is
  read off the tensor (ComfyUI versions differ), see :meth:`NormPatch._layout`.

Both are paired with a :class:`DiffusionModelWrapper` (one per layer, registered with
``add_wrapper_with_key(DIFFUSION_MODEL, "saferope", …)``). Per model call it

1. decides from the call's sigmas whether the layer is inside its start/end range,
2. opens a fresh :class:`CallRecord` and publishes it in a :class:`~contextvars.ContextVar`
   for the duration of the call only (object patches receive no transformer_options, so the
   record cannot travel with the arguments; a context variable is scoped to this call on this
   thread and is reset afterwards, so nothing leaks between calls, models or clones),
3. runs the model, then raises :class:`HookNotRunError` if any hook site the layer needs did not
   run while the layer was active — e.g. another node replaced a block, a cache skipped blocks,
   or this ComfyUI does not call the hook we rely on. Outside the range nothing is expected.

**torch.compile.** An object patch lives on a module instance, so torch.compile's guards see it:
a graph traced for the plain model is not reused for a protected clone (nor one traced for
another strength/threshold: each Apply makes new patch objects), and the other way round. An
attn1_patch lives in ``transformer_options``, whose guards ComfyUI 0.20.1's TorchCompileModel
filters out — there a graph traced without the hook is reused and the hook silently never runs
(caught by the check above). That is why ``object`` is the default on every ComfyUI and family,
and why an ``attn1`` layer refuses a call that runs under ComfyUI's torch.compile wrapper. The
hooks and the wrapper are excluded from compiled graphs (:func:`eager`): their bookkeeping runs as
Python on every call, the diffusion model around them is compiled as usual.

**Block caches are refused, always.** TeaCache, WaveSpeed's First Block Cache and the like
swap the model's ``forward_orig`` and, on cached steps, add a residual saved at an earlier step
instead of running (some of) the blocks. Nothing here can prove that the saved residual came
from a call protected by this same layer (the cache's state is the pack's own), so a step on
which a patched block did not run raises while the layer is active; the message names what
replaced the blocks (:func:`.compat.skip_suspects`: a replaced ``forward_orig``, a
``patches_replace`` entry, a foreign block class, with the custom node pack it comes from) and
the remedy. Steps on which the cache runs every block are protected normally, and so are steps
outside the layer's start/end range.

A hook that runs without its wrapper's record (the model was called outside ComfyUI's sampler
machinery) raises as well: without the record it cannot know the noise level or text length.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

import torch
from torch import Tensor

from ..saferope_engine import arch as archs
from ..saferope_engine.errors import HookNotRunError, SafeRoPEError
from .compat import skip_suspects, torch_compile_wrapper
from .layer import SafeRoPELayer, site_name

logger = logging.getLogger(__name__)

_EMPTY: Mapping[str, CallRecord] = MappingProxyType({})
#: token of a layer -> its record, for the model call(s) in progress on this thread.
_CALLS: ContextVar[Mapping[str, CallRecord]] = ContextVar("saferope_calls", default=_EMPTY)
#: where risk scores go during the LRS visualizer's model evaluation (None otherwise).
_SINK: ContextVar[RiskSink | None] = ContextVar("saferope_risk_sink", default=None)


class RiskSink(Protocol):
    """Receives the risk of every hook site during one model call.

    ``rho``/``gate``: ``(B, n, L)`` for the ``which`` ("q"/"k") vectors of the ``stream``
    ("txt", "img" or "joint" with ``txt_len`` text tokens first, or last with ``img_first``) at
    block ``(kind, index)``.
    """

    closed: bool

    def add(self, layer: SafeRoPELayer, kind: str, index: int, stream: str, which: str, rho: Tensor, gate: Tensor,
            *, txt_len: int, rotated: bool, img_first: bool = False) -> None: ...

    def close(self) -> None: ...


@contextlib.contextmanager
def collect_risk(sink: RiskSink) -> Iterator[RiskSink]:
    """Route risk scores of the next model call on this thread into ``sink``."""
    token = _SINK.set(sink)
    try:
        yield sink
    finally:
        _SINK.reset(token)


@dataclass(eq=False)
class CallRecord:
    """What one layer needs to know, and saw, during one model call."""

    layer: SafeRoPELayer
    active: bool
    context_len: int | None = None  # text length from the call's ``context`` argument
    sink: RiskSink | None = None
    seen: set[str] = field(default_factory=set)
    lengths: dict[tuple[str, str], int] = field(default_factory=dict)  # probe site (kind, path) -> tokens it saw
    layouts: dict[str, str] = field(default_factory=dict)  # kind -> "BHLD"/"BLHD" its QK-norms output in this call

    def text_length(self, kind: str, L: int) -> int:
        """Text tokens leading the joint sequence of ``L`` tokens at a block of ``kind`` (object mode)."""
        host = self.layer.model.kind(kind)
        ln = host.length
        n = None
        if ln is not None and ln.source == "probe":
            n = self.lengths.get((ln.kind, ln.site))
        elif ln is not None and ln.source == "context":
            n = self.context_len
        if n is None or not 0 <= n <= L:
            raise HookNotRunError(f"SafeRoPE ({self.layer.name}): the text length of this model call is unknown at "
                                  f"the {kind} blocks (no {ln.source if ln else 'length'} seen: {n}); refusing to "
                                  "run unprotected")
        return n if ln.segment == "txt" else L - n

    def missing(self) -> list[str]:
        """Hook sites that should have run in this call and did not."""
        return sorted(self.layer.sites() - self.seen) if self.active else []


def eager(fn: Callable, *, recursive: bool = True) -> Callable:
    """``fn`` kept out of torch.compile graphs: dynamo calls it as plain Python on every call.

    The hooks' bookkeeping (per-call record, sites seen, text length) must happen on every model
    call, not once at trace time. ``recursive=False`` (the DIFFUSION_MODEL wrapper) leaves the
    functions it calls — the diffusion model itself — to be compiled as usual.
    """
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return fn if disable is None else disable(fn, recursive=recursive)


def record_for(layer: SafeRoPELayer, where: str) -> CallRecord:
    """The record of ``layer`` for the model call in progress; raises when there is none."""
    rec = _CALLS.get().get(layer.token)
    if rec is None:
        raise HookNotRunError(
            f"SafeRoPE ({layer.name}): the {where} hook ran outside a model call prepared by ComfyUI's "
            "sampler (its DIFFUSION_MODEL wrapper did not run), so the noise level and text length are "
            "unknown; refusing to run unprotected")
    return rec


class Attn1Patch:
    """``attn1_patch`` callable for blocks that call it with joint text-first q/k before RoPE."""

    def __init__(self, layer: SafeRoPELayer) -> None:
        self.layer = layer
        self.kinds = layer.model.attn1_kinds()  # block_type -> kind

    @eager
    def __call__(self, q: Tensor, k: Tensor, v: Tensor, pe: Any = None, attn_mask: Any = None,
                 extra_options: Mapping[str, Any] | None = None, **_: Any) -> dict[str, Tensor]:
        opts = extra_options or {}
        block_type, index = opts.get("block_type"), opts.get("block_index")
        kind = self.kinds.get(block_type)
        if kind is None or not isinstance(index, int):
            raise SafeRoPEError(f"SafeRoPE ({self.layer.name}): attn1_patch called without a known block_type/"
                                f"block_index (got {block_type!r}, {index!r}) in a {self.layer.model.family.name} "
                                "model; this model is not supported")
        if not self.layer.patches(kind, index):
            return {}  # no work for blocks the adapter leaves alone
        rec = record_for(self.layer, "attn1_patch")
        img_slice = opts.get("img_slice")
        if not img_slice:
            raise HookNotRunError(f"SafeRoPE ({self.layer.name}): attn1_patch of {kind} block {index} came without "
                                  "img_slice, so text and image tokens cannot be told apart; refusing to run unprotected")
        txt_len = int(img_slice[0])  # q: (B, H, txt_len + img, D)
        q, k = self.layer.transform_qk(kind, index, q, k, txt_len=txt_len, stream="joint", record=rec)
        rec.seen.add(site_name(kind, index))
        return {"q": q, "k": k}

    def to(self, *args: Any, **kwargs: Any) -> Attn1Patch:
        """ComfyUI moves/casts patches; the engine keeps float32 device copies per device itself."""
        return self

    def __deepcopy__(self, memo: dict) -> Attn1Patch:
        return self  # stateless apart from the immutable layer


class NormPatch:
    """Object patch replacing one QK-norm module's ``forward`` on a clone.

    ``site.which == "qk"``: ``forward(q, k, v) -> (q, k)`` (Flux's QKNorm); ``"q"``/``"k"``:
    ``forward(x) -> x`` (one RMSNorm per tensor). Runs the original normalisation (the class's own
    ``forward``, or an object patch that was already on this clone — e.g. another pack's — passed
    as ``inner``), records the length it saw when it is a probe, then runs every SafeRoPE layer of
    the clone in application order.
    """

    def __init__(self, kind: str, index: int, site: archs.NormSite, module: torch.nn.Module,
                 layers: tuple[SafeRoPELayer, ...], *, inner: Callable | None = None,
                 probe: tuple[str, str] | None = None) -> None:
        self.kind, self.index, self.site, self.module = kind, index, site, module
        self.layers, self.inner, self.probe = layers, inner, probe
        self.name = site_name(kind, index, site.path)
        self._where = f"QK-norm ({self.name})"

    def with_layer(self, layer: SafeRoPELayer | None, *, probe: tuple[str, str] | None = None) -> NormPatch:
        """A new patch that also runs ``layer`` after the present ones and/or also probes."""
        layers = self.layers + ((layer,) if layer is not None and layer not in self.layers else ())
        return NormPatch(self.kind, self.index, self.site, self.module, layers, inner=self.inner,
                         probe=self.probe or probe)

    def _norm(self, *args: Any, **kwargs: Any) -> Any:
        if self.inner is not None:
            return self.inner(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)

    def _layout(self, t: Tensor, records: list[CallRecord]) -> str:
        """``"BHLD"`` or ``"BLHD"``: where this output's heads are.

        ComfyUI's code decides it, and it changed between versions (Qwen-Image's attention normalised
        ``(B, L, H, D)`` in 0.3.64 and ``(B, H, L, D)`` from 0.20), so the head axis is found in the
        tensor: the axis of the model's head count. When tokens and heads are equally many, the layout
        this kind's norms had earlier in the same model call decides; without one the call fails.
        """
        model = self.layers[0].model
        heads = model.key_heads() if self.site.which == "k" else model.shapes.num_heads
        fits = [lay for lay, axis in (("BHLD", 1), ("BLHD", 2)) if t.ndim == 4 and t.shape[axis] == heads]
        known = next((r.layouts[self.kind] for r in records if self.kind in r.layouts), None)
        if len(fits) == 1 and known not in (None, fits[0]):
            raise HookNotRunError(f"SafeRoPE ({self.layers[0].name}): the QK-norms of the {self.kind} blocks changed "
                                  f"layout within one model call ({known}, then {fits[0]} at {self.name})")
        if len(fits) == 1 or (len(fits) == 2 and known is not None):
            layout = fits[0] if len(fits) == 1 else known
            for r in records:
                r.layouts[self.kind] = layout
            return layout
        if not fits:
            raise HookNotRunError(f"SafeRoPE ({self.layers[0].name}): {self._where} gave a tensor of shape "
                                  f"{tuple(t.shape)} without an axis of the model's {heads} heads; refusing to run "
                                  "unprotected")
        raise HookNotRunError(f"SafeRoPE ({self.layers[0].name}): {self._where} saw as many tokens as heads "
                              f"({heads}) in the first QK-norm of its blocks in this call, so heads and tokens "
                              "cannot be told apart; refusing to guess")

    @eager
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self._norm(*args, **kwargs)
        pair = self.site.which == "qk"
        tensors = list(out) if pair else [out]  # (q, k) or x
        records = [record_for(layer, self._where) for layer in self.layers]
        blhd = self._layout(tensors[0], records) == "BLHD"
        views = [t.transpose(1, 2) if blhd else t for t in tensors]  # -> (B, H, L, D)
        L = int(views[0].shape[2])
        if self.probe is not None:
            for rec in records:
                rec.lengths[self.probe] = L  # the tokens of this stream in this call
        for layer, rec in zip(self.layers, records):
            if not layer.patches(self.kind, self.index):
                continue
            stream = self.site.stream
            txt_len = L if stream == "txt" else 0 if stream == "img" else rec.text_length(self.kind, L)
            img_first = stream == "joint" and layer.model.img_first(self.kind)
            if pair:
                views = list(layer.transform_qk(self.kind, self.index, views[0], views[1], txt_len=txt_len,
                                                img_first=img_first, stream=stream, record=rec))
            else:
                views = [layer.transform(self.kind, self.index, self.site.which, views[0], txt_len=txt_len,
                                         img_first=img_first, stream=stream, record=rec)]
            rec.seen.add(self.name)
        outs = [t.transpose(1, 2) if blhd else t for t in views]
        return tuple(outs) if pair else outs[0]


def _transformer_options(args: tuple, kwargs: Mapping[str, Any]) -> Mapping[str, Any]:
    opts = kwargs.get("transformer_options")
    if isinstance(opts, Mapping):
        return opts
    for a in reversed(args):  # Flux: (x, timestep, context, y, guidance, ref_latents, control, transformer_options)
        if isinstance(a, Mapping):
            return a
    return {}


def _sigmas(args: tuple, opts: Mapping[str, Any]) -> list[float] | None:
    s = opts.get("sigmas")
    if s is None and len(args) > 1 and isinstance(args[1], Tensor):
        s = args[1]  # Flux's timestep argument is sigma
    if s is None:
        return None
    return [float(x) for x in torch.as_tensor(s).detach().flatten().tolist()]


def _context_len(args: tuple, kwargs: Mapping[str, Any]) -> int | None:
    ctx = kwargs.get("context", args[2] if len(args) > 2 else None)
    return int(ctx.shape[1]) if isinstance(ctx, Tensor) and ctx.ndim == 3 else None  # (B, L_txt, C)


class DiffusionModelWrapper:
    """DIFFUSION_MODEL wrapper of one layer: per-call record, sampling range, fail-closed check."""

    def __init__(self, layer: SafeRoPELayer) -> None:
        self.layer = layer

    def __call__(self, executor: Callable, *args: Any, **kwargs: Any) -> Any:
        opts = _transformer_options(args, kwargs)
        if self.layer.mode == "attn1":
            compiled = torch_compile_wrapper(opts)
            if compiled is not None:
                raise SafeRoPEError(
                    f"SafeRoPE ({self.layer.name}): this model call runs under torch.compile ({compiled} wrapper, "
                    "e.g. the TorchCompileModel node) and the layer was applied with mode='attn1', whose hook lives "
                    "in transformer_options; ComfyUI's TorchCompileModel drops torch.compile's guards on "
                    "transformer_options, so a graph traced for another model can run without the hook. Apply "
                    "SafeRoPE with the default hook (QK-norm object patches: apply_saferope(..., mode=None), what "
                    "the Apply SafeRoPE node does), or remove TorchCompileModel from the workflow.")
        sink = _SINK.get()
        # the full range is active at every sigma: no need to read them (a device sync)
        active = self.layer.full_range or self.layer.active_at(_sigmas(args, opts))
        rec = CallRecord(self.layer, active=active,
                         context_len=_context_len(args, kwargs),
                         sink=None if sink is None or sink.closed else sink)
        token = _CALLS.set(MappingProxyType({**_CALLS.get(), self.layer.token: rec}))
        try:
            out = executor(*args, **kwargs)
        finally:
            _CALLS.reset(token)
        if rec.sink is not None:
            rec.sink.close()  # the visualizer reads one model call
        missing = rec.missing()
        if missing:  # still inside the call: whatever swapped the model's forward for it is visible
            raise HookNotRunError(self._not_run_message(missing, getattr(executor, "class_obj", None), opts))
        return out

    def _not_run_message(self, missing: list[str], diffusion_model: Any, opts: Mapping[str, Any]) -> str:
        how = "attn1_patch" if self.layer.mode == "attn1" else "QK-norm object patch"
        head = (f"SafeRoPE ({self.layer.name}): the {how} did not run for {missing} during this model call "
                "although the adapter is active at this noise level. ")
        try:
            suspects = skip_suspects(diffusion_model, opts, missing, self.layer.model)
        except Exception:  # noqa: BLE001 - a failed diagnosis must not hide the refusal itself
            logger.debug("SafeRoPE: could not inspect the model call for block replacements", exc_info=True)
            suspects = []
        range_ = f"{self.layer.start_percent:g}–{self.layer.end_percent:g}"
        which = "that node" if suspects else "such a node"
        remedy = (f"Remedy: remove or bypass {which}, switch it off (TeaCache rel_l1_thresh 0, First Block Cache "
                  "residual_diff_threshold 0), or limit its start/end so that it never skips blocks while SafeRoPE "
                  f"is active (Apply SafeRoPE's start_percent–end_percent: {range_}). ")
        if suspects:
            cause = ("Likely cause: " + "; ".join(suspects) + ". A block cache (TeaCache, First Block Cache, …) or "
                     "block-replacing node reuses or recomputes these blocks without SafeRoPE's hook, so their output "
                     "is not protected. " + remedy)
        else:
            cause = ("Another node may have replaced or skipped these blocks (a block cache such as TeaCache or "
                     "First Block Cache, a block replacement), or this ComfyUI does not call the hook. " + remedy)
        return head + cause + "Refusing to return an unprotected result."

    __call__ = eager(__call__, recursive=False)  # the model it runs is compiled as usual

    def to(self, *args: Any, **kwargs: Any) -> DiffusionModelWrapper:
        return self

    def __deepcopy__(self, memo: dict) -> DiffusionModelWrapper:
        return self
