"""Sentence templates and vocabularies for the synthetic MIMIC-CXR-style corpus.

Every template declares the CheXpert statuses it expresses (``T("...", pe=POS, ptx=NEG)``).
The generator decides a study's labels first and then only uses templates whose declared
statuses agree with them, so the chexpert CSV and the report text cannot drift apart.
Declarations are checked against the labelers' own mention lexicons
(``mentioned_observations``) in tests/test_synthetic.py: a template that names an
observation it does not declare fails there.

Slots are ``{code.attribute}``: ``code`` is a short observation code (see ``OBS_CODES``)
and the attribute comes from ``extractors.synthetic.FindingAttrs`` (side, size, lobe ...).
Sentences are capitalised after formatting, so templates are written in lower case where
they start with a slot.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import yaml

from extractors.resources import KNOWLEDGE_MAP, LEXICONS

POS, NEG, UNC = 1, 0, -1

# Short codes keep templates readable; values are the CheXpert column names.
OBS_CODES: dict[str, str] = {
    "at": "Atelectasis",
    "card": "Cardiomegaly",
    "cons": "Consolidation",
    "ed": "Edema",
    "ec": "Enlarged Cardiomediastinum",
    "fx": "Fracture",
    "les": "Lung Lesion",
    "lo": "Lung Opacity",
    "nf": "No Finding",
    "pe": "Pleural Effusion",
    "po": "Pleural Other",
    "pn": "Pneumonia",
    "ptx": "Pneumothorax",
    "sd": "Support Devices",
}
CODE_OF: dict[str, str] = {name: code for code, name in OBS_CODES.items()}

# MS-CXR-T's five temporal findings, as (code, CSV column).
TEMPORAL_FINDINGS: tuple[tuple[str, str], ...] = (
    ("cons", "consolidation_progression"),
    ("ed", "edema_progression"),
    ("pe", "pleural_effusion_progression"),
    ("pn", "pneumonia_progression"),
    ("ptx", "pneumothorax_progression"),
)

# Cue words the templates use; a labeler that knows these reads the text as intended.
NEGATION_CUES: tuple[str, ...] = ("no ", "without", "not ", "normal", "unremarkable")
UNCERTAINTY_CUES: tuple[str, ...] = (
    "cannot be excluded", "may represent", "possible", "concerning for", "versus",
)


@dataclass(frozen=True, slots=True)
class Template:
    text: str
    expresses: tuple[tuple[str, int], ...]  # (code, status) pairs the sentence states


def T(text: str, **expresses: int) -> Template:
    return Template(text, tuple(expresses.items()))


# ---------------------------------------------------------------------------------------
# Single-observation templates: SINGLES[(code, status)].  Some also state a second
# observation (an uncertain pneumonia "opacity concerning for pneumonia" states a
# positive Lung Opacity); the generator only uses those when the labels agree.
# ---------------------------------------------------------------------------------------
SINGLES: dict[tuple[str, int], tuple[Template, ...]] = {
    ("at", POS): (
        T("{at.base} atelectasis.", at=POS),
        T("Mild {at.base} atelectasis.", at=POS),
        T("Linear atelectasis {at.at_base}.", at=POS),
        T("There is {at.base} atelectasis.", at=POS),
        T("Subsegmental atelectasis {at.in_lobe}.", at=POS),
        T("{at.base} atelectasis with mild volume loss.", at=POS),
        T("Low lung volumes with {at.base} atelectasis.", at=POS),
        T("Elevation of the {at.hemidiaphragm} with adjacent atelectasis.", at=POS),
        T("Collapse of the {at.lobe_noun}.", at=POS),
    ),
    ("at", NEG): (
        T("There is no atelectasis.", at=NEG),
        T("No focal atelectasis.", at=NEG),
    ),
    ("at", UNC): (
        T("Possible {at.base} atelectasis.", at=UNC),
        T("{at.base} atelectasis cannot be excluded.", at=UNC),
        T("{at.base} opacity may represent atelectasis.", at=UNC, lo=POS),
    ),
    ("card", POS): (
        T("{card.sev} cardiomegaly.", card=POS),
        T("Cardiomegaly.", card=POS),
        T("The heart is {card.sevly} enlarged.", card=POS),
        T("Heart size is {card.sevly} enlarged.", card=POS),
        T("The cardiac silhouette is enlarged.", card=POS),
        T("{card.sev} enlargement of the cardiac silhouette.", card=POS),
    ),
    ("card", NEG): (
        T("Heart size is normal.", card=NEG),
        T("The heart size is normal.", card=NEG),
        T("Normal heart size.", card=NEG),
        T("The cardiac silhouette is normal in size.", card=NEG),
        T("Heart size is within normal limits.", card=NEG),
        T("No cardiomegaly.", card=NEG),
    ),
    ("card", UNC): (
        T("Possible mild cardiomegaly.", card=UNC),
        T("Cardiomegaly cannot be excluded.", card=UNC),
    ),
    ("cons", POS): (
        T("{cons.lobe} consolidation.", cons=POS),
        T("Consolidation {cons.in_lobe}.", cons=POS),
        T("Focal consolidation {cons.in_lobe}.", cons=POS),
        T("Dense consolidation {cons.in_lobe} with air bronchograms.", cons=POS),
        T("There is consolidation {cons.in_lobe}.", cons=POS),
    ),
    ("cons", NEG): (
        T("No focal consolidation.", cons=NEG),
        T("There is no focal consolidation.", cons=NEG),
        T("No consolidation is seen.", cons=NEG),
    ),
    ("cons", UNC): (
        T("Possible consolidation {cons.in_lobe}.", cons=UNC),
        T("{cons.lobe} consolidation cannot be excluded.", cons=UNC),
    ),
    ("ed", POS): (
        T("{ed.sev} pulmonary edema.", ed=POS),
        T("{ed.sev} interstitial pulmonary edema.", ed=POS),
        T("There is {ed.sev} pulmonary edema.", ed=POS),
        T("Pulmonary vascular congestion.", ed=POS),
        T("{ed.sev} pulmonary vascular congestion and interstitial edema.", ed=POS),
        T("Findings are consistent with {ed.sev} pulmonary edema.", ed=POS),
    ),
    ("ed", NEG): (
        T("No pulmonary edema.", ed=NEG),
        T("There is no pulmonary edema.", ed=NEG),
        T("No evidence of pulmonary edema.", ed=NEG),
        T("No pulmonary vascular congestion.", ed=NEG),
    ),
    ("ed", UNC): (
        T("Possible mild pulmonary edema.", ed=UNC),
        T("Mild pulmonary edema cannot be excluded.", ed=UNC),
    ),
    ("ec", POS): (
        T("The mediastinum is widened.", ec=POS),
        T("Widening of the superior mediastinum.", ec=POS),
        T("The cardiomediastinal silhouette is enlarged.", ec=POS),
        T("Enlarged cardiomediastinal silhouette.", ec=POS),
        T("Abnormal contour of the mediastinum.", ec=POS),
    ),
    ("ec", NEG): (
        T("Mediastinal contours are normal.", ec=NEG),
        T("The cardiomediastinal silhouette is normal.", ec=NEG),
        T("Normal cardiomediastinal silhouette.", ec=NEG),
        T("The mediastinum is not widened.", ec=NEG),
        T("Mediastinal and hilar contours are unremarkable.", ec=NEG),
    ),
    ("ec", UNC): (
        T("Possible widening of the mediastinum.", ec=UNC),
        T("Widening of the mediastinum cannot be excluded.", ec=UNC),
    ),
    ("fx", POS): (
        T("Acute displaced fracture of the {fx.side} {fx.rib} rib.", fx=POS),
        T("Healed {fx.side} rib fractures.", fx=POS),
        T("Old healed fracture of the {fx.side} clavicle.", fx=POS),
        T("Compression fracture of a lower thoracic vertebral body.", fx=POS),
        T("Nondisplaced fracture of the {fx.side} {fx.rib} rib.", fx=POS),
    ),
    ("fx", NEG): (
        T("No displaced rib fracture.", fx=NEG),
        T("No acute fracture.", fx=NEG),
        T("No acute displaced fracture is seen.", fx=NEG),
    ),
    ("fx", UNC): (
        T("Possible nondisplaced {fx.side} rib fracture.", fx=UNC),
        T("A {fx.side} rib fracture cannot be excluded.", fx=UNC),
    ),
    ("les", POS): (
        T("{les.cm} cm nodule {les.in_lobe}.", les=POS),
        T("A {les.cm} cm nodule is seen {les.in_lobe}.", les=POS),
        T("{les.lobe} mass measuring {les.mass_cm} cm.", les=POS),
        T("Spiculated nodule {les.in_lobe}.", les=POS),
        T("Cavitary lesion {les.in_lobe}.", les=POS),
    ),
    ("les", NEG): (
        T("No suspicious pulmonary nodule.", les=NEG),
        T("No pulmonary nodules or masses.", les=NEG),
    ),
    ("les", UNC): (
        T("Possible nodule {les.in_lobe}.", les=UNC),
        T("A nodule {les.in_lobe} cannot be excluded.", les=UNC),
        T("{les.lobe} opacity may represent a nodule.", les=UNC, lo=POS),
    ),
    ("lo", POS): (
        T("{lo.base} opacity.", lo=POS),
        T("{lo.base} opacities.", lo=POS),
        T("Patchy opacity {lo.in_lobe}.", lo=POS),
        T("Hazy opacity {lo.at_base}.", lo=POS),
        T("Increased opacity {lo.in_lobe}.", lo=POS),
        T("Ground-glass opacity {lo.in_lobe}.", lo=POS),
        T("There is patchy airspace disease {lo.in_lobe}.", lo=POS),
    ),
    ("lo", NEG): (
        T("No focal airspace opacity.", lo=NEG),
        T("No focal opacity.", lo=NEG),
    ),
    ("lo", UNC): (
        T("Possible subtle opacity {lo.in_lobe}.", lo=UNC),
        T("Subtle {lo.base} opacity cannot be excluded.", lo=UNC),
    ),
    ("pe", POS): (
        T("{pe.size} {pe.side} pleural effusion{pe.s}.", pe=POS),
        T("There {pe.is_are} {pe.a}{pe.size} {pe.side} pleural effusion{pe.s}.", pe=POS),
        T("{pe.size} {pe.side} effusion{pe.s}.", pe=POS),
        T("Layering {pe.side} pleural effusion{pe.s}.", pe=POS),
        T("{pe.size} {pe.sided} pleural effusion{pe.s}.", pe=POS),
        T("{pe.size} {pe.side} pleural effusion{pe.s} with blunting of the {pe.cpa}.", pe=POS),
    ),
    ("pe", NEG): (
        T("No pleural effusion.", pe=NEG),
        T("There is no pleural effusion.", pe=NEG),
        T("No effusion.", pe=NEG),
        T("No pleural effusions.", pe=NEG),
    ),
    ("pe", UNC): (
        T("Possible small {pe.side} pleural effusion{pe.s}.", pe=UNC),
        T("{pe.a}small {pe.side} pleural effusion{pe.s} cannot be excluded.", pe=UNC),
    ),
    ("po", POS): (
        T("{po.side} pleural thickening.", po=POS),
        T("{po.side} apical pleural thickening.", po=POS),
        T("{po.side} pleural scarring.", po=POS),
    ),
    ("po", NEG): (T("No pleural thickening.", po=NEG), T("No pleural scarring.", po=NEG)),
    ("po", UNC): (T("Possible {po.side} pleural thickening.", po=UNC),),
    ("pn", POS): (
        T("{pn.lobe} pneumonia.", pn=POS),
        T("Findings consistent with {pn.lobe} pneumonia.", pn=POS),
        T("Pneumonia {pn.in_lobe}.", pn=POS),
        T("{pn.lobe} opacity consistent with pneumonia.", pn=POS, lo=POS),
        T("Opacity {pn.in_lobe} consistent with infection.", pn=POS, lo=POS),
        T("Consolidation {pn.in_lobe} consistent with pneumonia.", pn=POS, cons=POS),
    ),
    ("pn", NEG): (
        T("No evidence of pneumonia.", pn=NEG),
        T("There is no pneumonia.", pn=NEG),
        T("No radiographic evidence of pneumonia.", pn=NEG),
    ),
    ("pn", UNC): (
        T("Possible early pneumonia.", pn=UNC),
        T("Pneumonia cannot be excluded.", pn=UNC),
        T("Infection cannot be excluded.", pn=UNC),
        T("Possible {pn.lobe} pneumonia.", pn=UNC),
        T("{pn.base} opacity concerning for pneumonia.", pn=UNC, lo=POS),
        T("{pn.base} opacity may represent pneumonia.", pn=UNC, lo=POS),
        T("Opacity {pn.in_lobe} concerning for infection.", pn=UNC, lo=POS),
    ),
    ("ptx", POS): (
        T("{ptx.size} {ptx.side} pneumothorax.", ptx=POS),
        T("{ptx.size} {ptx.side} apical pneumothorax.", ptx=POS),
        T("There is a {ptx.size} {ptx.side} pneumothorax.", ptx=POS),
        T("{ptx.side} pneumothorax with a visible visceral pleural edge.", ptx=POS),
    ),
    ("ptx", NEG): (
        T("No pneumothorax.", ptx=NEG),
        T("There is no pneumothorax.", ptx=NEG),
        T("No pneumothorax is seen.", ptx=NEG),
        T("No evidence of pneumothorax.", ptx=NEG),
    ),
    ("ptx", UNC): (
        T("Possible tiny {ptx.side} apical pneumothorax.", ptx=UNC),
        T("A small {ptx.side} pneumothorax cannot be excluded.", ptx=UNC),
    ),
}

# Sentences stating two or three observations at once: realistic, and harder to label.
COMBOS: tuple[Template, ...] = (
    T("There is no pneumothorax, but there {pe.is_are} {pe.a}{pe.size} {pe.side} pleural effusion{pe.s}.",
      ptx=NEG, pe=POS),
    T("No pneumothorax but {pe.size} {pe.side} effusion{pe.s}.", ptx=NEG, pe=POS),
    T("Cardiomegaly without overt pulmonary edema.", card=POS, ed=NEG),
    T("{card.sev} cardiomegaly without pulmonary edema.", card=POS, ed=NEG),
    T("{lo.base} opacity may represent atelectasis versus pneumonia.", lo=POS, at=UNC, pn=UNC),
    T("{lo.base} opacities, atelectasis versus pneumonia.", lo=POS, at=UNC, pn=UNC),
    T("{card.sev} cardiomegaly with {pe.size} {pe.side} pleural effusion{pe.s}.", card=POS, pe=POS),
    T("{ed.sev} pulmonary edema with {pe.size} {pe.side} pleural effusion{pe.s}.", ed=POS, pe=POS),
    T("Cardiomegaly with {ed.sev} pulmonary edema.", card=POS, ed=POS),
    T("{cons.lobe} consolidation concerning for pneumonia.", cons=POS, pn=UNC),
    T("{cons.lobe} consolidation consistent with pneumonia.", cons=POS, pn=POS),
    T("{at.base} atelectasis without focal consolidation.", at=POS, cons=NEG),
    T("{pe.size} {pe.side} pleural effusion{pe.s} with adjacent atelectasis.", pe=POS, at=POS),
    T("{pe.size} {pe.side} pleural effusion{pe.s} and {at.base} atelectasis.", pe=POS, at=POS),
    T("The heart size and mediastinal contours are normal.", card=NEG, ec=NEG),
    T("Heart size and cardiomediastinal contours are within normal limits.", card=NEG, ec=NEG),
    # The device comes first: "no" would otherwise reach it in a labeler's negation scope.
    T("{sd.device_noun} in place, without pneumothorax.", sd=POS, ptx=NEG),
)

# Positive noun phrases joined with a knowledge-map sign: "{np}, with {sign}." or
# "{sign}, consistent with {np}."
EVIDENCE_NPS: dict[str, tuple[str, ...]] = {
    "at": ("{at.base} atelectasis",),
    "card": ("{card.sev} cardiomegaly", "cardiomegaly"),
    "cons": ("{cons.lobe} consolidation",),
    "ed": ("{ed.sev} pulmonary edema",),
    "ec": ("widening of the mediastinum",),
    "fx": ("{fx.side} rib fracture",),
    "les": ("{les.lobe} nodule",),
    "lo": ("{lo.base} opacity",),
    "pe": ("{pe.size} {pe.side} pleural effusion{pe.s}",),
    "po": ("{po.side} pleural thickening",),
    "pn": ("{pn.lobe} pneumonia",),
    "ptx": ("{ptx.size} {ptx.side} pneumothorax",),
}
EVIDENCE_FORMS: tuple[str, ...] = ("{np}, with {sign}.", "{sign}, consistent with {np}.")

# Comparison language for MS-CXR-T findings, keyed by (code, progression).  "new" is
# written when the prior study did not have the finding; its CSV label is "worsening".
PROGRESSION: dict[tuple[str, str], tuple[str, ...]] = {
    ("pe", "worsening"): (
        "{pe.side} pleural effusion{pe.s} {pe.has_have} increased.",
        "Interval increase in {pe.side} pleural effusion{pe.s}.",
        "{pe.size} {pe.side} pleural effusion{pe.s} {pe.is_are} larger.",
        "Increased {pe.size} {pe.side} pleural effusion{pe.s}.",
    ),
    ("pe", "new"): (
        "New {pe.size} {pe.side} pleural effusion{pe.s}.",
        "{pe.size} {pe.side} pleural effusion{pe.s} {pe.is_are} new.",
    ),
    ("pe", "improving"): (
        "{pe.side} pleural effusion{pe.s} {pe.has_have} decreased.",
        "Decreased {pe.side} pleural effusion{pe.s}.",
        "Interval improvement in {pe.side} pleural effusion{pe.s}.",
        "{pe.side} effusion{pe.s} {pe.is_are} smaller.",
    ),
    ("pe", "stable"): (
        "{pe.size} {pe.side} pleural effusion{pe.s} {pe.is_are} unchanged.",
        "Stable {pe.size} {pe.side} pleural effusion{pe.s}.",
        "Persistent {pe.size} {pe.side} pleural effusion{pe.s}.",
        "{pe.size} {pe.side} effusion{pe.s} {pe.is_are} similar to the prior study.",
    ),
    ("ed", "worsening"): (
        "Pulmonary edema has worsened.",
        "Worsening {ed.sev} pulmonary edema.",
        "Interval increase in pulmonary edema.",
        "Edema is more prominent.",
    ),
    ("ed", "new"): ("New {ed.sev} pulmonary edema.",),
    ("ed", "improving"): (
        "Edema is improved.",
        "Improving pulmonary edema.",
        "Interval improvement in pulmonary edema.",
        "Pulmonary edema has decreased.",
        "Pulmonary edema is less prominent.",
    ),
    ("ed", "stable"): (
        "{ed.sev} pulmonary edema is unchanged.",
        "Stable {ed.sev} pulmonary edema.",
        "Persistent {ed.sev} interstitial edema.",
    ),
    ("cons", "worsening"): (
        "Worsening {cons.lobe} consolidation.",
        "{cons.lobe} consolidation has increased.",
    ),
    ("cons", "new"): ("New {cons.lobe} consolidation.",),
    ("cons", "improving"): (
        "Improving {cons.lobe} consolidation.",
        "{cons.lobe} consolidation has decreased.",
    ),
    ("cons", "stable"): (
        "Persistent {cons.lobe} consolidation.",
        "{cons.lobe} consolidation is unchanged.",
    ),
    ("pn", "worsening"): (
        "Worsening {pn.lobe} pneumonia.",
        "{pn.lobe} pneumonia has progressed.",
    ),
    ("pn", "new"): ("New {pn.lobe} pneumonia.",),
    ("pn", "improving"): (
        "Improving {pn.lobe} pneumonia.",
        "{pn.lobe} pneumonia is improved.",
    ),
    ("pn", "stable"): (
        "Persistent {pn.lobe} pneumonia.",
        "{pn.lobe} pneumonia is unchanged.",
    ),
    ("ptx", "worsening"): (
        "{ptx.side} pneumothorax has increased in size.",
        "Enlarging {ptx.side} pneumothorax.",
        "{ptx.size} {ptx.side} pneumothorax is larger.",
    ),
    ("ptx", "new"): ("New {ptx.size} {ptx.side} pneumothorax.",),
    ("ptx", "improving"): (
        "{ptx.side} pneumothorax is smaller.",
        "Decreased {ptx.side} pneumothorax.",
        "Decreasing {ptx.size} {ptx.side} apical pneumothorax.",
    ),
    ("ptx", "stable"): (
        "Stable {ptx.size} {ptx.side} pneumothorax.",
        "{ptx.size} {ptx.side} pneumothorax is unchanged.",
    ),
}

# Lists of negated findings, "No focal consolidation, pleural effusion, or pneumothorax."
NEGATION_LIST_NOUNS: dict[str, str] = {
    "cons": "focal consolidation",
    "pe": "pleural effusion",
    "ptx": "pneumothorax",
    "ed": "pulmonary edema",
    "pn": "pneumonia",
}
NEGATION_LIST_FORMS: tuple[str, ...] = ("No {items}.", "There is no {items}.", "No evidence of {items}.")

# Support devices: one sentence per device the patient has (code "sd", always positive).
DEVICE_SENTENCES: dict[str, tuple[str, ...]] = {
    "ett": (
        "Endotracheal tube terminates {cm} cm above the carina.",
        "ET tube tip is {cm} cm above the carina.",
        "Endotracheal tube in standard position.",
    ),
    "ng": (
        "Nasogastric tube tip is in the stomach.",
        "Enteric tube courses below the diaphragm with tip in the stomach.",
        "NG tube extends into the stomach.",
    ),
    "cvc": (
        "{side} internal jugular central venous catheter terminates in the {svc}.",
        "{side} PICC line tip is in the {svc}.",
        "{side} subclavian line ends in the {svc}.",
    ),
    "pm": (
        "{side}-sided pacemaker with leads in the right atrium and right ventricle.",
        "Dual-chamber pacemaker leads terminate in the right atrium and right ventricle.",
    ),
    "ct": (
        "{side} chest tube in place.",
        "{side} basilar chest tube remains in place.",
    ),
    "valve": ("Median sternotomy wires and prosthetic valve are noted.",),
}
DEVICE_NOUNS: dict[str, str] = {
    "ett": "endotracheal tube", "ng": "nasogastric tube", "cvc": "central line",
    "pm": "pacemaker", "ct": "chest tube", "valve": "prosthetic valve",
}
DEVICE_GENERIC: tuple[str, ...] = (
    "Lines and tubes are in standard position.",
    "Support devices are unchanged in position.",
)

# Sentences naming no CheXpert observation; each lists the codes whose positive or
# uncertain status would contradict it ("The lungs are clear." beside pneumonia).
FILLERS: tuple[tuple[str, frozenset[str]], ...] = (
    ("The lungs are clear.", frozenset({"lo", "cons", "pn", "at", "ed", "les"})),
    ("Lungs are well expanded and clear.", frozenset({"lo", "cons", "pn", "at", "ed", "les"})),
    ("The costophrenic angles are sharp.", frozenset({"pe", "po"})),
    ("No acute osseous abnormality.", frozenset({"fx"})),
    ("The pulmonary vasculature is normal.", frozenset({"ed"})),
    ("The visualized upper abdomen is unremarkable.", frozenset()),
    ("Surgical clips project over the upper abdomen.", frozenset()),
)

# Findings outside the 14 labels.  They contain words of CheXpert's "no finding" mention
# list, so a study carrying one never gets No Finding = 1.
INCIDENTAL: tuple[str, ...] = (
    "Mild degenerative changes of the thoracic spine.",
    "The lungs are hyperinflated.",
    "Calcified granuloma {in_lobe}.",
    "Atherosclerotic calcification of the aortic arch.",
    "Mild dextroscoliosis of the thoracic spine.",
    "Small hiatal hernia.",
    "Emphysema.",
)
# Knowledge-map observations outside the labels that also contribute incidental sentences.
INCIDENTAL_KNOWLEDGE: tuple[str, ...] = ("Hyperinflation", "Pneumoperitoneum")

NORMAL_IMPRESSIONS: tuple[str, ...] = (
    "No acute cardiopulmonary process.",
    "No acute cardiopulmonary abnormality.",
    "No acute intrathoracic process.",
    "Normal chest radiographs.",
    "No evidence of acute cardiopulmonary disease.",
)

# Indications never name an observation (a labeler may or may not read that section).
SYMPTOMS: tuple[str, ...] = (
    "shortness of breath", "cough", "fever", "chest pain", "dyspnea", "hypoxia", "tachycardia",
    "altered mental status", "weakness", "leukocytosis", "hemoptysis", "fatigue", "wheezing",
    "productive cough", "syncope", "abdominal pain", "desaturation", "tachypnea", "s/p fall",
    "pre-operative evaluation", "sepsis", "worsening dyspnea on exertion",
)
QUESTIONS: tuple[str, ...] = (
    "?PNA", "r/o acute process", "eval for acute cardiopulmonary process", "evaluate for interval change",
    "?acute process", "please assess", "r/o PTX",
)
DEVICE_INDICATIONS: tuple[str, ...] = (
    "s/p intubation, eval tube position", "s/p line placement", "eval NG tube placement",
)

# (description shared by the EXAMINATION line and PerformedProcedureStepDescription,
#  technique sentence, portable?)
EXAMS: tuple[tuple[str, str, bool], ...] = (
    ("CHEST (PA AND LAT)", "Chest PA and lateral", False),
    ("CHEST (PA AND LAT)", "Frontal and lateral views of the chest", False),
    ("CHEST (PRE-OP PA & LAT)", "Chest PA and lateral", False),
    ("CHEST (PORTABLE AP)", "Portable AP chest radiograph", True),
    ("CHEST (PORTABLE AP)", "AP portable upright view of the chest", True),
    ("CHEST (SINGLE VIEW)", "Single frontal view of the chest", True),
)
# Older reports title the findings with the exam; "PORTABLE" ones go with portable exams.
LEGACY_EXAM_HEADERS: tuple[str, ...] = (
    "PA AND LATERAL CHEST RADIOGRAPH", "PA AND LATERAL CHEST RADIOGRAPHS", "FRONTAL AND LATERAL CHEST RADIOGRAPHS",
    "PORTABLE AP CHEST RADIOGRAPH", "PORTABLE FRONTAL CHEST RADIOGRAPH",
)


# ---------------------------------------------------------------------------------------
# Knowledge-map signs: radiographic evidence phrases appended to positive statements.
# ---------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def knowledge_map() -> dict:
    with open(KNOWLEDGE_MAP, encoding="utf-8") as fh:
        return yaml.safe_load(fh) or {}


def _clean_sign(sign: str) -> str:
    # "(supine)", "(3 cm or smaller)": parenthetical qualifiers read badly inside a sentence.
    return re.sub(r"\s*\([^)]*\)", "", sign).strip()


@lru_cache(maxsize=1)
def evidence_signs() -> dict[str, tuple[tuple[str, tuple[str, ...], bool], ...]]:
    """Per observation code: (sign, other codes the sign mentions, blocks No Finding).

    Signs are taken from the knowledge map. Dropped: signs naming the observation itself
    ("enlarged cardiac silhouette, consistent with cardiomegaly" says it twice), signs
    naming Support Devices or Pleural Other ("Kerley B lines" would read as a device) or a
    pleural effusion (its side could contradict the effusion sentence), and negative
    phrasings ("no volume loss")."""
    out: dict[str, list[tuple[str, tuple[str, ...], bool]]] = {}
    for name, entry in knowledge_map().items():
        code = CODE_OF.get(name)
        if code is None or code in ("nf", "sd") or not isinstance(entry, dict):
            continue
        for raw in entry.get("signs", []) or []:
            sign = _clean_sign(str(raw))
            if not sign or sign.lower().startswith("no "):
                continue
            found = mentioned_observations(sign)
            others = tuple(sorted(c for c in found if c != "nf"))
            if code in found or any(c in ("sd", "po", "pe") for c in others):
                continue
            out.setdefault(code, []).append((sign, others, "nf" in found))
    return {k: tuple(v) for k, v in out.items()}


@lru_cache(maxsize=1)
def incidental_knowledge_sentences() -> tuple[str, ...]:
    """'Flattened hemidiaphragms, consistent with hyperinflation.' from the knowledge map."""
    sentences = []
    for name in INCIDENTAL_KNOWLEDGE:
        entry = knowledge_map().get(name) or {}
        for raw in entry.get("signs", []) or []:
            sign = _clean_sign(str(raw))
            if sign and not (mentioned_observations(sign) - {"nf"}):
                sentences.append(f"{sign[0].upper()}{sign[1:]}, consistent with {name.lower()}.")
    return tuple(sentences)


# ---------------------------------------------------------------------------------------
# Mention lexicon: which observations a piece of text names, by the labelers' phrase lists.
# ---------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def mention_lexicon() -> dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[re.Pattern[str], ...]]]:
    """Per code: (mention substrings, excluded substrings, NegBio include regexes).

    Both lexicons ship with the project (CheXpert's phrase lists, where ``_`` is a
    space, and NegBio's YAML whose entries may be regular expressions); a labeler may use
    either, so text is checked against both."""
    base = LEXICONS / "chexpert" / "phrases"
    negbio_path = LEXICONS / "negbio" / "chexpert_phrases.yml"
    negbio = yaml.safe_load(negbio_path.read_text(encoding="utf-8")) if negbio_path.exists() else {}
    lex = {}
    for code, name in OBS_CODES.items():
        stem = name.lower().replace(" ", "_")
        mention_file = base / "mention" / f"{stem}.txt"
        unmention_file = base / "unmention" / f"{stem}.txt"
        mentions = _read_phrases(mention_file)
        excluded = _read_phrases(unmention_file)
        regexes = []
        entry = (negbio or {}).get(name) or {}
        for pattern in entry.get("include", []) or []:
            pattern = str(pattern)
            if "\\" in pattern:  # only the regex entries add anything beyond the txt lists
                regexes.append(re.compile(pattern))
        lex[code] = (mentions, excluded, tuple(regexes))
    return lex


def _read_phrases(path) -> tuple[str, ...]:
    if not path.exists():
        return ()
    lines = path.read_text(encoding="utf-8").splitlines()
    return tuple(line.strip("\n").replace("_", " ").lower() for line in lines if line.strip())


def mentioned_observations(text: str) -> set[str]:
    """Codes of the observations whose mention phrases occur in ``text`` (lower-cased).

    'nf' is reported when a phrase of CheXpert's no-finding list occurs (emphysema,
    scoliosis ...): such text rules out No Finding = 1."""
    low = " " + text.lower() + " "
    found = set()
    for code, (mentions, excluded, regexes) in mention_lexicon().items():
        hay = low
        for phrase in excluded:
            hay = hay.replace(phrase, " ")
        if any(p in hay for p in mentions) or any(r.search(hay) for r in regexes):
            found.add(code)
    return found
