"""The evaluation baselines (training/baselines.py) and their scores under the evaluation's own scorer."""

from __future__ import annotations

import json

import pytest

from training.answers import is_well_formed, outcome_score, parse_output
from training.baselines import BASELINES, baseline_outputs, majority_answers, option_letters


def bench_row(sid: str, task: str, solution: str, options: str) -> dict:
    text = f"Which finding is in this chest X-ray?\nOptions:\n{options}\nThink step by step."
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return dict(sample_id=sid, task=task, prompt_json=json.dumps(prompt), solution=solution,
                gold_chain="The heart is enlarged.\nTherefore cardiomegaly.")


ROWS = [
    bench_row("s1", "binary", "A", "A) Yes\nB) No"),
    bench_row("s2", "temporal", "C", "A) stable\nB) worsening\nC) improving"),
    bench_row("s3", "single", "D", "A) Edema\nB) Fracture\nC) Pneumothorax\nD) Cardiomegaly"),
    bench_row("s4", "open", "Cardiomegaly, Pleural Effusion", ""),
]


def test_option_letters_come_from_the_question():
    assert [option_letters(r) for r in ROWS] == [["A", "B"], ["A", "B", "C"], ["A", "B", "C", "D"], []]


def test_majority_is_the_most_common_training_answer_per_task_ties_alphabetical():
    train = [dict(task="binary", solution=s) for s in "ABB"] + [dict(task="single", solution=s) for s in "CA"]
    assert majority_answers(train) == {"binary": "B", "single": "A"}


def test_baselines_answer_in_the_scored_layout():
    majority = {"binary": "B", "temporal": "A", "single": "D", "open": "No Finding"}
    outs = {k: baseline_outputs(k, ROWS, majority, seed=3) for k in BASELINES}
    assert outs["majority"][:3] == ["<answer>B</answer>", "<answer>A</answer>", "<answer>D</answer>"]
    for row, out in zip(ROWS, outs["random"], strict=True):
        answer = parse_output(out).answer
        if row["task"] == "open":
            assert 1 <= len(answer.split(", ")) <= 3
        else:
            assert answer in option_letters(row)
    assert outs["random"] == baseline_outputs("random", ROWS, majority, seed=3)  # seeded
    # The oracle is the trained layout with the gold answer: well formed, every answer right.
    assert all(is_well_formed(o) for o in outs["oracle"])
    assert [outcome_score(parse_output(o).answer, r["task"], r["solution"]) for r, o in
            zip(ROWS, outs["oracle"], strict=True)] == [1.0, 1.0, 1.0, 1.0]
    # No reasoning in majority/random: not well formed, no think block.
    assert not any(is_well_formed(o) for o in outs["majority"] + outs["random"])
    with pytest.raises(ValueError):
        baseline_outputs("majority", ROWS, None)
    with pytest.raises(ValueError):
        baseline_outputs("mode", ROWS, majority)
