"""One regular expression for many literal words, shaped as a trie (no spaCy, no other import).

An alternation of hundreds of literals makes ``re`` try every branch at every position; the
trie shape fails after one character almost everywhere. The reader's lexicon and the ingest
stage's instruction prefilter both scan every report with one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable


def trie_pattern(words: Iterable[str]) -> str:
    """A regex that matches the longest of ``words`` at a position, branching by character.

    An alternation of 250 literals makes re try every branch at every position; the trie
    shape fails after one character almost everywhere.
    """
    root: dict = {}
    for w in words:
        node = root
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = {}

    def emit(node: dict) -> str:
        branches = [re.escape(ch) + emit(child) for ch, child in sorted(node.items()) if ch]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if "" in node else body  # greedy: the longer phrase first

    return emit(root)
