"""Reward functions in TRL's signature, output parsing and the LLM judge's prompt/parse level."""

from __future__ import annotations

import json

import pytest

from training.answers import (
    completion_text,
    is_well_formed,
    outcome_score,
    parse_finding_set,
    parse_letter,
    parse_output,
    set_f1,
)
from training.judge_llm import JudgeVerdict, build_messages, judge_agreement, score_from_verdict
from training.radrscore import GoldChain, ReasoningScore, normalise_labels
from training.rewards import (
    DEFAULT_REWARD_FUNCS,
    DEFAULT_REWARD_WEIGHTS,
    encode_gold_labels,
    encode_gold_steps,
    format_reward,
    outcome_reward,
    process_reward,
    process_reward_gated,
)

STEPS = [
    {"kind": "observation", "text": "There is no pleural effusion.",
     "findings": [{"observation": "Pleural Effusion", "status": "absent", "anatomy": None}]},
    {"kind": "observation", "text": "The heart is enlarged, consistent with cardiomegaly.",
     "findings": [{"observation": "Cardiomegaly", "status": "present", "anatomy": "heart"}]},
    {"kind": "conclusion", "text": "Therefore, the answer is A.", "findings": []},
]
LABELS = {"Pleural Effusion": 0.0, "Cardiomegaly": 1.0, "Pneumothorax": "negative"}
GOOD = "<think>\n" + "\n".join(s["text"] for s in STEPS) + "\n</think>\n<answer>A</answer>"


def columns(n: int, **over) -> dict:
    cols = dict(solution=["A"] * n, task=["binary"] * n, gold_steps=[encode_gold_steps(STEPS)] * n,
                gold_labels=[encode_gold_labels(LABELS)] * n)
    cols.update(over)
    return cols


# ---- parsing ------------------------------------------------------------------------------------
def test_completion_text_handles_strings_messages_and_parts():
    assert completion_text("x") == "x"
    assert completion_text([{"role": "assistant", "content": "x"}]) == "x"
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "x"}]}]) == "x"
    assert completion_text(None) == ""


def test_parse_output_blocks_and_truncation():
    p = parse_output(GOOD)
    assert p.well_formed and p.answer == "A" and p.think.startswith("There is no pleural effusion.")
    truncated = parse_output("<think>No pneumothorax. There is")
    assert truncated.think == "No pneumothorax. There is" and truncated.answer is None
    free = parse_output("There is no pneumothorax.\nThe answer is B.")  # tagless: read by pattern
    assert free.tagless and free.think == "There is no pneumothorax." and free.answer == "B"
    assert parse_output("B").unparseable and parse_output("B").answer == "B"  # an answer, no reasoning
    assert parse_output("<think>a</think><answer>A</answer><answer>B</answer>").answer == "B"


@pytest.mark.parametrize("text,ok", [
    ("<think>r</think><answer>A</answer>", True),
    ("  <think>r</think>\n\n<answer>A</answer>\n", True),
    ("<think>r</think><answer>A</answer> trailing words", False),
    ("preamble <think>r</think><answer>A</answer>", False),
    ("<think>r</think><think>s</think><answer>A</answer>", False),
    ("<think>r</think><answer>A</answer><answer>B</answer>", False),
    ("<answer>A</answer><think>r</think>", False),
    ("<think></think><answer>A</answer>", False),
    ("<think>r</think>", False),
])
def test_is_well_formed(text, ok):
    assert is_well_formed(text) is ok


@pytest.mark.parametrize("answer,letter", [
    ("B", "B"), ("(B)", "B"), ("B) No", "B"), ("b.", "B"), ("Answer: C", "C"), ("The answer is D.", "D"),
    ("No", "B"), ("yes", "A"), ("E", None), ("", None), ("I am not sure", None),
])
def test_parse_letter(answer, letter):
    assert parse_letter(answer, ["Yes", "No", "Maybe", "Other"]) == letter


def test_open_task_sets():
    assert parse_finding_set("Cardiomegaly, pleural effusion and Edema") == {"Cardiomegaly", "Pleural Effusion", "Edema"}
    assert parse_finding_set('["Pneumothorax"]') == {"Pneumothorax"}
    assert parse_finding_set("No Finding") == {"No Finding"}
    assert set_f1({"A", "B"}, {"B", "C"}) == 0.5
    assert outcome_score("No Finding", "open", []) == 1.0
    assert outcome_score("Edema", "open", "Edema, Cardiomegaly") == pytest.approx(2 / 3)
    assert outcome_score(None, "open", "Edema") == 0.0


# ---- rewards --------------------------------------------------------------------------------
def test_rewards_on_strings_and_conversations_agree():
    conv = [[{"role": "assistant", "content": GOOD}]]
    for fn in (format_reward, outcome_reward, process_reward, process_reward_gated):
        assert fn([GOOD], **columns(1)) == fn(conv, **columns(1)) == [1.0], fn.__name__


def test_each_reward_responds_to_its_own_defect():
    wrong_answer = GOOD.replace("<answer>A", "<answer>B").replace("the answer is A.", "the answer is B.")
    assert wrong_answer.count("the answer is B.") == 1
    bad_format = GOOD + " extra words"
    false_reasoning = GOOD.replace("There is no pleural effusion.", "There is a large pleural effusion.")
    cs = [GOOD, wrong_answer, bad_format, false_reasoning, "", "A"]
    kw = columns(len(cs))
    assert format_reward(cs, **kw) == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    assert outcome_reward(cs, **kw) == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]  # a bare "A" is a free-text answer
    process = process_reward(cs, **kw)
    assert process[0] == process[2] == 1.0
    # A wrong answer costs the reasoning the steps that argued for it on no evidence: of the three
    # steps, the findingless "Therefore, the answer is B." is ineffective -> (1 + 1 + 2/3) / 3.
    assert process[1] == pytest.approx((1 + 1 + 2 / 3) / 3)
    assert 0.0 < process[3] < 1.0 and process[4] == process[5] == 0.0
    gated = process_reward_gated(cs, **kw)
    assert gated[1] == 0.0 and gated[0] == 1.0 and gated[3] == process[3]


def test_reward_columns_accept_python_objects_and_open_task():
    kw = dict(solution=["Cardiomegaly"], task=["open"], gold_steps=[STEPS], gold_labels=[LABELS])
    out = GOOD.replace("<answer>A", "<answer>Cardiomegaly")
    assert outcome_reward([out], **kw) == [1.0]
    assert process_reward([out], **kw) == [1.0]
    # missing gold columns: defined, never an exception
    assert process_reward([out]) == [0.0]


def test_default_weights_line_up_with_functions():
    import training.rewards as rewards

    assert len(DEFAULT_REWARD_FUNCS) == len(DEFAULT_REWARD_WEIGHTS)
    # configs name rewards "<name>" -> training.rewards.<name>_reward
    for name in ("outcome", "format", "process", "process_gated"):
        assert callable(getattr(rewards, f"{name}_reward"))
    assert [f.__name__ for f in DEFAULT_REWARD_FUNCS] == ["outcome_reward", "format_reward", "process_reward"]


def test_mismatched_column_length_is_an_error():
    with pytest.raises(ValueError):
        outcome_reward([GOOD, GOOD], solution=["A"], task=["binary", "binary"])


# ---- LLM judge: prompt and parse level ----------------------------------------------------------
def test_llm_judge_prompt_and_verdict_scoring():
    gold = GoldChain.from_steps(STEPS)
    labels = normalise_labels(LABELS)
    msgs = build_messages(["No effusion.", "Big heart.", "Filler."], gold, labels)
    user = msgs[-1]["content"]
    assert "1. Cardiomegaly: present" in user and "3. Filler." in user and "positive: Cardiomegaly" in user
    verdict = JudgeVerdict.model_validate_json(json.dumps({
        "stated_findings": [{"observation": "Pleural Effusion", "status": "absent", "correct": True},
                            {"observation": "Cardiomegaly", "status": "present", "correct": True},
                            {"observation": "Edema", "status": "present", "correct": False}],
        "key_findings": [{"index": 1, "recalled": True}, {"index": 2, "recalled": False}, {"index": 9, "recalled": True}],
        "steps": [{"index": 1, "supported": True}, {"index": 2, "supported": True}],
    }))
    s = score_from_verdict(verdict, 3, gold, True)
    assert (s.completeness, s.factuality, s.effectiveness) == (0.5, pytest.approx(2 / 3), pytest.approx(2 / 3))


def test_judge_agreement_correlations():
    rules = {f"s{i}": ReasoningScore(i / 10, i / 10, 1 - i / 10) for i in range(6)}
    llm = {f"s{i}": ReasoningScore(i / 10 + 0.05, (i % 2) / 2, 1 - i / 10) for i in range(6)}
    rows = {r["component"]: r for r in judge_agreement(rules, llm)}
    assert rows["completeness"]["pearson"] == pytest.approx(1.0)
    assert rows["effectiveness"]["spearman"] == pytest.approx(1.0)
    assert rows["completeness"]["n"] == 6
    constant = {k: ReasoningScore(0.5, 0.5, 0.5) for k in rules}
    assert judge_agreement(rules, constant)[0]["pearson"] is None
