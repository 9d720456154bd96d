"""Tiny ComfyUI models of every SafeRoPE family, their conditionings, concept adapters and diffusers twins.

Runs inside a ComfyUI process (``family_driver.py``); ``comfy`` and ``diffusers`` are imported
lazily. Every model is built through ComfyUI's own classes — ``comfy.supported_models.<Config>
(unet_config)`` → ``set_inference_dtype`` → ``get_model({})`` → a seeded random initialisation of
every parameter (ComfyUI's ops leave weights uninitialised) → ``comfy.model_patcher.ModelPatcher``.
The constructor arguments are fitted to the classes of the running tree: each tiny config lists
values for the fields any version may ask for, and :func:`constructor_args` keeps those the
tree's Params dataclass (or ``__init__`` signature) has, failing on a required field it lacks.

Head dim is 128 everywhere ComfyUI requires it (RoPE axes sum to the head size, Flux-style
loaders infer heads as hidden/128). Z-Image's parity model has ``dim`` 1024 (8 heads): below that,
ComfyUI's time embedder narrows to ``min(dim, 1024)`` where diffusers' keeps 1024, and the two
would not share weights.

Concept adapters are built from the ComfyUI model's own queries and keys (design §3): forward
hooks on the registry's QK-norm sites record them while the model samples prompts whose tokens
1..3 carry a synthetic concept direction (and safe prompts without it). Where those tokens sit is
read off the model itself — the rows of the context the diffusion model receives, where the text
stream's output reappears in the first joint block's input, and which axis of a norm's output has
the model's head count — so the fixture takes neither token order nor layout from the code under
test. Bases: the contrast basis (concept tokens' Gram minus safe tokens'); the threshold lies between
the highest risk of any safe prompt's token and the lowest of a concept token (see :func:`concept_adapter`).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import itertools
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import family_table
import torch

logger = logging.getLogger(__name__)

TEXT_DIM = 24  # width of the synthetic text embeddings (every model's context_in_dim)
POOLED_DIM = 32  # FLUX.1's pooled vector
TRIGGERS = 3  # tokens 1..3 of a concept prompt carry the concept
CONCEPT = 8.0  # size of the concept direction on those tokens
RANK = 2
PROBE_THRESHOLD = 0.999  # the probe adapter scores every text token and rotates (almost) none


@dataclass(frozen=True)
class Tiny:
    """A tiny model of one family (or of an unsupported model class) and how to drive it.

    Attributes:
        case: name of the case (a family id, ``z_image_gqa``, or an unsupported model's name).
        family: the registry id, ``None`` for models SafeRoPE must refuse.
        config_class: ``comfy.supported_models`` class.
        constructor: ``"module:Name"`` of the Params dataclass or diffusion-model class whose
            fields/arguments the tiny values are fitted to.
        values: candidate constructor values (a superset over ComfyUI versions).
        latent_hw: latent height = width (in latent pixels) used for sampling.
        pooled: the conditioning carries ``pooled_output`` of this size.
        twin: the diffusers class with the same architecture, or ``None`` (none has these weights: diffusers'
            Z-Image has no grouped-query keys). Parity runs where ComfyUI's key map converts every weight.
    """

    case: str
    family: str | None
    config_class: str
    constructor: str
    values: Mapping[str, Any]
    latent_hw: int = 8
    pooled: int | None = None
    twin: str | None = None

    @property
    def heads(self) -> tuple[int, int | None]:
        """``(query heads, key heads)`` of the tiny config (key heads ``None`` unless fewer: GQA)."""
        v = self.values
        h = int(v.get("num_heads", v.get("num_attention_heads", v.get("n_heads", 0))))
        kv = v.get("n_kv_heads")
        return h, (None if kv in (None, h) else int(kv))


_FLUX_COMMON = dict(context_in_dim=TEXT_DIM, hidden_size=256, num_heads=2, depth=2, depth_single_blocks=2)
_ZIMAGE = dict(patch_size=2, in_channels=16, n_layers=2, n_refiner_layers=1, multiple_of=2, ffn_dim_multiplier=8.0 / 3.0,
               norm_eps=1e-5, qk_norm=True, cap_feat_dim=TEXT_DIM, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512],
               rope_theta=256.0, z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32)

TINIES: dict[str, Tiny] = {t.case: t for t in (
    Tiny("flux1", "flux1", "Flux", "comfy.ldm.flux.model:FluxParams", dict(
        _FLUX_COMMON, in_channels=16, out_channels=16, vec_in_dim=POOLED_DIM, mlp_ratio=4.0, axes_dim=[16, 56, 56],
        theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[]),
        pooled=POOLED_DIM, twin="FluxTransformer2DModel"),
    Tiny("flux2", "flux2", "Flux2", "comfy.ldm.flux.model:FluxParams", dict(
        _FLUX_COMMON, in_channels=128, out_channels=128, vec_in_dim=None, mlp_ratio=3.0, axes_dim=[32, 32, 32, 32],
        theta=2000, patch_size=1, qkv_bias=False, guidance_embed=True, txt_ids_dims=[3], global_modulation=True,
        mlp_silu_act=True, ops_bias=False, default_ref_method="index", ref_index_scale=10.0), latent_hw=4,
        twin="Flux2Transformer2DModel"),
    Tiny("chroma", "chroma", "Chroma", "comfy.ldm.chroma.model:ChromaParams", dict(
        _FLUX_COMMON, in_channels=64, out_channels=64, mlp_ratio=4.0, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
        qkv_bias=True, in_dim=64, out_dim=256, hidden_dim=32, n_layers=1, txt_ids_dims=[], vec_in_dim=None),
        twin="ChromaTransformer2DModel"),
    Tiny("hunyuan_image", "hunyuan_image", "HunyuanImage21", "comfy.ldm.hunyuan_video.model:HunyuanVideoParams", dict(
        _FLUX_COMMON, in_channels=64, out_channels=64, vec_in_dim=None, mlp_ratio=4.0, axes_dim=[64, 64], theta=256,
        patch_size=[1, 1], qkv_bias=True, guidance_embed=False, byt5=False, meanflow=False,
        use_cond_type_embedding=False, vision_in_dim=None, meanflow_sum=False), latent_hw=4,
        twin="HunyuanImageTransformer2DModel"),
    Tiny("qwen_image", "qwen_image", "QwenImage", "comfy.ldm.qwen_image.model:QwenImageTransformer2DModel", dict(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=128, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, axes_dims_rope=(16, 56, 56), guidance_embeds=False, default_ref_method="index",
        use_additional_t_cond=False), twin="QwenImageTransformer2DModel"),
    Tiny("z_image", "z_image", "ZImage", "comfy.ldm.lumina.model:NextDiT", dict(_ZIMAGE, dim=1024, n_heads=8, n_kv_heads=8),
         twin="ZImageTransformer2DModel"),
    # grouped-query keys: 2 query heads share 1 key head (diffusers' Z-Image ignores n_kv_heads: ComfyUI only)
    Tiny("z_image_gqa", "z_image", "ZImage", "comfy.ldm.lumina.model:NextDiT",
         dict(_ZIMAGE, dim=256, n_heads=2, n_kv_heads=1)),
    # models of no supported family (their errors name what was found)
    Tiny("lumina2", None, "Lumina2", "comfy.ldm.lumina.model:NextDiT", dict(
        patch_size=2, in_channels=16, dim=256, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=1, qk_norm=True,
        cap_feat_dim=TEXT_DIM, axes_dims=[32, 48, 48], axes_lens=[300, 512, 512])),
    Tiny("hidream", None, "HiDream", "comfy.ldm.hidream.model:HiDreamImageTransformer2DModel", dict(
        patch_size=2, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=64,
        num_attention_heads=2, caption_channels=[TEXT_DIM, TEXT_DIM], text_emb_dim=POOLED_DIM, num_routed_experts=2,
        num_activated_experts=1, axes_dims_rope=(32, 32), max_resolution=(16, 16), llama_layers=[0])),
    Tiny("auraflow", None, "AuraFlow", "comfy.ldm.aura.mmdit:MMDiT", dict(  # a class no registry entry names
        in_channels=4, out_channels=4, patch_size=2, dim=64, n_layers=2, n_double_layers=1, n_heads=2,
        global_conddim=64, cond_seq_dim=TEXT_DIM, max_seq=64)),
    Tiny("sd3", None, "SD3", "comfy.ldm.modules.diffusionmodules.mmdit:MMDiT", dict(
        in_channels=16, out_channels=16, patch_size=2, depth=1, pos_embed_max_size=16, num_patches=256,
        adm_in_channels=POOLED_DIM, context_embedder_config={"target": "torch.nn.Linear", "params": {
            "in_features": TEXT_DIM, "out_features": 64}})),
)}
assert {t.family for t in TINIES.values() if t.family} == {f.family for f in family_table.FAMILIES}
assert {u[0] for u in family_table.UNSUPPORTED} <= set(TINIES)


def constructor_args(target: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The values ``target`` (``"module:Name"``, a dataclass or a class) accepts in this ComfyUI tree.

    Raises ``ValueError`` naming the required fields none of ``values`` gives.
    """
    module, name = target.split(":")
    obj = getattr(importlib.import_module(module), name)
    if dataclasses.is_dataclass(obj):
        fields = {f.name: f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                  for f in dataclasses.fields(obj)}
    else:
        params = inspect.signature(obj.__init__).parameters
        fields = {n: p.default is p.empty for n, p in params.items() if n != "self"
                  and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    missing = sorted(n for n, required in fields.items() if required and n not in values
                     and n not in ("dtype", "device", "operations"))
    if missing:
        raise ValueError(f"the tiny config has no value for {missing}, required by this ComfyUI's {target}")
    dropped = sorted(set(values) - set(fields))
    if dropped:
        logger.info("%s: this ComfyUI's %s takes no %s", name, target, dropped)
    return {k: v for k, v in values.items() if k in fields}


def init_weights(module: torch.nn.Module, seed: int) -> None:
    """Seeded random values for every parameter: norm scales near 1, weights ~ N(0, 1/fan_in), biases small."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.ndim == 1 and "norm" in name and not name.endswith("bias"):
                v = 1.0 + 0.1 * r
            elif p.ndim >= 2:
                v = r / math.sqrt(p[0].numel())
            else:
                v = 0.02 * r
            p.copy_(v.to(p.dtype))


def build(tiny: Tiny, seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    """A ModelPatcher of ``tiny`` built through ComfyUI's config class, weights seeded-random."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    config_cls = getattr(comfy.supported_models, tiny.config_class)
    unet_config = {**config_cls.unet_config, **constructor_args(tiny.constructor, tiny.values)}
    model_config = config_cls(unet_config)
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({})
    init_weights(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


# -- prompts --------------------------------------------------------------------------------------
def concept_direction(dim: int = TEXT_DIM) -> torch.Tensor:
    """The synthetic concept's unit direction in text-embedding space (fixed)."""
    v = torch.randn(dim, generator=torch.Generator().manual_seed(1234))
    return v / v.norm()


def text(seed: int, length: int = 10, concept: bool = False) -> torch.Tensor:
    """``(1, length, TEXT_DIM)`` synthetic text embeddings; with ``concept`` tokens 1..3 carry the concept."""
    t = torch.randn(1, length, TEXT_DIM, generator=torch.Generator().manual_seed(seed)) * 0.5
    c = concept_direction()
    t = t - (t @ c)[..., None] * c  # ordinary tokens carry nothing of the concept direction
    if concept:
        t[:, 1:1 + TRIGGERS] += CONCEPT * c
    return t


def conditioning(tiny: Tiny, seed: int, concept: bool = False, length: int = 10) -> list:
    """A CONDITIONING as the family's text encoder node would give it (embeddings plus what extra_conds reads)."""
    opts: dict[str, Any] = {"pooled_output": None}  # CLIPTextEncode always sets it (None for T5/LLM-only encoders)
    if tiny.pooled:
        opts["pooled_output"] = torch.randn(1, tiny.pooled, generator=torch.Generator().manual_seed(seed + 77))
        opts["guidance"] = 3.5
    return [[text(seed, length, concept), opts]]


def latent_pixels(patcher: Any, tiny: Tiny) -> int:
    """Image side in pixels whose latent is ``tiny.latent_hw`` (the downscale the LRS Visualizer assumes)."""
    lf = patcher.get_model_object("latent_format")
    return tiny.latent_hw * int(getattr(lf, "spacial_downscale_ratio", 8))


def sample_latent(patcher: Any, tiny: Tiny) -> torch.Tensor:
    """An empty latent of the model's channels and dimensions (what KSampler makes of an empty latent)."""
    lf = patcher.get_model_object("latent_format")
    latent = torch.zeros(1, lf.latent_channels, tiny.latent_hw, tiny.latent_hw)
    return latent.unsqueeze(2) if getattr(lf, "latent_dimensions", 2) == 3 else latent  # (1, C, [1,] h, w)


def sample(nodes: ModuleType, patcher: Any, tiny: Tiny, pos: list, neg: list | None = None, *, seed: int = 0,
           steps: int = 2, cfg: float = 2.0) -> torch.Tensor:
    """ComfyUI's KSampler on an empty latent of the model's channels (euler, simple)."""
    lf = patcher.get_model_object("latent_format")
    latent = {"samples": torch.zeros(1, lf.latent_channels, tiny.latent_hw, tiny.latent_hw)}
    neg = neg if neg is not None else conditioning(tiny, 99, length=7)
    out = nodes.KSampler().sample(patcher, seed, steps, cfg, "euler", "simple", pos, neg, latent, denoise=1.0)
    return out[0]["samples"].clone()


# -- observing the model's own q/k ---------------------------------------------------------------------
def _bhld(t: torch.Tensor, heads: int) -> torch.Tensor:
    """A QK-norm output as (B, H, L, D), told from where its ``heads`` heads are (the fixture's prompts and
    latents never have as many tokens as heads): ComfyUI's own layout, not the registry's."""
    if t.ndim == 4 and t.shape[1] == heads and t.shape[2] != heads:
        return t
    if t.ndim == 4 and t.shape[2] == heads and t.shape[1] != heads:
        return t.transpose(1, 2)
    raise AssertionError(f"cannot tell the {heads} heads in a QK-norm output of shape {tuple(t.shape)}")


def _attr(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class Observation:
    """Per model call: the context rows the model got, and every QK-norm output (B, H, L, D)."""

    context: torch.Tensor | None = None
    norms: dict[tuple[str, int, str], torch.Tensor] = field(default_factory=dict)  # (kind, index, "q"/"k") -> tensor
    text_out: torch.Tensor | None = None  # the text stream leaving the last per-stream block
    joint_in: torch.Tensor | None = None  # the first joint block's input


def _joint_entry(family: str, dm: Any) -> tuple[torch.nn.Module, Callable, torch.nn.Module] | None:
    """(last text-stream block, its output -> text tensor, first joint block), for families with joint blocks."""
    if family in ("flux1", "flux2", "chroma", "hunyuan_image") and len(dm.double_blocks) and len(dm.single_blocks):
        return dm.double_blocks[len(dm.double_blocks) - 1], (lambda out: out[1]), dm.single_blocks[0]  # (img, txt)
    if family == "z_image" and len(dm.context_refiner) and len(dm.layers):
        return dm.context_refiner[len(dm.context_refiner) - 1], (lambda out: out), dm.layers[0]
    return None


def observe(patcher: Any, family: Any, run: Callable[[Any], None]) -> list[Observation]:
    """Run ``run(clone)`` with forward hooks on every QK-norm site; one :class:`Observation` per model call.

    The sites are the registry's (``family.comfy``); head counts are read from the blocks.
    """
    import comfy.patcher_extension

    calls: list[Observation] = []
    clone = patcher.clone()

    def wrapper(executor, *args, **kwargs):
        ctx = kwargs.get("context", args[2] if len(args) > 2 else None)
        calls.append(Observation(context=ctx.detach().clone()))
        return executor(*args, **kwargs)

    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test_observe", wrapper)
    dm = patcher.model.diffusion_model
    handles = []
    for hk in family.comfy.kinds:
        for i, block in enumerate(_attr(dm, hk.blocks)):
            for site in hk.norms:
                mod = _attr(block, site.path)

                heads = {"q": int(_attr(block, hk.heads)),
                         "k": int(_attr(block, hk.kv_heads)) if hk.kv_heads else int(_attr(block, hk.heads))}

                def hook(_m, _args, out, kind=hk.kind, i=i, site=site, heads=heads):
                    tensors = list(out) if site.which == "qk" else [out]
                    for which, t in zip(("q", "k") if site.which == "qk" else (site.which,), tensors):
                        calls[-1].norms[(kind, i, which)] = _bhld(t, heads[which]).detach().float().clone()
                handles.append(mod.register_forward_hook(hook))
    entry = _joint_entry(family.id, dm)
    if entry is not None:
        last, pick, first = entry
        handles.append(last.register_forward_hook(
            lambda _m, _a, out: setattr(calls[-1], "text_out", pick(out).detach().clone())))
        def joint_in(_m, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))  # the joint sequence, the block's first argument
            calls[-1].joint_in = x.detach().clone()

        handles.append(first.register_forward_pre_hook(joint_in, with_kwargs=True))
    try:
        run(clone)
    finally:
        for h in handles:
            h.remove()
    return calls


def trigger_rows(obs: Observation, ctx: torch.Tensor) -> list[int]:
    """Positions in the model's context of the concept tokens of ``ctx`` (rows matched exactly)."""
    got = obs.context[0].float()
    rows = []
    for j in range(1, 1 + TRIGGERS):
        hits = (got == ctx[0, j].float()).all(-1).nonzero().flatten().tolist()
        if len(hits) != 1:
            raise AssertionError(f"concept token {j} found {len(hits)} times in the model's context")
        rows.append(hits[0])
    return rows


def text_span(obs: Observation, L: int) -> tuple[int, bool]:
    """``(text length, image first)`` of a joint sequence of ``L`` tokens, from where the text stream reappears."""
    t, x = obs.text_out, obs.joint_in
    if t is None or x is None or x.shape[1] != L:
        raise AssertionError(f"joint entry not observed (text {None if t is None else tuple(t.shape)}, "
                             f"input {None if x is None else tuple(x.shape)}, L {L})")
    T = t.shape[1]
    if torch.equal(x[:, :T], t):
        return T, False
    if torch.equal(x[:, L - T:], t):
        return T, True
    raise AssertionError("the text stream is neither at the start nor at the end of the joint sequence")


@dataclass
class Layout:
    """Where the text of one observed call sits at each kind: ``(txt_len, img_first)`` and trigger positions."""

    spans: dict[str, tuple[int, bool]]
    triggers: list[int]  # positions inside the text stream


def layout_of(obs: Observation, family: Any, ctx: torch.Tensor) -> Layout:
    """The :class:`Layout` of one observed call of the prompt ``ctx`` ((1, T, C) embeddings)."""
    rows = trigger_rows(obs, ctx)
    spans = {}
    for hk in family.comfy.kinds:
        stream = hk.norms[0].stream
        x = next((v for (k, _, _), v in obs.norms.items() if k == hk.kind), None)
        if x is None:
            continue
        L = x.shape[2]
        spans[hk.kind] = (L, False) if stream == "txt" else (0, False) if stream == "img" else text_span(obs, L)
    return Layout(spans, rows)


def _separating(bounds: Mapping[Any, tuple[float, float]], margin: float = 0.02) -> tuple:
    """The largest set of blocks (earliest in model order on ties) in which every concept token scores above
    every token of a safe prompt: ``bounds[block] = (max LRS of safe tokens, min LRS of concept tokens)``."""
    names = list(bounds)
    for n in range(len(names), 0, -1):
        for subset in itertools.combinations(names, n):
            if max(bounds[k][0] for k in subset) + margin < min(bounds[k][1] for k in subset):
                return subset
    return ()


def concept_adapter(nodes: ModuleType, engine: ModuleType, patcher: Any, tiny: Tiny, *, seed: int = 7,
                    prompts: int = 4, steps: int = 3) -> tuple[Any, Any, dict]:
    """An adapter from the model's own q/k at the concept tokens: ``(adapter, probe, calibration)``.

    Statistics come from ``prompts`` concept prompts and as many safe prompts, each sampled for
    ``steps`` steps (every model call observed). Bases: every head of every block of the
    text-carrying kinds, the trainer's default contrast basis (top eigenvectors of the concept
    tokens' Gram minus the safe prompts' text tokens'). Threshold: midway between the highest risk
    of any text token of a safe prompt and the lowest risk of a concept token, for the largest set
    of blocks where the two separate (in a random tiny model some blocks mix the concept into the
    other tokens more than others). ``probe`` has the same bases in *every* block of the text-carrying
    kinds and threshold :data:`PROBE_THRESHOLD`: it makes every hook site score its tokens (the
    token-split checks) without rotating them.
    """
    arch = engine.arch
    shapes = arch.comfy_shapes(arch.detect_comfy(patcher.model), patcher.model.diffusion_model)
    family = arch.get(shapes.arch)
    candidates = tuple(k.name for k in family.kinds if "txt" in k.segments)
    sub = importlib.import_module(engine.__name__ + ".subspace")
    stats = {u: sub.GramAccumulator(shapes.num_heads, shapes.head_dim, num_kv_heads=shapes.num_kv_heads)
             for u in (True, False)}
    seen: list[tuple[bool, Observation, Layout]] = []
    for s in range(2 * prompts):
        unsafe = s % 2 == 0
        cond = conditioning(tiny, 100 + s, concept=unsafe, length=9 + s // 2)
        calls = observe(patcher, family,
                        lambda m, cond=cond, s=s: sample(nodes, m, tiny, cond, seed=s, steps=steps, cfg=1.0))
        for obs in calls:
            lay = layout_of(obs, family, cond[0][0])
            seen.append((unsafe, obs, lay))
            for (kind, idx, which), x in obs.norms.items():
                if kind not in candidates:
                    continue
                txt_len, img_first = lay.spans[kind]
                mask = torch.zeros(x.shape[0], txt_len, dtype=torch.bool)
                mask[:, lay.triggers] = True
                stats[unsafe].add(kind, idx, which, x, txt_len=txt_len, img_first=img_first,
                                  txt_mask=mask if unsafe else None, segments=("txt",))

    def assemble(blocks: tuple[tuple[str, int], ...], threshold: float) -> Any:
        selection = {b: list(range(shapes.num_heads)) for b in blocks}
        adapter = sub.assemble_adapter(stats[True], selection, rank=RANK, blocks=shapes.blocks, arch=shapes.arch,
                                       threshold=threshold, concepts=("concept",), base_model=f"tiny-{tiny.case}",
                                       basis="contrast", safe=stats[False])
        g = torch.Generator().manual_seed(seed)
        for b in adapter.blocks.values():
            for seg in ("txt", "img"):
                A = b.generator(seg)
                if A is not None:
                    w = torch.randn(A.shape, generator=g, dtype=torch.float64)
                    skew = w - w.transpose(-1, -2)
                    A.copy_((skew / torch.linalg.matrix_norm(skew)[:, None, None] * 3.0).float())
        return adapter

    # calibration, per block: (max LRS of a safe prompt's text token, min LRS of a concept token)
    full = assemble(tuple((kind, i) for kind in candidates for i in range(shapes.blocks[kind])), PROBE_THRESHOLD)
    bounds = {(kind, i): (0.0, 1.0) for kind in candidates for i in range(shapes.blocks[kind])}
    for unsafe, obs, lay in seen:
        for (kind, idx, which), x in obs.norms.items():
            if kind not in candidates:
                continue
            txt_len, img_first = lay.spans[kind]
            _, risk = full.apply(kind, idx, which, x, txt_len=txt_len, img_first=img_first, strength=0.0,
                                 return_risk=True)
            rho = risk[0].amax(dim=(0, 1))  # (L,) max over batch rows and heads
            a = x.shape[2] - txt_len if img_first else 0
            txt = rho[a:a + txt_len]
            hi, lo = bounds[(kind, idx)]
            bounds[(kind, idx)] = ((hi, min(lo, float(txt[lay.triggers].min()))) if unsafe
                                   else (max(hi, float(txt.max())), lo))
    blocks = _separating(bounds)
    if not blocks:
        raise AssertionError(f"{tiny.case}: in no block do the concept tokens separate from safe prompts' "
                             f"tokens (max safe LRS, min concept LRS per block: {bounds})")
    hi_safe = max(bounds[b][0] for b in blocks)
    lo_concept = min(bounds[b][1] for b in blocks)
    tau = (hi_safe + lo_concept) / 2
    adapter = assemble(blocks, tau)
    adapter.validate(for_file=True)
    full.validate(for_file=True)
    first = next(lay for unsafe, _, lay in seen if unsafe)
    return adapter, full, {"blocks": [f"{k}.{i}" for k, i in blocks], "candidates": list(candidates),
                           "bounds": {f"{k}.{i}": v for (k, i), v in bounds.items()}, "threshold": tau,
                           "calls": len(seen), "spans": {k: list(v) for k, v in first.spans.items()},
                           "trigger_positions": first.triggers}


# -- diffusers twins (parity) -----------------------------------------------------------------------
class NoKeyMap(AssertionError):
    """ComfyUI's key map does not convert every weight of this model."""


def _key_map(tiny: Tiny, unet_config: Mapping[str, Any]) -> tuple[Mapping[str, Any] | None, str]:
    """ComfyUI's diffusers → ComfyUI key map for this family (``None``: the module names are the same)."""
    import comfy.utils

    if tiny.family == "flux1":
        return comfy.utils.flux_to_diffusers(unet_config), "comfy.utils.flux_to_diffusers"
    if tiny.family == "z_image":
        return comfy.utils.z_image_to_diffusers(unet_config), "comfy.utils.z_image_to_diffusers"
    if tiny.family in ("flux2", "chroma"):  # ComfyUI's LoRA loader uses the FLUX.1 map for every Flux-code model
        return comfy.utils.flux_to_diffusers(unet_config), "comfy.utils.flux_to_diffusers"
    if tiny.family == "qwen_image":
        return None, "identical module names (ComfyUI's Qwen-Image follows diffusers)"
    maps = sorted(n for n in dir(comfy.utils) if n.endswith("_to_diffusers"))
    raise NoKeyMap(f"no ComfyUI key map converts {tiny.case} to diffusers (comfy.utils has {', '.join(maps)})")


def _twin_module(tiny: Tiny) -> torch.nn.Module:
    import diffusers

    v = tiny.values
    cls = getattr(diffusers, tiny.twin)
    if tiny.family == "flux1":
        return cls(patch_size=1, in_channels=v["in_channels"] * v["patch_size"] ** 2, num_layers=v["depth"],
                   num_single_layers=v["depth_single_blocks"], attention_head_dim=v["hidden_size"] // v["num_heads"],
                   num_attention_heads=v["num_heads"], joint_attention_dim=v["context_in_dim"],
                   pooled_projection_dim=v["vec_in_dim"], guidance_embeds=v["guidance_embed"],
                   axes_dims_rope=tuple(v["axes_dim"]))
    if tiny.family == "flux2":
        return cls(patch_size=v["patch_size"], in_channels=v["in_channels"], num_layers=v["depth"],
                   num_single_layers=v["depth_single_blocks"], attention_head_dim=v["hidden_size"] // v["num_heads"],
                   num_attention_heads=v["num_heads"], joint_attention_dim=v["context_in_dim"], mlp_ratio=v["mlp_ratio"],
                   axes_dims_rope=tuple(v["axes_dim"]), rope_theta=v["theta"])
    if tiny.family == "chroma":
        return cls(patch_size=1, in_channels=v["in_channels"], num_layers=v["depth"],
                   num_single_layers=v["depth_single_blocks"], attention_head_dim=v["hidden_size"] // v["num_heads"],
                   num_attention_heads=v["num_heads"], joint_attention_dim=v["context_in_dim"],
                   axes_dims_rope=tuple(v["axes_dim"]), approximator_num_channels=v["in_dim"],
                   approximator_hidden_dim=v["hidden_dim"], approximator_layers=v["n_layers"])
    if tiny.family == "qwen_image":
        return cls(patch_size=v["patch_size"], in_channels=v["in_channels"], out_channels=v["out_channels"],
                   num_layers=v["num_layers"], attention_head_dim=v["attention_head_dim"],
                   num_attention_heads=v["num_attention_heads"], joint_attention_dim=v["joint_attention_dim"],
                   axes_dims_rope=tuple(v["axes_dims_rope"]))
    if tiny.family == "z_image":
        return cls(all_patch_size=(v["patch_size"],), all_f_patch_size=(1,), in_channels=v["in_channels"], dim=v["dim"],
                   n_layers=v["n_layers"], n_refiner_layers=v["n_refiner_layers"], n_heads=v["n_heads"],
                   n_kv_heads=v["n_kv_heads"], norm_eps=v["norm_eps"], qk_norm=v["qk_norm"], cap_feat_dim=v["cap_feat_dim"],
                   rope_theta=v["rope_theta"], t_scale=v["time_scale"], axes_dims=list(v["axes_dims"]),
                   axes_lens=list(v["axes_lens"]))
    raise NoKeyMap(f"{tiny.case}: no diffusers twin")


def diffusers_twin(tiny: Tiny, patcher: Any) -> tuple[torch.nn.Module, str]:
    """The diffusers model with the ComfyUI model's weights, converted by ComfyUI's key map; ``(model, how)``.

    Raises :class:`NoKeyMap` naming the weights the map leaves out (either side).
    """
    if tiny.twin is None:
        raise NoKeyMap(f"{tiny.case}: no diffusers model has these weights")
    unet_config = patcher.model.model_config.unet_config
    comfy_sd = {k: v.detach().float() for k, v in patcher.model.diffusion_model.state_dict().items()}
    key_map, how = _key_map(tiny, unet_config)
    twin = _twin_module(tiny).eval()
    want = twin.state_dict()
    new, used = {}, set()
    for k in want:
        target = k if key_map is None else key_map.get(k)
        if target is None:
            continue
        if isinstance(target, str):
            src = target
            value = comfy_sd.get(src)
        elif target[1] is None:  # (comfy_key, None, fn): a converted copy (fn is its own inverse: a swap)
            src = target[0]
            value = target[2](comfy_sd[src]) if src in comfy_sd else None
        else:  # (comfy_key, (dim, start, size)): a slice of a fused weight
            src = target[0]
            dim, start, size = target[1]
            value = comfy_sd[src].narrow(dim, start, size) if src in comfy_sd else None
        if value is not None:
            new[k] = value.clone()
            used.add(src)
    missing, unused = sorted(set(want) - set(new)), sorted(set(comfy_sd) - used)
    if missing or unused:
        raise NoKeyMap(f"{how} leaves {len(missing)} of {len(want)} diffusers weights (e.g. {missing[:4]}) and "
                       f"{len(unused)} of {len(comfy_sd)} ComfyUI weights (e.g. {unused[:4]}) unconverted")
    twin.load_state_dict(new, strict=True)
    return twin, how


def _pack(x: torch.Tensor, p: int = 2) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/p·w/p, C·p·p), the patch order of ComfyUI's and diffusers' Flux and Qwen-Image."""
    B, C, h, w = x.shape
    return x.view(B, C, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, (h // p) * (w // p), C * p * p)


def _unpack(x: torch.Tensor, h: int, w: int, p: int = 2) -> torch.Tensor:
    B, _, CC = x.shape
    C = CC // (p * p)
    return x.view(B, h // p, w // p, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, h, w)


def diffusers_call(tiny: Tiny, twin: torch.nn.Module, args: list, kwargs: Mapping[str, Any]) -> torch.Tensor:
    """The twin on the arguments ComfyUI gave its diffusion model; the output in ComfyUI's layout."""
    x, sigma, context = args[0], args[1], args[2]
    B = x.shape[0]
    with torch.no_grad():
        if tiny.family == "flux1":
            y, guidance = args[3], args[4]
            h, w = x.shape[-2:]
            ids = torch.zeros(h // 2, w // 2, 3)
            ids[..., 1] = torch.arange(h // 2)[:, None]
            ids[..., 2] = torch.arange(w // 2)[None, :]
            out = twin(hidden_states=_pack(x), encoder_hidden_states=context, pooled_projections=y, timestep=sigma,
                       img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(context.shape[1], 3), guidance=guidance,
                       return_dict=False)[0]
            return _unpack(out, h, w)
        if tiny.family == "qwen_image":
            h, w = x.shape[-2:]
            mask = args[3] if len(args) > 3 and args[3] is not None else torch.ones(B, context.shape[1], dtype=torch.long)
            out = twin(hidden_states=_pack(x[:, :, 0]), encoder_hidden_states=context, encoder_hidden_states_mask=mask,
                       timestep=sigma, img_shapes=[(1, h // 2, w // 2)] * B, return_dict=False)[0]
            return _unpack(out, h, w).unsqueeze(2)
        if tiny.family == "z_image":
            out = twin(x=[x[b].unsqueeze(1) for b in range(B)], t=1.0 - sigma, cap_feats=[context[b] for b in range(B)],
                       return_dict=False)[0]
            return -torch.stack([o.squeeze(1) for o in out])  # ComfyUI's NextDiT returns the negated velocity
    raise NoKeyMap(f"{tiny.case}: no diffusers call")
