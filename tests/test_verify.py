"""Deterministic chain verification: one failing chain per reason code, offsets, speed, robustness."""

from __future__ import annotations

import dataclasses
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extractors.chains import verify as v
from extractors.chains.types import LabelEvidence, MiningInput
from schemas.chains import Evidence, ReasoningChain, ReasoningStep, StepFinding
from schemas.labels import OBSERVATIONS

# A MIMIC-style report: leading spaces, wrapped lines ("\n "), a PHI placeholder, and a
# sentence that occurs twice (findings and impression).
REPORT = (
    "                                 FINAL REPORT\n"
    " EXAMINATION:  CHEST (PA AND LAT)\n \n"
    " INDICATION:  ___ year old woman with dyspnea\n \n"
    " FINDINGS: \n \n"
    " Large left pleural effusion is new.  Small\n right effusion is new.  There is no\n pneumothorax.  The heart\n"
    " size is normal.  Possible right basilar atelectasis.\n \n"
    " IMPRESSION: \n \n"
    " Large left pleural effusion is new.\n"
)
PRIOR = " FINDINGS: \n \n Small left pleural effusion.  No pneumothorax.\n"


def label(value: str, sentence: str | None = None, text: str = REPORT, occurrence: int = 0) -> LabelEvidence:
    if sentence is None:
        return LabelEvidence(value)
    start = -1
    for _ in range(occurrence + 1):
        start = text.index(sentence, start + 1)
    return LabelEvidence(value, sentence, start, start + len(sentence))


def labels(**overrides: LabelEvidence) -> dict[str, LabelEvidence]:
    out = {o: LabelEvidence("not_mentioned") for o in OBSERVATIONS}
    out.update({k.replace("_", " "): val for k, val in overrides.items()})
    return out


LABELS = labels(
    Pleural_Effusion=label("positive", "Large left pleural effusion is new."),
    Pneumothorax=label("negative", "There is no\n pneumothorax."),
    Cardiomegaly=label("negative", "The heart\n size is normal."),
    Atelectasis=label("uncertain", "Possible right basilar atelectasis."),
)


def binary_item(answer: str = "Yes", finding: str = "Pleural Effusion", **kw) -> MiningInput:
    sample = dict(
        sample_id="s-bin", task="binary", question=f"Does this chest X-ray show {finding.lower()}?",
        options=["Yes", "No"], answer_letter="A" if answer == "Yes" else "B", answer_text=answer,
        findings=[finding], answer_findings=[finding] if answer == "Yes" else [],
    )
    return MiningInput(sample=sample, report=kw.pop("report", REPORT), labels=kw.pop("labels", LABELS), **kw)


def step(kind: str, text: str, findings=(), quotes=()) -> ReasoningStep:
    return ReasoningStep(
        kind=kind, text=text,
        findings=[StepFinding(observation=o, status=s) for o, s in findings],
        evidence=[Evidence(quote=q) for q in quotes],
    )


def good_binary_chain() -> ReasoningChain:
    return ReasoningChain(steps=[
        step("plan", "Examine the chest X-ray for signs of pleural effusion."),
        step("observation", "A large left pleural effusion is seen.", [("Pleural Effusion", "present")],
             ["Large left pleural effusion is new."]),
        step("interpretation", "Opacity obscuring the left costophrenic angle indicates pleural effusion.",
             [("Pleural Effusion", "present")]),
        step("conclusion", "Therefore, there is a pleural effusion; the answer is A) Yes.",
             [("Pleural Effusion", "present")]),
    ])


def codes(chain: ReasoningChain, item: MiningInput) -> list[str]:
    return [f.code for f in v.verify_chain(chain, item)]


def with_step(chain: ReasoningChain, index: int, new: ReasoningStep) -> ReasoningChain:
    steps = list(chain.steps)
    steps[index] = new
    return ReasoningChain(steps=steps)


def test_well_formed_chain_passes():
    assert v.verify_chain(good_binary_chain(), binary_item()) == []


# --- one failing chain per reason code -------------------------------------------------
def _failing_cases():
    base = good_binary_chain()
    obs_step = base.steps[1]
    yield "EVIDENCE_NOT_FOUND", with_step(base, 1, obs_step.model_copy(
        update={"evidence": [Evidence(quote="Massive right pleural effusion.")]})), binary_item()
    yield "OBSERVATION_WITHOUT_EVIDENCE", with_step(base, 1, obs_step.model_copy(update={"evidence": []})), binary_item()
    yield "STATUS_CONTRADICTS_LABEL", ReasoningChain(steps=[
        *base.steps[:2],
        step("observation", "The heart is enlarged.", [("Cardiomegaly", "present")],
             ["year old woman with dyspnea"]),  # a quote that names no finding: only the label disagrees
        base.steps[3]]), binary_item()
    # In the report, and true, but about another finding than the one the step states.
    yield "EVIDENCE_OFF_TOPIC", ReasoningChain(steps=[
        *base.steps[:2],
        step("observation", "There is no pneumothorax.", [("Pneumothorax", "absent")],
             ["Large left pleural effusion is new."]),
        base.steps[3]]), binary_item()
    # The label source (e.g. a CSV) says pneumothorax; the quoted sentence says there is none.
    csv_disagrees = binary_item()
    csv_disagrees = dataclasses.replace(
        csv_disagrees, labels={**csv_disagrees.labels, "Pneumothorax": label("positive", "There is no\n pneumothorax.")})
    yield "EVIDENCE_CONTRADICTS_FINDING", ReasoningChain(steps=[
        *base.steps[:2],
        step("observation", "There is a pneumothorax.", [("Pneumothorax", "present")], ["There is no pneumothorax."]),
        base.steps[3]]), csv_disagrees
    yield "ANSWER_MISMATCH", with_step(base, 3, step(
        "conclusion", "Therefore, the answer is B) No.", [("Pleural Effusion", "present")])), binary_item()
    yield "NO_CONCLUSION", ReasoningChain(steps=base.steps[:3]), binary_item()
    yield "OPTION_NOT_ADDRESSED", ReasoningChain(steps=[
        base.steps[0], base.steps[1].model_copy(update={"findings": []}),
        base.steps[3].model_copy(update={"findings": []})]), binary_item()
    yield "LEAKAGE", with_step(base, 1, obs_step.model_copy(
        update={"text": "The report states a large left pleural effusion."})), binary_item()
    yield "TOO_FEW_STEPS", ReasoningChain(steps=[base.steps[3]]), binary_item()
    yield "TOO_MANY_STEPS", ReasoningChain(steps=[base.steps[0]] * v.MAX_STEPS + base.steps[1:]), binary_item()
    yield "STEP_TOO_LONG", with_step(base, 2, base.steps[2].model_copy(
        update={"text": "Pleural effusion blunts the angle. " * 15})), binary_item()
    yield "CHAIN_TOO_LONG", ReasoningChain(steps=[
        base.steps[0], *[base.steps[2].model_copy(update={"text": "x" * 390})] * 10, *base.steps[1:]]), binary_item()
    yield "STEP_EMPTY", with_step(base, 2, base.steps[2].model_copy(update={"text": "   "})), binary_item()
    yield "UNKNOWN_OBSERVATION", with_step(base, 2, step(
        "interpretation", "This suggests a hiatal hernia.", [("Hiatal Hernia", "present")])), binary_item()
    yield "UNKNOWN_TASK", base, MiningInput(sample={**binary_item().sample, "task": "vqa"}, report=REPORT, labels=LABELS)
    temporal = temporal_item("worsening")
    yield "TEMPORAL_NO_COMPARISON", ReasoningChain(steps=[
        s for s in good_temporal_chain().steps if s.kind != "comparison"]), temporal


@pytest.mark.parametrize("code", [c for c in v.REASON_CODES])
def test_each_reason_code_has_a_failing_chain(code):
    cases = {c: (chain, item) for c, chain, item in _failing_cases()}
    chain, item = cases[code]
    failures = v.verify_chain(chain, item)
    found = {f.code for f in failures}
    # Each case breaks exactly one rule (a chain over the character budget also has many steps).
    assert found == ({code, v.TOO_MANY_STEPS} if code == v.CHAIN_TOO_LONG else {code}), v.describe_failures(failures)


def test_an_empty_plan_is_tolerated_but_not_counted():
    base = good_binary_chain()
    empty_plan = base.steps[0].model_copy(update={"text": " "})
    assert codes(with_step(base, 0, empty_plan), binary_item()) == []
    assert codes(ReasoningChain(steps=[empty_plan, base.steps[3]]), binary_item()) == [v.TOO_FEW_STEPS]


def test_failures_carry_step_index_and_detail():
    chain = with_step(good_binary_chain(), 1, good_binary_chain().steps[1].model_copy(
        update={"evidence": [Evidence(quote="Massive right pleural effusion.")]}))
    (failure,) = [f for f in v.verify_chain(chain, binary_item()) if f.code == v.EVIDENCE_NOT_FOUND]
    assert failure.step_index == 1 and "Massive right" in failure.detail
    assert "EVIDENCE_NOT_FOUND (step 1)" in v.describe_failures([failure])


# --- evidence grounding ----------------------------------------------------------------
def test_ground_evidence_maps_wrapped_quotes_back_to_exact_offsets():
    chain = ReasoningChain(steps=[
        step("observation", "A small right effusion.", [("Pleural Effusion", "present")],
             ["Small right effusion is new", "there is no pneumothorax."]),
    ])
    grounded = v.ground_evidence(chain, binary_item())
    first, second = grounded.steps[0].evidence
    assert REPORT[first.start:first.end] == first.quote == "Small\n right effusion is new"
    assert REPORT[second.start:second.end] == second.quote == "There is no\n pneumothorax."
    assert chain.steps[0].evidence[0].start is None  # the input chain is left untouched


def test_ground_evidence_keeps_valid_offsets_of_a_repeated_sentence():
    sentence = "Large left pleural effusion is new."
    second = REPORT.index(sentence, REPORT.index(sentence) + 1)
    chain = ReasoningChain(steps=[step("observation", "Effusion.", quotes=[sentence])])
    chain.steps[0].evidence[0] = Evidence(quote=sentence, start=second, end=second + len(sentence))
    assert v.ground_evidence(chain, binary_item()).steps[0].evidence[0].start == second
    chain.steps[0].evidence[0] = Evidence(quote=sentence, start=3, end=9)  # wrong offsets are replaced
    assert v.ground_evidence(chain, binary_item()).steps[0].evidence[0].start == REPORT.index(sentence)


def test_unfound_and_too_short_quotes_stay_ungrounded():
    chain = ReasoningChain(steps=[step("observation", "x", quotes=["no", "Massive effusion", "right effusi"])])
    grounded = v.ground_evidence(chain, binary_item())
    assert [(e.start, e.end) for e in grounded.steps[0].evidence] == [(None, None)] * 3  # "effusi" not a word end


def test_trailing_period_and_case_are_tolerated():
    assert v.locate_quote("large LEFT pleural effusion is new.", REPORT) == (145, 180) == (
        REPORT.index("Large left"), REPORT.index("Large left") + 35)
    assert v.locate_quote("No acute process.", " IMPRESSION: No acute process\n") == (13, 29)  # period not in text
    start, end = v.locate_quote("the heart size is normal.", REPORT)
    assert REPORT[start:end] == "The heart\n size is normal."


# --- temporal: prior quotes, progression ----------------------------------------------
def temporal_item(progression: str, prior_report: str = PRIOR) -> MiningInput:
    options = ["stable", "worsening", "improving"]
    sample = dict(
        sample_id="s-tmp", task="temporal", question="What is the progression of pleural effusion?",
        options=options, answer_letter="ABC"[options.index(progression)], answer_text=progression,
        findings=["Pleural Effusion"], answer_findings=["Pleural Effusion"],
    )
    prior_labels = labels(Pleural_Effusion=label("positive", "Small left pleural effusion.", PRIOR))
    return MiningInput(sample=sample, report=REPORT, labels=LABELS, prior_report=prior_report,
                       prior_labels=prior_labels)


def good_temporal_chain() -> ReasoningChain:
    return ReasoningChain(steps=[
        step("plan", "Compare the prior and the current image for pleural effusion."),
        step("observation", "On the prior image, a small left pleural effusion.", [("Pleural Effusion", "present")],
             ["Small left pleural effusion."]),
        step("observation", "On the current image, a large left pleural effusion.", [("Pleural Effusion", "present")],
             ["Large left pleural effusion is new."]),
        step("comparison", "Compared with the prior image, the effusion has worsened.",
             [("Pleural Effusion", "present")]),
        step("conclusion", "Therefore, the pleural effusion is worsening; the answer is B) worsening.",
             [("Pleural Effusion", "present")]),
    ])


def test_temporal_chain_passes_and_prior_quotes_use_shifted_offsets():
    item = temporal_item("worsening")
    assert v.verify_chain(good_temporal_chain(), item) == []
    grounded = v.ground_evidence(good_temporal_chain(), item)
    prior_ev = grounded.steps[1].evidence[0]
    assert prior_ev.start >= len(REPORT) + 1 == v.prior_offset(item)
    assert v.evidence_document(item)[prior_ev.start:prior_ev.end] == prior_ev.quote
    assert PRIOR[prior_ev.start - v.prior_offset(item):prior_ev.end - v.prior_offset(item)] == prior_ev.quote
    assert v.evidence_source(prior_ev, item) == "prior_report"
    assert v.evidence_source(grounded.steps[2].evidence[0], item) == "report"


def test_prior_quotes_are_not_evidence_outside_the_temporal_task():
    chain = with_step(good_binary_chain(), 1, good_binary_chain().steps[1].model_copy(
        update={"evidence": [Evidence(quote="Small left pleural effusion.")]}))
    item = binary_item(prior_report=PRIOR)
    assert v.EVIDENCE_NOT_FOUND in codes(chain, item)


def test_prior_steps_are_checked_against_prior_labels():
    # The prior image had an effusion; stating it absent there contradicts the prior labels.
    chain = with_step(good_temporal_chain(), 1, step(
        "observation", "On the prior image, no effusion.", [("Pleural Effusion", "absent")],
        ["Small left pleural effusion."]))
    failures = v.verify_chain(chain, temporal_item("worsening"))
    # the quote itself says "effusion" too, so the step also contradicts its own evidence
    assert sorted(f.code for f in failures) == [v.EVIDENCE_CONTRADICTS_FINDING, v.STATUS_CONTRADICTS_LABEL]
    assert "prior" in next(f.detail for f in failures if f.code == v.STATUS_CONTRADICTS_LABEL)


def test_comparison_contradicting_the_progression_is_a_mismatch():
    item = temporal_item("improving")
    chain = with_step(good_temporal_chain(), 4, step(
        "conclusion", "Therefore, the effusion is improving; the answer is C) improving.",
        [("Pleural Effusion", "present")]))
    assert codes(chain, item) == [v.ANSWER_MISMATCH]  # the comparison still says "worsened"


# --- statuses and evidence requirements ------------------------------------------------
@pytest.mark.parametrize("status, ok", [("uncertain", True), ("present", False), ("absent", False)])
def test_uncertain_labels_accept_only_uncertain_statements(status, ok):
    chain = ReasoningChain(steps=[
        *good_binary_chain().steps[:2],
        step("observation", "Possible right basilar atelectasis.", [("Atelectasis", status)],
             ["Possible right basilar atelectasis."]),
        good_binary_chain().steps[3],
    ])
    assert (codes(chain, binary_item()) == []) is ok


def test_unmentioned_absent_needs_no_quote_but_negatives_do():
    base = good_binary_chain()
    unmentioned = step("observation", "There is no sign of fracture or edema.", [("Fracture", "absent"), ("Edema", "absent")])
    assert codes(ReasoningChain(steps=[*base.steps[:3], unmentioned, base.steps[3]]), binary_item()) == []
    negative = step("observation", "There is no pneumothorax.", [("Pneumothorax", "absent")])
    assert codes(ReasoningChain(steps=[*base.steps[:3], negative, base.steps[3]]), binary_item()) == [
        v.OBSERVATION_WITHOUT_EVIDENCE]


def test_binary_no_answer_and_finding_stated_present_is_a_mismatch():
    item = binary_item("No", finding="Pneumothorax")
    chain = ReasoningChain(steps=[
        step("plan", "Examine the chest X-ray for pneumothorax."),
        step("observation", "There is no pneumothorax.", [("Pneumothorax", "absent")], ["There is no pneumothorax."]),
        step("conclusion", "Therefore, there is no pneumothorax; the answer is B) No.", [("Pneumothorax", "absent")]),
    ])
    assert codes(chain, item) == []
    assert v.ANSWER_MISMATCH in codes(with_step(chain, 2, step(
        "conclusion", "Therefore, the answer is B) No.", [("Pneumothorax", "present")])), item)


# --- answers of option and open tasks --------------------------------------------------
def single_item() -> MiningInput:
    options = ["Edema", "Pleural Effusion", "Pneumothorax", "Cardiomegaly"]
    sample = dict(sample_id="s-single", task="single", question="Which finding is in this chest X-ray?",
                  options=options, answer_letter="B", answer_text="Pleural Effusion", findings=options,
                  answer_findings=["Pleural Effusion"])
    return MiningInput(sample=sample, report=REPORT, labels=LABELS)


def single_chain(conclusion: str) -> ReasoningChain:
    return ReasoningChain(steps=[
        step("plan", "Check each candidate finding: edema, pleural effusion, pneumothorax and cardiomegaly."),
        step("observation", "A large left pleural effusion.", [("Pleural Effusion", "present")],
             ["Large left pleural effusion is new."]),
        step("observation", "No pneumothorax; normal heart size.", [("Pneumothorax", "absent"), ("Cardiomegaly", "absent")],
             ["There is no pneumothorax.", "The heart size is normal."]),
        step("observation", "No sign of edema.", [("Edema", "absent")]),
        step("conclusion", conclusion, [("Pleural Effusion", "present")]),
    ])


@pytest.mark.parametrize("conclusion, ok", [
    ("Therefore, the answer is B) Pleural Effusion.", True),
    ("Therefore, the answer is (B).", True),
    ("Options A) Edema and B) Pleural Effusion were weighed; the answer is B.", True),  # explicit answer wins
    ("Therefore, pleural effusion is the finding.", True),  # answer text without a letter
    ("Therefore, the answer is C) Pneumothorax.", False),
    ("Therefore, A) or B).", False),
    ("Therefore, the finding is edema.", False),
])
def test_option_conclusions(conclusion, ok):
    assert (codes(single_chain(conclusion), single_item()) == []) is ok


def test_answer_letter_before_the_conclusion_is_leakage():
    chain = with_step(single_chain("Therefore, the answer is B."), 0, step("plan", "The answer is B, so check effusion."))
    assert codes(chain, single_item()) == [v.LEAKAGE]


@pytest.mark.parametrize("text", [
    "Per the report, there is an effusion.", "According to the radiologist, an effusion.",
    "As dictated, an effusion.", "The impression section names an effusion.", "As per the plan, a drain.",
    "A ___ effusion.", "Effusion at XXXX.", "Findings discussed with Dr. Smith.", "IMPRESSION: effusion.",
])
def test_leakage_wording(text):
    assert v.leakage_reasons(text), text


def test_clean_wording_and_evidence_placeholders_are_not_leakage():
    assert v.leakage_reasons("To answer the question, examine the costophrenic angles.", "AB", final=False) == []
    # Quotes are data: a placeholder inside evidence is fine.
    chain = with_step(good_binary_chain(), 1, good_binary_chain().steps[1].model_copy(update={
        "evidence": [Evidence(quote="Large left pleural effusion is new."), Evidence(quote="___ year old woman")]}))
    assert codes(chain, binary_item()) == []


def open_item(answer_findings: list[str]) -> MiningInput:
    sample = dict(sample_id="s-open", task="open", question="Which findings are in this chest X-ray?", options=[],
                  answer_letter=None, answer_text=", ".join(answer_findings) or "No Finding", findings=[],
                  answer_findings=answer_findings)
    return MiningInput(sample=sample, report=REPORT, labels=LABELS)


def test_open_conclusions_state_the_findings_set():
    chain = ReasoningChain(steps=[
        step("plan", "Review the chest X-ray systematically."),
        step("observation", "A large left pleural effusion.", [("Pleural Effusion", "present")],
             ["Large left pleural effusion is new."]),
        step("conclusion", "Therefore, the finding in this chest X-ray is pleural effusion.",
             [("Pleural Effusion", "present")]),
    ])
    item = open_item(["Pleural Effusion"])
    assert codes(chain, item) == []
    extra = with_step(chain, 2, step("conclusion", "Therefore, pleural effusion and atelectasis.",
                                     [("Pleural Effusion", "present"), ("Atelectasis", "present")]))
    assert v.ANSWER_MISMATCH in codes(extra, item)
    missing = with_step(chain, 2, step("conclusion", "Therefore, there is atelectasis."))
    assert codes(missing, item) == [v.ANSWER_MISMATCH]


def test_open_with_no_findings_accepts_a_normal_conclusion():
    clean = labels(No_Finding=label("positive", "The heart\n size is normal."))
    sample = open_item([]).sample
    item = MiningInput(sample=sample, report=REPORT, labels=clean)
    chain = ReasoningChain(steps=[
        step("observation", "The heart size is normal.", [("No Finding", "present")], ["The heart size is normal."]),
        step("conclusion", "Therefore, there are no abnormal findings in this chest X-ray."),
    ])
    assert codes(chain, item) == []


# --- robustness and speed --------------------------------------------------------------
def test_malformed_inputs_do_not_crash():
    chain = good_binary_chain()
    for item in [
        MiningInput(sample={}, report="", labels={}),
        MiningInput(sample={"task": None, "options": None, "findings": "Edema"}, report=None, labels=None),  # type: ignore[arg-type]
        MiningInput(sample="not a dict", report=REPORT, labels={"Edema": "positive"}),  # type: ignore[arg-type]
    ]:
        assert isinstance(v.verify_chain(chain, item), list)
        v.ground_evidence(chain, item)
    assert v.NO_CONCLUSION in codes(ReasoningChain(steps=[]), binary_item())


_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=120)


@settings(max_examples=120, deadline=None)
@given(st.lists(st.tuples(
    st.sampled_from(["plan", "observation", "interpretation", "comparison", "conclusion"]), _text,
    st.lists(st.tuples(st.sampled_from([*OBSERVATIONS, "foo", "pleural effusion"]),
                       st.sampled_from(["present", "absent", "uncertain"])), max_size=3),
    st.lists(_text, max_size=2)), max_size=8),
    st.sampled_from(["binary", "single", "multi", "open", "temporal", "bogus"]))
def test_random_chains_never_crash_and_give_known_codes(raw_steps, task):
    chain = ReasoningChain(steps=[step(k, t, f, q) for k, t, f, q in raw_steps])
    item = temporal_item("stable") if task == "temporal" else binary_item()
    item = MiningInput(sample={**item.sample, "task": task}, report=item.report, labels=item.labels,
                       prior_report=item.prior_report, prior_labels=item.prior_labels)
    failures = v.verify_chain(chain, item)
    assert all(f.code in v.REASON_CODES for f in failures)
    grounded = v.ground_evidence(chain, item)
    document = v.evidence_document(item)
    for s in grounded.steps:
        for e in s.evidence:
            assert e.start is None or document[e.start:e.end] == e.quote


def test_verification_is_well_under_a_millisecond():
    chain, item = good_temporal_chain(), temporal_item("worsening")
    v.verify_chain(chain, item)  # warm the regex caches
    n = 500
    started = time.perf_counter()
    for _ in range(n):
        v.verify_chain(chain, item)
    assert (time.perf_counter() - started) / n < 1e-3


# --- evidence on topic -----------------------------------------------------------------
@pytest.mark.parametrize("finding,status,quote,ok", [
    ("Pleural Effusion", "present", "Blunting of the left costophrenic angle.", True),  # a sign of it
    ("Atelectasis", "present", "Bibasilar opacities.", True),  # names a related finding (Lung Opacity)
    ("No Finding", "present", "No\n pneumothorax.", True),  # findings stated absent
    ("Pneumothorax", "absent", "No\n pneumothorax.", True),
    ("Lung Lesion", "absent", "No lung lesion or edema.", True),  # named, though the mention finder reads only edema
    ("Pneumothorax", "absent", "Bibasilar opacities.", False),  # names only an unrelated finding
    ("No Finding", "present", "Bibasilar opacities.", False),  # a finding stated present
])
def test_evidence_must_bear_on_a_stated_finding(finding, status, quote, ok):
    chain_step = step("observation", "Seen on the radiograph.", [(finding, status)], [quote])
    assert (v._check_quote_topic(1, chain_step) == []) is ok


def test_a_step_stating_several_findings_needs_quotes_bearing_on_one_of_them():
    both = step("observation", "No pneumothorax or effusion.", [("Pneumothorax", "absent"), ("Edema", "absent")],
                ["No\n pneumothorax."])
    assert v._check_quote_topic(1, both) == []
    (failure,) = v._check_quote_topic(2, both.model_copy(update={"evidence": [Evidence(quote="Bibasilar opacities.")]}))
    assert failure.code == v.EVIDENCE_OFF_TOPIC and failure.step_index == 2
    assert "Lung Opacity" in failure.detail and "Pneumothorax" in failure.detail
