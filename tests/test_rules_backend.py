"""The rule backend: its chains pass verification on generated inputs of all five task types."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extractors.chains import verify as v
from extractors.chains.knowledge import canonical_observation, load_knowledge_map, parse_knowledge_map
from extractors.chains.rules_backend import (
    EXTRACTION_ERROR,
    RulesChainExtractor,
    extract_rules_chain,
    image_phrasing,
    sentence_spans,
)
from extractors.chains.types import LabelEvidence, MiningInput
from schemas.labels import OBSERVATIONS, TARGET_OBSERVATIONS, TEMPORAL_OBSERVATIONS

# --- a small generator of MIMIC-style reports with labels ------------------------------
POSITIVE = {
    "Enlarged Cardiomediastinum": "The cardiomediastinal silhouette is widened.",
    "Cardiomegaly": "The heart is moderately enlarged.",
    "Lung Lesion": "A 2 cm nodule is seen in the right upper lobe.",
    "Lung Opacity": "There is patchy opacity at the left lung base.",
    "Edema": "There is mild pulmonary edema with vascular congestion.",
    "Consolidation": "Consolidation in the right lower lobe shows air bronchograms.",
    "Pneumonia": "Findings are concerning for pneumonia.",
    "Atelectasis": "Linear atelectasis is seen at the lung bases.",
    "Pneumothorax": "There is a small right apical pneumothorax.",
    "Pleural Effusion": "There is blunting of the left costophrenic angle from a small pleural effusion.",
    "Fracture": "There is an old healed fracture of the left sixth rib.",
    "Support Devices": "A right PICC line terminates in the lower SVC.",
}
NEGATIVE = {"Cardiomegaly": "Heart size is normal.", "Enlarged Cardiomediastinum": "Mediastinal contours are normal."}
# Report wording that must never reach step text (the evidence quote keeps it verbatim).
PREFIXES = ["", "Compared to ___, ", "As in the prior report, ", "As discussed with Dr. ___, "]
OPTIONS_TEMPORAL = ["stable", "worsening", "improving"]


def negative_sentence(names: list[str]) -> str:
    if len(names) == 1 and names[0] in NEGATIVE:
        return NEGATIVE[names[0]]
    return "No " + " or ".join(n.lower() for n in names) + "."


def wrap_report(sentences: list[str], impression: str | None) -> tuple[str, list[tuple[int, int]]]:
    """A MIMIC-style report (lines wrapped with '\\n ', leading space); spans of each sentence."""
    text = "                                 FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n \n"
    text += " INDICATION:  ___ year old man with cough\n \n FINDINGS: \n \n "
    spans, line = [], 0
    for sentence in [*sentences, *([impression] if impression else [])]:
        if impression and sentence is impression and len(spans) == len(sentences):
            text += "\n \n IMPRESSION: \n \n "
            line = 0
        elif spans:
            text += "  "
            line += 2
        start = len(text)
        for i, word in enumerate(sentence.split(" ")):
            if i:
                if line > 55:
                    text += "\n "
                    line = 0
                else:
                    text += " "
                    line += 1
            text += word
            line += len(word)
        spans.append((start, len(text)))
    return text + "\n", spans


@st.composite
def studies(draw, require=None):
    """(report, labels) with labels that agree with the report; ``require`` forces some values."""
    values = {o: draw(st.sampled_from(["positive", "negative", "uncertain", "not_mentioned"])) for o in TARGET_OBSERVATIONS}
    values.update(require or {})
    sentences: list[str] = []
    owners: list[list[str]] = []
    negatives = [o for o, val in values.items() if val == "negative"]
    for observation, value in values.items():
        prefix = draw(st.sampled_from(PREFIXES))
        if value == "positive":
            body = POSITIVE[observation]
            sentences.append(prefix + body[0].lower() + body[1:] if prefix else body)
            owners.append([observation])
        elif value == "uncertain":
            sentences.append(f"{observation} cannot be excluded.")
            owners.append([observation])
    # Negatives: one sentence may negate two findings ("No edema or pneumothorax.").
    pair = draw(st.booleans())
    while negatives:
        group = negatives[:2] if pair and not any(n in NEGATIVE for n in negatives[:2]) else negatives[:1]
        negatives = negatives[len(group):]
        sentences.append(negative_sentence(group))
        owners.append(group)
    if not any(val in ("positive", "uncertain") for val in values.values()):
        sentences.append("No acute cardiopulmonary process.")
        owners.append(["No Finding"])
        values["No Finding"] = "positive"
    order = draw(st.permutations(range(len(sentences))))
    sentences = [sentences[i] for i in order]
    owners = [owners[i] for i in order]
    # Repeat the first sentence as the impression: a duplicated sentence must keep its offsets.
    impression = sentences[0] if draw(st.booleans()) else None
    report, spans = wrap_report(sentences, impression)
    # Labels point at the impression copy when there is one (as a labeler reading bottom-up might).
    labels = {o: LabelEvidence("not_mentioned") for o in OBSERVATIONS}
    for k, (names, span) in enumerate(zip(owners, spans)):
        if impression and k == 0:
            span = spans[-1]
        for name in names:
            labels[name] = LabelEvidence(values[name], report[span[0]:span[1]], span[0], span[1])
    return report, labels


@st.composite
def binary_items(draw):
    finding = draw(st.sampled_from(TARGET_OBSERVATIONS))
    answer = draw(st.sampled_from(["Yes", "No"]))
    report, labels = draw(studies({finding: "positive" if answer == "Yes" else draw(st.sampled_from(["negative", "not_mentioned"]))}))
    sample = dict(sample_id="b", task="binary", question=f"Does this chest X-ray show {finding.lower()}?",
                  options=["Yes", "No"], answer_letter="AB"[answer == "No"], answer_text=answer, findings=[finding],
                  answer_findings=[finding] if answer == "Yes" else [])
    return MiningInput(sample=sample, report=report, labels=labels)


@st.composite
def single_items(draw):
    answer, *distractors = draw(st.permutations(TARGET_OBSERVATIONS))[:4]
    require = {answer: "positive", **{d: draw(st.sampled_from(["negative", "not_mentioned"])) for d in distractors}}
    report, labels = draw(studies(require))
    options = draw(st.permutations([answer, *distractors]))
    sample = dict(sample_id="s", task="single", question="Which finding is in this chest X-ray?", options=options,
                  answer_letter="ABCD"[options.index(answer)], answer_text=answer, findings=options,
                  answer_findings=[answer])
    return MiningInput(sample=sample, report=report, labels=labels)


@st.composite
def multi_items(draw):
    size = draw(st.integers(2, 5))
    shuffled = draw(st.permutations(TARGET_OBSERVATIONS))
    true_set = sorted(shuffled[:size])
    # Findings outside the true set are not positive, so a wrong option is really wrong.
    require = {o: "positive" for o in true_set}
    require.update({o: draw(st.sampled_from(["negative", "not_mentioned", "uncertain"])) for o in shuffled[size:]})
    report, labels = draw(studies(require))
    wrong = [sorted(draw(st.permutations(TARGET_OBSERVATIONS))[:size]) for _ in range(3)]
    options = [", ".join(s) for s in [true_set, *wrong]]
    options = draw(st.permutations(list(dict.fromkeys(options))))
    answer = ", ".join(true_set)
    findings = list(dict.fromkeys(f for o in options for f in o.split(", ")))
    sample = dict(sample_id="m", task="multi", question="Which findings are in this chest X-ray?", options=options,
                  answer_letter="ABCD"[options.index(answer)], answer_text=answer, findings=findings,
                  answer_findings=true_set)
    return MiningInput(sample=sample, report=report, labels=labels)


@st.composite
def open_items(draw):
    report, labels = draw(studies())
    answer = [o for o in TARGET_OBSERVATIONS if labels[o].value == "positive"]
    if not answer and labels["No Finding"].value == "positive":
        answer = ["No Finding"]  # as the task builder answers a normal study
    # The task builder asks about the answer only; asking about every target is the harder case.
    findings = answer if draw(st.booleans()) else list(TARGET_OBSERVATIONS)
    sample = dict(sample_id="o", task="open", question="Which findings are in this chest X-ray?", options=[],
                  answer_letter=None, answer_text=", ".join(answer), findings=findings, answer_findings=answer)
    return MiningInput(sample=sample, report=report, labels=labels)


@st.composite
def temporal_items(draw):
    finding = draw(st.sampled_from(TEMPORAL_OBSERVATIONS))
    progression = draw(st.sampled_from(OPTIONS_TEMPORAL))
    current = draw(st.sampled_from(["positive", "negative"] if progression == "improving" else ["positive"]))
    report, labels = draw(studies({finding: current}))
    prior_report, prior_labels = draw(studies({finding: draw(st.sampled_from(["positive", "negative", "not_mentioned"]))}))
    sample = dict(sample_id="t", task="temporal", question=f"What is the progression of {finding.lower()}?",
                  options=OPTIONS_TEMPORAL, answer_letter="ABC"[OPTIONS_TEMPORAL.index(progression)],
                  answer_text=progression, findings=[finding], answer_findings=[finding])
    return MiningInput(sample=sample, report=report, labels=labels, prior_report=prior_report,
                       prior_labels=prior_labels)


def assert_accepted(item: MiningInput) -> None:
    chain = extract_rules_chain(item)
    failures = v.verify_chain(chain, item)
    assert failures == [], v.describe_failures(failures) + "\n" + chain.model_dump_json(indent=1)
    outcome = RulesChainExtractor().extract(item)
    assert outcome.accepted and outcome.sample_id == item.sample["sample_id"]
    assert (outcome.extractor, outcome.protocol, outcome.prompt_version) == ("rules", "rules", "rules-v1")
    document = v.evidence_document(item)
    for step in outcome.chain.steps:
        assert not v.leakage_reasons(step.text)
        for evidence in step.evidence:
            assert document[evidence.start:evidence.end] == evidence.quote
    assert chain.steps[-1].kind == "conclusion" and v.MIN_STEPS <= len(chain.steps) <= v.MAX_STEPS


FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(binary_items())
def test_binary_chains_verify(item):
    assert_accepted(item)


@FAST
@given(single_items())
def test_single_chains_verify(item):
    assert_accepted(item)


@FAST
@given(multi_items())
def test_multi_chains_verify(item):
    assert_accepted(item)


@FAST
@given(open_items())
def test_open_chains_verify_within_step_bounds(item):
    assert_accepted(item)
    plan = extract_rules_chain(item).steps[0]
    # The plan must not give the answer away (the task builder's open findings are the answer).
    assert plan.kind == "plan" and not any(f.lower() in plan.text.lower() for f in item.sample["answer_findings"])


@FAST
@given(temporal_items())
def test_temporal_chains_verify(item):
    assert_accepted(item)
    chain = extract_rules_chain(item)
    assert any(s.kind == "comparison" for s in chain.steps)


# --- specific behaviour ----------------------------------------------------------------
REPORT = (
    " FINDINGS: \n \n Compared to ___, there is blunting of the left costophrenic\n angle.  No pneumothorax.\n"
    " \n IMPRESSION: \n \n Small left pleural effusion, discussed with Dr. ___ at 2pm.\n"
)


def _labels(**values: tuple[str, str | None]) -> dict[str, LabelEvidence]:
    out = {o: LabelEvidence("not_mentioned") for o in OBSERVATIONS}
    for key, (value, sentence) in values.items():
        start = REPORT.index(sentence) if sentence else None
        out[key.replace("_", " ")] = LabelEvidence(value, sentence, start, start + len(sentence) if sentence else None)
    return out


def _binary(labels, finding="Pleural Effusion", answer="Yes") -> MiningInput:
    return MiningInput(sample=dict(sample_id="x", task="binary", options=["Yes", "No"], answer_letter="AB"[answer == "No"],
                                   answer_text=answer, findings=[finding], answer_findings=[]), report=REPORT, labels=labels)


def test_placeholders_stay_in_quotes_and_out_of_step_text():
    sentence = "Compared to ___, there is blunting of the left costophrenic\n angle."
    item = _binary(_labels(Pleural_Effusion=("positive", sentence)))
    outcome = RulesChainExtractor().extract(item)
    assert outcome.accepted
    observation = next(s for s in outcome.chain.steps if s.kind == "observation")
    assert observation.evidence[0].quote == sentence and "___" not in observation.text
    assert observation.text == "There is blunting of the left costophrenic angle."
    assert observation.findings[0].anatomy == "left costophrenic angle"
    interpretation = next(s for s in outcome.chain.steps if s.kind == "interpretation")
    assert interpretation.text == "Blunting of the costophrenic angle indicates pleural effusion."


def test_labels_without_sentences_fall_back_to_a_mention_sentence():
    # CheXpert CSV labels carry values but no sentences.
    item = _binary(_labels(Pleural_Effusion=("positive", None), Pneumothorax=("negative", None)))
    outcome = RulesChainExtractor().extract(item)
    assert outcome.accepted, v.describe_failures(outcome.failures)
    quotes = [e.quote for s in outcome.chain.steps for e in s.evidence]
    assert quotes == ["Small left pleural effusion, discussed with Dr. ___ at 2pm."]
    assert "discussed" not in outcome.chain.render()


def test_normal_study_without_label_sentences_cites_the_normal_sentence():
    report = " FINDINGS: \n \n Heart size is normal.  The lungs are clear.\n \n IMPRESSION: \n \n No acute\n process.\n"
    labels = {o: LabelEvidence("not_mentioned") for o in OBSERVATIONS}
    labels["No Finding"] = LabelEvidence("positive")
    labels["Cardiomegaly"] = LabelEvidence("negative")
    sample = dict(sample_id="n", task="open", options=[], answer_letter=None, answer_text="No Finding",
                  findings=["No Finding"], answer_findings=["No Finding"])
    outcome = RulesChainExtractor().extract(MiningInput(sample=sample, report=report, labels=labels))
    assert outcome.accepted, v.describe_failures(outcome.failures)
    assert [e.quote for s in outcome.chain.steps for e in s.evidence] == ["The lungs are clear."]
    assert outcome.chain.steps[-1].text == "Therefore, the finding in this chest X-ray is a normal study (no finding)."


def test_sample_contradicting_its_labels_is_rejected_with_codes():
    # The answer says Yes, the label says negative: the backend must not paper over it.
    item = _binary(_labels(Pneumothorax=("negative", "No pneumothorax.")), finding="Pneumothorax", answer="Yes")
    outcome = RulesChainExtractor().extract(item)
    assert not outcome.accepted and outcome.chain is None and outcome.raw_output
    assert v.ANSWER_MISMATCH in {f.code for f in outcome.failures}


def test_malformed_inputs_give_failures_not_exceptions():
    for item in [
        MiningInput(sample={}, report="", labels={}),
        MiningInput(sample={"sample_id": "z", "task": "single", "options": None, "findings": 3}, report=None,  # type: ignore[arg-type]
                    labels=None),  # type: ignore[arg-type]
        MiningInput(sample="nonsense", report=3, labels=[1, 2]),  # type: ignore[arg-type]
    ]:
        outcome = RulesChainExtractor().extract(item)
        assert not outcome.accepted and outcome.failures
        assert all(f.code in (*v.REASON_CODES, EXTRACTION_ERROR) for f in outcome.failures)


def test_stale_offsets_and_bogus_prior_labels_are_tolerated():
    # A temporal sample without options (the release also trains on option-free variants):
    # wrong label offsets are re-located, unreadable prior labels are ignored.
    item = MiningInput(sample={"sample_id": "z", "task": "temporal", "findings": ["Edema"], "answer_text": "stable"},
                       report="No edema.", labels={"Edema": LabelEvidence("negative", "No edema.", 50, 60)},
                       prior_report="Mild edema.", prior_labels={"Edema": "bogus"})  # type: ignore[dict-item]
    outcome = RulesChainExtractor().extract(item)
    assert outcome.accepted, v.describe_failures(outcome.failures)
    assert outcome.chain.steps[-1].text == "Therefore, the edema is stable; the answer is stable."


def test_chains_are_deterministic():
    item = _binary(_labels(Pleural_Effusion=("positive", "Small left pleural effusion, discussed with Dr. ___ at 2pm."),
                           Pneumothorax=("negative", "No pneumothorax.")))
    first = extract_rules_chain(item).model_dump_json()
    assert all(extract_rules_chain(item).model_dump_json() == first for _ in range(3))
    a, b = RulesChainExtractor().extract(item), RulesChainExtractor().extract(item)
    assert a.chain == b.chain and a.failures == b.failures


def test_image_phrasing_drops_leaking_clauses():
    assert image_phrasing(" 1. IMPRESSION: Mild edema,  as per the report.") == "Mild edema."
    assert image_phrasing("Findings discussed with Dr. ___ by telephone.") is None
    assert image_phrasing("PICC line tip in the SVC") == "PICC line tip in the SVC."


def test_sentence_spans_split_on_periods_headers_and_blank_lines():
    text = " FINDINGS: \n \n No effusion.  Mild\n edema.\n \n IMPRESSION: Normal"
    assert [text[a:b] for a, b in sentence_spans(text)] == ["FINDINGS", "No effusion.", "Mild\n edema.",
                                                            "IMPRESSION", "Normal"]


def test_knowledge_map_loads_signs_anatomy_and_cues():
    knowledge = load_knowledge_map()
    assert {canonical_observation(o) for o in TARGET_OBSERVATIONS} <= set(knowledge.observations)
    assert ("Pleural Effusion", "meniscus sign") in knowledge.findings_for_sign("A meniscus sign is seen.")
    assert knowledge.signs_in("Consolidation", "Consolidation with volume loss") == []  # "no volume loss" needs "no"
    assert knowledge.progressions_in("The effusion has decreased.") == {"improving"}
    assert canonical_observation(" pleural   EFFUSION ") == "Pleural Effusion" and canonical_observation(3) is None


def test_malformed_knowledge_entries_are_skipped():
    knowledge = parse_knowledge_map(
        "Edema: [not, a, mapping]\n"
        "pleural effusion:\n  signs: [meniscus sign, 3]\n  anatomy: costophrenic angle\n"
        "progression_cues:\n  improving: [better]\n  sideways: [odd]\n"
    )
    assert list(knowledge.observations) == ["Pleural Effusion"]
    assert knowledge.observations["Pleural Effusion"].signs == ("meniscus sign",)
    assert knowledge.observations["Pleural Effusion"].anatomy == ()
    assert knowledge.progressions_in("It got better.") == {"improving"}
    assert parse_knowledge_map("{unclosed: [").observations == {}
