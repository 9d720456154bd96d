"""Prompt files.

One prompt per line; blank lines and lines starting with ``#`` are ignored. Two optional
tab-separated forms:

* unlearn files: ``unsafe prompt<TAB>safe rewrite`` pairs a prompt with its anchor (the
  ``anchor`` objective); a separate ``--anchors`` file, line-aligned, does the same;
* evaluation files: ``prompt<TAB>key=value,key=value`` gives expected labels for scorers
  (e.g. ``a red circle<TAB>colour=red,shape=circle``).

Each of these is a one-line :class:`~trainer.core.errors.UsageError` naming the file (and the line):
a missing, unreadable or empty file, a folder given as a file, a line holding a control character
(NUL, a carriage return inside the line, …). Lines end at ``\n`` (``\r\n`` too), so line numbers
are the ones an editor shows; a UTF-8 byte-order mark is dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError

#: Characters a prompt may not hold (tab separates columns): C0/C1 controls and Unicode line separators.
CONTROL_CHARS = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_NAMES = {0: "NUL", 0x0D: "carriage return", 0x0B: "vertical tab", 0x0C: "form feed", 0x1B: "escape"}


@dataclass(frozen=True)
class PromptLine:
    """One non-comment line: the prompt and its optional second column."""

    text: str
    extra: str | None
    lineno: int


def read_lines(path: str | Path, *, what: str) -> list[PromptLine]:
    """Non-empty, non-comment lines of a prompt file, split at the first tab."""
    if not path:
        raise UsageError(f"{what}: no prompt file given")
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{what}: {str(p)!r} is a directory, not a prompt file")
    if not p.exists():
        raise UsageError(f"{what}: prompt file {str(p)!r} not found")
    if not p.is_file():
        raise UsageError(f"{what}: {str(p)!r} is not a regular file")
    try:
        text = p.read_bytes().decode("utf-8-sig")  # no newline translation: a lone \r is reported
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{what}: cannot read prompt file {str(p)!r} ({e})") from None
    out = []
    for i, raw in enumerate(text.split("\n"), start=1):
        raw = raw[:-1] if raw.endswith("\r") else raw
        bad = CONTROL_CHARS.search(raw)
        if bad:
            code = ord(bad.group())
            name = _NAMES.get(code, "control character")
            raise UsageError(f"{what}: {str(p)!r} line {i}: {name} (U+{code:04X}) at column {bad.start() + 1}")
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        prompt, sep, extra = raw.partition("\t")
        prompt = prompt.strip()
        if not prompt:
            raise UsageError(f"{what}: {str(p)!r} line {i}: empty prompt before the tab")
        out.append(PromptLine(prompt, extra.strip() if sep else None, i))
    if not out:
        raise UsageError(f"{what}: prompt file {str(p)!r} has no prompts")
    return out


def read_prompts(path: str | Path, *, what: str) -> list[str]:
    """Prompts of a plain prompt file (a second column is not allowed)."""
    lines = read_lines(path, what=what)
    for ln in lines:
        if ln.extra is not None:
            raise UsageError(f"{what}: {str(path)!r} line {ln.lineno}: unexpected tab-separated column")
    return [ln.text for ln in lines]


@dataclass(frozen=True)
class UnlearnPrompts:
    """Unsafe prompts and, when available, their safe rewrites (same order)."""

    prompts: list[str]
    anchors: list[str] | None


def read_unlearn(path: str | Path, anchors_path: str | Path | None = None, *, need_anchors: bool = False) -> UnlearnPrompts:
    """Unsafe prompts with anchors from ``unsafe<TAB>anchor`` lines or a line-aligned anchors file."""
    lines = read_lines(path, what="unsafe prompts")
    inline = [ln.extra for ln in lines]
    has_inline = [x is not None for x in inline]
    if any(has_inline) and not all(has_inline):
        bad = next(ln for ln in lines if ln.extra is None)
        raise UsageError(f"unsafe prompts: {str(path)!r} line {bad.lineno}: no '<TAB>anchor' although other lines have one")
    anchors: list[str] | None = [x for x in inline] if all(has_inline) else None  # type: ignore[misc]
    if anchors is not None and any(not a for a in anchors):
        bad = next(ln for ln in lines if not ln.extra)
        raise UsageError(f"unsafe prompts: {str(path)!r} line {bad.lineno}: empty anchor after the tab")
    if anchors_path:
        if anchors is not None:
            raise UsageError("unsafe prompts: anchors given twice (tab-separated lines and an anchors file)")
        anchors = read_prompts(anchors_path, what="anchor prompts")
        if len(anchors) != len(lines):
            raise UsageError(f"anchor prompts: {str(anchors_path)!r} has {len(anchors)} prompts, "
                             f"the unsafe file {str(path)!r} has {len(lines)} (they pair line by line)")
    if need_anchors and anchors is None:
        raise UsageError(f"unsafe prompts: the anchor objective needs a safe rewrite per prompt "
                         f"('unsafe<TAB>anchor' lines in {str(path)!r} or prompts.anchors)")
    return UnlearnPrompts([ln.text for ln in lines], anchors)


@dataclass(frozen=True)
class EvalItem:
    """An evaluation prompt and its expected labels (empty when the file gives none)."""

    prompt: str
    labels: dict[str, str] = field(default_factory=dict)


def read_eval(path: str | Path, *, what: str) -> list[EvalItem]:
    """Evaluation prompts with optional ``key=value,…`` labels in a second column."""
    items = []
    for ln in read_lines(path, what=what):
        labels: dict[str, str] = {}
        if ln.extra:
            for part in ln.extra.split(","):
                k, sep, v = part.partition("=")
                if not sep or not k.strip() or not v.strip():
                    raise UsageError(f"{what}: {str(path)!r} line {ln.lineno}: labels must be key=value,… got {ln.extra!r}")
                labels[k.strip()] = v.strip()
        items.append(EvalItem(ln.text, labels))
    return items
