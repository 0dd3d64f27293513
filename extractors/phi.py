"""A guard that keeps text that looks like identifying information (PHI) away from remote LLM endpoints.

De-identified corpora (MIMIC-CXR writes ``___`` where a name, date or number was) should hold
nothing this module flags; a hospital's own export often does. Before a request leaves for an
endpoint that is not on this machine, its messages are scanned for:

=========  ======================================================================================
kind       what is flagged
=========  ======================================================================================
name       a title and a capitalised name: "Dr. Smith", "Mrs O'Brien", "DR. JONES" (a placeholder
           such as MIMIC's "Dr. ___" is not a name)
date       03/14/2019, 3-14-19, 2019-03-14, 2019/03/14, March 14, 2019, Mar. 14th 2019,
           14 March 2019, March 2019, "on March 14"
phone      (617) 555-1234, 617-555-1234, 617.555.1234, +1 617 555 1234, 555-1234
ssn        123-45-6789
record     a record number: MRN 1234567, MRN: 12345, MR# 1234567, medical record number 1234567,
           record/acct/account/accession (no., #, number) followed by 7 or more digits
address    a house number and a street: "12 Main Street", "4400 Old Mill Rd."
email      name@example.org
=========  ======================================================================================

The patterns favour recall on the forms above and were checked against the bundled example
reports and the synthetic corpus (no hits): measurements ("3.5 x 2.1 cm"), times ("10:30"),
levels ("T12"), ratios ("1/2") and the placeholder ``___`` are never flagged. It is a guard
against accidents, not a de-identification tool: free-text names without a title, for one,
pass.

Which endpoints it applies to (``PhiGuard.applies_to``): every endpoint except

* loopback ones (127.0.0.0/8, ``localhost``, ``::1``) -- a vLLM server on the same machine,
  the test server -- unless ``enforce_loopback`` (``LLMSettings.phi_enforce_loopback``) is set;
* hosts the user allowed explicitly (``LLMSettings.phi_allow_hosts``, e.g. a hospital's own
  Azure deployment covered by a data-processing agreement), or every host
  (``LLMSettings.phi_allow_all``).

No base URL means the official OpenAI API, which is remote.

``PhiGuard`` is an ``LLMClient`` request guard: called with the messages and the base URL of
every request (plan, steps, polish, refine and repair calls alike), it raises ``PhiBlocked``
(a ``RequestBlocked``) before anything is sent. Its message names the kinds found, never the
text. The mine stage also screens each sample up front (``PhiGuard.kinds_in``) so a flagged
report becomes one PHI_DETECTED rejection without any call.

Pure: no I/O; the contextvar ``CURRENT_SAMPLE`` lets a caller that runs samples as asyncio
tasks learn which sample a blocked request belonged to (``PhiGuard.blocked``).
"""

from __future__ import annotations

import contextvars
import ipaddress
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from extractors.llm.client import RequestBlocked

REASON_CODE = "PHI_DETECTED"
KINDS = ("name", "date", "phone", "ssn", "record", "address", "email")

# The sample whose requests are being made (set by the caller per asyncio task).
CURRENT_SAMPLE: contextvars.ContextVar[str | None] = contextvars.ContextVar("radchain_phi_sample", default=None)

# ---- patterns ----------------------------------------------------------------------------------
_MONTHS = (r"(?:Jan(?:uary|\.)?|Feb(?:ruary|\.)?|Mar(?:ch|\.)?|Apr(?:il|\.)?|May|Jun(?:e|\.)?|Jul(?:y|\.)?"
           r"|Aug(?:ust|\.)?|Sep(?:t(?:ember|\.)?|\.)?|Oct(?:ober|\.)?|Nov(?:ember|\.)?|Dec(?:ember|\.)?"
           r"|JANUARY|FEBRUARY|MARCH|APRIL|JUNE|JULY|AUGUST|SEPTEMBER|OCTOBER|NOVEMBER|DECEMBER)")
_FULL_MONTHS = (r"(?:January|February|March|April|May|June|July|August|September|October|November|December"
                r"|JANUARY|FEBRUARY|MARCH|APRIL|JUNE|JULY|AUGUST|SEPTEMBER|OCTOBER|NOVEMBER|DECEMBER)")
_DAY = r"(?:0?[1-9]|[12]\d|3[01])(?:st|nd|rd|th)?"
_YEAR = r"(?:1[89]\d\d|2[0-2]\d\d)"  # MIMIC shifts dates into the 2100s
_STREET = (r"(?:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Way|Place|Pl|Terrace"
           r"|Ter|Parkway|Pkwy|Highway|Hwy|Circle|Cir|Square|Sq)")
# Mixed-case titles, period optional; upper-case ones need their period ("MR. JONES"), since
# "MR angiography", "DR chest" and "MRS" (MR spectroscopy) are radiology, not people.
_TITLE = r"(?:(?:Dr|Drs|Mr|Mrs|Ms|Miss|Mx|Prof|Doctor)\.?|(?:DR|DRS|MR|MRS|MS|PROF)\.|DOCTOR|MISS)"

PATTERNS: dict[str, tuple[re.Pattern[str], ...]] = {
    "name": (
        # Title, optional period, then a capitalised word (not a placeholder: "Dr. ___").
        re.compile(rf"(?<![A-Za-z]){_TITLE}[ \t]+(?:[A-Z]\.[ \t]*)?[A-Z][A-Za-z'\u2019-]*[a-zA-Z]"),
        # "John Smith, MD" / "J. Smith M.D."
        re.compile(r"\b[A-Z][a-z]+(?:[ \t]+[A-Z]\.)?[ \t]+[A-Z][a-z'\u2019-]+,?[ \t]+(?:M\.D\.|MD|D\.O\.|RN|NP|PA-C)\b"),
    ),
    "date": (
        re.compile(rf"(?<![\d/.-])(?:0?[1-9]|1[0-2])[/-](?:0?[1-9]|[12]\d|3[01])[/-](?:{_YEAR}|\d\d)(?![\d/-])"),
        re.compile(rf"(?<![\d/.-]){_YEAR}[-/.](?:0[1-9]|1[0-2])[-/.](?:0[1-9]|[12]\d|3[01])(?!\d)"),
        re.compile(rf"(?<![A-Za-z]){_MONTHS}[ \t]+{_DAY},?[ \t]+{_YEAR}(?!\d)"),
        re.compile(rf"(?<![\d]){_DAY}[ \t]+(?:of[ \t]+)?{_MONTHS}\.?,?[ \t]+{_YEAR}(?!\d)"),
        re.compile(rf"(?<![A-Za-z]){_FULL_MONTHS},?[ \t]+{_YEAR}(?!\d)"),
        re.compile(rf"\b(?:on|of|since|from|until|dated)[ \t]+{_FULL_MONTHS}[ \t]+{_DAY}(?![\d])"),
    ),
    "phone": (
        re.compile(r"(?<![\w.-])(?:\+?1[ .-]?)?\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}(?![\d-])"),
        re.compile(r"(?<![\w.-])(?:\+?1[ .-])?\d{3}[.-]\d{3}[.-]\d{4}(?![\d-])"),
        re.compile(r"(?<![\w.-])\+1[ ]\d{3}[ ]\d{3}[ ]\d{4}(?!\d)"),
        re.compile(r"(?<![\w.-])\d{3}-\d{4}(?![\d-])"),
    ),
    "ssn": (re.compile(r"(?<![\w-])\d{3}-\d{2}-\d{4}(?![\d-])"),),
    "record": (
        re.compile(r"\b(?:MRN|MR#|MR[ \t]+no\.?|medical[ \t]+record(?:[ \t]+(?:number|no\.?|#))?)[ \t]*[:#]?[ \t]*"
                   r"[A-Z]{0,3}\d{4,}", re.IGNORECASE),
        re.compile(r"\b(?:record|acct|account|accession|patient[ \t]+id|pt[ \t]+id)[ \t]*"
                   r"(?:number|no\.?|num|#)?[ \t]*[:#]?[ \t]*[A-Z]{0,3}\d{7,}", re.IGNORECASE),
    ),
    "address": (
        re.compile(r"(?<![\w.])\d{1,6}[ \t]+(?:[NSEW]\.?[ \t]+)?(?:[A-Z][a-z]+[ \t]+){1,3}" + _STREET + r"\b\.?"),
    ),
    "email": (re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"),),
}


@dataclass(frozen=True)
class PhiHit:
    kind: str
    start: int
    end: int


def find_phi(text: str) -> list[PhiHit]:
    """Every match in ``text``, sorted by position (offsets into ``text``)."""
    if not isinstance(text, str) or not text:
        return []
    hits = [PhiHit(kind, m.start(), m.end()) for kind, patterns in PATTERNS.items()
            for p in patterns for m in p.finditer(text)]
    return sorted(hits, key=lambda h: (h.start, h.end, h.kind))


def phi_kinds(*texts: str | None) -> list[str]:
    """The kinds found in any of ``texts``, in ``KINDS`` order (empty: nothing flagged)."""
    found: set[str] = set()
    for text in texts:
        if not isinstance(text, str) or not text:
            continue
        for kind, patterns in PATTERNS.items():
            if kind not in found and any(p.search(text) for p in patterns):
                found.add(kind)
    return [k for k in KINDS if k in found]


def message_texts(messages: Iterable[Mapping[str, Any]]) -> list[str]:
    """The text of chat messages: string contents and the text parts of typed contents."""
    out: list[str] = []
    for m in messages or ():
        content = m.get("content") if isinstance(m, Mapping) else None
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, Sequence):
            for part in content:
                if isinstance(part, str):
                    out.append(part)
                elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                    out.append(part["text"])
    return out


# ---- endpoints ---------------------------------------------------------------------------------
def endpoint_host(base_url: str | None) -> str:
    """The host a base URL points at (lower case); no URL means the official OpenAI API."""
    if not base_url:
        return "api.openai.com"
    raw = base_url.strip()
    if "//" not in raw:
        raw = "//" + raw
    try:
        host = urlsplit(raw).hostname
    except ValueError:
        host = None
    return (host or "").lower()


def is_loopback(base_url: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 (also IPv4-mapped) and localhost; anything else is remote."""
    host = endpoint_host(base_url)
    if not host:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


class PhiBlocked(RequestBlocked):
    """A request was stopped because its messages look like they hold identifying information."""

    def __init__(self, kinds: Sequence[str], host: str) -> None:
        self.kinds = list(kinds)
        self.host = host
        super().__init__(f"{REASON_CODE}: not sent to {host}: text looks like {', '.join(self.kinds)}")


class PhiGuard:
    """``LLMClient`` request guard; see the module docstring."""

    def __init__(
        self,
        *,
        allow_hosts: Iterable[str] = (),
        allow_all: bool = False,
        enforce_loopback: bool = False,
    ) -> None:
        self.allow_hosts = {h.strip().lower().strip("[]") for h in allow_hosts if h and h.strip()}
        self.allow_all = bool(allow_all)
        self.enforce_loopback = bool(enforce_loopback)
        self._lock = threading.Lock()
        self.blocked: dict[str | None, list[str]] = {}  # sample id (CURRENT_SAMPLE) -> kinds
        self.checked = 0
        self.refused = 0

    @classmethod
    def from_settings(cls, llm: Any) -> PhiGuard:
        """From an ``LLMSettings`` (phi_allow_hosts, phi_allow_all, phi_enforce_loopback)."""
        return cls(
            allow_hosts=getattr(llm, "phi_allow_hosts", None) or (),
            allow_all=getattr(llm, "phi_allow_all", False),
            enforce_loopback=getattr(llm, "phi_enforce_loopback", False),
        )

    def _allowed_host(self, base_url: str | None) -> bool:
        host = endpoint_host(base_url)
        if host in self.allow_hosts:
            return True
        if base_url:  # "host:port" entries
            raw = base_url if "//" in base_url else "//" + base_url
            try:
                netloc = urlsplit(raw).netloc.lower().rsplit("@", 1)[-1]
            except ValueError:
                netloc = ""
            return bool(netloc) and netloc in self.allow_hosts
        return False

    def applies_to(self, base_url: str | None) -> bool:
        """Whether requests to this endpoint are screened."""
        if self.allow_all or self._allowed_host(base_url):
            return False
        if is_loopback(base_url):
            return self.enforce_loopback
        return True

    def kinds_in(self, *texts: str | None) -> list[str]:
        return phi_kinds(*texts)

    def __call__(self, messages: Sequence[Mapping[str, Any]], base_url: str | None) -> None:
        if not self.applies_to(base_url):
            return
        kinds = phi_kinds(*message_texts(messages))
        with self._lock:
            self.checked += 1
            if kinds:
                self.refused += 1
                sample = CURRENT_SAMPLE.get()
                merged = set(self.blocked.get(sample, [])) | set(kinds)
                self.blocked[sample] = [k for k in KINDS if k in merged]
        if kinds:
            raise PhiBlocked(kinds, endpoint_host(base_url))


def describe(kinds: Sequence[str], host: str, where: str = "the report") -> str:
    """The dead-letter detail of a PHI_DETECTED rejection: kinds and host, never the text."""
    return (f"not sent to {host}: {where} looks like it holds identifying information "
            f"({', '.join(kinds) or 'unknown kind'}); de-identify it, or allow this endpoint with "
            f"llm.phi_allow_hosts (or llm.phi_allow_all)")
