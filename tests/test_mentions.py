"""Finding mentions: cue families, scope boundaries, lexicon details, offsets, bad input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extractors.mentions import (
    OTHER_FINDING,
    find_mentions,
    find_mentions_in_spans,
    findings_of,
    iter_mentions_in_spans,
    sentence_spans,
)
from schemas.labels import OBSERVATIONS

A, P, U = "absent", "present", "uncertain"

CASES = [
    # ---- negation -------------------------------------------------------------------
    ("No pneumothorax.", {"Pneumothorax": A}),
    ("There is no evidence of pneumonia.", {"Pneumonia": A}),
    ("No focal consolidation, pleural effusion, or pneumothorax.",
     {"Consolidation": A, "Pleural Effusion": A, "Pneumothorax": A}),
    ("Cardiomegaly without overt pulmonary edema.", {"Cardiomegaly": P, "Edema": A}),
    ("Negative for pneumothorax.", {"Pneumothorax": A}),
    # typographic apostrophes, as model outputs write them
    ("There isn\u2019t a distinct nodule in the left lower lobe.", {"Lung Lesion": A}),
    ("No effusion; there\u2019s a small pneumothorax.", {"Pleural Effusion": A, "Pneumothorax": P}),
    ("The lungs are free of consolidation.", {"Consolidation": A}),
    ("The lungs are clear of edema.", {"Edema": A}),
    ("Interval resolution of the left pleural effusion.", {"Pleural Effusion": A}),
    ("The previously seen pneumothorax has resolved.", {"Pneumothorax": A}),
    ("Pneumothorax is not seen.", {"Pneumothorax": A}),
    ("A pleural effusion is not identified.", {"Pleural Effusion": A}),
    ("Pneumothorax is no longer seen.", {"Pneumothorax": A}),
    ("The heart is not enlarged.", {"Cardiomegaly": A}),
    ("Heart size is normal.", {"Cardiomegaly": A}),
    ("Heart size is at the upper limits of normal.", {"Cardiomegaly": A}),
    ("Normal cardiomediastinal silhouette.", {"Enlarged Cardiomediastinum": A}),
    ("Mediastinal and hilar contours are unremarkable.", {"Enlarged Cardiomediastinum": A}),
    ("The heart size and mediastinal contours are normal.", {"Cardiomegaly": A, "Enlarged Cardiomediastinum": A}),
    ("The endotracheal tube has been removed.", {"Support Devices": A}),
    # ---- uncertainty ----------------------------------------------------------------
    ("Possible small left pleural effusion.", {"Pleural Effusion": U}),
    ("Pneumonia cannot be excluded.", {"Pneumonia": U}),
    ("Infection cannot be entirely excluded.", {"Pneumonia": U}),
    ("Pneumonia is not excluded.", {"Pneumonia": U}),
    ("Cardiac size cannot be evaluated.", {"Cardiomegaly": U}),
    ("Bibasilar opacities may represent atelectasis.", {"Lung Opacity": P, "Atelectasis": U}),
    ("Findings concerning for pneumonia.", {"Pneumonia": U}),
    ("Questionable nodule in the right upper lobe.", {"Lung Lesion": U}),
    ("Suspicious for a right upper lobe mass.", {"Lung Lesion": U}),
    ("Likely bibasilar atelectasis.", {"Atelectasis": U}),
    ("Mild interstitial edema is likely.", {"Edema": U}),
    ("Right basilar opacity could be atelectasis.", {"Lung Opacity": P, "Atelectasis": U}),
    ("Findings suggestive of mild pulmonary edema.", {"Edema": U}),
    ("Differential includes pneumonia and aspiration.", {"Pneumonia": U}),
    ("Borderline cardiomegaly.", {"Cardiomegaly": U}),
    ("Heart size is borderline.", {"Cardiomegaly": U}),
    ("Left basilar opacity, atelectasis versus pneumonia.", {"Lung Opacity": P, "Atelectasis": U, "Pneumonia": U}),
    ("Atelectasis vs. pneumonia at the left base.", {"Atelectasis": U, "Pneumonia": U}),
    ("Atelectasis or pneumonia at the left base.", {"Atelectasis": U, "Pneumonia": U}),
    ("Rule out pneumonia.", {"Pneumonia": U}),
    ("?pneumonia", {"Pneumonia": U}),
    ("Pneumothorax?", {"Pneumothorax": U}),
    ("Minimal patchy airspace disease within the lingula, may reflect atelectasis or consolidation.",
     {"Lung Opacity": P, "Atelectasis": U, "Consolidation": U}),
    # MIMIC wraps lines in the middle of a cue.
    ("Mild pulmonary edema cannot\n be excluded.", {"Edema": U}),
    # ---- scope boundaries -----------------------------------------------------------
    ("No pneumothorax but small left effusion.", {"Pneumothorax": A, "Pleural Effusion": P}),
    ("There is no pneumothorax, but there is a small left pleural effusion.",
     {"Pneumothorax": A, "Pleural Effusion": P}),
    ("No pneumothorax; small left pleural effusion persists.", {"Pneumothorax": A, "Pleural Effusion": P}),
    ("No effusion, however there is mild pulmonary edema.", {"Pleural Effusion": A, "Edema": P}),
    ("No focal consolidation although there is mild atelectasis.", {"Consolidation": A, "Atelectasis": P}),
    ("No pneumothorax following chest tube placement.", {"Pneumothorax": A, "Support Devices": P}),
    ("Possible small right pleural effusion, no pneumothorax.", {"Pleural Effusion": U, "Pneumothorax": A}),
    ("No pneumothorax, mild cardiomegaly.", {"Pneumothorax": A, "Cardiomegaly": P}),
    ("No pleural effusion which was seen on the prior study.", {"Pleural Effusion": A}),
    ("Heart size is normal with no edema.", {"Cardiomegaly": A, "Edema": A}),
    ("Left pleural effusion with adjacent atelectasis.", {"Pleural Effusion": P, "Atelectasis": P}),
    ("No focal consolidation to suggest pneumonia.", {"Consolidation": A, "Pneumonia": A}),
    ("No suspicious pulmonary nodule.", {"Lung Lesion": A}),
    ("Left lower lobe consolidation concerning for pneumonia.", {"Consolidation": P, "Pneumonia": U}),
    # ---- pseudo-negation and stated presence ----------------------------------------
    ("No change in the large right pleural effusion.", {"Pleural Effusion": P}),
    ("Stable moderate cardiomegaly.", {"Cardiomegaly": P}),
    ("Unchanged small left pleural effusion.", {"Pleural Effusion": P}),
    ("Findings are consistent with pulmonary edema.", {"Edema": P}),
    ("Left lower lobe opacity consistent with pneumonia.", {"Lung Opacity": P, "Pneumonia": P}),
    ("There is a small right pneumothorax.", {"Pneumothorax": P}),
    ("No pleural effusion is present.", {"Pleural Effusion": A}),
    ("No pneumothorax is seen.", {"Pneumothorax": A}),
    # ---- lexicon details ------------------------------------------------------------
    ("Small pericardial effusion.", {}),
    ("Plate-like atelectasis at the left base.", {"Atelectasis": P}),
    ("Kerley B lines are present.", {}),
    ("Mild hydropneumothorax.", {"Pneumothorax": P}),
    ("History of tuberculosis.", {}),
    ("The heart size is stable.", {}),
    ("The mediastinum is widened.", {"Enlarged Cardiomediastinum": P}),
    ("Severe enlargement of the cardiac silhouette.", {"Cardiomegaly": P}),
    ("Right PICC line tip in the SVC.", {"Support Devices": P}),
    ("Left pleural scarring.", {"Pleural Other": P}),
    ("Calcified nodule in the left upper lobe.", {}),
    ("Healed left rib fractures.", {"Fracture": P}),
    ("Collapse of the right middle lobe.", {"Atelectasis": P}),
]


@pytest.mark.parametrize("sentence,expected", CASES, ids=[c[0][:50] for c in CASES])
def test_sentence_statuses(sentence: str, expected: dict[str, str]) -> None:
    got = findings_of(find_mentions(sentence), observations=OBSERVATIONS)
    assert got == expected


def test_case_count_covers_the_brief() -> None:
    assert len(CASES) >= 40


def test_other_findings_are_reported_separately() -> None:
    mentions = find_mentions("Emphysema. Mild degenerative changes of the spine.")
    assert {m.observation for m in mentions} == {OTHER_FINDING}
    assert all(m.status == "present" for m in mentions)


def test_cue_and_phrase_are_reported() -> None:
    (m,) = find_mentions("Trace left effusion cannot be entirely excluded.")
    assert (m.status, m.cue, m.phrase) == ("uncertain", "cannot be entirely excluded", "effusion")
    (m,) = find_mentions("No evidence of atelectasis.")
    # Prefix phrases ("atelecta") are reported as the whole word.
    assert (m.cue, m.phrase) == ("no evidence of", "atelectasis")
    (m,) = find_mentions("Small left pneumothorax.")
    assert m.cue is None


@pytest.mark.parametrize("sentence,anatomy", [
    ("Right lower lobe consolidation.", "right lower lobe"),
    ("Large left pleural effusion.", "left"),
    ("Mild bibasilar atelectasis.", "bibasilar"),
    ("Opacity in the lingula.", "lingula"),
    ("Blunting of the right costophrenic angle, consistent with effusion.", None),
    ("Pneumothorax.", None),
])
def test_anatomy(sentence: str, anatomy: str | None) -> None:
    mentions = [m for m in find_mentions(sentence) if m.observation != OTHER_FINDING]
    assert mentions[0].anatomy == anatomy


def test_offsets_index_the_text_with_base_offset() -> None:
    text = " FINDINGS:\n \n No pleural\n effusion.  Mild pulmonary edema cannot\n be excluded.\n"
    for base in (0, 100):
        mentions = find_mentions(text, base_offset=base)
        assert [m.observation for m in mentions] == ["Pleural Effusion", "Edema"]
        for m in mentions:
            assert text[m.start - base:m.end - base] == m.phrase
            assert text[m.sentence_start - base:m.sentence_end - base] == m.sentence
    assert mentions[0].sentence == "No pleural\n effusion."


def test_spans_of_one_report() -> None:
    text = "INDICATION: r/o pneumonia.\nFINDINGS: No effusion.\nIMPRESSION: Small pneumothorax."
    f0 = text.index("No effusion")
    i0 = text.index("Small")
    mentions = find_mentions_in_spans(text, [(f0, text.index("\nIMPRESSION")), (i0, len(text)), (-5, 0), (90, 999)])
    assert [(m.observation, m.status) for m in mentions] == [("Pleural Effusion", A), ("Pneumothorax", P)]
    assert all(text[m.start:m.end] == m.phrase for m in mentions)


def test_iter_mentions_keeps_order_and_survives_bad_items() -> None:
    items = [("No effusion.", [(0, 12)]), (None, [(0, 3)]), ("Edema.", []), ("Edema.", [(0, 6)])]
    out = list(iter_mentions_in_spans(items, chunk=2))
    assert [[m.observation for m in ms] for ms in out] == [["Pleural Effusion"], [], [], ["Edema"]]


def test_sentences_break_at_blank_lines_headers_and_not_at_vs() -> None:
    text = "FINDINGS: Effusion\n\nIMPRESSION: atelectasis vs. pneumonia. 2. Edema."
    sentences = [text[s:e] for s, e in sentence_spans(text)]
    assert sentences == ["FINDINGS:", "Effusion", "IMPRESSION:", "atelectasis vs. pneumonia.", "Edema."]


def test_question_marks_end_questions_but_not_hedges() -> None:
    text = "Is there an effusion? No. Eval ?PNA today."
    assert [text[s:e] for s, e in sentence_spans(text)] == ["Is there an effusion?", "No.", "Eval ?PNA today."]
    got = [(m.status, m.sentence) for m in find_mentions("Pneumothorax? No pneumothorax is seen.")]
    assert got == [("uncertain", "Pneumothorax?"), ("absent", "No pneumothorax is seen.")]


# ---- expand_normals: free-text reasoning ----------------------------------------------

def test_expand_normals_reads_clear_lungs() -> None:
    text = "The lungs are clear."
    assert find_mentions(text) == []
    got = findings_of(find_mentions(text, expand_normals=True))
    assert got == {o: A for o in ("Lung Opacity", "Consolidation", "Pneumonia", "Edema", "Atelectasis")}


def test_expand_normals_never_overrides_an_explicit_mention() -> None:
    got = findings_of(find_mentions("The lungs are clear except for left basilar atelectasis.", expand_normals=True))
    assert got["Atelectasis"] == P and got["Consolidation"] == A
    assert find_mentions("The lungs are not clear.", expand_normals=True) == []


@pytest.mark.parametrize("sentence,expected", [
    ("No acute cardiopulmonary process.", {o: A for o in ("Lung Opacity", "Consolidation", "Pneumonia", "Edema",
                                                            "Pleural Effusion", "Pneumothorax")}),
    ("Heart is normal in size.", {"Cardiomegaly": A}),
    ("Normal heart size and unremarkable mediastinum.", {"Cardiomegaly": A, "Enlarged Cardiomediastinum": A}),
    ("The costophrenic angles are sharp.", {"Pleural Effusion": A}),
    ("No acute osseous abnormality.", {"Fracture": A}),
    ("I see an enlarged heart with small bilateral effusions.", {"Cardiomegaly": P, "Pleural Effusion": P}),
])
def test_expand_normals_paraphrases(sentence: str, expected: dict[str, str]) -> None:
    assert findings_of(find_mentions(sentence, expand_normals=True), observations=OBSERVATIONS) == expected


# ---- bad input --------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [None, 123, b"no effusion", "", "   \n\t ", "?", ".....", "İİİ no effusion İ"])
def test_bad_input_never_crashes(bad) -> None:
    mentions = find_mentions(bad)  # type: ignore[arg-type]
    assert isinstance(mentions, list)
    if isinstance(bad, str):
        for m in mentions:
            assert bad[m.start:m.end] == m.phrase


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["no ", "effusion", "pneumothorax", "the heart", " size", ",", ";", ".", "\n",
                                  "?", "İ", "-", "  ", "\n \n", " not ", "may", " clear", "lungs", " ", "vs."]),
                max_size=40).map("".join))
def test_offsets_hold_on_arbitrary_text(text: str) -> None:
    for m in find_mentions(text, expand_normals=True):
        assert text[m.start:m.end] == m.phrase
        assert text[m.sentence_start:m.sentence_end] == m.sentence
        assert m.sentence_start <= m.start < m.end <= m.sentence_end
