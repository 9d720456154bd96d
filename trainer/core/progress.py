"""Progress bars (tqdm on stderr; silent when stderr is not a terminal or tqdm is absent)."""

from __future__ import annotations

import sys
from typing import Any


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(*, total: int, initial: int = 0, desc: str = "", enabled: bool = True, unit: str = "it"):
    """A tqdm bar showing rate (it/s) and postfix values, or a silent stand-in."""
    if not enabled or not sys.stderr.isatty():
        return _Silent()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Silent()
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr)
