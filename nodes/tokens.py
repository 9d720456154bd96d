"""Label the text tokens of a conditioning with the words they came from.

ComfyUI's ``CLIP.tokenize(text, return_word_ids=True)`` returns one token stream per text
encoder (for FLUX ``"l"`` for CLIP-L and ``"t5xxl"`` for T5), each a list of chunks of
``(token_id, weight, word_id)``. The FLUX transformer's text tokens are the T5 stream, so we take
the stream whose length equals the conditioning's text length and decode each id with that
stream's tokenizer; when no decoder is reachable the word index stands in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

_PREFERRED = ("t5xxl", "t5", "umt5xxl", "llama", "qwen25_7b", "mistral3_24b")


def _decoder(clip: Any, key: str) -> Callable[[int], str] | None:
    tk = getattr(clip, "tokenizer", None)
    sub = getattr(tk, key, None) or getattr(tk, f"clip_{key}", None)
    hf = getattr(sub, "tokenizer", None)
    if hf is None:
        return None
    if hasattr(hf, "convert_ids_to_tokens"):
        return lambda i: str(hf.convert_ids_to_tokens(int(i)))
    if hasattr(hf, "decode"):
        return lambda i: str(hf.decode([int(i)]))
    return None


def _clean(piece: str) -> str:
    piece = piece.replace("▁", " ").replace("</w>", " ").strip()
    return piece or "␣"


def token_labels(clip: Any, text: str, txt_len: int) -> tuple[list[str] | None, str]:
    """``(labels, note)``: one label per text token, or ``None`` and why not."""
    if clip is None or not text.strip():
        return None, "no CLIP/prompt given: tokens are numbered"
    try:
        streams = clip.tokenize(text, return_word_ids=True)
    except Exception as e:  # a CLIP without word ids, or a tokenizer error: labels are optional
        logger.warning("SafeRoPE LRS: could not tokenize the prompt for labels: %s", e)
        return None, f"tokenizing the prompt failed ({type(e).__name__}): tokens are numbered"
    flat = {key: [t for chunk in chunks for t in chunk] for key, chunks in streams.items()}
    keys = sorted(flat, key=lambda k: (k not in _PREFERRED, _PREFERRED.index(k) if k in _PREFERRED else 0, k))
    for key in keys:
        toks = flat[key]
        if len(toks) != txt_len:
            continue
        decode = _decoder(clip, key)
        labels = []
        for i, tok in enumerate(toks):
            tid = tok[0] if isinstance(tok, (tuple, list)) else tok
            word = tok[2] if isinstance(tok, (tuple, list)) and len(tok) > 2 else 0
            if not isinstance(tid, int):
                labels.append("<embedding>")
            elif decode is not None:
                labels.append(_clean(decode(tid)))
            else:
                labels.append(f"w{word}" if word else f"#{i}")
        return labels, f"labels from the {key!r} tokens of the prompt"
    sizes = ", ".join(f"{k}: {len(v)}" for k, v in flat.items())
    return None, (f"the prompt's token streams ({sizes}) do not match the {txt_len} text tokens of the conditioning: "
                  "tokens are numbered")
