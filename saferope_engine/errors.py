"""Exception types of the engine. Every failure the engine detects is one of these."""

from __future__ import annotations


class SafeRoPEError(Exception):
    """Base class of every error the SafeRoPE engine raises on purpose."""


class AdapterFormatError(SafeRoPEError, ValueError):
    """An adapter file or in-memory adapter violates format v1 (design §4).

    The message names the file (when there is one) and the offending key or tensor.
    """


class IncompatibleAdapterError(SafeRoPEError, ValueError):
    """The adapter was built for a model of other shapes (heads, head dim, block counts)."""


class HookNotRunError(SafeRoPEError, RuntimeError):
    """A SafeRoPE patch was installed but did not run during a model call (fail closed)."""
