"""Model families SafeRoPE supports: one registry, one small module per family (design §8).

SafeRoPE needs three things of a transformer: attention that normalises queries and keys per
head (QK-norm) and then applies RoPE, on a sequence of text and image tokens. Everything a
family adds on top — where its blocks are, which QK-norm modules produce the pre-RoPE vectors,
which tokens a module sees, how the text length of a call is known, how to recognise the family
— is data in one module of this package. The math (:mod:`..core`), the file format
(:mod:`..adapter`), the fail-closed guard and the trainer's stages name no family.

Adding a family (the checklist — a new family is one new module here plus its test fixture):

1. Read the family's attention code in ComfyUI (``comfy/ldm/<family>``) and diffusers
   (``diffusers/models/transformers/transformer_<family>.py``): find every QK-norm module whose
   output goes to RoPE, which stream it sees (text, image, or the joint sequence) and in which
   layout (``(B, H, L, D)`` or ``(B, L, H, D)``), the token order of joint sequences, and what
   tells the text (or image) length of a call.
2. Write ``saferope_engine/arch/<id>.py`` with ``ARCH = Arch(...)``:
   ``id`` (lower-case, the adapter files' ``arch``), ``name``, ``kinds`` (block kinds in model
   order, each with the segments its tokens can carry), ``comfy`` (:class:`ComfySpec`: the
   ComfyUI ``BaseModel`` class names that identify the family — never shapes — and one
   :class:`HostKind` per kind) and ``diffusers`` (:class:`DiffusersSpec`: the transformer class
   names, one :class:`HostKind` per kind, the pipeline classes and which of them generate from
   text), and ``models`` (the real models' sizes, for the README). Modules whose name starts
   with ``_`` hold pieces several families share.
3. Nothing else registers it: this package imports every public module in it.
4. Add the family's tiny models (ComfyUI and diffusers, same weights where ComfyUI has a key map)
   to the family fixtures of the tests (``tests/families.py``); the per-family tests then run
   on it: gate fires only on the synthetic concept, safe prompts bit-identical, strength 0 equals
   base, wrong-family adapters rejected, skipped hooks raise.
5. Add a row to the README's model-support table.
6. For the trainer (``python -m trainer``): one module ``trainer/families/<id>.py`` (how to encode
   prompts, call the transformer for a velocity, pack latents, generate) listed in the table
   ``trainer.families.FAMILIES``, and a tiny pipeline of the family in ``tests/tiny_families.py``.

Families that cannot be supported are listed in :data:`UNSUPPORTED` with the reason, so the
error a user sees names the family and why.

This package imports only the standard library: families describe ComfyUI and diffusers
objects by attribute paths and class names and are inspected duck-typed.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import UnsupportedModelError

__all__ = [
    "SEGMENTS", "Kind", "NormSite", "Length", "HostKind", "ComfySpec", "DiffusersSpec", "Arch",
    "ModelShapes", "register", "get", "arches", "ids", "UNSUPPORTED", "detect_comfy", "detect_diffusers",
    "resolve_attr", "comfy_shapes", "diffusers_shapes",
]

#: Token segments: text tokens rotate with ``A_txt``, image tokens (reference images included) with ``A_img``.
SEGMENTS = ("txt", "img")
_STREAMS = ("txt", "img", "joint")
_WHICH = ("qk", "q", "k")
_LAYOUTS = ("BHLD", "BLHD")
_ORDERS = ("txt_first", "img_first")
_SOURCES = ("img_slice", "probe", "block_arg", "model_arg", "context")


@dataclass(frozen=True)
class Kind:
    """A block kind of a family (``double``, ``single``, ``context_refiner`` …).

    ``segments``: which token segments its attention sees — a generator for any other segment
    would never act, so the format rejects it.
    """

    name: str
    segments: tuple[str, ...] = SEGMENTS

    def __post_init__(self) -> None:
        if not (self.name and self.name.replace("_", "a").isalnum() and self.name[0].isalpha() and self.name.islower()):
            raise ValueError(f"kind name must be lower-case letters, digits and '_', got {self.name!r}")
        if not self.segments or any(s not in SEGMENTS for s in self.segments):
            raise ValueError(f"kind {self.name}: segments must be a non-empty subset of {SEGMENTS}")


@dataclass(frozen=True)
class NormSite:
    """A QK-norm module inside a block whose output is a pre-RoPE query and/or key.

    Attributes:
        path: attribute path from the block (``"img_attn.norm"``, ``"attn.norm_q"``).
        which: ``"qk"`` for a module normalising both (``forward(q, k, v) -> (q, k)``, ComfyUI's
            Flux ``QKNorm``), else ``"q"`` or ``"k"`` for a module normalising one tensor.
        stream: the tokens the module sees: ``"txt"``, ``"img"`` or ``"joint"`` (both, in the
            kind's token order).
        layout: ``"BHLD"`` (batch, heads, tokens, head dim) or ``"BLHD"``. diffusers sites are used as
            given; in ComfyUI it is the layout of the version read for the registry, and the pack
            finds the head axis in every tensor (ComfyUI's Qwen-Image code moved from ``BLHD`` to
            ``BHLD`` between 0.3.64 and 0.20).
    """

    path: str
    which: str
    stream: str
    layout: str = "BHLD"

    def __post_init__(self) -> None:
        if self.which not in _WHICH or self.stream not in _STREAMS or self.layout not in _LAYOUTS:
            raise ValueError(f"bad NormSite {self}")


@dataclass(frozen=True)
class Length:
    """How the split of a joint sequence is known in one model call: the length of ``segment``.

    ``source``:
        * ``"img_slice"`` — ComfyUI's ``extra_options["img_slice"][0]`` (attn1_patch calls);
        * ``"probe"`` — the sequence length seen by site ``site`` of the *last* block of kind
          ``kind`` (e.g. the text stream of the last double block is exactly the text of the
          single blocks);
        * ``"block_arg"`` / ``"model_arg"`` — ``arg.shape[1]`` of the block's / the model's forward
          argument named ``arg`` (or at position ``index``), a ``(B, T, C)`` tensor;
        * ``"context"`` — ComfyUI's ``context`` argument of the diffusion model call.
    """

    source: str
    segment: str = "txt"
    kind: str | None = None
    site: str | None = None
    arg: str | None = None
    index: int | None = None

    def __post_init__(self) -> None:
        if self.source not in _SOURCES or self.segment not in SEGMENTS:
            raise ValueError(f"bad Length {self}")
        if self.source == "probe" and not (self.kind and self.site):
            raise ValueError("a probe length names the kind and site it reads")
        if self.source in ("block_arg", "model_arg") and not self.arg:
            raise ValueError(f"a {self.source} length names the argument")


@dataclass(frozen=True)
class HostKind:
    """Where one block kind lives in a host (ComfyUI's model or a diffusers transformer).

    Attributes:
        kind: the family's kind name.
        blocks: attribute path (from the diffusion model / transformer) of the blocks' ``ModuleList``.
        block_classes: class names a block of this kind may have (structure check).
        norms: the QK-norm sites of one block.
        heads: attribute path (from the block) of its query head count.
        kv_heads: attribute path of its key head count where it may be smaller (GQA), else ``None``.
        order: token order of joint sites, ``"txt_first"`` or ``"img_first"``.
        length: how joint sites learn the split (``None`` when the kind has no joint site).
        attn1: ComfyUI only: ``(block_type, path)`` when ComfyUI calls ``attn1_patch`` for this
            kind with joint text-first q/k, ``transformer_options["block_type"] == block_type``;
            ``path`` is the module (from the block, ``""`` = the block) whose ``forward`` makes the call.
        flip: ComfyUI only: attribute path (from the diffusion model) that a ComfyUI version sets
            true when it builds this kind's joint sequence in the other order than ``order`` (older
            ComfyUI ran HunyuanVideo-code models image first: ``double_blocks.0.flipped_img_txt``).
            Read from the model object when the pack recognises it; absent or false: ``order``.
    """

    kind: str
    blocks: str
    block_classes: tuple[str, ...]
    norms: tuple[NormSite, ...]
    heads: str
    kv_heads: str | None = None
    order: str = "txt_first"
    length: Length | None = None
    attn1: tuple[str, str] | None = None
    flip: str | None = None

    def __post_init__(self) -> None:
        if self.order not in _ORDERS:
            raise ValueError(f"order must be one of {_ORDERS}, got {self.order!r}")
        if any(n.stream == "joint" for n in self.norms) and self.length is None:
            raise ValueError(f"kind {self.kind}: joint norm sites need a Length")
        if not self.norms:
            raise ValueError(f"kind {self.kind}: no norm sites")


@dataclass(frozen=True)
class ComfySpec:
    """How a family appears in ComfyUI.

    ``model_classes``: names of the ComfyUI ``BaseModel`` classes (``comfy.model_base``) of the
    family — the exact class of ``ModelPatcher.model``; ``config_classes``: where several families
    share one ``BaseModel`` class, names of ``model_config`` classes (``comfy.supported_models``)
    that must appear in the config's class hierarchy.
    """

    model_classes: tuple[str, ...]
    kinds: tuple[HostKind, ...]
    config_classes: tuple[str, ...] = ()


@dataclass(frozen=True)
class DiffusersSpec:
    """How a family appears in diffusers: transformer class names, its kinds, its pipelines.

    ``pipeline_classes``: every diffusers pipeline class (``model_index.json``'s ``_class_name``)
    that drives a transformer of the family; ``text_to_image``: those of them that generate from a
    prompt alone, the ones an adapter is built and evaluated with (the trainer loads these).
    ``check_call(args, kwargs)`` may raise for call modes the sites cannot split correctly.
    """

    transformer_classes: tuple[str, ...]
    kinds: tuple[HostKind, ...]
    pipeline_classes: tuple[str, ...] = ()
    text_to_image: tuple[str, ...] = ()
    check_call: Callable[[tuple, Mapping[str, Any]], None] | None = None

    def __post_init__(self) -> None:
        extra = [p for p in self.text_to_image if p not in self.pipeline_classes]
        if extra:
            raise ValueError(f"text_to_image pipelines {extra} are not among pipeline_classes")


@dataclass(frozen=True)
class Arch:
    """One model family (design §8)."""

    id: str
    name: str
    kinds: tuple[Kind, ...]
    comfy: ComfySpec | None
    diffusers: DiffusersSpec | None
    models: str = ""
    gqa: bool = False  # keys may have fewer heads than queries

    def __post_init__(self) -> None:
        names = [k.name for k in self.kinds]
        if not self.kinds or len(set(names)) != len(names):
            raise ValueError(f"{self.id}: kinds must be distinct and non-empty")
        for spec in (self.comfy, self.diffusers):
            if spec is None:
                continue
            host = [hk.kind for hk in spec.kinds]
            if sorted(host) != sorted(names):
                raise ValueError(f"{self.id}: host kinds {host} differ from the family's kinds {names}")
            for hk in spec.kinds:
                if hk.length and hk.length.source == "probe" and hk.length.kind not in names:
                    raise ValueError(f"{self.id}: probe of unknown kind {hk.length.kind!r}")

    @property
    def kind_names(self) -> tuple[str, ...]:
        return tuple(k.name for k in self.kinds)

    def kind(self, name: str) -> Kind:
        for k in self.kinds:
            if k.name == name:
                return k
        raise KeyError(f"{self.name} has no block kind {name!r} (kinds: {', '.join(self.kind_names)})")

    def label(self) -> str:
        return f"{self.name} ({self.id})"


@dataclass(frozen=True)
class ModelShapes:
    """What an adapter must match in a model: family, head layout and block counts per kind."""

    arch: str
    num_heads: int
    head_dim: int
    blocks: Mapping[str, int]
    num_kv_heads: int | None = None  # None: keys have as many heads as queries


# -- the registry ------------------------------------------------------------------------------
_REGISTRY: dict[str, Arch] = {}

#: Model classes met in ComfyUI (and diffusers) that SafeRoPE does not support, and why.
UNSUPPORTED: dict[str, str] = {
    "HiDream": "HiDream applies RoPE inline right after its RMSNorm inside the attention, leaving no hook before RoPE",
    "HiDreamImageTransformer2DModel": "HiDream applies RoPE inline right after its RMSNorm, leaving no hook before RoPE",
    "SD3": "SD3/SD3.5 use no rotary embedding, so there is no pre-RoPE query/key to rotate",
    "SD3Transformer2DModel": "SD3/SD3.5 use no rotary embedding, so there is no pre-RoPE query/key to rotate",
    "Lumina2": "Lumina 2 is not covered (only Z-Image of the Lumina-2 code family is)",
    "Lumina2Transformer2DModel": "Lumina 2 is not covered (only Z-Image of the Lumina-2 code family is)",
    "HunyuanVideo": "video models are not supported (HunyuanImage 2.1 is)",
    "HunyuanVideoTransformer3DModel": "video models are not supported (HunyuanImage 2.1 is)",
    "HunyuanImage21Refiner": "the HunyuanImage 2.1 refiner is not covered (the base HunyuanImage 2.1 is)",
}


def register(arch: Arch) -> Arch:
    """Add a family (the module of a family calls this through ``ARCH``); ids are unique."""
    if arch.id in _REGISTRY and _REGISTRY[arch.id] is not arch:
        raise ValueError(f"model family {arch.id!r} registered twice")
    _REGISTRY[arch.id] = arch
    return arch


def ids() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def arches() -> tuple[Arch, ...]:
    return tuple(_REGISTRY.values())


def get(arch_id: str) -> Arch:
    """The family with this id; ``KeyError`` naming the known ids otherwise."""
    try:
        return _REGISTRY[arch_id]
    except (KeyError, TypeError):
        raise KeyError(f"unknown model family {arch_id!r} (known: {', '.join(_REGISTRY)})") from None


def _supported_list() -> str:
    return ", ".join(a.label() for a in _REGISTRY.values())


def resolve_attr(obj: Any, path: str) -> Any:
    """``obj.a.b.c`` for ``path = "a.b.c"`` (``""`` is ``obj``); ``AttributeError`` naming the path."""
    for part in filter(None, path.split(".")):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def _mro_names(obj: Any) -> list[str]:
    return [c.__name__ for c in type(obj).__mro__]


def detect_comfy(base_model: Any) -> Arch:
    """The family of a ComfyUI ``BaseModel`` (``ModelPatcher.model``), by class — never by shapes.

    Raises :class:`UnsupportedModelError` naming the classes found when no family claims it,
    with the reason for families known to be unsupported.
    """
    cls = type(base_model).__name__
    config = getattr(base_model, "model_config", None)
    config_names = _mro_names(config) if config is not None else []
    hits = [a for a in _REGISTRY.values() if a.comfy is not None and cls in a.comfy.model_classes
            and (not a.comfy.config_classes or any(n in config_names for n in a.comfy.config_classes))]
    dm = getattr(base_model, "diffusion_model", None)
    found = f"ComfyUI model class {cls!r}"
    if config is not None:
        found += f" (config {type(config).__name__!r}"
        found += f", diffusion model {type(dm).__name__!r})" if dm is not None else ")"
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:  # pragma: no cover - a registry bug
        raise UnsupportedModelError(f"{found} is claimed by several families: {[a.id for a in hits]}")
    why = UNSUPPORTED.get(cls) or UNSUPPORTED.get(type(config).__name__ if config is not None else "")
    reason = f": {why}" if why else ""
    raise UnsupportedModelError(f"SafeRoPE does not support this model — {found}{reason}. "
                                f"Supported families: {_supported_list()}")


def detect_diffusers(transformer: Any) -> Arch:
    """The family of a diffusers transformer, by class (its own or a base class)."""
    names = _mro_names(transformer)
    for name in names:
        for a in _REGISTRY.values():
            if a.diffusers is not None and name in a.diffusers.transformer_classes:
                return a
    why = UNSUPPORTED.get(names[0])
    reason = f": {why}" if why else ""
    raise UnsupportedModelError(f"SafeRoPE does not support the diffusers model {names[0]!r}{reason}. "
                                f"Supported families: {_supported_list()}")


def _head_dim_of(norm: Any, where: str) -> int:
    """Head size from a QK-norm module: the length of its scale (or its normalised shape).

    ComfyUI's Flux ``QKNorm`` holds a ``query_norm`` RMSNorm; other sites are RMSNorms themselves.
    """
    mod = getattr(norm, "query_norm", norm)
    params = list(mod.parameters()) if hasattr(mod, "parameters") else []
    if params and len(params[0].shape) >= 1:
        return int(params[0].shape[-1])  # RMSNorm scale: (head_dim,)
    ns = getattr(mod, "normalized_shape", None)
    if isinstance(ns, (tuple, list)) and ns:
        return int(ns[-1])
    raise UnsupportedModelError(f"{where}: the QK-norm module {type(norm).__name__} has no scale to read the head size from")


def _shapes(arch: Arch, root: Any, kinds: Iterable[HostKind], host: str) -> ModelShapes:
    """Read head counts, head size and block counts of every kind from the modules themselves."""
    heads, kv, dims, counts = set(), set(), set(), {}
    for hk in kinds:
        try:
            blocks = resolve_attr(root, hk.blocks)
        except (AttributeError, IndexError, TypeError):
            raise UnsupportedModelError(f"{arch.label()} recognised, but the {host} model "
                                        f"{type(root).__name__} has no {hk.blocks!r} ({hk.kind} blocks)") from None
        try:
            n = len(blocks)
        except TypeError:
            raise UnsupportedModelError(f"{arch.label()}: {host} {hk.blocks!r} is not a list of blocks") from None
        counts[hk.kind] = n
        for i in range(n):
            b = blocks[i]
            where = f"{arch.name} {host} {hk.kind} block {i}"
            if type(b).__name__ not in hk.block_classes:
                raise UnsupportedModelError(f"{where} is a {type(b).__name__}, expected {' or '.join(hk.block_classes)} "
                                            "(a replaced block class cannot be hooked safely)")
            try:
                heads.add(int(resolve_attr(b, hk.heads)))
                if hk.kv_heads:
                    kv.add(int(resolve_attr(b, hk.kv_heads)))
                for site in hk.norms:
                    dims.add(_head_dim_of(resolve_attr(b, site.path), f"{where} ({site.path})"))
            except (AttributeError, IndexError, TypeError, ValueError) as e:
                raise UnsupportedModelError(f"{where} lacks what SafeRoPE hooks ({type(e).__name__}: {e})") from None
    if sum(counts.values()) == 0:
        raise UnsupportedModelError(f"{arch.label()} {host} model has no attention blocks")
    if len(heads) != 1 or len(dims) != 1 or len(kv) > 1:
        raise UnsupportedModelError(f"{arch.label()} {host} model: blocks disagree on head count/size "
                                    f"(heads {sorted(heads)}, kv heads {sorted(kv)}, head dims {sorted(dims)})")
    h = heads.pop()
    k = kv.pop() if kv else h
    if k < 1 or h % k:
        raise UnsupportedModelError(f"{arch.label()}: {h} query heads are not a multiple of {k} key heads")
    return ModelShapes(arch=arch.id, num_heads=h, head_dim=dims.pop(), blocks=counts,
                       num_kv_heads=None if k == h else k)


def comfy_shapes(arch: Arch, diffusion_model: Any) -> ModelShapes:
    """:class:`ModelShapes` of a ComfyUI diffusion model of family ``arch``."""
    if arch.comfy is None:
        raise UnsupportedModelError(f"{arch.label()} has no ComfyUI integration")
    return _shapes(arch, diffusion_model, arch.comfy.kinds, "ComfyUI")


def diffusers_shapes(arch: Arch, transformer: Any) -> ModelShapes:
    """:class:`ModelShapes` of a diffusers transformer of family ``arch``."""
    if arch.diffusers is None:
        raise UnsupportedModelError(f"{arch.label()} has no diffusers integration")
    return _shapes(arch, transformer, arch.diffusers.kinds, "diffusers")


def _load_families() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        arch = getattr(module, "ARCH", None)
        if not isinstance(arch, Arch) or arch.id != info.name:
            raise ImportError(f"{module.__name__} must define ARCH = Arch(id={info.name!r}, …)")
        register(arch)


_load_families()
