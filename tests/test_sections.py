"""The section parser: the official example report, header variants, fallbacks, offsets."""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extractors.resources import REPORTS
from extractors.sections import lexicon_titles, normalize_header, parse_sections, section_text
from schemas.ingest import SECTION_NAMES

EXAMPLE = (REPORTS / "example_report_from_MIT-LCP_docs.txt").read_text(encoding="utf-8")

FINDINGS_BODY = (
    "Cardiac size cannot be evaluated.  Large left pleural effusion is new.  Small\n"
    " right effusion is new.  The upper lungs are clear.  Right lower lobe opacities\n"
    " are better seen in prior CT.  There is no pneumothorax.  There are mild\n"
    " degenerative changes in the thoracic spine"
)
# (name, header as written, start, end, body) of every section of the official example.
EXAMPLE_SECTIONS = [
    ("preamble", "", 33, 45, "FINAL REPORT"),
    ("examination", "EXAMINATION", 61, 79, "CHEST (PA AND LAT)"),
    ("indication", "INDICATION", 96, 159, "___ year old woman with ?pleural effusion  // ?pleural effusion"),
    ("technique", "TECHNIQUE", 175, 195, "Chest PA and lateral"),
    ("comparison", "COMPARISON", 212, 215, "___"),
    ("findings", "FINDINGS", 233, 507, FINDINGS_BODY),
    ("impression", "IMPRESSION", 527, 554, "Large left pleural effusion"),
]


def _check_offsets(text: str, sections) -> None:
    previous_end = 0
    for s in sections:
        assert text[s.start:s.end] == s.body
        assert s.body == s.body.strip() and s.body
        assert s.start >= previous_end, "sections overlap or are out of order"
        assert s.name in SECTION_NAMES
        previous_end = s.end


def test_official_example_report_is_split_exactly():
    assert EXAMPLE.startswith(" " * 33 + "FINAL REPORT\n EXAMINATION:")  # the exact byte layout
    sections = parse_sections(EXAMPLE)
    got = [(s.name, s.header, s.start, s.end, s.body) for s in sections]
    assert got == EXAMPLE_SECTIONS
    assert not any(s.inferred for s in sections)
    _check_offsets(EXAMPLE, sections)
    assert section_text(sections, "impression") == "Large left pleural effusion"
    assert section_text(sections, "addendum") is None


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("IMPRESSION", "impression"), ("IMPRESSON", "impression"), ("IMPRESION", "impression"),
        ("IMPRESSOIN", "impression"), ("IMPRESSSION", "impression"), ("CONCLUSION", "impression"),
        ("CONCLUSIONS", "impression"), ("IMPRESSIONS", "impression"), ("Impression", "impression"),
        ("FINDINGS", "findings"), ("FINDNGS", "findings"), ("FINDING", "findings"),
        ("FINDINGS AND IMPRESSION", "findings"), ("FINDINGS/IMPRESSION", "findings"), ("Findings", "findings"),
        ("REASON FOR EXAM", "indication"), ("REASON FOR EXAMINATION", "indication"), ("INDICATION", "indication"),
        ("INDCATION", "indication"), ("Reason for exam", "indication"),
        ("CLINICAL HISTORY", "history"), ("HISTORY", "history"), ("MEDICAL CONDITION", "history"),
        ("COMPARISON", "comparison"), ("COMPARISONS", "comparison"), ("PRIOR", "comparison"),
        ("COMPARISION", "comparison"), ("PRIOR STUDIES", "comparison"), ("COMPARISON EXAM", "comparison"),
        ("TECHNIQUE", "technique"), ("EXAMINATION", "examination"), ("TYPE OF EXAMINATION", "examination"),
        ("WET READ", "addendum"), ("ADDENDUM", "addendum"), ("AMENDMENT", "addendum"),
        ("NOTIFICATION", "other"), ("RECOMMENDATIONS", "other"), ("FOOBAR", "other"),
    ],
)
def test_header_variants_and_typos_are_normalised(header, name):
    assert normalize_header(header) == name
    report = f"                                 FINAL REPORT\n {header}:  The lungs are clear.\n"
    sections = parse_sections(report)
    assert (sections[-1].name, sections[-1].header, sections[-1].body) == (name, header, "The lungs are clear.")


def test_every_lexicon_title_is_a_header_with_a_known_name():
    titles = lexicon_titles()
    assert len(titles) > 400
    for title in titles:
        report = f"                                 FINAL REPORT\n {title}:  Body text here.\n \n IMPRESSION: ok\n"
        sections = parse_sections(report)
        assert sections[1].header == title, title
        assert sections[1].name in SECTION_NAMES
        assert sections[1].body == "Body text here."


def test_headers_need_line_start_and_a_colon_before_whitespace():
    text = (" FINDINGS: Tube at 10:13 AM. Note:this is not a header.\n"
            " The NG TUBE: is not a header either because of lower case before it\n"
            " IMPRESSION:no space after colon is not a header\n"
            " IMPRESSION: Clear.\n")
    sections = parse_sections(text)
    assert [s.name for s in sections] == ["findings", "impression"]
    assert sections[1].body == "Clear."
    assert "10:13 AM" in sections[0].body and "no space after colon" in sections[0].body
    _check_offsets(text, sections)


def test_title_case_headers_of_generic_reports():
    text = "Indication: Cough.\nComparison: None.\nFindings: Lungs are clear.\n\nImpression: Normal chest."
    sections = parse_sections(text)
    assert [(s.name, s.header, s.body) for s in sections] == [
        ("indication", "Indication", "Cough."), ("comparison", "Comparison", "None."),
        ("findings", "Findings", "Lungs are clear."), ("impression", "Impression", "Normal chest."),
    ]
    _check_offsets(text, sections)
    # Lower-case words before a colon are not headers unless they are known titles.
    text = " FINDINGS: Tube tip: at the carina.\n Lines and tubes: unchanged.\n"
    assert [s.name for s in parse_sections(text)] == ["findings"]


def test_empty_sections_are_dropped_and_crlf_is_handled():
    text = " FINDINGS:\r\n \r\n IMPRESSION:  \r\n Small effusion.\r\n"
    sections = parse_sections(text)
    assert [(s.name, s.body) for s in sections] == [("impression", "Small effusion.")]
    _check_offsets(text, sections)


def test_fallback_without_headers_last_paragraph_is_impression():
    text = "                  FINAL REPORT\n The heart is normal.\n Lungs clear.\n \n No acute process.\n"
    sections = parse_sections(text)
    assert [(s.name, s.body, s.inferred) for s in sections] == [
        ("preamble", "FINAL REPORT", False),
        ("findings", "The heart is normal.\n Lungs clear.", True),
        ("impression", "No acute process.", True),
    ]
    assert all(s.header == "" for s in sections)
    _check_offsets(text, sections)


def test_fallback_single_paragraph_is_impression():
    text = "Heart size normal and lungs are clear. No edema or pneumonia. No effusion"
    sections = parse_sections(text)
    assert [(s.name, s.start, s.end, s.inferred) for s in sections] == [("impression", 0, len(text), True)]


def test_fallback_splits_the_last_headed_section():
    text = " INDICATION: Cough.\n \n Lungs are clear.\n \n No pneumonia.\n"
    sections = parse_sections(text)
    assert [(s.name, s.body, s.inferred) for s in sections] == [
        ("indication", "Cough.", False), ("findings", "Lungs are clear.", True), ("impression", "No pneumonia.", True),
    ]
    # A report with a real findings/impression section is never touched by the fallback.
    assert not any(s.inferred for s in parse_sections(" FINDINGS: a\n \n b\n"))


def test_degenerate_inputs_do_not_crash():
    assert parse_sections("") == []
    assert parse_sections("   \n \n  ") == []
    assert [s.name for s in parse_sections(" INDICATION: cough\n")] == ["indication"]
    assert [s.body for s in parse_sections("FINAL REPORT\n ___\n")] == ["FINAL REPORT", "___"]


_HEADERS = ["FINDINGS", "IMPRESSION", "INDICATION", "COMPARISON", "TECHNIQUE", "WET READ", "Impression",
            "IMPRESSON", "CLINICAL HISTORY", "NOTIFICATION", "PA AND LATERAL VIEWS OF THE CHEST"]
_line = st.text(alphabet=st.sampled_from(list("abcdefXYZ .,:;_/-()0123456789\t")), max_size=40)
_body = st.lists(_line, max_size=4).map(lambda lines: "\n ".join(lines))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(_HEADERS), _body, st.sampled_from(["\n", "\n \n", "\r\n"])), max_size=8),
       st.text(max_size=60))
def test_offsets_hold_on_generated_mimic_style_reports(parts, preamble):
    text = preamble + "".join(f" {h}: {b}{sep}" for h, b, sep in parts)
    _check_offsets(text, parse_sections(text))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_offsets_hold_on_arbitrary_text(text):
    _check_offsets(text, parse_sections(text))


def test_parser_speed_and_no_pathological_inputs():
    # A loose floor (the benchmark measures the real figure): catches accidental
    # per-character Python loops or quadratic behaviour, not noise on a shared machine.
    n = 3000
    t0 = time.perf_counter()
    for _ in range(n):
        parse_sections(EXAMPLE)
    rate = n / (time.perf_counter() - t0)
    assert rate > 5000, f"{rate:.0f} reports/s"
    huge = ("A" * 79 + " " * 50 + "\n") * 8000 + " FINDINGS: " + "x " * 200_000
    t0 = time.perf_counter()
    sections = parse_sections(huge)
    assert time.perf_counter() - t0 < 1.0
    assert sections[-1].name == "findings"


def test_view_title_heads_findings_only_when_there_is_no_findings_header():
    assert normalize_header("PA AND LATERAL CHEST RADIOGRAPHS") == normalize_header("PORTABLE AP CHEST RADIOGRAPH")
    assert normalize_header("PORTABLE AP CHEST RADIOGRAPH") == "view-title"
    alone = " PORTABLE AP CHEST RADIOGRAPH:\n Small left pleural effusion.\n \n IMPRESSION:\n Effusion.\n"
    names = [(sec.name, sec.body) for sec in parse_sections(alone)]
    assert names == [("findings", "Small left pleural effusion."), ("impression", "Effusion.")]
    with_findings = (" PA AND LATERAL CHEST RADIOGRAPHS:\n Two views.\n \n FINDINGS:\n Clear lungs.\n"
                     " \n IMPRESSION:\n Normal.\n")
    names = [sec.name for sec in parse_sections(with_findings)]
    assert names == ["examination", "findings", "impression"]
