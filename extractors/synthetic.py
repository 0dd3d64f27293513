"""A synthetic MIMIC-CXR-style corpus: reports, CSVs and small JPGs, for demos, tests and benchmarks.

Real MIMIC-CXR needs a credentialed licence, so the project ships a generator that writes
the same layout (MIMIC-CXR-JPG 2.0.0 plus an MS-CXR-T-style temporal CSV) with text that
exercises the parts of the pipeline real reports exercise: the byte layout (every line
starts with a space, a centred FINAL REPORT line), header variants and typos, missing
sections, ``___`` PHI placeholders, negation and uncertainty, priors and comparison
language.

The generator decides each study's CheXpert labels first and writes sentences that state
exactly those labels (see ``extractors.synthetic_phrases``), so the chexpert CSV agrees
with the text: a positive observation is named without a negation or uncertainty cue,
a negative one with a negation cue, an uncertain one with an uncertainty cue, and a
blank one is not named at all. Labels are the union over FINDINGS and IMPRESSION.

It streams: one patient's studies are in memory at a time, and CSV rows are written as
they are made, so MIMIC's 227,835 studies take minutes and little memory. For a given
seed the output is byte-identical.
"""

from __future__ import annotations

import csv
import io
import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache
from pathlib import Path

from extractors.synthetic_phrases import (
    COMBOS,
    DEVICE_GENERIC,
    DEVICE_INDICATIONS,
    DEVICE_NOUNS,
    DEVICE_SENTENCES,
    EVIDENCE_FORMS,
    EVIDENCE_NPS,
    EXAMS,
    FILLERS,
    INCIDENTAL,
    LEGACY_EXAM_HEADERS,
    NEG,
    NEGATION_LIST_FORMS,
    NEGATION_LIST_NOUNS,
    NORMAL_IMPRESSIONS,
    OBS_CODES,
    POS,
    PROGRESSION,
    QUESTIONS,
    SINGLES,
    SYMPTOMS,
    TEMPORAL_FINDINGS,
    UNC,
    Template,
    evidence_signs,
    incidental_knowledge_sentences,
    mentioned_observations,
)

# ---------------------------------------------------------------------------------------
# Public names: the file names and columns the ingest reader expects.
# ---------------------------------------------------------------------------------------
MIMIC_CSV_NAMES: dict[str, str] = {
    "metadata": "mimic-cxr-2.0.0-metadata.csv",
    "split": "mimic-cxr-2.0.0-split.csv",
    "chexpert": "mimic-cxr-2.0.0-chexpert.csv",
    "temporal": "ms-cxr-t_temporal-classification.csv",
}
# MIMIC-CXR's column order (alphabetical).
CHEXPERT_COLUMNS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
)
METADATA_COLUMNS: tuple[str, ...] = (
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
    "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
)
SPLIT_COLUMNS: tuple[str, ...] = ("dicom_id", "study_id", "subject_id", "split")
TEMPORAL_COLUMNS: tuple[str, ...] = (
    "dicom_id", "study_id", "subject_id", "previous_dicom_id", "previous_study_id",
    *(column for _, column in TEMPORAL_FINDINGS),
)
PROGRESSION_LABELS: tuple[str, ...] = ("improving", "stable", "worsening")
MARKER_NAME = ".radchain-synthetic.json"  # written into OUT; lets a re-run clear its own old files

MAX_STUDIES = 5_000_000
LABEL_TEXT = {POS: "1.0", NEG: "0.0", UNC: "-1.0"}


@dataclass
class CorpusSummary:
    out: Path
    seed: int
    patients: int
    studies: int
    images: int  # image rows in the metadata CSV
    images_written: int  # JPG files written (0 with images=False)
    temporal_pairs: int
    metadata_csv: Path
    split_csv: Path
    chexpert_csv: Path
    temporal_csv: Path
    wall_s: float
    label_counts: dict[str, dict[str, int]] = field(default_factory=dict)  # column -> {"1.0": n, ...}
    splits: dict[str, int] = field(default_factory=dict)  # split -> patients

    @property
    def studies_per_s(self) -> float:
        return self.studies / self.wall_s if self.wall_s > 0 else float("inf")


# ---------------------------------------------------------------------------------------
# Where findings are and how big: the slot values templates read ({pe.side} ...).
# ---------------------------------------------------------------------------------------
# (side, lobe adjective, lobe noun, "in the ..." phrase, zone adjective, "at the ..." phrase)
_LOCATIONS: tuple[tuple[str, str, str, str, str, str], ...] = (
    ("left", "left lower lobe", "left lower lobe", "in the left lower lobe", "left basilar",
     "at the left lung base"),
    ("right", "right lower lobe", "right lower lobe", "in the right lower lobe", "right basilar",
     "at the right lung base"),
    ("bilateral", "bilateral lower lobe", "lower lobes", "in both lower lobes", "bibasilar",
     "at both lung bases"),
    ("right", "right middle lobe", "right middle lobe", "in the right middle lobe", "right middle lobe",
     "in the right middle lobe"),
    ("right", "right upper lobe", "right upper lobe", "in the right upper lobe", "right upper lobe",
     "in the right upper lobe"),
    ("left", "left upper lobe", "left upper lobe", "in the left upper lobe", "left upper lobe",
     "in the left upper lobe"),
    ("left", "lingular", "lingula", "in the lingula", "lingular", "in the lingula"),
)
_LOCATION_WEIGHTS = (26, 26, 22, 8, 8, 5, 5)
_UNILATERAL = tuple(i for i, loc in enumerate(_LOCATIONS) if loc[0] != "bilateral")
_SCALES = {
    "pe": ("small", "moderate", "large"),
    "ptx": ("tiny", "small", "moderate", "large"),
}
_SEVERITY = ("mild", "moderate", "severe")
_SEVERITY_ADVERB = {"mild": "mildly", "moderate": "moderately", "severe": "severely"}
_RIBS = ("fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")
_FOCUS_CODES = ("lo", "cons", "pn", "at")  # parenchymal findings of one study share a location


class FindingAttrs:
    """Slot values for one observation of one study (read by str.format_map)."""

    __slots__ = (
        "code", "loc", "size_idx", "side", "sided", "lobe", "lobe_noun", "in_lobe", "base", "at_base",
        "hemidiaphragm", "cpa", "size", "sev", "sevly", "s", "is_are", "has_have", "a", "cm", "mass_cm",
        "rib", "devices", "device_noun",
    )

    def __init__(self, code: str, loc: int, size_idx: int, cm: str = "1.5", mass_cm: str = "4.0",
                 rib: str = "sixth", devices: tuple[str, ...] = ()) -> None:
        self.code, self.loc, self.size_idx = code, loc, size_idx
        side, self.lobe, self.lobe_noun, self.in_lobe, self.base, self.at_base = _LOCATIONS[loc]
        self.side = side
        both = side == "bilateral"
        self.sided = side if both else f"{side}-sided"
        self.hemidiaphragm = "hemidiaphragms" if both else f"{side} hemidiaphragm"
        self.cpa = "costophrenic angles" if both else f"{side} costophrenic angle"
        scale = _SCALES.get(code, _SEVERITY)
        self.size = scale[min(size_idx, len(scale) - 1)]
        self.sev = _SEVERITY[min(size_idx, 2)]
        self.sevly = _SEVERITY_ADVERB[self.sev]
        self.s, self.is_are, self.has_have, self.a = ("s", "are", "have", "") if both else ("", "is", "has", "a ")
        self.cm, self.mass_cm, self.rib = cm, mass_cm, rib
        self.devices = devices
        self.device_noun = DEVICE_NOUNS.get(devices[0], "line") if devices else "line"

    def resized(self, size_idx: int) -> FindingAttrs:
        top = len(_SCALES.get(self.code, _SEVERITY)) - 1
        return FindingAttrs(self.code, self.loc, max(0, min(top, size_idx)), self.cm, self.mass_cm, self.rib,
                            self.devices)


# ---------------------------------------------------------------------------------------
# Label sampling: which observations a study has, with MIMIC-like rates and correlations.
# ---------------------------------------------------------------------------------------
# (name, weight, {code: probability present}): findings that travel together.
_SYNDROMES: tuple[tuple[str, float, dict[str, float]], ...] = (
    ("heart_failure", 20, {"card": .75, "ed": .7, "pe": .6, "at": .25, "ec": .08, "lo": .2}),
    ("infection", 20, {"lo": .85, "pn": .85, "cons": .35, "pe": .2, "at": .2}),
    ("basilar", 17, {"at": .85, "pe": .5, "lo": .35}),
    ("effusion", 10, {"pe": .95, "at": .4, "card": .2}),
    ("pneumothorax", 6, {"ptx": .95, "fx": .15, "pe": .1, "at": .2}),
    ("lesion", 7, {"les": .95, "lo": .3, "pe": .1}),
    ("trauma", 4, {"fx": .95, "ptx": .2, "lo": .2}),
    ("mediastinal", 4, {"ec": .9, "card": .4}),
    ("pleural", 3, {"po": .9, "at": .3, "lo": .2}),
    ("opacity", 9, {"lo": .95, "at": .3, "ed": .1}),
)
_SYNDROME_WEIGHTS = tuple(w for _, w, _ in _SYNDROMES)
_UNCERTAIN_RATE = {"pn": .45, "at": .15, "ed": .2, "cons": .15, "card": .06, "pe": .1, "ptx": .06,
                   "les": .25, "fx": .12, "ec": .2, "lo": .04, "po": .1}
_NEGATIVE_RATE_ABNORMAL = {"ptx": .55, "pe": .4, "cons": .35, "ed": .3, "pn": .15, "card": .2, "ec": .1,
                           "fx": .05, "lo": .05, "les": .03, "at": .02, "po": .01}
_NEGATIVE_RATE_NORMAL = {"ptx": .8, "pe": .8, "card": .65, "cons": .5, "ec": .4, "ed": .2, "pn": .15,
                         "fx": .05, "les": .02, "lo": .05, "at": .02, "po": .01}
_CHRONIC = ("card", "les", "po", "fx", "ec")  # findings that persist between visits
_TEMPORAL_CODES = tuple(code for code, _ in TEMPORAL_FINDINGS)
_LABEL_CODES = tuple(code for code in OBS_CODES if code not in ("nf", "sd"))
_ORDER = {"sd": 0, "lo": 1, "cons": 2, "pn": 3, "at": 4, "ed": 5, "les": 6, "pe": 7, "ptx": 8, "po": 9,
          "card": 10, "ec": 11, "fx": 12}
_INCIDENTAL_ORDER = 13
_FILLER_ORDER = 14


@dataclass
class Patient:
    index: int
    subject_id: int
    female: bool
    icu_devices: tuple[str, ...]  # devices while in the ICU (empty: never)
    chronic_devices: tuple[str, ...]  # pacemaker, valve: in every study
    split: str


@dataclass
class Study:
    """One study while it is generated: labels first, then text and images."""

    study_id: int
    when: datetime
    labels: dict[str, int]  # code -> status; absent = not mentioned
    attrs: dict[str, FindingAttrs]
    progression: dict[str, str]  # code -> improving/stable/worsening/new
    devices: tuple[str, ...]
    normal: bool
    incidental: bool
    portable: bool
    exam: tuple[str, str, bool] = EXAMS[0]
    images: list[tuple[str, str]] = field(default_factory=list)  # (dicom_id, view)
    text: str = ""


def _new_attrs(code: str, rng: random.Random, study_attrs: dict[str, FindingAttrs],
               devices: tuple[str, ...] = ()) -> FindingAttrs:
    if code in _FOCUS_CODES:
        shared = next((study_attrs[c] for c in _FOCUS_CODES if c in study_attrs), None)
        loc = shared.loc if shared else rng.choices(range(len(_LOCATIONS)), _LOCATION_WEIGHTS)[0]
    elif code in ("ptx", "fx", "les"):
        loc = rng.choice(_UNILATERAL)
    elif code in ("pe", "po"):
        loc = rng.choices((0, 1, 2), (35, 30, 35))[0]
    else:  # edema, heart, mediastinum, devices: side is not used
        loc = 2
    scale = _SCALES.get(code, _SEVERITY)
    size_idx = rng.choices(range(len(scale)), (5, 4, 2, 1)[: len(scale)])[0]
    return FindingAttrs(
        code, loc, size_idx,
        cm=f"{rng.uniform(0.6, 2.9):.1f}", mass_cm=f"{rng.uniform(3.2, 7.5):.1f}", rib=rng.choice(_RIBS),
        devices=devices,
    )


def _draw_study(rng: random.Random, patient: Patient, prev: Study | None, study_id: int,
                when: datetime) -> Study:
    labels: dict[str, int] = {}
    attrs: dict[str, FindingAttrs] = {}
    progression: dict[str, str] = {}
    in_icu = bool(patient.icu_devices) and rng.random() < 0.85
    devices = tuple(patient.icu_devices if in_icu else ()) + patient.chronic_devices
    prev_findings = [c for c in _LABEL_CODES if prev and prev.labels.get(c) in (POS, UNC)] if prev else []

    if prev_findings and rng.random() < 0.6:
        # Follow-up: what the prior showed mostly persists, and MS-CXR-T findings get a
        # stated progression (their size moves with it).
        for code in prev_findings:
            status = prev.labels[code]
            if rng.random() >= (0.7 if status == POS else 0.4):
                continue
            labels[code] = status
            old = prev.attrs[code]
            if status == POS and code in _TEMPORAL_CODES and rng.random() < 0.75:
                trend = rng.choice(PROGRESSION_LABELS)
                progression[code] = trend
                step = {"improving": -1, "stable": 0, "worsening": 1}[trend]
                attrs[code] = old.resized(old.size_idx + step)
            else:
                attrs[code] = old
        fresh = [c for c in _TEMPORAL_CODES if c not in labels]
        if fresh and rng.random() < 0.2:
            code = rng.choice(fresh)
            labels[code] = POS
            attrs[code] = _new_attrs(code, rng, attrs)
            if rng.random() < 0.6:
                progression[code] = "new"
    roll = rng.random()
    incidental = False
    if not labels and roll < 0.36:
        normal = True
    elif not labels and roll < 0.40:
        normal, incidental = False, True  # only findings outside the 14 labels
    else:
        normal = False
        if not labels:
            _, _, probs = rng.choices(_SYNDROMES, _SYNDROME_WEIGHTS)[0]
            for code, p in probs.items():
                if rng.random() < p:
                    labels[code] = UNC if rng.random() < _UNCERTAIN_RATE[code] else POS
            if not any(s in (POS, UNC) for s in labels.values()):
                first = next(iter(probs))
                labels[first] = POS
            if labels.get("pn") == UNC and labels.get("lo") == POS and "at" not in labels and rng.random() < 0.35:
                labels["at"] = UNC  # the classic hedge: basilar opacity, atelectasis versus pneumonia
            if prev:  # chronic findings of earlier visits come back
                for code in _CHRONIC:
                    if code not in labels and prev.labels.get(code) == POS and rng.random() < 0.8:
                        labels[code] = POS
                        attrs[code] = prev.attrs[code]
        incidental = rng.random() < 0.12
    negative_rate = _NEGATIVE_RATE_NORMAL if normal else _NEGATIVE_RATE_ABNORMAL
    for code in _LABEL_CODES:
        if code not in labels and rng.random() < negative_rate[code]:
            labels[code] = NEG
    if devices:
        labels["sd"] = POS
    if not incidental and not any(labels.get(c) in (POS, UNC) for c in _LABEL_CODES):
        labels["nf"] = POS  # CheXpert: nothing but support devices is positive or uncertain
        normal = True
    for code in labels:
        if code not in attrs and code != "nf":
            attrs[code] = _new_attrs(code, rng, attrs, devices if code == "sd" else ())
    portable = in_icu or rng.random() < 0.25
    exam = rng.choice([e for e in EXAMS if e[2] == portable])
    return Study(study_id, when, labels, attrs, progression, devices, normal, incidental, portable, exam)


# ---------------------------------------------------------------------------------------
# Sentences: templates whose stated statuses agree with the labels.
# ---------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _blocks_no_finding() -> dict[str, bool]:
    """Template text -> whether it names something of CheXpert's no-finding list."""
    texts = [t.text for ts in SINGLES.values() for t in ts] + [t.text for t in COMBOS]
    return {text: "nf" in mentioned_observations(text) for text in texts}


def _fits(tpl: Template, labels: dict[str, int]) -> bool:
    for code, status in tpl.expresses:
        if labels.get(code) != status:
            return False
    return not (labels.get("nf") == POS and _blocks_no_finding()[tpl.text])


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _device_sentences(study: Study, rng: random.Random) -> list[str]:
    if rng.random() < 0.15:
        return [rng.choice(DEVICE_GENERIC)]
    out = []
    for device in study.devices:
        text = rng.choice(DEVICE_SENTENCES[device])
        out.append(_cap(text.format(
            side=rng.choice(("right", "left")), cm=f"{rng.uniform(2.5, 6.5):.1f}",
            svc=rng.choice(("lower SVC", "mid SVC", "cavoatrial junction")),
        )))
    return out


def _evidence_sentence(code: str, study: Study, rng: random.Random) -> str | None:
    labels = study.labels
    options = [
        (sign, blocks) for sign, others, blocks in evidence_signs().get(code, ())
        if all(labels.get(o) == POS for o in others) and not (blocks and labels.get("nf") == POS)
        and not (study.portable and "PA film" in sign)  # a portable film is AP
    ]
    if not options or code not in EVIDENCE_NPS:
        return None
    sign, _ = rng.choice(options)
    np_text = rng.choice(EVIDENCE_NPS[code]).format_map(study.attrs)
    return _cap(rng.choice(EVIDENCE_FORMS).format(np=np_text, sign=sign))


def _compose(study: Study, codes: list[str], rng: random.Random) -> list[tuple[int, str]]:
    """Sentences stating the labels of ``codes`` (in anatomical order keys)."""
    labels, attrs = study.labels, study.attrs
    items: list[tuple[int, str]] = []
    covered: set[str] = set()  # membership only; never iterated (set order is not stable)
    for code in codes:
        trend = study.progression.get(code)
        if trend:
            items.append((_ORDER[code], _cap(rng.choice(PROGRESSION[(code, trend)]).format_map(attrs))))
            covered.add(code)
    wanted = set(codes)
    if rng.random() < 0.45:
        fitting = [t for t in COMBOS if _fits(t, labels) and not any(c in covered for c, _ in t.expresses)
                   and any(c in wanted for c, _ in t.expresses)]
        if fitting:
            tpl = rng.choice(fitting)
            items.append((_ORDER[tpl.expresses[0][0]], _cap(tpl.text.format_map(attrs))))
            covered.update(c for c, _ in tpl.expresses)
    negatives = [c for c in codes if c not in covered and labels.get(c) == NEG and c in NEGATION_LIST_NOUNS]
    if len(negatives) >= 2 and rng.random() < 0.6:
        nouns = [NEGATION_LIST_NOUNS[c] for c in negatives]
        joined = f"{nouns[0]} or {nouns[1]}" if len(nouns) == 2 else ", ".join(nouns[:-1]) + f", or {nouns[-1]}"
        items.append((_ORDER["pe"], rng.choice(NEGATION_LIST_FORMS).format(items=joined)))
        covered.update(negatives)
    for code in codes:
        if code in covered:
            continue
        covered.add(code)
        if code == "sd":
            items.extend((_ORDER["sd"], s) for s in _device_sentences(study, rng))
            continue
        status = labels[code]
        if status == POS and rng.random() < 0.2:
            text = _evidence_sentence(code, study, rng)
            if text:
                items.append((_ORDER[code], text))
                continue
        options = [t for t in SINGLES[(code, status)] if _fits(t, labels)]
        items.append((_ORDER[code], _cap(rng.choice(options).text.format_map(attrs))))
    return items


def _findings_sentences(study: Study, rng: random.Random) -> list[str]:
    codes = [c for c in study.labels if c != "nf"]
    codes.sort(key=lambda c: _ORDER[c])
    items = _compose(study, codes, rng)
    abnormal = {c for c, s in study.labels.items() if s in (POS, UNC) and c != "sd"}
    usable = [text for text, forbidden in FILLERS if not (forbidden & abnormal)]
    for text in rng.sample(usable, min(len(usable), rng.randint(1, 3) if study.normal else rng.randint(0, 1))):
        items.append((_FILLER_ORDER, text))
    if study.incidental:
        items.append((_INCIDENTAL_ORDER, _incidental_sentence(study, rng)))
    items.sort(key=lambda item: item[0])
    return [text for _, text in items]


def _incidental_sentence(study: Study, rng: random.Random) -> str:
    pool = INCIDENTAL + incidental_knowledge_sentences()
    text = rng.choice(pool)
    return text.format(in_lobe=rng.choice(("in the right upper lobe", "in the left lower lobe", "in the lingula")))


def _impression_sentences(study: Study, rng: random.Random) -> list[str]:
    if study.labels.get("nf") == POS:
        items = [rng.choice(NORMAL_IMPRESSIONS)]
        if "sd" in study.labels and rng.random() < 0.5:
            items = _device_sentences(study, rng)[:1] + items
        return items
    codes = [c for c in study.labels if c != "nf" and study.labels[c] in (POS, UNC)]
    codes += [c for c in ("ptx", "pe") if study.labels.get(c) == NEG and rng.random() < 0.3]
    if "sd" in codes and rng.random() < 0.7:
        codes.remove("sd")  # impressions often leave the tubes to the findings
    codes.sort(key=lambda c: _ORDER[c])
    items = _compose(study, codes, rng) if codes else []
    if study.incidental and (not items or rng.random() < 0.3):
        items.append((_INCIDENTAL_ORDER, _incidental_sentence(study, rng)))
    items.sort(key=lambda item: item[0])
    return [text for _, text in items]


# ---------------------------------------------------------------------------------------
# Report layout: MIMIC's bytes (leading space on every line, two spaces between sentences).
# ---------------------------------------------------------------------------------------
WRAP_WIDTH = 78  # characters after the leading space, as in MIMIC's example report
FINAL_REPORT_LINE = " " * 32 + "FINAL REPORT"  # plus the leading space: 33 spaces


def wrap_sentences(sentences: list[str], first: str = "", width: int = WRAP_WIDTH) -> list[str]:
    """Greedy wrap; sentences are separated by two spaces, words by one (MIMIC's style).

    ``first`` (an inline header such as "FINDINGS:") starts the first line, followed by
    two spaces."""
    lines: list[str] = []
    line = first
    pending_sep = "  " if first else ""
    for sentence in sentences:
        for i, word in enumerate(sentence.split()):
            sep = (pending_sep if i == 0 else " ") if line else ""
            if line and len(line) + len(sep) + len(word) > width:
                lines.append(line)
                line = word
            else:
                line += sep + word
        pending_sep = "  "
    if line:
        lines.append(line)
    return lines


def _indication(study: Study, patient: Patient, rng: random.Random) -> list[str]:
    """The indication as wrap units: MIMIC puts two spaces before the '//' question."""
    symptom = rng.choice(DEVICE_INDICATIONS) if study.devices and rng.random() < 0.4 else rng.choice(SYMPTOMS)
    sex_word = rng.choice(("woman", "female") if patient.female else ("man", "male"))
    letter = "F" if patient.female else "M"
    style = rng.random()
    if style < 0.55:
        return [f"___ year old {sex_word} with {symptom}", f"// {rng.choice(QUESTIONS)}"]
    if style < 0.75:
        return [f"___ year old {sex_word} with {symptom}."]
    if style < 0.9:
        return [f"___{letter} with {symptom}"]
    return [f"___-year-old {sex_word} with {symptom}."]


def _render_report(study: Study, patient: Patient, has_prior: bool, rng: random.Random) -> str:
    findings = _findings_sentences(study, rng)
    impression = _impression_sentences(study, rng)
    lines: list[str] = [FINAL_REPORT_LINE]
    sections: list[list[str]] = []

    layout = rng.random()
    legacy = 0.78 <= layout < 0.90
    exam_header = 0.90 <= layout < 0.95
    combined = layout >= 0.95
    # Which of FINDINGS / IMPRESSION exist (every labelled sentence lands in one of them).
    presence = rng.random()
    if combined:
        findings, impression = findings + [s for s in impression if s not in findings], []
    elif presence < 0.12 and impression:
        impression = findings + [s for s in impression if s not in findings]
        findings = []
    elif presence < 0.20:
        findings = findings + [s for s in impression if s not in findings]
        impression = []
    if not findings and not impression:
        impression = [rng.choice(NORMAL_IMPRESSIONS)]

    indication = _indication(study, patient, rng)
    if legacy:
        header = rng.choice(("HISTORY", "CLINICAL HISTORY", "REASON FOR EXAMINATION", "INDICATION"))
        sections.append(wrap_sentences(indication, f"{header}:"))
    else:
        sections.append([f"EXAMINATION:  {study.exam[0]}"])
        header = rng.choices(("INDICATION", "REASON FOR EXAMINATION", "HISTORY"), (92, 4, 4))[0]
        sections.append(wrap_sentences(indication, f"{header}:"))
        if rng.random() < 0.9:
            sections.append([f"TECHNIQUE:  {study.exam[1]}"])
    comparison = (rng.choice(("___", "___.", "Chest radiograph ___", "Prior chest radiographs ___ through ___."))
                  if has_prior else rng.choice(("None.", "None", "None available.")))
    sections.append([f"{rng.choices(('COMPARISON', 'COMPARISONS'), (95, 5))[0]}:  {comparison}"])

    if findings:
        if combined:
            title = "FINDINGS AND IMPRESSION"
        elif exam_header:
            title = rng.choice([h for h in LEGACY_EXAM_HEADERS if ("PORTABLE" in h) == study.portable])
        else:
            title = "FINDINGS"
        if legacy or exam_header:
            sections.append(wrap_sentences(findings, f"{title}:"))
        else:
            sections.append([f"{title}: ", "", *wrap_sentences(findings)])
    if impression:
        title = rng.choices(("IMPRESSION", "IMPRESSON", "CONCLUSION"), (93, 2, 5))[0]
        if rng.random() < 0.25:  # MIMIC often drops the last full stop
            impression[-1] = impression[-1].rstrip(".")
        if len(impression) >= 2 and rng.random() < 0.3:
            body = [line for i, s in enumerate(impression, 1) for line in wrap_sentences([s], f"{i}.")]
        else:
            body = wrap_sentences(impression)
        if legacy:
            sections.append(wrap_sentences(impression, f"{title}:"))
        else:
            sections.append([f"{title}: ", "", *body])
    if not study.normal and rng.random() < 0.03:
        sections.append(wrap_sentences([
            f"The findings were discussed with ___, M.D. by ___, M.D. on the telephone on ___ at "
            f"{rng.randint(1, 12)}:{rng.randint(0, 59):02d} {rng.choice(('AM', 'PM'))}, "
            f"{rng.randint(2, 30)} minutes after discovery of the findings."], "NOTIFICATION:"))

    for i, section in enumerate(sections):
        if i:
            lines.append("")
        lines.extend(section)
    return "\n".join(" " + line for line in lines) + "\n"


# ---------------------------------------------------------------------------------------
# Images: a few pre-encoded JPGs per look (heart size, effusion, opacity), reused.
# ---------------------------------------------------------------------------------------
_VIEWS = {  # ViewPosition -> (ViewCodeSequence meaning, orientation, (Rows, Columns) options)
    "PA": ("postero-anterior", "Erect", ((3056, 2544), (2544, 3056))),
    "AP": ("antero-posterior", "Recumbent", ((2539, 3050), (3050, 2539), (2544, 3056))),
    "LATERAL": ("lateral", "Erect", ((3056, 2544),)),
    "LL": ("left lateral", "Erect", ((2544, 3056),)),
}
_IMAGE_VARIANTS = 3


class ImagePool:
    """JPEG bytes keyed by (lateral, cardiomegaly, effusion, opacity, variant), built lazily."""

    def __init__(self, seed: int, size: int) -> None:
        self.seed, self.size = seed, size
        self._cache: dict[tuple[bool, bool, bool, bool, int], bytes] = {}

    def get(self, key: tuple[bool, bool, bool, bool, int]) -> bytes:
        blob = self._cache.get(key)
        if blob is None:
            blob = self._cache[key] = self._render(key)
        return blob

    def _render(self, key: tuple[bool, bool, bool, bool, int]) -> bytes:
        import numpy as np
        from PIL import Image

        lateral, cardio, effusion, opacity, variant = key
        n = self.size
        gen = np.random.default_rng([self.seed & 0xFFFFFFFF, *map(int, key)])
        yy, xx = np.mgrid[0:n, 0:n] / n

        def ellipse(cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
            return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0

        img = np.full((n, n), 25.0)
        img[ellipse(0.5, 0.55, 0.46, 0.5)] = 125.0  # torso
        lungs = [(0.5, 0.45, 0.3, 0.33)] if lateral else [(0.3, 0.45, 0.15, 0.32), (0.7, 0.45, 0.15, 0.32)]
        for cx, cy, rx, ry in lungs:
            lung = ellipse(cx, cy, rx, ry)
            img[lung] = 55.0
            if effusion:
                img[lung & (yy > cy + ry * 0.45)] = 135.0  # fluid fills the costophrenic angle
        heart_rx = (0.2 if cardio else 0.13) * (0.8 if lateral else 1.0)
        img[ellipse(0.42 if lateral else 0.55, 0.62, heart_rx, 0.13)] = 165.0
        if opacity:
            img[ellipse(0.28 if not lateral else 0.5, 0.55, 0.07, 0.07)] = 120.0
        img += gen.normal(0.0, 10.0, (n, n))
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "L").save(buf, "JPEG", quality=80)
        return buf.getvalue()


def _views_for(study: Study, rng: random.Random) -> list[str]:
    if study.portable:
        return ["AP", "AP"] if rng.random() < 0.15 else ["AP"]
    roll = rng.random()
    if roll < 0.15:
        return ["PA"]
    if roll < 0.9:
        return ["PA", "LATERAL"]
    return ["PA", "LATERAL", rng.choice(("LL", "PA"))]


def _dicom_id(rng: random.Random) -> str:
    return "-".join(f"{rng.getrandbits(32):08x}" for _ in range(5))


# ---------------------------------------------------------------------------------------
# The corpus writer.
# ---------------------------------------------------------------------------------------
def _clear_previous(out: Path) -> None:
    """Remove what an earlier run of this generator wrote to ``out`` (and nothing else)."""
    if not (out / MARKER_NAME).exists():
        return
    shutil.rmtree(out / "files", ignore_errors=True)
    for name in MIMIC_CSV_NAMES.values():
        (out / name).unlink(missing_ok=True)


def _split_plan(studies: int) -> tuple[int, int, int]:
    """(block size, test patients per block, validate patients per block), per patient.

    MIMIC's split is about 97/1/2; small corpora get 80/10/10 so that validate and test
    are never empty."""
    return (10, 1, 1) if studies < 2000 else (100, 2, 1)


def _split_for(index: int, seed: int, plan: tuple[int, int, int]) -> str:
    block, n_test, n_val = plan
    block_no, pos = divmod(index, block)
    if block_no == 0:
        # The first block fixes patient 0 to train, 1 to test, 2 to validate: a corpus of
        # three patients already has all three splits.
        test = set(range(1, 1 + n_test))
        val = set(range(1 + n_test, 1 + n_test + n_val))
    else:
        picks = random.Random(f"{seed}:split:{block_no}").sample(range(block), n_test + n_val)
        test, val = set(picks[:n_test]), set(picks[n_test:])
    return "test" if pos in test else "validate" if pos in val else "train"


def _study_count(rng: random.Random, left: int) -> int:
    return min(left, rng.choices((1, 2, 3, 4, 5, 6), (40, 25, 13, 10, 7, 5))[0])


def _format_time(when: datetime, rng: random.Random) -> str:
    value = when.hour * 10000 + when.minute * 100 + when.second + rng.randrange(1000) / 1000
    return repr(round(value, 3))


def _validate(out: Path, studies: int, seed: int, image_size: int) -> Path:
    if isinstance(studies, bool) or not isinstance(studies, int) or studies < 1:
        raise ValueError(f"studies must be a positive integer, got {studies!r}")
    if studies > MAX_STUDIES:
        raise ValueError(f"studies must be at most {MAX_STUDIES:,}, got {studies:,}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 8 <= image_size <= 2048:
        raise ValueError(f"image_size must be an integer between 8 and 2048, got {image_size!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {out} exists and is not a directory")
    return out


def generate_corpus(
    out: Path,
    studies: int,
    seed: int = 13,
    images: bool = True,
    image_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> CorpusSummary:
    """Write a synthetic MIMIC-CXR-JPG-style corpus of ``studies`` studies under ``out``.

    ``progress`` is called with the number of studies written so far (about 200 times
    per corpus, and once at the end). Files an earlier run of this generator left in
    ``out`` are replaced; other files there are left alone."""
    out = _validate(out, studies, seed, image_size)
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    _clear_previous(out)
    marker = {"generator": "radchain.synthetic", "studies": studies, "seed": seed, "images": bool(images),
              "image_size": image_size, "complete": False}
    (out / MARKER_NAME).write_text(json.dumps(marker, sort_keys=True) + "\n")

    master = random.Random(f"{seed}:corpus")
    # Study ids: an affine bijection of the study counter onto 50000000..59999999, so ids
    # look random yet never collide and need no memory.
    mult = master.randrange(1_000_003, 9_999_999, 2)
    while mult % 5 == 0:
        mult += 2
    offset = master.randrange(10_000_000)
    max_gap = max(1, min(60, 9_000_000 // studies))
    split_plan = _split_plan(studies)
    pool = ImagePool(seed, image_size) if images else None
    step = max(1, studies // 200)

    paths = {key: out / name for key, name in MIMIC_CSV_NAMES.items()}
    handles = {key: open(path, "w", newline="", encoding="utf-8") for key, path in paths.items()}
    counts = {"patients": 0, "studies": 0, "images": 0, "written": 0, "pairs": 0}
    label_counts = {column: {"1.0": 0, "0.0": 0, "-1.0": 0} for column in CHEXPERT_COLUMNS}
    splits = {"train": 0, "validate": 0, "test": 0}
    try:
        writers = {key: csv.writer(fh, lineterminator="\n") for key, fh in handles.items()}
        writers["metadata"].writerow(METADATA_COLUMNS)
        writers["split"].writerow(SPLIT_COLUMNS)
        writers["chexpert"].writerow(("subject_id", "study_id", *CHEXPERT_COLUMNS))
        writers["temporal"].writerow(TEMPORAL_COLUMNS)
        subject_id = 10_000_000
        reported = 0
        while counts["studies"] < studies:
            index = counts["patients"]
            subject_id += master.randint(1, max_gap)
            rng = random.Random(f"{seed}:patient:{index}")
            patient = Patient(
                index=index, subject_id=subject_id, female=rng.random() < 0.5,
                icu_devices=tuple(d for d, p in (("ett", .6), ("ng", .5), ("cvc", .7), ("ct", .15))
                                  if rng.random() < p) if rng.random() < 0.22 else (),
                chronic_devices=(("pm",) if rng.random() < 0.05 else ()) + (("valve",) if rng.random() < 0.03 else ()),
                split=_split_for(index, seed, split_plan),
            )
            counts["patients"] += 1
            splits[patient.split] += 1
            n = _study_count(rng, studies - counts["studies"])
            _write_patient(out, patient, n, rng, counts, writers, pool, label_counts, mult, offset)
            if counts["studies"] - reported >= step and progress is not None:
                reported = counts["studies"]
                progress(reported)
    finally:
        for fh in handles.values():
            fh.close()
    if progress is not None:
        progress(counts["studies"])
    marker["complete"] = True
    (out / MARKER_NAME).write_text(json.dumps(marker, sort_keys=True) + "\n")
    return CorpusSummary(
        out=out, seed=seed, patients=counts["patients"], studies=counts["studies"], images=counts["images"],
        images_written=counts["written"], temporal_pairs=counts["pairs"], metadata_csv=paths["metadata"],
        split_csv=paths["split"], chexpert_csv=paths["chexpert"], temporal_csv=paths["temporal"],
        wall_s=time.perf_counter() - started, label_counts=label_counts, splits=splits,
    )


def _write_patient(out: Path, patient: Patient, n_studies: int, rng: random.Random, counts: dict[str, int],
                   writers: dict, pool: ImagePool | None, label_counts: dict[str, dict[str, int]],
                   mult: int, offset: int) -> None:
    subject = str(patient.subject_id)
    patient_dir = out / "files" / f"p{subject[:2]}" / f"p{subject}"
    patient_dir.mkdir(parents=True, exist_ok=True)
    when = datetime(rng.randint(2110, 2195), rng.randint(1, 12), rng.randint(1, 28), rng.randint(0, 23),
                    rng.randint(0, 59), rng.randint(0, 59))
    prev: Study | None = None
    for order in range(n_studies):
        if order:
            when += timedelta(hours=rng.randint(6, 24 * 400), minutes=rng.randint(0, 59))
        study_id = 50_000_000 + (mult * counts["studies"] + offset) % 10_000_000
        counts["studies"] += 1
        study = _draw_study(rng, patient, prev, study_id, when)
        study.text = _render_report(study, patient, prev is not None, rng)
        with open(patient_dir / f"s{study_id}.txt", "w", encoding="utf-8", newline="\n") as fh:
            fh.write(study.text)

        study_date = when.strftime("%Y%m%d")
        study_time = _format_time(when, rng)
        views = _views_for(study, rng)
        image_dir = patient_dir / f"s{study_id}"
        if pool is not None:
            image_dir.mkdir(exist_ok=True)
        look = (study.labels.get("card") == POS, study.labels.get("pe") == POS,
                any(study.labels.get(c) == POS for c in ("lo", "cons", "pn")))
        for view in views:
            dicom_id = _dicom_id(rng)
            study.images.append((dicom_id, view))
            meaning, orientation, shapes = _VIEWS[view]
            rows, cols = rng.choice(shapes)
            writers["metadata"].writerow((
                dicom_id, subject, study_id, study.exam[0], view, rows, cols, study_date,
                study_time, study.exam[0], meaning, orientation if rng.random() < 0.95 else "",
            ))
            writers["split"].writerow((dicom_id, study_id, subject, patient.split))
            counts["images"] += 1
            if pool is not None:
                key = (view in ("LATERAL", "LL"), *look, rng.randrange(_IMAGE_VARIANTS))
                with open(image_dir / f"{dicom_id}.jpg", "wb") as fh:
                    fh.write(pool.get(key))
                counts["written"] += 1

        row = [subject, study_id]
        for column in CHEXPERT_COLUMNS:
            status = study.labels.get(_CODE_OF_COLUMN[column])
            if status is None:
                row.append("")
            else:
                text = LABEL_TEXT[status]
                row.append(text)
                label_counts[column][text] += 1
        writers["chexpert"].writerow(row)

        if prev is not None and study.progression:
            writers["temporal"].writerow((
                study.images[0][0], study_id, subject, prev.images[0][0], prev.study_id,
                *("worsening" if study.progression.get(code) == "new" else study.progression.get(code, "")
                  for code in _TEMPORAL_CODES),
            ))
            counts["pairs"] += 1
        prev = study


_CODE_OF_COLUMN = {name: code for code, name in OBS_CODES.items()}


__all__ = [
    "CHEXPERT_COLUMNS", "CorpusSummary", "FINAL_REPORT_LINE", "METADATA_COLUMNS", "MIMIC_CSV_NAMES",
    "SPLIT_COLUMNS", "TEMPORAL_COLUMNS", "generate_corpus", "wrap_sentences",
]
