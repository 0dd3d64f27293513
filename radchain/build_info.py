"""What code wrote a row: the package version and, in a git checkout, the commit (read once per process)."""

from __future__ import annotations

import subprocess
from functools import lru_cache
from pathlib import Path

from radchain import __version__

REPO_DIR = Path(__file__).resolve().parents[1]


@lru_cache(maxsize=1)
def git_commit(repo: Path = REPO_DIR) -> str | None:
    """The short commit of the checkout this code runs from, ``-dirty`` when tracked files differ from it;
    None when the code is not a git checkout of its own (an installed wheel) or git is missing."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)

    try:
        top = git("rev-parse", "--show-toplevel")
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != repo.resolve():
            return None  # not a checkout, or a checkout of something that merely contains this folder
        head = git("rev-parse", "--short=10", "HEAD")
        if head.returncode != 0 or not head.stdout.strip():
            return None
        dirty = git("diff", "--quiet", "HEAD", "--").returncode == 1
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "")


def code_version() -> str:
    """``radchain-<version>`` plus ``+g<commit>`` when the code is a git checkout (PEP 440's local part)."""
    commit = git_commit()
    return f"radchain-{__version__}" + (f"+g{commit}" if commit else "")
