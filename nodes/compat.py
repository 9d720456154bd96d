"""What the running ComfyUI can do and what shape the model is — by feature detection.

Nothing here compares version numbers: every decision is taken from the objects at hand, so a
ComfyUI fork or a release we never saw gets the same treatment as the ones we tested.

* :func:`flux_info` reads the Flux model behind a ModelPatcher: head count, head dim and block
  counts derived from the modules themselves (never from a model config that may hard-code them),
  and whether its block classes call ``transformer_options["patches"]["attn1_patch"]``.
  ComfyUI added that call to ``DoubleStreamBlock``/``SingleStreamBlock`` (after QK-norm, before
  RoPE) in the 0.17–0.19 range; older versions silently ignore the key. We look for the string
  constant ``"attn1_patch"`` in the code object of both block classes' ``forward`` — present
  exactly when the method reads that key. If detection were ever wrong, the fail-closed check of
  :mod:`.patch` still raises instead of letting an unprotected image through.
* :func:`sigma_range` converts start/end percent to sigmas the way ComfyUI's own nodes do
  (``model_sampling.percent_to_sigma``).
* :func:`torch_compile_wrapper` tells whether a model call runs under ComfyUI's torch.compile
  wrapper (TorchCompileModel), from the call's ``transformer_options["wrappers"]``.
* :func:`skip_suspects` names, from inside a model call, what took blocks out of ComfyUI's own
  block loop (a replaced ``forward_orig``, ``patches_replace`` entries, foreign block classes)
  and the custom node pack it comes from — for the message of a hook that did not run.

ComfyUI modules are imported lazily so that this file imports without ComfyUI (CI).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..saferope_engine.errors import IncompatibleAdapterError

logger = logging.getLogger(__name__)

#: ``comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL`` (the value is part of ComfyUI's
#: saved-state format and has not changed since wrappers exist); used only without ComfyUI.
_DIFFUSION_MODEL_FALLBACK = "diffusion_model"


def diffusion_model_wrapper_type() -> str:
    """The wrapper type whose wrappers run around ``Flux._forward`` on every model call."""
    try:
        from comfy.patcher_extension import WrappersMP  # type: ignore[import-not-found]
    except ImportError:
        return _DIFFUSION_MODEL_FALLBACK
    return WrappersMP.DIFFUSION_MODEL


def comfy_version() -> str:
    """ComfyUI's version string, or ``"unknown"`` (for log messages only, never for decisions)."""
    try:
        import comfyui_version  # type: ignore[import-not-found]
    except ImportError:
        return "unknown"
    return str(getattr(comfyui_version, "__version__", "unknown"))


def norm_path(kind: str, index: int, part: str) -> str:
    """Attribute path (from the BaseModel) of the QK-norm module that produces ``part``'s q/k.

    ``part`` is ``"txt"``/``"img"`` for the two streams of a double block, ``"joint"`` for a
    single block (whose one norm sees text and image tokens together, text first).
    """
    if kind == "double":
        return f"diffusion_model.double_blocks.{index}.{part}_attn.norm"
    return f"diffusion_model.single_blocks.{index}.norm"


def calls_attn1_patch(cls: type) -> bool:
    """Whether ``cls.forward`` reads ``transformer_options["patches"]["attn1_patch"]``."""
    code = getattr(getattr(cls, "forward", None), "__code__", None)
    return code is not None and "attn1_patch" in code.co_consts


@dataclass(frozen=True)
class FluxInfo:
    """Shapes of a Flux-architecture diffusion model and the hook it offers."""

    num_heads: int
    head_dim: int
    num_double_blocks: int
    num_single_blocks: int
    attn1_patch: bool  # both block classes call attn1_patch between QK-norm and RoPE

    def shapes(self) -> dict[str, int]:
        """Keyword arguments of :meth:`SafeRoPEAdapter.check_compatible`."""
        return {"num_heads": self.num_heads, "head_dim": self.head_dim,
                "num_double_blocks": self.num_double_blocks, "num_single_blocks": self.num_single_blocks}


def _not_flux(why: str) -> IncompatibleAdapterError:
    return IncompatibleAdapterError(
        f"SafeRoPE needs a FLUX-architecture model (ComfyUI's comfy.ldm.flux double/single stream blocks); {why}")


def _head_dim_of(norm: Any, where: str) -> int:
    qn = getattr(norm, "query_norm", None)
    params = list(qn.parameters()) if isinstance(qn, torch.nn.Module) else []
    if not params:
        raise _not_flux(f"{where} has no QK-norm with a scale parameter")
    return int(params[0].shape[-1])  # RMSNorm scale: (head_dim,)


def flux_info(model: Any) -> FluxInfo:
    """Inspect the diffusion model of a ModelPatcher. Raises if it is not a Flux-style model."""
    try:
        dm = model.get_model_object("diffusion_model")
    except AttributeError:
        raise _not_flux(f"got {type(model).__name__} without a diffusion model") from None
    double, single = getattr(dm, "double_blocks", None), getattr(dm, "single_blocks", None)
    if not isinstance(double, torch.nn.ModuleList) or not isinstance(single, torch.nn.ModuleList):
        raise _not_flux(f"{type(dm).__name__} has no double_blocks/single_blocks")
    if len(double) + len(single) == 0:
        raise _not_flux(f"{type(dm).__name__} has no attention blocks")
    heads, dims = set(), set()
    for i, b in enumerate(double):
        heads.add(getattr(b, "num_heads", None))
        for part in ("img", "txt"):
            dims.add(_head_dim_of(getattr(getattr(b, f"{part}_attn", None), "norm", None), f"double block {i}"))
    for i, b in enumerate(single):
        heads.add(getattr(b, "num_heads", None))
        dims.add(_head_dim_of(getattr(b, "norm", None), f"single block {i}"))
    if len(heads) != 1 or None in heads or len(dims) != 1:
        raise _not_flux(f"blocks disagree on head count/dim (heads {sorted(map(str, heads))}, dims {sorted(dims)})")
    classes = {type(b) for b in double} | {type(b) for b in single}
    return FluxInfo(num_heads=int(heads.pop()), head_dim=dims.pop(), num_double_blocks=len(double),
                    num_single_blocks=len(single), attn1_patch=all(calls_attn1_patch(c) for c in classes))


def sigma_range(model: Any, start_percent: float, end_percent: float) -> tuple[float, float]:
    """``(sigma_start, sigma_end)``: the patch acts at sigmas ``sigma_end ≤ σ ≤ sigma_start``.

    Percent 0 is the start of sampling (highest noise), 1 its end — as in ComfyUI's ControlNet
    and conditioning-range nodes, which use the same ``percent_to_sigma`` conversion.
    """
    if not (0.0 <= start_percent <= end_percent <= 1.0):
        raise ValueError(f"need 0 ≤ start_percent ≤ end_percent ≤ 1, got start_percent={start_percent}, "
                         f"end_percent={end_percent}")
    ms = model.get_model_object("model_sampling")
    return float(ms.percent_to_sigma(start_percent)), float(ms.percent_to_sigma(end_percent))


# -- what else acts on a model call (for error messages and the torch.compile check) -----------------
#: ``comfy_api.torch_helpers.torch_compile.COMPILE_KEY``: the key of the APPLY_MODEL wrapper that
#: ComfyUI's TorchCompileModel (``set_torch_compile_wrapper``) installs; used only if that import fails.
_COMPILE_KEY_FALLBACK = "torch.compile"
_APPLY_MODEL_FALLBACK = "apply_model"


def _compile_keys() -> tuple[str, str]:
    try:
        from comfy.patcher_extension import WrappersMP  # type: ignore[import-not-found]
        apply_model = WrappersMP.APPLY_MODEL
    except ImportError:
        apply_model = _APPLY_MODEL_FALLBACK
    try:
        from comfy_api.torch_helpers.torch_compile import COMPILE_KEY  # type: ignore[import-not-found]
    except ImportError:
        COMPILE_KEY = _COMPILE_KEY_FALLBACK
    return apply_model, COMPILE_KEY


def torch_compile_wrapper(transformer_options: Mapping[str, Any]) -> str | None:
    """``"<wrapper type>/<key>"`` of ComfyUI's torch.compile wrapper when this model call runs compiled."""
    apply_model, key = _compile_keys()
    wrappers = transformer_options.get("wrappers", {})
    found = wrappers.get(apply_model, {}) if isinstance(wrappers, Mapping) else {}
    return f"{apply_model}/{key}" if isinstance(found, Mapping) and found.get(key) else None


def custom_node_pack(fn: Any) -> str | None:
    """Folder under ``custom_nodes`` that defines ``fn`` (a function, bound method or callable object)."""
    f = inspect.unwrap(getattr(fn, "__func__", fn))
    code = getattr(f, "__code__", None) or getattr(getattr(type(f), "__call__", None), "__code__", None)
    parts = Path(code.co_filename).parts if code is not None else ()
    for i, part in enumerate(parts[:-1]):
        if part == "custom_nodes":
            return parts[i + 1]
    return None


def describe_callable(fn: Any) -> str:
    """``name`` of a callable plus where it comes from: a custom node pack, else its module."""
    f = inspect.unwrap(getattr(fn, "__func__", fn))
    name = getattr(f, "__qualname__", None) or type(f).__qualname__
    pack = custom_node_pack(f)
    if pack is not None:
        return f"{name} from custom node pack {pack!r}"
    return f"{name} ({getattr(f, '__module__', None) or type(f).__module__})"


def _site_block(site: str) -> tuple[str, int]:
    kind, index = site.split(".")[:2]  # "double.3.txt", "single.7"
    return kind, int(index)


def skip_suspects(diffusion_model: Any, transformer_options: Mapping[str, Any], missing: list[str]) -> list[str]:
    """What, seen from inside a model call, replaces or skips the blocks whose hooks did not run.

    Looks for the ways node packs take blocks out of ComfyUI's own ``forward_orig`` loop: a
    replaced ``forward_orig``/``_forward``/``forward`` on the diffusion model instance (block
    caches such as TeaCache and WaveSpeed's First Block Cache swap ``forward_orig`` for the
    duration of the call), ``patches_replace["dit"]`` entries for those blocks, and blocks whose
    class comes from a custom node pack or whose ``forward`` is replaced on the instance.
    """
    found: list[str] = []
    own = vars(diffusion_model) if diffusion_model is not None and hasattr(diffusion_model, "__dict__") else {}
    for name in ("forward_orig", "_forward", "forward"):
        if callable(own.get(name)):
            found.append(f"the diffusion model's {name} is replaced during this call by {describe_callable(own[name])}")
    patches = transformer_options.get("patches_replace", {})
    dit = patches.get("dit", {}) if isinstance(patches, Mapping) else {}
    blocks = sorted({_site_block(s) for s in missing})
    for kind, index in blocks:
        fn = dit.get((f"{kind}_block", index)) if isinstance(dit, Mapping) else None
        if fn is not None:
            found.append(f"{kind} block {index} is replaced by patches_replace['dit'][('{kind}_block', {index})] = "
                         f"{describe_callable(fn)}")
        lst = getattr(diffusion_model, f"{kind}_blocks", None)
        block = lst[index] if isinstance(lst, torch.nn.ModuleList) and index < len(lst) else None
        if block is None:
            continue
        if custom_node_pack(type(block).forward) is not None:
            found.append(f"{kind} block {index} is a {describe_callable(type(block).forward)}")
        elif callable(vars(block).get("forward")):
            found.append(f"{kind} block {index}'s forward is replaced by {describe_callable(vars(block)['forward'])}")
    return found
