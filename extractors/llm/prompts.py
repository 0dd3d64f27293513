"""Versioned prompt templates on disk, and quoting of untrusted text (reports) inside prompts.

A template file is ``<dir>/<version>.<part>.txt`` (e.g. ``single-v1.user.txt``) with
``$name`` placeholders (``string.Template``: report text substituted into a template is
never itself parsed as a template, and braces in JSON examples need no escaping). The
version string travels into every int_llm_calls row and into the request hash; editing a
template changes the rendered messages and so the hash as well, even without a new version.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from string import Template

_BACKTICK_RUN = re.compile(r"`+")


def fence(text: str) -> str:
    """Quote ``text`` in a fenced block whose fence cannot occur inside it.

    Markdown's rule: the fence is one backtick longer than the longest run of backticks in
    the text (at least three), so a report cannot close the block early and smuggle text
    out of the quoted region. The text itself is kept byte for byte: evidence quotes must
    match the report exactly.
    """
    longest = max((len(m.group(0)) for m in _BACKTICK_RUN.finditer(text)), default=0)
    bar = "`" * max(3, longest + 1)
    return f"{bar}\n{text}\n{bar}"


@lru_cache(maxsize=256)
def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


class PromptTemplates:
    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)

    def path(self, version: str, part: str) -> Path:
        return self.directory / f"{version}.{part}.txt"

    def text(self, version: str, part: str) -> str:
        path = self.path(version, part)
        if not path.is_file():
            raise FileNotFoundError(f"no prompt template {path.name} in {self.directory}")
        return _read(path).strip()

    def render(self, version: str, part: str, **values: object) -> str:
        """Fill ``$name`` placeholders; a placeholder without a value raises KeyError."""
        return Template(self.text(version, part)).substitute({k: str(v) for k, v in values.items()})

    def versions(self) -> list[str]:
        return sorted({p.name.split(".", 1)[0] for p in self.directory.glob("*.txt")})
