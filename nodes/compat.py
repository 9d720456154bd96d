"""What the running ComfyUI can do and what the model is — through the engine's family registry.

Nothing here compares version numbers: every decision is taken from the objects at hand, so a
ComfyUI fork or a release we never saw gets the same treatment as the ones we tested.

* :func:`comfy_model` recognises the model family from the ModelPatcher's ``BaseModel`` class
  (:func:`saferope_engine.arch.detect_comfy` — class and structure, never shapes alone), reads head
  count, head size and block counts from the modules themselves, and whether every block kind
  calls ``transformer_options["patches"]["attn1_patch"]`` between QK-norm and RoPE. ComfyUI added
  that call to Flux's blocks in the 0.17–0.19 range and to Qwen-Image's attention by 0.20; older
  versions silently ignore the key. We look for the string constant ``"attn1_patch"`` in the code
  object of the calling module's ``forward`` — present exactly when the method reads that key. If
  detection were ever wrong, the fail-closed check of :mod:`.patch` still raises instead of
  letting an unprotected image through.
* The token order of joint sequences is the registry's unless the model object says otherwise
  (:attr:`~saferope_engine.arch.HostKind.flip`: ComfyUI before 0.14 ran HunyuanImage 2.1 image first).
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..saferope_engine import arch as archs
from ..saferope_engine.errors import UnsupportedModelError

logger = logging.getLogger(__name__)

#: ``comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL`` (the value is part of ComfyUI's
#: saved-state format and has not changed since wrappers exist); used only without ComfyUI.
_DIFFUSION_MODEL_FALLBACK = "diffusion_model"


def diffusion_model_wrapper_type() -> str:
    """The wrapper type whose wrappers run around the diffusion model's forward on every model call."""
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


def calls_attn1_patch(cls: type) -> bool:
    """Whether ``cls.forward`` reads ``transformer_options["patches"]["attn1_patch"]``."""
    code = getattr(getattr(cls, "forward", None), "__code__", None)
    return code is not None and "attn1_patch" in code.co_consts


@dataclass(frozen=True)
class ComfyModel:
    """A recognised ComfyUI model: its family, shapes, and the hook its blocks offer."""

    family: archs.Arch
    shapes: archs.ModelShapes
    attn1_patch: bool  # every block kind calls attn1_patch with joint q/k before RoPE
    orders: Mapping[str, str] = field(default_factory=dict, hash=False)  # kind -> token order of its joint sites

    def kind(self, name: str) -> archs.HostKind:
        return next(hk for hk in self.family.comfy.kinds if hk.kind == name)

    def img_first(self, kind: str) -> bool:
        """Whether the joint sequence of ``kind`` puts the image tokens first in this model."""
        return self.orders.get(kind, self.kind(kind).order) == "img_first"

    def key_heads(self) -> int:
        """Heads of the keys (fewer than the queries' under grouped-query attention)."""
        return self.shapes.num_kv_heads or self.shapes.num_heads

    def site_path(self, kind: str, index: int, site: archs.NormSite) -> str:
        """Attribute path (from the BaseModel) of a QK-norm module — the object patch's target."""
        return f"diffusion_model.{self.kind(kind).blocks}.{index}.{site.path}"

    def attn1_kinds(self) -> dict[str, str]:
        """``transformer_options["block_type"]`` of attn1_patch calls → block kind."""
        return {hk.attn1[0]: hk.kind for hk in self.family.comfy.kinds if hk.attn1}


def comfy_model(model: Any) -> ComfyModel:
    """Recognise the diffusion model behind a ModelPatcher. Raises naming what was found if unsupported."""
    base = getattr(model, "model", None)
    if base is None or not hasattr(model, "get_model_object"):
        raise UnsupportedModelError(f"SafeRoPE needs a ComfyUI MODEL (a ModelPatcher), got {type(model).__name__}")
    family = archs.detect_comfy(base)
    dm = model.get_model_object("diffusion_model")
    shapes = archs.comfy_shapes(family, dm)
    orders = {hk.kind: _order(hk, dm) for hk in family.comfy.kinds}
    attn1 = True
    for hk in family.comfy.kinds:
        if shapes.blocks.get(hk.kind, 0) == 0:
            continue
        if hk.attn1 is None:
            attn1 = False
            break
        blocks = archs.resolve_attr(dm, hk.blocks)
        classes = {type(archs.resolve_attr(b, hk.attn1[1])) for b in blocks}
        attn1 = attn1 and all(calls_attn1_patch(c) for c in classes)
    if attn1 and any(o == "img_first" for o in orders.values()):  # attn1_patch's img_slice means text first
        attn1 = False
    return ComfyModel(family=family, shapes=shapes, attn1_patch=attn1, orders=orders)


def _order(hk: archs.HostKind, dm: Any) -> str:
    """The token order of ``hk``'s joint sites in this model: the registry's, reversed where ``hk.flip`` is true."""
    if hk.flip is None:
        return hk.order
    try:
        flipped = archs.resolve_attr(dm, hk.flip) is True
    except (AttributeError, IndexError, TypeError):
        flipped = False  # the attribute is gone from this ComfyUI's code: the registry's order
    if flipped:
        logger.info("SafeRoPE: %s has %s set: its %s blocks see the image tokens first", type(dm).__name__, hk.flip,
                    hk.kind)
    return ("img_first" if hk.order == "txt_first" else "txt_first") if flipped else hk.order


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
    call = type(f).__call__ if callable(f) else None  # a callable object: its class's __call__
    code = getattr(f, "__code__", None) or getattr(call, "__code__", None)
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
    kind, index = site.split(":", 1)[0].split(".")[:2]  # "double.3:txt_attn.norm", "single.7"
    return kind, int(index)


def skip_suspects(diffusion_model: Any, transformer_options: Mapping[str, Any], missing: list[str],
                  model: ComfyModel | None = None) -> list[str]:
    """What, seen from inside a model call, replaces or skips the blocks whose hooks did not run.

    Looks for the ways node packs take blocks out of ComfyUI's own block loop: a replaced
    ``forward_orig``/``_forward``/``forward`` on the diffusion model instance (block caches such as
    TeaCache and WaveSpeed's First Block Cache swap ``forward_orig`` for the duration of the call),
    ``patches_replace["dit"]`` entries for those blocks, and blocks whose class comes from a custom
    node pack or whose ``forward`` is replaced on the instance.
    """
    found: list[str] = []
    own = vars(diffusion_model) if diffusion_model is not None and hasattr(diffusion_model, "__dict__") else {}
    for name in ("forward_orig", "_forward", "forward"):
        if callable(own.get(name)):
            found.append(f"the diffusion model's {name} is replaced during this call by {describe_callable(own[name])}")
    patches = transformer_options.get("patches_replace", {})
    dit = patches.get("dit", {}) if isinstance(patches, Mapping) else {}
    for kind, index in sorted({_site_block(s) for s in missing}):
        fn = dit.get((f"{kind}_block", index)) if isinstance(dit, Mapping) else None
        if fn is not None:
            found.append(f"{kind} block {index} is replaced by patches_replace['dit'][('{kind}_block', {index})] = "
                         f"{describe_callable(fn)}")
        attr = model.kind(kind).blocks if model is not None else f"{kind}_blocks"
        lst = getattr(diffusion_model, attr, None)
        block = lst[index] if isinstance(lst, torch.nn.ModuleList) and index < len(lst) else None
        if block is None:
            continue
        if custom_node_pack(type(block).forward) is not None:
            found.append(f"{kind} block {index} is a {describe_callable(type(block).forward)}")
        elif callable(vars(block).get("forward")):
            found.append(f"{kind} block {index}'s forward is replaced by {describe_callable(vars(block)['forward'])}")
    return found
