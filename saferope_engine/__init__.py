"""SafeRoPE engine: risk scores, closed-form rotations, subspace tools, the adapter format and the
registry of model families (:mod:`saferope_engine.arch`).

Core modules import only torch (and safetensors when reading/writing files). The diffusers
integration lives in :mod:`saferope_engine.diffusers` and imports diffusers lazily.
"""

from .adapter import AdapterMeta, BlockAdapter, ModelShapes, SafeRoPEAdapter, content_sha256, load_adapter
from .core import BlockRisk, latent_risk, saferope_qk, saferope_x
from .errors import AdapterFormatError, HookNotRunError, IncompatibleAdapterError, SafeRoPEError, UnsupportedModelError

__all__ = [
    "AdapterMeta", "BlockAdapter", "ModelShapes", "SafeRoPEAdapter", "load_adapter", "content_sha256",
    "BlockRisk", "latent_risk", "saferope_qk", "saferope_x",
    "SafeRoPEError", "AdapterFormatError", "IncompatibleAdapterError", "HookNotRunError", "UnsupportedModelError",
]
__version__ = "0.1.0"
