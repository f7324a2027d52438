"""Document boundaries inside packed windows (data.document_mask): each token's document index and RoPE position.

Prepare ends every document with EOT (raylm.data.tokenizer), and EOT never comes from text, so a window's
boundaries follow from its tokens alone: a token belongs to the document of the EOTs before it, and an EOT to the
document it ends. Being a pure function of the window, this adds nothing to the stream's resume state.
"""

from __future__ import annotations

import numpy as np

from raylm.data.tokenizer import EOT_ID


def document_ids(tokens: np.ndarray) -> np.ndarray:
    """(B, T) int64: 0 for the window's first (often partial) document, +1 after each EOT."""
    ends = tokens == EOT_ID  # (B, T)
    return np.cumsum(ends, axis=1) - ends  # an EOT counts for the tokens after it


def document_positions(tokens: np.ndarray, mode: str) -> np.ndarray:
    """(B, T) int64 RoPE positions: the window's 0..T-1 (continue), or 0 at each document's first token
    (restart)."""
    B, T = tokens.shape
    index = np.broadcast_to(np.arange(T, dtype=np.int64), (B, T))
    if mode == "continue":
        return index.copy()
    starts = np.zeros((B, T), dtype=bool)
    starts[:, 0] = True
    starts[:, 1:] = tokens[:, :-1] == EOT_ID  # a document starts after each EOT
    first = np.maximum.accumulate(np.where(starts, index, 0), axis=1)  # (B, T) its document's first index
    return index - first
