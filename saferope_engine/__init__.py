"""SafeRoPE engine: risk scores, closed-form rotations, subspace tools and the adapter format.

Core modules import only torch (and safetensors when reading/writing files). The diffusers
integration lives in :mod:`saferope_engine.diffusers` and imports diffusers lazily.
"""

from .adapter import AdapterMeta, BlockAdapter, SafeRoPEAdapter, load_adapter
from .core import BlockRisk, latent_risk, saferope_qk
from .errors import AdapterFormatError, HookNotRunError, IncompatibleAdapterError, SafeRoPEError

__all__ = [
    "AdapterMeta", "BlockAdapter", "SafeRoPEAdapter", "load_adapter",
    "BlockRisk", "latent_risk", "saferope_qk",
    "SafeRoPEError", "AdapterFormatError", "IncompatibleAdapterError", "HookNotRunError",
]
__version__ = "0.1.0"
