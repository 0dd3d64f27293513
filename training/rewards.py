"""GRPO reward functions in TRL's signature: ``fn(completions, **kwargs) -> list[float]``.

TRL calls every reward function with ``prompts``, ``completions``, ``completion_ids`` and
each dataset column as a keyword argument holding one value per completion (a prompt's
columns repeated ``num_generations`` times), plus ``trainer_state``, ``log_extra`` and
``log_metric``. Completions are strings for a standard dataset and lists of messages
(``[{"role": "assistant", "content": ...}]``) for a conversational one; both work here.

RL dataset columns these functions read (the ``mart_*`` RL set; the dataset builder
writes them):

=============  ==============================================================================
``solution``   option tasks: the gold letter ("B"); open task: the gold findings, comma-joined
               ("Cardiomegaly, Pleural Effusion") or a JSON list; "" or "No Finding" = none
``task``       binary | single | multi | open | temporal
``options``    optional: the option texts (lets "No" or "Pleural Effusion" count as a letter)
``gold_steps`` JSON string: ``[{"text": ..., "kind": ..., "findings": [{"observation": ...,
               "status": "present|absent|uncertain", "anatomy": ...}]}]`` (the gold chain);
               a list of such dicts is accepted too
``gold_labels`` JSON string: ``{"Pleural Effusion": "positive", ...}`` for the study
               (positive | negative | uncertain | not_mentioned, or CheXpert codes 1/0/-1);
               a dict is accepted too
=============  ==============================================================================

Default weighting (``DEFAULT_REWARD_FUNCS`` with ``DEFAULT_REWARD_WEIGHTS`` for
``GRPOConfig.reward_weights``): outcome 1.0, format 0.5, process 1.0.

* outcome 1.0 -- answer accuracy is what the benchmark measures; it is the anchor.
* process 1.0 -- the same scale as the outcome, because reasoning quality is the point of
  the mined chains; and it is dense: when all 8 rollouts of a prompt get the answer right
  (or all wrong) the outcome reward has zero advantage, and only the process reward still
  separates good from bad reasoning. Ungated by default for that reason;
  ``process_reward_gated`` (process x outcome) is there for runs where reasoning that leads
  to a wrong answer should earn nothing.
* format 0.5 -- the layout is learned in the first few dozen steps (SFT already teaches it)
  and then saturates, after which it carries no advantage; half weight is enough to fix it
  early without letting a well-formed but wrong rollout outscore a correct one (0.5 < 1.0).
  A malformed rollout still gets its outcome and process rewards (both parse leniently),
  so a truncated but correct rollout is not zeroed.

Speed: parsing is cached per distinct string (gold JSON once per prompt, step findings once
per distinct line), no embeddings are used, and nothing is imported lazily in the hot path.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from training.answers import completion_text, is_well_formed, outcome_score, parse_output
from training.findings_text import prefetch
from training.radrscore import (
    GoldChain,
    ReasoningScore,
    gold_chain_from_json,
    labels_from_json,
    normalise_labels,
    score_reasoning,
    wrong_answer,
)

__all__ = [
    "DEFAULT_REWARD_FUNCS", "DEFAULT_REWARD_WEIGHTS", "encode_gold_labels", "encode_gold_steps",
    "format_reward", "outcome_reward", "process_gated_reward", "process_reward", "process_reward_gated",
    "reward_components", "weighted_rewards",
]


# ---- column encoding (for the dataset builder) ---------------------------------------------------
def encode_gold_steps(steps: Sequence[Mapping[str, Any] | Any]) -> str:
    """The ``gold_steps`` column value for a chain (step dicts, ChainStepRow dicts or ReasoningStep)."""
    out = []
    for s in steps:
        d = s if isinstance(s, Mapping) else s.model_dump()
        findings = [
            {"observation": f["observation"], "status": f["status"], "anatomy": f.get("anatomy")}
            for f in (dict(x) if isinstance(x, Mapping) else x.model_dump() for x in (d.get("findings") or []))
        ]
        out.append({"text": d.get("text") or "", "kind": d.get("kind"), "findings": findings})
    return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


def encode_gold_labels(labels: Mapping[str, Any]) -> str:
    """The ``gold_labels`` column value: {observation: positive|negative|uncertain|not_mentioned}."""
    return json.dumps(normalise_labels(labels), ensure_ascii=False, sort_keys=True, separators=(",", ":"))


# ---- column access ---------------------------------------------------------------------------
def _column(kwargs: Mapping[str, Any], name: str, n: int) -> list[Any]:
    values = kwargs.get(name)
    if values is None:
        return [None] * n
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        return [values] * n  # a scalar for the whole batch (direct calls in scripts)
    if len(values) != n:
        raise ValueError(f"reward column {name!r} has {len(values)} values for {n} completions")
    return list(values)


def _gold_chain(value: Any) -> GoldChain:
    if isinstance(value, GoldChain):
        return value
    if value is None or isinstance(value, str):
        return gold_chain_from_json(value)
    return GoldChain.from_steps(value)


def _labels(value: Any) -> Mapping[str, str]:
    if value is None or isinstance(value, str):
        return labels_from_json(value)
    return normalise_labels(value)


# ---- rewards ----------------------------------------------------------------------------------
def format_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """1.0 when the output is exactly one <think>…</think> then one <answer>…</answer>, else 0.0."""
    return [1.0 if is_well_formed(completion_text(c)) else 0.0 for c in completions]


def outcome_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """Answer correctness: 1/0 letter match (option tasks), set F1 (open task); no answer = 0."""
    n = len(completions)
    solutions, tasks, options = (_column(kwargs, k, n) for k in ("solution", "task", "options"))
    out = []
    for c, sol, task, opts in zip(completions, solutions, tasks, options):
        answer = parse_output(completion_text(c)).answer
        out.append(outcome_score(answer, str(task or ""), sol, opts))
    return out


def process_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """RadRScore (rules judge) of the <think> text against ``gold_steps`` and ``gold_labels``."""
    return [r.radrscore for r in _process_scores(completions, kwargs)]


def _process_scores(completions: Sequence[Any], kwargs: Mapping[str, Any]) -> list[ReasoningScore]:
    n = len(completions)
    steps, labels = _column(kwargs, "gold_steps", n), _column(kwargs, "gold_labels", n)
    solutions, tasks, options = (_column(kwargs, k, n) for k in ("solution", "task", "options"))
    parsed = [parse_output(completion_text(c)) for c in completions]
    prefetch(p.think for p in parsed)  # every unseen line of the batch in a few finder calls
    out = []
    for p, g, lab, sol, task, opts in zip(parsed, steps, labels, solutions, tasks, options):
        # The answer is part of the reasoning's argument: steps arguing for a wrong one are ineffective.
        outcome = outcome_score(p.answer, str(task or ""), sol, opts)
        wrong = wrong_answer(p.answer, str(task or ""), sol, opts, outcome) if sol is not None else None
        out.append(score_reasoning(p.think, _gold_chain(g), _labels(lab), wrong=wrong))
    return out


def process_reward_gated(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """process_reward x outcome_reward: reasoning earns only as much as the answer is right
    (0 for a wrong letter; scaled by the set F1 on the open task)."""
    process = process_reward(completions, **kwargs)
    outcome = outcome_reward(completions, **kwargs)
    return [p * o for p, o in zip(process, outcome)]


def reward_components(completions: Sequence[Any], **kwargs: Any) -> list[dict[str, float | None]]:
    """All components per completion (for logging and debugging a reward run)."""
    fmt, outcome = format_reward(completions, **kwargs), outcome_reward(completions, **kwargs)
    rows = []
    for i, r in enumerate(_process_scores(completions, kwargs)):
        rows.append(dict(format=fmt[i], outcome=outcome[i], completeness=r.completeness, factuality=r.factuality,
                         effectiveness=r.effectiveness, process=r.radrscore))
    return rows


REWARD_COLUMNS = ("solution", "task", "options", "gold_steps", "gold_labels")


def weighted_rewards(
    funcs: Sequence[Any], weights: Sequence[float], rows: Sequence[Mapping[str, Any]], completions: Sequence[Any]
) -> list[float]:
    """The reward GRPO trains on, for one completion per row: sum of weight x fn, each fn called as TRL
    calls it (the rows' reward columns as keyword lists). Scores outputs of any model on fixed prompts
    with exactly the training reward (bench/learning.py: the SFT and GRPO checkpoints on held-out prompts)."""
    if len(funcs) != len(weights):
        raise ValueError(f"{len(weights)} reward weights for {len(funcs)} reward functions")
    if len(rows) != len(completions):
        raise ValueError(f"{len(completions)} completions for {len(rows)} rows")
    columns = {c: [r.get(c) for r in rows] for c in REWARD_COLUMNS if any(c in r for r in rows)}
    total = [0.0] * len(rows)
    for fn, weight in zip(funcs, weights):
        for i, value in enumerate(fn(list(completions), **columns)):
            total[i] += weight * (value or 0.0)  # None (not applicable) counts 0, as TRL's nansum does
    return total


# Config name "process_gated" -> training.rewards.process_gated_reward (configs name rewards as
# <name>_reward); TRL still logs it under the function's own name, process_reward_gated.
process_gated_reward = process_reward_gated

DEFAULT_REWARD_FUNCS = (outcome_reward, format_reward, process_reward)
DEFAULT_REWARD_WEIGHTS = (1.0, 0.5, 1.0)
