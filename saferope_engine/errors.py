"""Exception types of the engine. Every failure the engine detects is one of these."""

from __future__ import annotations


class SafeRoPEError(Exception):
    """Base class of every error the SafeRoPE engine raises on purpose."""


class AdapterFormatError(SafeRoPEError, ValueError):
    """An adapter file or in-memory adapter violates the adapter format (design §4, §8).

    The message names the file (when there is one) and the offending key or tensor.
    """


class IncompatibleAdapterError(SafeRoPEError, ValueError):
    """The adapter was built for another model: another family, or other heads, head size or block counts."""


class HookNotRunError(SafeRoPEError, RuntimeError):
    """A SafeRoPE patch was installed but did not run during a model call (fail closed)."""


class UnsupportedModelError(IncompatibleAdapterError):
    """The model is of no supported family (or lacks what SafeRoPE hooks); the message names what was found."""
