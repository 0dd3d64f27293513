"""Tables written by the ingest stage."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from schemas.base import TableRecord
from schemas.checks import relationship, sql_check

SECTION_NAMES = (
    "preamble", "examination", "indication", "history", "technique", "comparison",
    "findings", "impression", "addendum", "other",
)


class SuspectSpan(BaseModel):
    """A sentence of a report that reads like an instruction to a model (extractors.instructions)."""

    start: int  # offsets into raw_reports.text
    end: int
    kind: str  # imperative | role | override


class RawReport(TableRecord):
    __table__ = "raw_reports"
    __description__ = "Report text exactly as read from the source (bytes decoded as UTF-8)."
    __grain__ = "one report (study)"
    __key__ = ("study_id",)

    study_id: str
    patient_id: str
    source: str  # file path, or table path + row number
    text: str
    n_chars: int
    content_hash: str
    # SUSPECT_INSTRUCTION when the report holds instruction-like sentences (the report is kept, flagged;
    # the label and mine stages read it with those sentences blanked out).
    flags: list[str] = Field(default_factory=list)
    suspect_spans: list[SuspectSpan] = Field(default_factory=list)


class Section(TableRecord):
    __table__ = "stg_sections"
    __description__ = "Report sections with normalised names and character offsets into raw_reports.text."
    __grain__ = "one section of one report"
    __key__ = ("section_id",)

    section_id: str
    study_id: str
    ordinal: int
    name: str  # one of SECTION_NAMES
    header: str  # header as written, e.g. "IMPRESSON"
    start: int  # body offsets: text == raw_reports.text[start:end]
    end: int
    text: str
    inferred: bool = False  # True when made by the no-header paragraph fallback (extractors/sections.py)

    __checks__ = (
        relationship("stg_sections", "study_id", "raw_reports", "study_id"),
        sql_check("stg_sections", "offsets_in_text",
                  "SELECT s.section_id AS id FROM {table} s JOIN raw_reports r USING (study_id) "
                  "WHERE s.start < 0 OR s.\"end\" > length(r.text) OR s.start > s.\"end\" "
                  "OR substr(r.text, s.start + 1, s.\"end\" - s.start) <> s.text",
                  "a section's offsets lie inside its report and cut out exactly its text", reads=("raw_reports",)),
    )


class Image(TableRecord):
    __table__ = "stg_images"
    __description__ = ("Images of each study (JPG/PNG/DICOM paths), each opened with Pillow at ingest: status "
                       "ok/missing/corrupt, width, height, format; exists = usable (status ok).")
    __grain__ = "one image"
    __key__ = ("dicom_id",)

    dicom_id: str
    study_id: str
    patient_id: str
    path: str
    view_position: str | None = None
    exists: bool  # usable: status == "ok"
    status: str = "ok"  # ok | missing (no such file) | corrupt (there, but Pillow cannot read it: extractors.sources)
    width: int | None = None  # pixels, from the image header (None for DICOM and unusable files)
    height: int | None = None
    format: str | None = None  # JPEG, PNG, DICOM, ...

    __checks__ = (
        relationship("stg_images", "study_id", "stg_studies", "study_id"),
        sql_check("stg_images", "status_values",
                  "SELECT dicom_id AS id FROM {table} WHERE status NOT IN ('ok', 'missing', 'corrupt') "
                  "OR \"exists\" <> (status = 'ok')",
                  "status is ok, missing or corrupt, and exists = (status = 'ok')"),
    )


class Study(TableRecord):
    __table__ = "stg_studies"
    __description__ = "Studies with patient, time order, split and prior study."
    __grain__ = "one study"
    __key__ = ("study_id",)

    study_id: str
    patient_id: str
    study_datetime: datetime | None = None
    study_order: int  # 0 = the patient's first study
    prior_study_id: str | None = None
    split: str  # train / validate / test
    n_images: int
    has_findings: bool
    has_impression: bool

    __checks__ = (
        relationship("stg_studies", "study_id", "raw_reports", "study_id"),
        relationship("stg_studies", "prior_study_id", "stg_studies", "study_id",
                     description="a study's prior study exists"),
    )
