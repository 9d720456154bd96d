"""Resolve ``--model`` to a local diffusers FLUX folder, check its layout, and load its parts.

``--model`` is one of: a registered name (:func:`register_model`; the toy world registers ``toy``,
its shipped model); a local folder in the diffusers FLUX.1 layout (``transformer/``, ``text_encoder/`` + ``tokenizer/`` (CLIP),
``text_encoder_2/`` + ``tokenizer_2/`` (T5), ``vae/``, ``scheduler/``); or a Hugging Face hub id
that is already in the local cache. Nothing is ever downloaded: the hub is queried in
local-files-only mode and ``HF_HUB_OFFLINE`` is set by the CLI.

:func:`resolve_model` checks, before a run writes anything, every file it can without loading
weights: the configs, ``model_index.json``, non-empty tokenizer folders, and each weights file's
safetensors header against the file's size (a truncated download fails here, naming the file).
Weights are loaded from ``.safetensors`` only (``use_safetensors=True``): nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import UsageError
from ..core.rundir import DamagedFileError, safetensors_header

logger = logging.getLogger(__name__)

#: Sub-folders of the diffusers FLUX layout and what each holds.
LAYOUT = {
    "transformer": "the FluxTransformer2DModel",
    "text_encoder": "the CLIP text encoder",
    "tokenizer": "the CLIP tokenizer",
    "text_encoder_2": "the T5 text encoder",
    "tokenizer_2": "the T5 tokenizer",
    "vae": "the AutoencoderKL",
    "scheduler": "the flow-matching scheduler",
}
_CONFIG_FILES = {"transformer": "config.json", "text_encoder": "config.json", "text_encoder_2": "config.json",
                 "vae": "config.json", "scheduler": "scheduler_config.json"}

#: Sub-folders whose weights are checked (safetensors files, or the shards an index names).
WEIGHT_FOLDERS = ("transformer", "text_encoder", "text_encoder_2", "vae")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


@dataclass(frozen=True)
class ModelInfo:
    """A checked model folder and the shapes read from its configs (no weights loaded)."""

    spec: str  # what the user gave
    path: Path  # the folder
    name: str  # a readable name (hub id, folder name or "toy")
    num_heads: int
    head_dim: int
    num_double_blocks: int
    num_single_blocks: int
    in_channels: int
    guidance_embeds: bool
    vae_scale_factor: int
    sample_size: int
    t5_max_length: int

    @property
    def shapes(self):
        """:class:`saferope_engine.ModelShapes` of the model (what an adapter must match)."""
        from saferope_engine import ModelShapes

        return ModelShapes(arch="flux1", num_heads=self.num_heads, head_dim=self.head_dim,
                           blocks={"double": self.num_double_blocks, "single": self.num_single_blocks})

    def identity(self) -> dict[str, Any]:
        """What identifies the text encoders' output (for the embedding cache key)."""
        out: dict[str, Any] = {"path": str(self.path.resolve())}
        for sub in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
            folder = self.path / sub
            out[sub] = sorted((f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in folder.iterdir() if f.is_file())
        return out


#: Models known by name (``--model toy``), added by extensions (:func:`register_model`).
NAMED_MODELS: dict[str, Path] = {}


def register_model(name: str, folder: str | Path) -> None:
    """Make ``--model NAME`` mean the diffusers pipeline folder ``folder`` (an extension calls this)."""
    if not name or "/" in name or name.startswith((".", "~")):
        raise ValueError(f"a model name is one word, got {name!r}")
    NAMED_MODELS[name] = Path(folder)


def named_model(spec: str) -> Path | None:
    """The folder registered as ``spec`` (after loading the extensions), or ``None``."""
    from ..extensions import load_extensions

    if spec not in NAMED_MODELS:
        load_extensions()
    return NAMED_MODELS.get(spec)


def _unknown_name(spec: str) -> UsageError:
    """The error for a bare name that is no folder and no registered model (naming failed extensions)."""
    from ..extensions import failures

    failed = failures()
    if failed:
        why = "; ".join(f"extension {ref}: {err}" for ref, err in failed.items())
        return UsageError(f"MODEL {spec!r}: the {spec} model is not available in this install ({why})")
    return UsageError(f"MODEL {spec!r}: no such folder")


def _hub_dir(spec: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UsageError(f"MODEL {spec!r}: not a folder, and huggingface_hub is not installed to look it up") from None
    try:
        return Path(snapshot_download(repo_id=spec, local_files_only=True))
    except Exception as e:  # LocalEntryNotFoundError, HFValidationError, …
        raise UsageError(f"MODEL {spec!r}: not a local folder and not in the local Hugging Face cache "
                         f"(the trainer never downloads; fetch it first with `hf download {spec}`) "
                         f"[{type(e).__name__}]") from None


def _read_json(path: Path, spec: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"MODEL {spec!r}: cannot read {path.parent.name}/{path.name} ({type(e).__name__})") from None


def resolve_model(spec: str, *, need: tuple[str, ...] = tuple(LAYOUT)) -> ModelInfo:
    """Find and check the model folder; raises a one-line :class:`UsageError` naming what is missing."""
    if not spec:
        raise UsageError("no model given (--model FOLDER | HUB_ID | toy)")
    named = named_model(spec) if "/" not in spec and not spec.startswith((".", "~")) else None
    if named is not None:
        path, name = named, spec
    elif Path(spec).expanduser().exists():
        path = Path(spec).expanduser()
        name = path.resolve().name
        if not path.is_dir():
            raise UsageError(f"MODEL {spec!r}: not a folder")
    elif "/" in spec and not spec.startswith((".", "/", "~")) and spec.count("/") == 1:
        path, name = _hub_dir(spec), spec
    elif "/" not in spec and not spec.startswith((".", "~")):
        raise _unknown_name(spec)
    else:
        raise UsageError(f"MODEL {spec!r}: no such folder")
    for sub in need:
        if not (path / sub).is_dir():
            raise UsageError(f"MODEL {spec!r}: no {sub}/ folder ({LAYOUT[sub]}); expected the diffusers FLUX layout")
        cfg_name = _CONFIG_FILES.get(sub)
        if cfg_name and not (path / sub / cfg_name).is_file():
            raise UsageError(f"MODEL {spec!r}: {sub}/{cfg_name} is missing")
        if sub in WEIGHT_FOLDERS:
            check_weights(path, sub, spec)
        elif sub.startswith("tokenizer") and not any(f.is_file() for f in (path / sub).iterdir()):
            raise UsageError(f"MODEL {spec!r}: {sub}/ is empty ({LAYOUT[sub]})")
    if not (path / "model_index.json").is_file():
        raise UsageError(f"MODEL {spec!r}: model_index.json is missing (the FluxPipeline folder's index)")
    _read_json(path / "model_index.json", spec)
    tcfg = _read_json(path / "transformer" / "config.json", spec)
    try:
        num_heads, head_dim = int(tcfg["num_attention_heads"]), int(tcfg["attention_head_dim"])
        nd, ns, inc = int(tcfg["num_layers"]), int(tcfg["num_single_layers"]), int(tcfg["in_channels"])
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"MODEL {spec!r}: transformer/config.json is not a FluxTransformer2DModel config (no {e})") from None
    vae_scale, sample = 0, 0  # unknown without a VAE config: generation/training then need height/width
    if (path / "vae" / "config.json").is_file():
        vcfg = _read_json(path / "vae" / "config.json", spec)
        if not isinstance(vcfg.get("block_out_channels"), list):
            raise UsageError(f"MODEL {spec!r}: vae/config.json has no block_out_channels")
        vae_scale = 2 ** (len(vcfg["block_out_channels"]) - 1)  # the VAE halves the size per extra level
        size = vcfg.get("sample_size", 0)
        sample = int(size[0] if isinstance(size, list) else size or 0)
    t5_max = 0
    tok_cfg = path / "tokenizer_2" / "tokenizer_config.json"
    if tok_cfg.is_file():
        t5_max = int(_read_json(tok_cfg, spec).get("model_max_length", 0) or 0)
    enc_cfg = path / "text_encoder_2" / "config.json"
    if enc_cfg.is_file():
        n_pos = _read_json(enc_cfg, spec).get("n_positions")
        if isinstance(n_pos, int) and n_pos > 0:
            t5_max = min(t5_max, n_pos) if t5_max > 0 else n_pos
    return ModelInfo(spec=spec, path=path, name=name, num_heads=num_heads, head_dim=head_dim,
                     num_double_blocks=nd, num_single_blocks=ns, in_channels=inc,
                     guidance_embeds=bool(tcfg.get("guidance_embeds", False)), vae_scale_factor=vae_scale,
                     sample_size=sample, t5_max_length=t5_max)


def check_weights(path: Path, sub: str, spec: str) -> list[Path]:
    """The safetensors files of ``path/sub`` (an index's shards, or every ``*.safetensors``), each checked
    complete by its header (:func:`trainer.core.rundir.safetensors_header`); raises naming the file."""
    folder = path / sub
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        names: set[str] = set()
        for index in indexes:
            weight_map = _read_json(index, spec).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise UsageError(f"MODEL {spec!r}: {sub}/{index.name} has no weight_map")
            names |= {str(v) for v in weight_map.values()}
        files = [folder / n for n in sorted(names)]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(f.name for f in folder.iterdir() if f.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise UsageError(f"MODEL {spec!r}: {sub}/ holds only pickle weights ({', '.join(pickles)}); the trainer "
                             "loads .safetensors only (convert them first)")
        raise UsageError(f"MODEL {spec!r}: {sub}/ has no .safetensors weights ({LAYOUT[sub]})")
    for f in files:
        if not f.is_file():
            raise UsageError(f"MODEL {spec!r}: {sub}/{f.name} is missing (named in the weights index)")
        try:
            safetensors_header(f)
        except DamagedFileError as e:
            raise UsageError(f"MODEL {spec!r}: {e}") from None
    return files


def max_sequence_length(info: ModelInfo, requested: int) -> int:
    """T5 sequence length: ``requested`` or the tokenizer's limit (capped by the T5 config)."""
    limit = info.t5_max_length
    if requested:
        if limit and requested > limit:
            raise UsageError(f"max_sequence_length {requested} exceeds the model's T5 limit {limit}")
        return requested
    if not limit:
        raise UsageError(f"MODEL {info.spec!r}: tokenizer_2 has no model_max_length; set max_sequence_length")
    return limit


def image_size(info: ModelInfo, height: int, width: int) -> tuple[int, int]:
    """Pixel size: the requested one or the VAE's sample size; must fit the latent packing."""
    h, w = height or info.sample_size, width or info.sample_size
    if not (h and w and info.vae_scale_factor):
        raise UsageError(f"MODEL {info.spec!r}: no VAE sample size in its config; set height and width")
    mult = info.vae_scale_factor * 2  # VAE downsampling × 2×2 latent packing
    if h % mult or w % mult:
        raise UsageError(f"height/width {h}×{w} must be multiples of {mult} for this model")
    return h, w


def quiet_diffusers() -> None:
    """No loading progress bars or deprecation chatter from diffusers/transformers."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*torch_dtype.*", category=FutureWarning)
    try:
        from diffusers.utils import logging as dlog

        dlog.disable_progress_bar()
        dlog.set_verbosity_error()
        from transformers.utils import logging as tlog

        tlog.disable_progress_bar()
        tlog.set_verbosity_error()
    except ImportError:  # pragma: no cover - the trainer extra is installed with both
        pass


def torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


def load_transformer(info: ModelInfo, dtype: str, device):
    """The frozen FluxTransformer2DModel (``requires_grad`` off everywhere, eval mode)."""
    from diffusers import FluxTransformer2DModel

    quiet_diffusers()
    model = FluxTransformer2DModel.from_pretrained(str(info.path / "transformer"), torch_dtype=torch_dtype(dtype),
                                                   local_files_only=True, use_safetensors=True)
    model.requires_grad_(False).eval().to(device)
    return model


def load_pipeline(info: ModelInfo, dtype: str, device, *, transformer=None, text_only: bool = False):
    """A FluxPipeline. ``text_only`` loads just the tokenizers and text encoders (for embeddings)."""
    from diffusers import FluxPipeline

    quiet_diffusers()
    kwargs: dict[str, Any] = {"torch_dtype": torch_dtype(dtype), "local_files_only": True, "use_safetensors": True}
    if text_only:
        kwargs.update(transformer=None, vae=None)
    elif transformer is not None:
        kwargs["transformer"] = transformer
    pipe = FluxPipeline.from_pretrained(str(info.path), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
