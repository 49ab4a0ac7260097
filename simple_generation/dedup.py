"""Near-duplicate prompts: MinHash signatures and LSH (``datasketch``, the optional extra ``dedup``).

``near_duplicates(texts, threshold=0.9)`` maps each removed index to the earlier index it duplicates:
a text is removed when its estimated Jaccard similarity (over character shingles of the lower-cased,
whitespace-collapsed text) to an earlier *kept* text is at least ``threshold``. The first text of a
group is always the one kept, and chains never form (a removed text is never the reference of another).
Used only when asked for (``near_duplicates=`` / ``--near-dedup``); exact duplicates are a separate,
always-exact mechanism.

Memory: one signature of ``num_perm`` 64-bit values per kept text (1 KiB at the default 128).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_SPACES = re.compile(r"\s+")


def _require_datasketch():
    try:
        import datasketch
    except ImportError:
        raise ImportError(
            "near-duplicate removal needs datasketch: pip install -e \".[dedup]\" in a clone of simple-generation "
            "(or pip install datasketch)."
        ) from None
    return datasketch


def shingles(text: str, size: int = 5) -> set[bytes]:
    """Character ``size``-grams of ``text`` lower-cased with runs of whitespace collapsed."""
    normal = _SPACES.sub(" ", text.lower()).strip()
    if len(normal) <= size:
        return {normal.encode("utf-8", "surrogatepass")}
    return {normal[i:i + size].encode("utf-8", "surrogatepass") for i in range(len(normal) - size + 1)}


def near_duplicates(texts: Iterable[str], threshold: float = 0.9, *, num_perm: int = 128, shingle: int = 5,
                    seed: int = 1) -> dict[int, int]:
    """``{removed index: kept earlier index}`` for texts at least ``threshold`` similar to an earlier kept one.

    Example:
        >>> near_duplicates(["the cat sat on the mat today", "the cat sat on the mat today!", "dogs"], 0.8)
        {1: 0}
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}.")
    datasketch = _require_datasketch()
    # LSH finds candidates (its banding cannot target thresholds near 1); each is then checked exactly.
    lsh = datasketch.MinHashLSH(threshold=min(threshold, 0.9), num_perm=num_perm)
    kept: dict[int, datasketch.LeanMinHash] = {}
    removed: dict[int, int] = {}
    for index, text in enumerate(texts):
        minhash = datasketch.MinHash(num_perm=num_perm, seed=seed)
        minhash.update_batch(list(shingles(text, shingle)))
        candidates = sorted(int(c) for c in lsh.query(minhash))
        match = next((c for c in candidates if minhash.jaccard(kept[c]) >= threshold), None)
        if match is not None:
            removed[index] = match
            continue
        lean = datasketch.LeanMinHash(minhash)
        kept[index] = lean
        lsh.insert(index, lean)
    return removed
