"""One regular expression for many literal words, shaped as a trie (no spaCy, no other import);
and one for several patterns, the prefilter that lets most texts skip them all.

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


def any_of(patterns: Iterable[re.Pattern[str]]) -> re.Pattern[str]:
    """One pattern that matches in a text exactly where one of ``patterns`` does.

    Most texts match none of a family of patterns (normal paraphrases, progression cues, leak
    phrases): one search of the alternation says so, where each pattern would scan the text anew.
    The patterns must share their flags, which the alternation keeps.
    """
    patterns = list(patterns)
    flags = {p.flags for p in patterns}
    if len(flags) != 1:
        raise ValueError(f"any_of needs patterns with one set of flags, got {sorted(flags)}")
    return re.compile("|".join(f"(?:{p.pattern})" for p in patterns), flags.pop())
