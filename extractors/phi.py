"""A guard that keeps text that looks like identifying information (PHI) away from remote LLM endpoints.

De-identified corpora (MIMIC-CXR writes ``___`` where a name, date or number was) should hold
nothing this module flags; a hospital's own export often does. Before a request leaves for an
endpoint that is not on this machine, its messages are scanned for:

===========  ====================================================================================
kind         what is flagged (the Safe Harbor identifier kinds that can appear in report text)
===========  ====================================================================================
name         a title and a capitalised name: "Dr. Smith", "Dr.Smith", "Mrs O'Brien", "DR. JONES",
             "John Smith, MD" (a placeholder such as "Dr. ___" or "Dr. XXXX" is not a name)
date         every element of a date but the year: 03/14/2019, 3-14-19, 2019-03-14, 14.03.2187,
             14-Mar-2187, March 14, 2019, 14 March 2019, March 2019, "on March 14"
age          ages over 89: "97 years old", "92-year-old", "95 yo", "age 97", "aged 101"
phone        (617) 555-1234, 617-555-1234, 617.555.1234, 617 555 0199, 6175550199, +1 617 555 1234,
             555-1234, "tel 6175551234"
fax          a fax number: "Fax: (617) 555-0100"
ssn          123-45-6789, 123 45 6789, "SSN 123456789"
record       a medical record number: MRN 1234567, M.R.N. 12345678, MR# 1234567, Unit No: 1234567,
             hospital/chart number, accession/record/case/patient id with 7 or more digits,
             "ID: 12345678" (any other labelled unique number)
health_plan  member/subscriber/policy/beneficiary/insurance id: "member id ABC123456"
account      acct/account/billing number: "Acct #12345678"
license      licence/certificate/DEA/NPI number: "license no. A1234567"
vehicle      a licence plate or VIN: "plate 7ABC123", "VIN 1HGCM82633A004352"
device       a device serial number: "serial no. SN-88812A", "S/N 4471122", "UDI 00123456"
url          http(s):// and www. addresses
ip           an IPv4 address: 192.168.1.20
address      a house number and a street: "12 Main Street", "4400 Old Mill Rd.", "123 main st";
             a ZIP code after a state or a label: "Boston, MA 02114", "zip 02114"
email        name@example.org
===========  ====================================================================================

Safe Harbor's biometric identifiers and full-face photographs do not occur in report text; a city
or county without a street or ZIP code is not caught (there is no list of place names here).

The patterns favour recall on the forms above and were checked against the bundled example
reports, the prompts, the synthetic corpus and the 3,851 real IU X-ray reports (no hits: their
``XXXX`` placeholders, like MIMIC's ``___``, are not PHI): measurements ("3.5 x 2.1 cm"), times
("10:30"), levels ("T12"), ratios ("1/2") and placeholders are never flagged. It is a guard
against accidents, not a de-identification tool: free-text names without a title, for one,
pass.

It applies to every endpoint, loopback ones included (a local proxy may forward to a hosted
API), except those the user opted out explicitly (``PhiGuard.applies_to``): hosts listed in
``LLMSettings.phi_allow_hosts`` (``host`` or ``host:port``: a hospital's own deployment covered by
a data-processing agreement, or a vLLM server on this machine: ``["127.0.0.1"]``), or every host
(``LLMSettings.phi_allow_all``). No base URL means the official OpenAI API.

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

# The sample whose requests are being made (set by the caller per asyncio task).
CURRENT_SAMPLE: contextvars.ContextVar[str | None] = contextvars.ContextVar("radchain_phi_sample", default=None)

# ---- patterns ----------------------------------------------------------------------------------
_MONTHS = (r"(?:Jan(?:uary|\.)?|Feb(?:ruary|\.)?|Mar(?:ch|\.)?|Apr(?:il|\.)?|May|Jun(?:e|\.)?|Jul(?:y|\.)?"
           r"|Aug(?:ust|\.)?|Sep(?:t(?:ember|\.)?|\.)?|Oct(?:ober|\.)?|Nov(?:ember|\.)?|Dec(?:ember|\.)?"
           r"|JANUARY|FEBRUARY|MARCH|APRIL|JUNE|JULY|AUGUST|SEPTEMBER|OCTOBER|NOVEMBER|DECEMBER"
           r"|JAN|FEB|MAR|APR|MAY|JUN|JUL|AUG|SEPT?|OCT|NOV|DEC)")
_FULL_MONTHS = (r"(?:January|February|March|April|May|June|July|August|September|October|November|December"
                r"|JANUARY|FEBRUARY|MARCH|APRIL|JUNE|JULY|AUGUST|SEPTEMBER|OCTOBER|NOVEMBER|DECEMBER)")
_DAY = r"(?:0?[1-9]|[12]\d|3[01])(?:st|nd|rd|th)?"
_YEAR = r"(?:1[89]\d\d|2[0-2]\d\d)"  # MIMIC shifts dates into the 2100s
_STREET = (r"(?:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Way|Place|Pl|Terrace"
           r"|Ter|Parkway|Pkwy|Highway|Hwy|Circle|Cir|Square|Sq)")
# Street words that are never radiology in lower case ("ct", "dr", "pl", "way" are left out: "3 mm on ct").
_STREET_LOWER = r"(?:street|st|avenue|ave|road|rd|boulevard|blvd|lane|ln|drive|parkway|pkwy|highway|hwy|terrace)"
_STATES = (r"(?:AL|AK|AZ|AR|CA|CO|CT|DE|DC|FL|GA|HI|ID|IL|IN|IA|KS|KY|LA|ME|MD|MA|MI|MN|MS|MO|MT|NE|NV|NH|NJ|NM"
           r"|NY|NC|ND|OH|OK|OR|PA|RI|SC|SD|TN|TX|UT|VT|VA|WA|WV|WI|WY|PR)")
# Mixed-case titles, period optional; upper-case ones need their period ("MR. JONES"), since
# "MR angiography", "DR chest" and "MRS" (MR spectroscopy) are radiology, not people. After a
# period the blank is optional ("Dr.Smith").
_TITLE_DOT = r"(?:(?:Dr|Drs|Mr|Mrs|Ms|Mx|Prof|DR|DRS|MR|MRS|MS|PROF)\.)"
_TITLE_WORD = r"(?:Dr|Drs|Mr|Mrs|Ms|Miss|Mx|Prof|Doctor|DOCTOR|MISS)"
# A capitalised name that is not a de-identification placeholder ("XXXX", "X").
_NAME = r"(?!X+\b)[A-Z][A-Za-z'\u2019-]*[a-zA-Z]"
_PHONE_SEP = r"[ .-]"
_ID = r"[ \t]*(?:number|no\.?|num|#)?[ \t]*[:#]?[ \t]*"  # "no.", "#", ":" between a label and its value

PATTERNS: dict[str, tuple[re.Pattern[str], ...]] = {
    "name": (
        # Title, then a capitalised word (not a placeholder: "Dr. ___", "Dr. XXXX").
        re.compile(rf"(?<![A-Za-z])(?:{_TITLE_DOT}[ \t]*|{_TITLE_WORD}[ \t]+)(?:[A-Z]\.[ \t]*)?{_NAME}"),
        # "John Smith, MD" / "J. Smith M.D."
        re.compile(r"\b(?!X+\b)[A-Z][a-z]+(?:[ \t]+[A-Z]\.)?[ \t]+(?!X+\b)[A-Z][a-z'\u2019-]+,?[ \t]+"
                   r"(?:M\.D\.|MD|D\.O\.|RN|NP|PA-C)\b"),
    ),
    "date": (
        re.compile(rf"(?<![\d/.-])(?:0?[1-9]|1[0-2])[/-](?:0?[1-9]|[12]\d|3[01])[/-](?:{_YEAR}|\d\d)(?![\d/-])"),
        re.compile(rf"(?<![\d/.-]){_YEAR}[-/.](?:0?[1-9]|1[0-2])[-/.](?:0?[1-9]|[12]\d|3[01])(?!\d)"),
        # Day first, any separator, four-digit year: 14.03.2187, 14/03/2187, 31-12-2019.
        re.compile(rf"(?<![\d/.-])(?:0?[1-9]|[12]\d|3[01])[./-](?:0?[1-9]|1[0-2])[./-]{_YEAR}(?!\d)"),
        re.compile(rf"(?<![A-Za-z]){_MONTHS}[ \t/-]+{_DAY},?[ \t/-]+{_YEAR}(?!\d)"),
        # 14 March 2019, 14-Mar-2187, 14/MAR/2187, 14th of March, 2019
        re.compile(rf"(?<![\d]){_DAY}[ \t/-]*(?:of[ \t]+)?{_MONTHS}\.?,?[ \t/-]*{_YEAR}(?!\d)"),
        re.compile(rf"(?<![A-Za-z]){_FULL_MONTHS},?[ \t]+{_YEAR}(?!\d)"),
        re.compile(rf"\b(?:on|of|since|from|until|dated)[ \t]+{_FULL_MONTHS}[ \t]+{_DAY}(?![\d])"),
    ),
    # Ages over 89 (Safe Harbor): "97 years old", "97-year-old", "97 yo", "97 y/o", "age 97", "aged 101".
    "age": (
        re.compile(r"(?<![\d.])(?:9\d|1[0-4]\d)[ \t-]*(?:years?|yrs?|y)\.?[ \t-]*(?:old|o\b|/o\b)",
                   re.IGNORECASE),
        re.compile(r"\bage[ds]?[ \t:]+(?:9\d|1[0-4]\d)(?!\.?\d)", re.IGNORECASE),
        re.compile(r"(?<![\d.])(?:9\d|1[0-4]\d)[ \t-]*(?:yo|y\.o\.)(?![A-Za-z])", re.IGNORECASE),
    ),
    "phone": (
        re.compile(rf"(?<![\w.-])(?:\+?1{_PHONE_SEP}?)?\(\d{{3}}\)[ .-]?\d{{3}}{_PHONE_SEP}\d{{4}}(?![\d-])"),
        re.compile(rf"(?<![\w.-])(?:\+?1{_PHONE_SEP})?\d{{3}}[.-]\d{{3}}[.-]\d{{4}}(?![\d-])"),
        # Blanks as separators or none at all (North American numbers: area code and exchange 2-9).
        re.compile(r"(?<![\w.-])(?:\+?1[ ])?[2-9]\d{2}[ ][2-9]\d{2}[ ]\d{4}(?![\d-])"),
        re.compile(r"(?<![\w.+-])(?:\+?1)?[2-9]\d{2}[2-9]\d{6}(?![\w-])"),
        re.compile(r"(?<![\w.-])\+1[ ]\d{3}[ ]\d{3}[ ]\d{4}(?!\d)"),
        re.compile(r"(?<![\w.-])\d{3}-\d{4}(?![\d-])"),
        re.compile(r"\b(?:tel|phone|pager|cell|mobile|call)\b\.?[ \t:#]*\(?\d{3}\)?[ .-]?\d{3}[ .-]?\d{4}(?!\d)",
                   re.IGNORECASE),
    ),
    "fax": (re.compile(r"\bfax(?:ed)?\b[^\d\n]{0,20}?\+?\(?\d[\d ().-]{5,}\d", re.IGNORECASE),),
    "ssn": (
        re.compile(r"(?<![\w-])\d{3}-\d{2}-\d{4}(?![\d-])"),
        re.compile(r"(?<![\w.-])\d{3}[ ]\d{2}[ ]\d{4}(?![\d-])"),
        re.compile(r"\b(?:SSN|S\.S\.N\.?|social[ \t]+security(?:[ \t]+(?:number|no\.?|#))?)[ \t:#]*"
                   r"\d{3}[ .-]?\d{2}[ .-]?\d{4}(?!\d)", re.IGNORECASE),
    ),
    "record": (
        re.compile(r"\b(?:M\.?R\.?N\b\.?|MR#|MR[ \t]+no\.?|medical[ \t]+record(?:[ \t]+(?:number|no\.?|#))?"
                   r"|unit[ \t]+(?:no\.?|number|#)|hospital[ \t]+(?:no\.?|number|#)|chart[ \t]+(?:no\.?|number|#))"
                   r"[ \t]*[:#]?[ \t]*[A-Z]{0,3}\d{4,}", re.IGNORECASE),
        re.compile(r"\b(?:record|accession|patient[ \t]+id|pt[ \t]+id|case)" + _ID + r"[A-Z]{0,3}\d{7,}",
                   re.IGNORECASE),
        # Any other labelled unique number: "ID: 12345678".
        re.compile(r"\b(?:ID|identifier)[ \t]*[:#][ \t]*[A-Z]{0,3}\d{6,}", re.IGNORECASE),
    ),
    "health_plan": (
        re.compile(r"\b(?:member|subscriber|beneficiary|policy|health[ \t]+plan|insurance|medicaid|medicare"
                   r"|group)[ \t]+(?:id|no\.?|number|#)[ \t:#]*(?=(?:[A-Z-]*\d){4})[A-Z0-9-]{5,}", re.IGNORECASE),
    ),
    "account": (re.compile(r"\b(?:acct|account|billing)" + _ID + r"[A-Z]{0,3}\d{5,}", re.IGNORECASE),),
    "license": (
        re.compile(r"\b(?:licen[cs]e|certificate|cert|DEA|NPI)" + _ID + r"[A-Z]{0,2}\d{5,}", re.IGNORECASE),
    ),
    "vehicle": (
        re.compile(r"\b(?:license[ \t]+plate|plate(?:[ \t]+(?:no\.?|number|#))?|VIN)[ \t:#]*"
                   r"(?=[A-Z0-9-]*\d)[A-Z0-9][A-Z0-9-]{3,16}\b", re.IGNORECASE),
        # A 17-character vehicle identification number (no I, O, Q) with letters and digits.
        re.compile(r"\b(?=[A-HJ-NPR-Z0-9]*\d)(?=[A-HJ-NPR-Z0-9]*[A-HJ-NPR-Z])[A-HJ-NPR-Z0-9]{17}\b"),
    ),
    "device": (
        re.compile(r"\b(?:serial|S/N|SN|UDI|device[ \t]+id)(?:[ \t]*(?:number|no\.?|#))?[ \t]*[:#]?[ \t]*"
                   r"(?=[A-Z0-9-]*\d)(?=[A-Z0-9-]{5,})[A-Z0-9-]*\d[A-Z0-9-]*", re.IGNORECASE),
    ),
    "url": (re.compile(r"\b(?:https?://|www\.)[^\s<>\"']+", re.IGNORECASE),),
    "ip": (
        re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
                   r"(?!\.?\d)"),
    ),
    "address": (
        re.compile(r"(?<![\w.])\d{1,6}[ \t]+(?:[NSEW]\.?[ \t]+)?(?:[A-Z][a-z]+[ \t]+){1,3}" + _STREET + r"\b\.?"),
        re.compile(r"(?<![\w.])\d{1,6}[ \t]+(?:[nsew]\.?[ \t]+)?(?:[a-z]{3,}[ \t]+){1,3}" + _STREET_LOWER
                   + r"\b\.?", re.IGNORECASE),
        # A ZIP code after a state ("Boston, MA 02114") or a label ("zip 02114-1234").
        re.compile(rf"\b{_STATES}[ \t]+\d{{5}}(?:-\d{{4}})?(?![\d-])"),
        re.compile(r"\b(?:zip|zip[ \t]+code|postal[ \t]+code)[ \t:#]*\d{5}(?:-\d{4})?(?!\d)", re.IGNORECASE),
    ),
    "email": (re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"),),
}
KINDS = tuple(PATTERNS)


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
    ) -> None:
        self.allow_hosts = {h.strip().lower().strip("[]") for h in allow_hosts if h and h.strip()}
        self.allow_all = bool(allow_all)
        self._lock = threading.Lock()
        self.blocked: dict[str | None, list[str]] = {}  # sample id (CURRENT_SAMPLE) -> kinds
        self.checked = 0
        self.refused = 0

    @classmethod
    def from_settings(cls, llm: Any) -> PhiGuard:
        """From an ``LLMSettings`` (phi_allow_hosts, phi_allow_all)."""
        return cls(
            allow_hosts=getattr(llm, "phi_allow_hosts", None) or (),
            allow_all=getattr(llm, "phi_allow_all", False),
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
        """Whether requests to this endpoint are screened: all of them (loopback too), except the ones
        opted out explicitly (``allow_hosts``, ``allow_all``)."""
        return not (self.allow_all or self._allowed_host(base_url))

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
    local = " (a server on this machine: list it only if it does not forward to another host)" if is_loopback(host) else ""
    return (f"not sent to {host}: {where} looks like it holds identifying information "
            f"({', '.join(kinds) or 'unknown kind'}); de-identify it, or allow this endpoint with "
            f"llm.phi_allow_hosts{local} (or llm.phi_allow_all)")
