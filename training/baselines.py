"""Reference outputs scored beside a model, by the same scorer: what a score is worth.

Three baselines per benchmark row (``mart_benchmark`` rows: ``task``, ``prompt_json``, ``solution``,
``gold_chain``):

* ``majority`` -- the most common training answer of the row's task (a letter, or the open task's most
  common finding set), with no reasoning: the accuracy a model gets from the label prior alone.
* ``random`` -- a uniformly random option letter of the row's own question (open task: 1-3 findings
  drawn at random), seeded: the chance level.
* ``oracle`` -- the gold chain and the gold answer in the trained layout
  (``<think>chain</think><answer>X</answer>``): the upper bound of every metric under this scorer
  (accuracy 1; RadRScore below 1 where the rules judge cannot match the gold chain's own wording).

Majority and random answers carry no ``<think>`` block: their RadRScore is 0 and they are not well formed,
by construction. Pure functions; no I/O.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from schemas.labels import TARGET_OBSERVATIONS
from training.datasets import assistant_text

BASELINES = ("majority", "random", "oracle")
_OPTION_LINE = re.compile(r"^\s*([A-H])\)", re.MULTILINE)


def question_text(row: Mapping[str, Any]) -> str:
    """The text blocks of a benchmark/RL row's prompt (``prompt_json`` or ``prompt``)."""
    raw = row.get("prompt_json", row.get("prompt"))
    messages = json.loads(raw) if isinstance(raw, str) else raw or []
    parts = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
            continue
        parts.extend(str(block.get("text") or "") for block in content or [] if block.get("type") == "text")
    return "\n".join(parts)


def option_letters(row: Mapping[str, Any]) -> list[str]:
    """The option letters a question offers ("A) Yes" lines), in order; [] for the open task."""
    return list(dict.fromkeys(_OPTION_LINE.findall(question_text(row))))


def majority_answers(train_rows: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """Task -> its most common training ``solution`` (ties: the alphabetically first)."""
    counts: dict[str, Counter[str]] = {}
    for row in train_rows:
        counts.setdefault(str(row["task"]), Counter())[str(row["solution"])] += 1
    return {task: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for task, c in sorted(counts.items())}


def answer_only(answer: str) -> str:
    return f"<answer>{answer}</answer>"


def baseline_outputs(
    kind: str,
    rows: Sequence[Mapping[str, Any]],
    majority: Mapping[str, str] | None = None,
    seed: int = 13,
) -> list[str]:
    """One output per benchmark row for the baseline ``kind`` (see the module docstring)."""
    if kind == "majority":
        if majority is None:
            raise ValueError("the majority baseline needs the training answers per task (majority_answers)")
        # A task absent from training has no prior: the baseline gives no answer (scored wrong).
        return [answer_only(majority[str(r["task"])]) if str(r["task"]) in majority else "" for r in rows]
    if kind == "random":
        rng = random.Random(f"random-baseline:{seed}")
        outputs = []
        for r in rows:
            letters = option_letters(r)
            if letters:
                outputs.append(answer_only(rng.choice(letters)))
            else:
                picked = rng.sample(TARGET_OBSERVATIONS, rng.randint(1, 3))
                outputs.append(answer_only(", ".join(sorted(picked))))
        return outputs
    if kind == "oracle":
        return [assistant_text(r.get("gold_chain"), str(r["solution"])) for r in rows]
    raise ValueError(f"unknown baseline {kind!r}; choose from {', '.join(BASELINES)}")
