"""Real report language: every sentence quoted in the issue "Real report language" (and the
reading defects of the RadRScore issue) with its expected status, property tests of the
reader, and the reader scored on the shared real data (IU/Open-i development half, NegEx).

Expected statuses are written from the sentence's meaning, not from the reader's output.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extractors.labeler import label_report
from extractors.mentions import OTHER_FINDING, find_mentions, findings_of, status_of_span, statuses_of_spans
from schemas.labels import OBSERVATIONS

A, P, U = "absent", "present", "uncertain"
REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"

ISSUE_SENTENCES = [
    # negation scope over a coordinated list; a hedge word inside the list is part of it
    ("No focal consolidation, large pleural effusion, or pneumothorax is identified.",
     {"Consolidation": A, "Pleural Effusion": A, "Pneumothorax": A}),
    ("No focal consolidation, suspicious pulmonary opacity, pleural effusion, or pneumothorax.",
     {"Consolidation": A, "Lung Opacity": A, "Pleural Effusion": A, "Pneumothorax": A}),
    ("Question small right pleural effusion.", {"Pleural Effusion": U}),
    ("There may also be small bilateral pleural effusion.", {"Pleural Effusion": U}),
    ("Does not appear to be a hydropneumothorax", {"Pneumothorax": A}),
    ("The lungs do not demonstrate focal infiltrate or effusion.", {"Lung Opacity": A, "Pleural Effusion": A}),
    # a statement about a test, not the patient; other body parts; other words that collide
    ("CT scan is more sensitive in detecting small nodules.", {}),
    ("Soft tissue edema of the ankle.", {}),
    ("Status post lumpectomy.", {}),
    # the RadRScore issue's reading defects (model reasoning)
    ("These findings support the diagnosis of pneumonia.", {"Pneumonia": P}),
    ("The heart size is normal, ruling out cardiomegaly.", {"Cardiomegaly": A}),
    ("Pneumonia is unlikely.", {"Pneumonia": A}),  # NegBio reads "unlikely" as negation
    ("Pneumonia is less likely.", {"Pneumonia": U}),
    ("Pleural effusion is excluded.", {"Pleural Effusion": A}),
    ("Pleural effusion: not present.", {"Pleural Effusion": A}),
    ("The chest X-ray does not show signs of pneumothorax.", {"Pneumothorax": A}),
    ("There isn't any obvious sign of pneumothorax.", {"Pneumothorax": A}),
    ("The image doesn't show a pleural effusion.", {"Pleural Effusion": A}),
    ("Pneumothorax appears as a visible pleural line with absent lung markings.", {}),
    ("**Pneumothorax**:", {}),
    # a new assertion after a comma is not negated; a hedge after a comma stays a hedge
    ("No pneumothorax, small left pleural effusion.", {"Pneumothorax": A, "Pleural Effusion": P}),
    ("No pneumothorax, possible small effusion.", {"Pneumothorax": A, "Pleural Effusion": U}),
    ("No evidence of pulmonary consolidation, large pleural effusion/pneumothorax.",
     {"Consolidation": A, "Pleural Effusion": A, "Pneumothorax": A}),
    ("Consolidation, atelectasis, and blunting in the left lower lobe have cleared in the interval.",
     {"Consolidation": A, "Atelectasis": A}),
    ("Findings are nonspecific, but may represent subsegmental atelectasis versus mild interstitial edema "
     "or an atypical infectious process.", {"Atelectasis": U, "Edema": U, "Pneumonia": U}),
    ("Please correlate clinically for pneumonia.", {"Pneumonia": U}),
    ("Pneumonia is in the differential.", {"Pneumonia": U}),
    ("There is a 9 mm nodule that is not definitively calcified.", {"Lung Lesion": P}),
    ("Right elbow: no fracture or joint effusion.", {"Fracture": A}),
    ("Mild degenerative endplate changes.", {OTHER_FINDING: P}),
]


@pytest.mark.parametrize("sentence,expected", ISSUE_SENTENCES, ids=[s[:48] for s, _ in ISSUE_SENTENCES])
def test_issue_sentences_read_as_they_mean(sentence: str, expected: dict[str, str]) -> None:
    # Other findings ("calcified", "blunting") are compared only where the case names them.
    wanted = [*OBSERVATIONS, *expected]
    got = findings_of(find_mentions(sentence, expand_normals=False), observations=wanted)
    assert got == expected


def test_endplate_is_bone_not_a_device_and_degenerative_spine_blocks_no_finding() -> None:
    """CheXpert's no-finding list names "degenera-": a degenerative spine is an other finding, so
    No Finding stays blank (Open-i's gold agrees: 149 of 154 dev reports whose only finding is
    degenerative are not "normal"). The endplate is not a plate."""
    labels = label_report("Mild degenerative change of the thoracic spine. Mild degenerative endplate changes.")
    assert labels["Support Devices"].value == "not_mentioned"
    assert labels["No Finding"].value == "not_mentioned"


def test_status_of_any_named_target() -> None:
    s = "Extremities reveal no peripheral cyanosis or EDEMA."
    assert status_of_span(s, s.index("EDEMA"), len(s) - 1) == "absent"
    s2 = "He did have some left-sided weakness although that seemed to have resolved."
    assert status_of_span(s2, s2.index("left"), s2.index(" although")) == "present"
    s3 = "If pneumonia is suspected, obtain a lateral view."
    assert status_of_span(s3, s3.index("pneumonia"), s3.index(" is")) is None  # hypothetical: no claim
    with pytest.raises(ValueError):
        status_of_span("short", 3, 99)
    assert statuses_of_spans([]) == []


# ---- properties ---------------------------------------------------------------------------

SINGLE = [("pneumothorax", "Pneumothorax"), ("pleural effusion", "Pleural Effusion"),
          ("focal consolidation", "Consolidation"), ("cardiomegaly", "Cardiomegaly"),
          ("pulmonary edema", "Edema"), ("atelectasis", "Atelectasis"), ("pneumonia", "Pneumonia"),
          ("pulmonary nodule", "Lung Lesion"), ("rib fracture", "Fracture")]
MODIFIERS = ["", "small ", "mild ", "left ", "right-sided ", "new ", "moderate ", "bibasilar "]
TAILS = ["", " is seen", " is identified", " is present", " on the left", " at the base"]


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(SINGLE), st.sampled_from(MODIFIERS), st.sampled_from(TAILS))
def test_prefixing_no_never_leaves_a_single_finding_positive(pair, modifier, tail) -> None:
    phrase, observation = pair
    affirmed = f"There is {modifier}{phrase}{tail}."
    assert findings_of(find_mentions(affirmed), [observation]) == {observation: P}
    negated = f"No {modifier}{phrase}{tail}."
    assert findings_of(find_mentions(negated), [observation]).get(observation) == A


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(SINGLE), min_size=2, max_size=4, unique=True), st.sampled_from(MODIFIERS))
def test_a_negated_disjunctive_list_negates_every_item(items, modifier) -> None:
    """"No A, <modifier> B, or C": every item absent, whatever modifier opens an item."""
    phrases = [p for p, _ in items]
    listed = ", ".join(phrases[:-1]) + f", or {phrases[-1]}"
    listed = listed.replace(phrases[1], modifier + phrases[1], 1)
    got = findings_of(find_mentions(f"No {listed}."), [o for _, o in items])
    assert got == {o: A for _, o in items}


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(SINGLE), st.sampled_from(SINGLE), st.sampled_from(["small", "mild", "moderate", "large"]))
def test_a_new_assertion_after_a_comma_is_not_negated(first, second, severity) -> None:
    if first[1] == second[1]:
        return
    got = findings_of(find_mentions(f"No {first[0]}, {severity} {second[0]}."), [first[1], second[1]])
    assert got == {first[1]: A, second[1]: P}


# ---- the shared real data -------------------------------------------------------------------

needs_real = pytest.mark.skipif(not (REAL / "iu-xray" / "openi_gold_dev.csv").exists(),
                                reason="shared/data/real is not beside this checkout")


@needs_real
def test_iu_development_half_meets_the_floors() -> None:
    from extractors import real_text as rt

    gold = rt.read_openi_gold(REAL / "iu-xray" / "openi_gold_dev.csv")
    assert len(gold) == 1924
    result = rt.score_iu(rt.read_iu_reports(REAL / "iu-xray" / "indiana_reports.csv", gold), gold)
    assert result.studies == 1924
    assert result.macro_agreeing >= 0.85
    assert min(result.score(o).f1 for o in rt.AGREEING) >= 0.75
    assert result.micro()[2] >= 0.87
    # Mass and Nodule both map to Lung Lesion: either column positive counts
    assert result.score("Lung Lesion").gold_positive == 53


@needs_real
def test_negex_sentences_read_better_than_medspacy_context() -> None:
    from extractors import real_text as rt

    items = rt.read_negex(REAL / "negex" / "rsAnnotations-1-120-random.txt")
    assert len(items) == 2376 and sum(i.negated for i in items) == 491
    ours = rt.score_negex("radchain", items, rt.radchain_negated)
    assert ours.accuracy >= 0.95 and ours.f1 >= 0.94


@needs_real
def test_the_verifier_rejects_every_step_that_claims_a_finding_its_negated_quote_denies() -> None:
    from extractors import real_text as rt

    reports = rt.read_iu_reports(REAL / "iu-xray" / "indiana_reports.csv")[:800]
    result = rt.verifier_polarity_on(reports)
    assert result.steps > 100 and result.accepted == 0


# ---- language check ------------------------------------------------------------------------

@pytest.mark.parametrize("text,english", [
    ("No pneumothorax. No cardiomegaly. No acute osseous abnormality. No acute cardiopulmonary process.", True),
    ("XXXX change. No active cardiopulmonary disease. Thoracolumbar scoliosis.", True),
    ("Mild cardiomegaly. Small left effusion.", True),
    ("Normal.", True),
    ("Kein Pleuraerguss. Herz normal gross. Lunge beidseits belueftet. Kein Nachweis einer Pneumonie.", False),
    ("No hay derrame pleural. Corazon de tamano normal. Sin signos de neumonia.", False),
    ("Pas d'épanchement pleural. Cœur de taille normale. Aucun signe de pneumopathie.", False),
    ("Sem derrame pleural. Coração de tamanho normal. Sem sinais de pneumonia.", False),
    ("无气胸。心脏大小正常。未见胸腔积液。无肺炎征象。", False),
    ("Нет пневмоторакса. Сердце нормальных размеров.", False),
])
def test_language_is_judged_on_words_that_carry_meaning(text: str, english: bool) -> None:
    from extractors.language import looks_english

    assert looks_english(text) is english


@needs_real
def test_no_real_english_report_is_taken_for_another_language() -> None:
    from extractors import real_text as rt
    from extractors.language import looks_english

    reports = rt.read_iu_reports(REAL / "iu-xray" / "indiana_reports.csv")
    assert len(reports) == 3851
    assert [r.uid for r in reports if not looks_english(r.text)] == []
