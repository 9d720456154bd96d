"""Resolve ``--model`` to a local diffusers pipeline folder, decide its family, check it, and load its parts.

``--model`` is one of: a registered name (:func:`register_model`; the toy world registers ``toy``,
its shipped model); a local diffusers pipeline folder (``model_index.json`` and one sub-folder per
component: ``transformer/``, the text encoders and tokenizers, ``vae/``, ``scheduler/`` …); or a
Hugging Face hub id that is already in the local cache. Nothing is ever downloaded: the hub is
queried in local-files-only mode and ``HF_HUB_OFFLINE`` is set by the CLI.

The family comes from the folder (:func:`model_family`): ``model_index.json``'s pipeline class and
the transformer class (model_index.json's and ``transformer/config.json``'s), looked up in the
engine's registry; the pipeline must be one of the family's text-to-image pipelines. The shapes an
adapter must match are read off the transformer built from its config on the ``meta`` device (no
weights, no memory) by the engine itself.

:func:`resolve_model` checks, before a run writes anything, every file it can without loading
weights: ``model_index.json``, every component's folder and config, non-empty tokenizer folders,
and each weights file's safetensors header against the file's size (a truncated download fails
here, naming the file). Weights are loaded from ``.safetensors`` only (``use_safetensors=True``):
nothing is unpickled.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

from saferope_engine import arch

from ..core.errors import UsageError
from ..core.rundir import DamagedFileError, safetensors_header
from . import FAMILIES
from .base import Family, ModelInfo

logger = logging.getLogger(__name__)

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


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
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"MODEL {spec!r}: cannot read {path.parent.name}/{path.name} ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise UsageError(f"MODEL {spec!r}: {path.parent.name}/{path.name} is not a JSON object")
    return data


def _find(spec: str) -> tuple[Path, str]:
    """``(folder, readable name)`` of a registered name, a local folder or a cached hub id."""
    if not spec:
        raise UsageError("no model given (--model FOLDER | HUB_ID | toy)")
    named = named_model(spec) if "/" not in spec and not spec.startswith((".", "~")) else None
    if named is not None:
        return named, spec
    if Path(spec).expanduser().exists():
        path = Path(spec).expanduser()
        if not path.is_dir():
            raise UsageError(f"MODEL {spec!r}: not a folder")
        return path, path.resolve().name
    if "/" in spec and not spec.startswith((".", "/", "~")) and spec.count("/") == 1:
        return _hub_dir(spec), spec
    if "/" not in spec and not spec.startswith((".", "~")):
        raise _unknown_name(spec)
    raise UsageError(f"MODEL {spec!r}: no such folder")


def _components(index: dict[str, Any], spec: str) -> dict[str, tuple[str, str]]:
    """model_index.json's components: ``name -> (library, class)`` (optional components left out are skipped)."""
    out = {}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list):
            continue
        if len(value) != 2:
            raise UsageError(f"MODEL {spec!r}: model_index.json entry {name!r} is not [library, class]")
        if value[0] is None or value[1] is None:
            continue
        out[name] = (str(value[0]), str(value[1]))
    return out


def _family_of(pipeline: str, transformer: str, spec: str) -> tuple[arch.Arch, Family]:
    """The registry family of a pipeline class and transformer class, which must agree and be supported."""
    def by(attr: str, cls: str) -> arch.Arch | None:
        return next((a for a in arch.arches() if a.diffusers is not None and cls in getattr(a.diffusers, attr)), None)

    by_transformer = by("transformer_classes", transformer)
    if by_transformer is None:
        why = arch.UNSUPPORTED.get(transformer)
        known = ", ".join(f"{a.label()}: {', '.join(a.diffusers.transformer_classes)}" for a in arch.arches()
                          if a.diffusers is not None)
        raise UsageError(f"MODEL {spec!r}: transformer class {transformer!r} is of no supported model family"
                         f"{f' ({why})' if why else ''}; supported: {known}")
    by_pipeline = by("pipeline_classes", pipeline)
    if by_pipeline is not None and by_pipeline is not by_transformer:
        raise UsageError(f"MODEL {spec!r}: model_index.json names the {by_pipeline.name} pipeline {pipeline!r} but a "
                         f"{by_transformer.name} transformer {transformer!r}")
    family = by_transformer
    if pipeline not in family.diffusers.text_to_image:
        raise UsageError(f"MODEL {spec!r}: {pipeline!r} is not a text-to-image pipeline of {family.label()}; the "
                         f"trainer loads {', '.join(family.diffusers.text_to_image)} (model_index.json's _class_name)")
    return family, FAMILIES[family.id]


def _is_tokenizer(cls: str) -> bool:
    return "Tokenizer" in cls or "Processor" in cls or cls == "TokenizersBackend"


def _check_component(path: Path, sub: str, cls: str, spec: str) -> None:
    """A component folder exists and is whole: its config, weights (checked by header), or tokenizer files."""
    folder = path / sub
    if not folder.is_dir():
        raise UsageError(f"MODEL {spec!r}: no {sub}/ folder (the {cls}); expected the diffusers pipeline layout "
                         "that model_index.json lists")
    if "Scheduler" in cls:
        if not (folder / "scheduler_config.json").is_file():
            raise UsageError(f"MODEL {spec!r}: {sub}/scheduler_config.json is missing")
        return
    if _is_tokenizer(cls):
        if not any(f.is_file() for f in folder.iterdir()):
            raise UsageError(f"MODEL {spec!r}: {sub}/ is empty (the {cls})")
        return
    if (folder / "config.json").is_file() or any(folder.glob("*.safetensors*")) or any(
            f.suffix in _PICKLE_SUFFIXES for f in folder.iterdir()):
        if not (folder / "config.json").is_file():
            raise UsageError(f"MODEL {spec!r}: {sub}/config.json is missing")
        check_weights(path, sub, spec, cls)
    elif not any(f.is_file() for f in folder.iterdir()):
        raise UsageError(f"MODEL {spec!r}: {sub}/ is empty (the {cls})")


@functools.lru_cache(maxsize=16)
def _meta_shapes(cls: str, config_json: str):
    """The engine's shapes of a transformer built from its config on the meta device (no weights, no memory)."""
    import diffusers
    import torch

    from saferope_engine.diffusers import model_shapes

    quiet_diffusers()
    with torch.device("meta"):
        model = getattr(diffusers, cls).from_config(json.loads(config_json))
    return model_shapes(model)


def resolve_model(spec: str, *, need: tuple[str, ...] | None = None) -> ModelInfo:
    """Find and check the model folder and decide its family; raises a one-line :class:`UsageError` naming
    what is missing or wrong. ``need``: the components to check (default: every one model_index.json lists)."""
    path, name = _find(spec)
    if not (path / "model_index.json").is_file():
        raise UsageError(f"MODEL {spec!r}: model_index.json is missing (the diffusers pipeline folder's index)")
    index = _read_json(path / "model_index.json", spec)
    pipeline = index.get("_class_name")
    components = _components(index, spec)
    if not isinstance(pipeline, str) or "transformer" not in components:
        raise UsageError(f"MODEL {spec!r}: model_index.json names no pipeline class with a transformer "
                         "(expected a diffusers text-to-image pipeline folder)")
    family_arch, family = _family_of(pipeline, components["transformer"][1], spec)
    for sub in (need if need is not None else tuple(components)):
        if sub not in components:
            raise UsageError(f"MODEL {spec!r}: model_index.json lists no {sub!r} component")
        _check_component(path, sub, components[sub][1], spec)
    tcfg = _read_json(path / "transformer" / "config.json", spec)
    tcls = tcfg.get("_class_name", components["transformer"][1])
    if tcls not in family_arch.diffusers.transformer_classes:
        raise UsageError(f"MODEL {spec!r}: transformer/config.json: {tcls!r} is not a {family_arch.name} transformer "
                         f"(model_index.json names the {pipeline} with a {components['transformer'][1]})")
    try:
        shapes = _meta_shapes(tcls, json.dumps({k: v for k, v in tcfg.items() if not k.startswith("_")},
                                               sort_keys=True))
    except UsageError:
        raise
    except Exception as e:  # a config the class cannot be built from
        raise UsageError(f"MODEL {spec!r}: transformer/config.json does not build a {tcls} "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    vcfg = _read_json(path / "vae" / "config.json", spec) if (path / "vae" / "config.json").is_file() else {}
    return ModelInfo(spec=spec, path=path, name=name, family=family.id, pipeline=pipeline, components=components,
                     shapes=shapes, transformer_config=tcfg, vae_config=vcfg)


def model_family(spec: str) -> str:
    """The family id of ``--model`` ``spec``: the one place that decides a model's family (from the folder).

    Checks only what that needs (model_index.json and the transformer); recipes key their
    ``[defaults.<id>]`` tables by the result.
    """
    info = resolve_model(spec, need=("transformer",))
    logger.debug("model %s: family %s (%s)", spec, info.family, info.pipeline)
    return info.family


def check_weights(path: Path, sub: str, spec: str, what: str = "") -> list[Path]:
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
        raise UsageError(f"MODEL {spec!r}: {sub}/ has no .safetensors weights ({what or sub})")
    for f in files:
        if not f.is_file():
            raise UsageError(f"MODEL {spec!r}: {sub}/{f.name} is missing (named in the weights index)")
        try:
            safetensors_header(f)
        except DamagedFileError as e:
            raise UsageError(f"MODEL {spec!r}: {e}") from None
    return files


def family_of(info: ModelInfo) -> Family:
    """The trainer module of ``info``'s family."""
    return FAMILIES[info.family]


def max_sequence_length(info: ModelInfo, requested: int) -> int:
    """The text length prompts are encoded to: ``requested`` or the family's default (checked against its limit)."""
    return family_of(info).max_sequence_length(info, requested)


def image_size(info: ModelInfo, height: int, width: int) -> tuple[int, int]:
    """Pixel size: the requested one or the VAE's sample size; must fit the family's latent packing."""
    return family_of(info).image_size(info, height, width)


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


def _from_pretrained(cls_name: str, folder: Path, dtype: str, library: str = "diffusers"):
    import importlib

    cls = getattr(importlib.import_module(library), cls_name)
    return cls.from_pretrained(str(folder), torch_dtype=torch_dtype(dtype), local_files_only=True,
                               use_safetensors=True)


def load_transformer(info: ModelInfo, dtype: str, device):
    """The frozen transformer of the folder's class (``requires_grad`` off everywhere, eval mode)."""
    quiet_diffusers()
    cls = info.transformer_config.get("_class_name", info.component_class("transformer"))
    model = _from_pretrained(cls, info.path / "transformer", dtype)
    model.requires_grad_(False).eval().to(device)
    return model


def load_vae(info: ModelInfo, dtype: str, device):
    """The frozen VAE of the folder's class."""
    quiet_diffusers()
    library, cls = info.components["vae"]
    vae = _from_pretrained(cls, info.path / "vae", dtype, library)
    vae.requires_grad_(False).eval().to(device)
    return vae


def load_pipeline(info: ModelInfo, dtype: str, device, *, transformer=None, text_only: bool = False):
    """The folder's pipeline (its model_index.json class). ``text_only`` loads just the text encoders and
    tokenizers (:attr:`Family.text_parts`; for embeddings) — the transformer and the VAE stay on disk."""
    import diffusers

    quiet_diffusers()
    kwargs: dict[str, Any] = {"torch_dtype": torch_dtype(dtype), "local_files_only": True, "use_safetensors": True}
    if text_only:
        kwargs.update({name: None for name in info.components if name not in family_of(info).text_parts
                       and name != "scheduler"})
    elif transformer is not None:
        kwargs["transformer"] = transformer
    pipe = getattr(diffusers, info.pipeline).from_pretrained(str(info.path), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
