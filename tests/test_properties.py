"""Property-based tests: the pure parsers and scorers never raise and keep their invariants on any input.

Inputs mix arbitrary text (any character UTF-8 can encode, and runs of control, zero-width,
bidi and NUL characters) with report-shaped text built from MIMIC-like pieces, so hypothesis
reaches the interesting branches (headers, negations, placeholders, think/answer tags) as
well as the garbage. Example counts are kept modest (a few seconds per property); raised to
thousands once while writing them, they found nothing further.
"""

from __future__ import annotations

import json
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extractors.chains.types import LabelEvidence, MiningInput
from extractors.chains.verify import REASON_CODES, evidence_document, ground_evidence, verify_chain
from extractors.labeler import label_report
from extractors.sections import parse_sections
from schemas.chains import Evidence, ReasoningChain, ReasoningStep, StepFinding
from schemas.ingest import SECTION_NAMES
from schemas.labels import OBSERVATIONS
from schemas.vqa import TASKS
from training.answers import completion_text, is_well_formed, parse_output
from training.rewards import (
    format_reward,
    outcome_reward,
    process_reward,
    process_reward_gated,
    reward_components,
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---- text strategies -------------------------------------------------------------------------------------
ODD_CHARS = "\x00\x01\x07\x08\x0b\x0c\x1b\x1f\x7f\u200b\u200e\u200f\u202a\u202e\u2066\ufeff\ufffd\t\r\n "
PIECES = [
    " FINDINGS:", " IMPRESSION:", " FINDINGS AND IMPRESSION:", "Findings:", " INDICATION:  ___", " COMPARISON:",
    " EXAMINATION:  CHEST (PA AND LAT)", "FINAL REPORT", " WET READ:", " ADDENDUM:", " PICC LINE:", "___",
    "No pleural effusion.", "Small left pleural effusion.", "Heart size is normal.", "Mild cardiomegaly.",
    "Cannot exclude pneumonia.", "There is no pneumothorax.", "Possible atelectasis at the left base.",
    "Lungs are clear", "ET tube in place.", "unchanged", "10:13", "1.", "2.", "\n", "\n \n", " ", ":", "  ",
    "`", "```", "<think>", "</think>", "<answer>", "</answer>", "A)", "(B)", "Answer: C",
]
arbitrary_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=400) | st.text(
    alphabet=st.sampled_from(list(ODD_CHARS) + list("aAzZ:.,;-_()/ 0123456789")), max_size=200)
report_text = st.lists(st.sampled_from(PIECES) | st.text(alphabet=ODD_CHARS, max_size=3) | arbitrary_text,
                       max_size=25).map("".join)
any_text = report_text | arbitrary_text
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=15),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                          max_size=4), max_leaves=20)


# ---- sections ------------------------------------------------------------------------------------------------
@FAST
@given(any_text)
def test_sections_offsets_hold_and_never_raise(text):
    sections = parse_sections(text)
    prev_end = 0
    for s in sections:
        assert s.name in SECTION_NAMES
        assert 0 <= s.start <= s.end <= len(text)
        assert text[s.start:s.end] == s.body
        assert s.body and s.body == s.body.strip()
        assert s.start >= prev_end  # in text order, never overlapping
        prev_end = s.end
        assert isinstance(s.header, str) and isinstance(s.inferred, bool)


@FAST
@given(any_text)
def test_phi_scan_never_raises_and_offsets_hold(text):
    from extractors.phi import KINDS, find_phi, phi_kinds

    hits = find_phi(text)
    for h in hits:
        assert h.kind in KINDS and 0 <= h.start < h.end <= len(text)
    assert phi_kinds(text) == [k for k in KINDS if k in {h.kind for h in hits}]


# ---- labeler ---------------------------------------------------------------------------------------------------
VALUES = {"positive", "negative", "uncertain", "not_mentioned"}


def _check_labels(labels: dict, text: str) -> None:
    assert set(labels) == set(OBSERVATIONS) and len(labels) == 14
    for name, ev in labels.items():
        assert ev.value in VALUES, (name, ev)
        if ev.start is not None or ev.end is not None:
            assert ev.start is not None and ev.end is not None
            assert 0 <= ev.start <= ev.end <= len(text)
            if ev.sentence is not None:
                assert text[ev.start:ev.end] == ev.sentence
    assert labels["Pleural Other"].value in VALUES


bad_sections = st.lists(st.tuples(st.sampled_from(["findings", "impression", "FINDINGS", "other", "", None]),
                                  st.integers(-50, 500) | st.none() | st.just("x"),
                                  st.integers(-50, 500) | st.none()), max_size=4)


@SLOW
@given(any_text, bad_sections)
def test_labeler_never_raises_and_labels_are_valid(text, junk_sections):
    _check_labels(label_report(text), text)
    sections = [(s.name, s.start, s.end) for s in parse_sections(text)]
    _check_labels(label_report(text, sections), text)
    _check_labels(label_report(text, junk_sections), text)  # malformed section rows are skipped


# ---- verifier -----------------------------------------------------------------------------------------------------
observation_names = st.sampled_from(list(OBSERVATIONS) + ["pleural effusion", "Effusion", "", "Unicorn"]) | \
    st.text(max_size=20)
findings = st.builds(StepFinding, observation=observation_names, status=st.sampled_from(["present", "absent", "uncertain"]),
                     anatomy=st.none() | st.text(max_size=20))
offsets = st.none() | st.integers(-10, 600)
evidence = st.builds(Evidence, quote=report_text | st.sampled_from(["No pleural effusion", "", "___", "no"]),
                     start=offsets, end=offsets)
steps = st.builds(ReasoningStep, kind=st.sampled_from(["plan", "observation", "interpretation", "comparison",
                                                       "conclusion"]),
                  text=any_text, findings=st.lists(findings, max_size=3), evidence=st.lists(evidence, max_size=3))
chains = st.builds(ReasoningChain, steps=st.lists(steps, max_size=14))
label_values = st.sampled_from(["positive", "negative", "uncertain", "not_mentioned", "weird", ""])
labels = st.dictionaries(observation_names, st.builds(LabelEvidence, value=label_values), max_size=6)
samples = st.fixed_dictionaries({
    "sample_id": st.text(max_size=8),
    "task": st.sampled_from(list(TASKS) + ["", "Binary ", "unknown"]) | st.none(),
    "question": any_text,
    "options": st.none() | st.lists(st.sampled_from(["Yes", "No", "stable", "worsening", "improving",
                                                     "Pleural Effusion", "Edema, Atelectasis", ""]) | st.text(max_size=10),
                                    max_size=5),
    "answer_letter": st.none() | st.sampled_from(["A", "B", "c", "Z", "", " ", "AB"]),
    "answer_text": st.none() | st.text(max_size=20) | st.sampled_from(["Yes", "No", "stable", "Pleural Effusion"]),
    "findings": st.none() | st.lists(observation_names, max_size=3) | st.text(max_size=10),
    "answer_findings": st.none() | st.lists(observation_names, max_size=3),
})
items = st.builds(MiningInput, sample=samples, report=report_text, labels=labels,
                  prior_report=st.none() | report_text, prior_labels=st.none() | labels)


@SLOW
@given(chains, items)
def test_verifier_never_raises_and_uses_known_codes(chain, item):
    failures = verify_chain(chain, item)
    assert {f.code for f in failures} <= set(REASON_CODES)
    for f in failures:
        assert isinstance(f.detail, str)
        assert f.step_index is None or 0 <= f.step_index < max(1, len(chain.steps))
    grounded = ground_evidence(chain, item)
    document = evidence_document(item)
    assert len(grounded.steps) == len(chain.steps)
    for step in grounded.steps:
        for ev in step.evidence:
            if ev.start is not None:
                assert 0 <= ev.start < ev.end <= len(document) and document[ev.start:ev.end] == ev.quote




@SLOW
@given(st.dictionaries(st.sampled_from(["steps", "kind", "text", "extra"]), json_values, max_size=3)
       | st.fixed_dictionaries({"steps": st.lists(st.dictionaries(
           st.sampled_from(["kind", "text", "findings", "evidence"]), json_values, max_size=4), max_size=5)}),
       items)
def test_chain_shaped_json_is_rejected_or_verified(payload, item):
    from pydantic import ValidationError

    try:
        chain = ReasoningChain.model_validate(payload)
    except ValidationError:
        return
    assert {f.code for f in verify_chain(chain, item)} <= set(REASON_CODES)


# ---- reward parsing and the rewards ------------------------------------------------------------------------------
OUTPUT_PIECES = ["<think>", "</think>", "<answer>", "</answer>", "<THINK>", "<answer>A</answer>", "B", "(C)",
                 "Answer: D", "Pleural Effusion", "No Finding", "Cardiomegaly, Edema", "\n", " ", "The heart is enlarged.",
                 "There is no pleural effusion.", "stable", "yes", ""]
outputs = st.lists(st.sampled_from(OUTPUT_PIECES) | arbitrary_text, max_size=12).map("".join) | arbitrary_text
content = st.none() | outputs | st.integers() | st.lists(
    outputs | st.fixed_dictionaries({"type": st.sampled_from(["text", "image", "TEXT"]), "text": st.none() | outputs})
    | st.integers(), max_size=3)
message = st.fixed_dictionaries({"role": st.sampled_from(["assistant", "user", "system", ""]), "content": content})
completion = outputs | st.lists(message | st.integers() | st.none(), max_size=3) | message | st.none() | st.integers()

gold_steps = st.none() | st.sampled_from(["", "[]", "{", "null", "[1, 2]", '[{"text": 3}]']) | st.lists(
    st.fixed_dictionaries({"text": outputs, "kind": st.sampled_from(["observation", "conclusion", None, "x"]),
                           "findings": st.lists(st.fixed_dictionaries({
                               "observation": observation_names, "status": st.sampled_from(["present", "absent",
                                                                                            "uncertain", "?"]),
                               "anatomy": st.none() | st.text(max_size=8)}), max_size=2)}), max_size=4).map(json.dumps) \
    | st.lists(json_values | st.dictionaries(st.sampled_from(["text", "kind", "findings"]), json_values, max_size=3),
               max_size=3).map(json.dumps) \
    | st.lists(st.dictionaries(st.sampled_from(["text", "kind", "findings"]), json_values, max_size=3), max_size=3)
gold_labels = st.none() | st.sampled_from(["", "{}", "[", "[1]", '{"Edema": 7}']) | st.dictionaries(
    observation_names, st.sampled_from(["positive", "negative", "uncertain", "not_mentioned", "1.0", "-1", "", "x"]),
    max_size=5).map(json.dumps) | st.dictionaries(observation_names, json_values, max_size=3)
solutions = st.none() | st.sampled_from(["A", "B", "", "No Finding", "Pleural Effusion, Edema", '["Edema"]', "[", "Z"]) \
    | st.text(max_size=20)
tasks = st.sampled_from(list(TASKS) + ["", "x"]) | st.none()
option_lists = st.none() | st.lists(st.sampled_from(["Yes", "No", "Edema", "stable"]) | st.text(max_size=8), max_size=4)


@FAST
@given(completion)
def test_parse_output_never_raises(c):
    text = completion_text(c)
    assert isinstance(text, str)
    parsed = parse_output(text)
    assert parsed.think is None or isinstance(parsed.think, str)
    assert parsed.answer is None or isinstance(parsed.answer, str)
    assert parsed.well_formed == is_well_formed(text)
    if parsed.well_formed:
        assert parsed.think and parsed.answer is not None


def _in_unit(values: list, n: int) -> None:
    assert len(values) == n
    for v in values:
        assert isinstance(v, float) and not math.isnan(v) and 0.0 <= v <= 1.0, v


@SLOW
@given(st.data())
def test_rewards_return_floats_in_the_unit_interval(data):
    n = data.draw(st.integers(1, 4))
    comps = data.draw(st.lists(completion, min_size=n, max_size=n))
    kwargs = dict(
        solution=data.draw(st.lists(solutions, min_size=n, max_size=n)),
        task=data.draw(st.lists(tasks, min_size=n, max_size=n)),
        options=data.draw(st.lists(option_lists, min_size=n, max_size=n)),
        gold_steps=data.draw(st.lists(gold_steps, min_size=n, max_size=n)),
        gold_labels=data.draw(st.lists(gold_labels, min_size=n, max_size=n)),
        prompts=[None] * n,
    )
    fmt = format_reward(comps, **kwargs)
    _in_unit(fmt, n)
    assert set(fmt) <= {0.0, 1.0}
    _in_unit(outcome_reward(comps, **kwargs), n)
    process = process_reward(comps, **kwargs)
    _in_unit(process, n)
    gated = process_reward_gated(comps, **kwargs)
    _in_unit(gated, n)
    assert all(g <= p + 1e-9 for g, p in zip(gated, process))
    for row in reward_components(comps, **kwargs):
        for key in ("format", "outcome", "process"):
            assert 0.0 <= row[key] <= 1.0
        for key in ("completeness", "factuality", "effectiveness"):
            assert row[key] is None or 0.0 <= row[key] <= 1.0


# ---- the labeler's cue lookup: the bisection index answers as the scan does -------------------------------
_CUE_KINDS = ("negation", "uncertainty", "affirm", "pseudo", "termination")


@st.composite
def _cue_lists(draw):
    from extractors.mentions import CueRule, _Cue

    cues, pos = [], 0
    for _ in range(draw(st.integers(0, 60))):
        pos += draw(st.integers(0, 12))  # sorted by start; ends may overlap later cues
        length = draw(st.integers(1, 25))
        rule = CueRule(name="r", kind=draw(st.sampled_from(_CUE_KINDS)), phrases=("x",))
        cues.append(_Cue(rule, pos, pos + length))
    return cues


@settings(max_examples=300, deadline=None)
@given(_cue_lists(), st.integers(-5, 800), st.integers(0, 40))
def test_indexed_cue_lookup_matches_the_linear_scan(cues, start, length):
    from extractors.mentions import _IndexedCues, _SentenceCues

    scan, index = _SentenceCues(cues), _IndexedCues(cues)
    assert index.before(start) == scan.before(start)
    assert index.after(start + length) == scan.after(start + length)


def test_a_report_pasted_as_one_long_sentence_is_labeled_as_its_clauses_say():
    """Thousands of cues in one sentence (no full stop): the nearest cue still decides, and a
    negation 100 KB before a mention does not reach it."""
    clause = "there is a small left pleural effusion and mild cardiomegaly without pneumothorax"
    labels = label_report("FINDINGS: " + ", ".join([clause] * 5000) + ".")
    assert (labels["Pleural Effusion"].value, labels["Cardiomegaly"].value,
            labels["Pneumothorax"].value) == ("positive", "positive", "negative")
    far = label_report("FINDINGS: No pleural effusion " + "lorem ipsum dolor " * 6000 + "and a small pneumothorax.")
    assert far["Pneumothorax"].value == "positive" and far["Pleural Effusion"].value == "negative"
