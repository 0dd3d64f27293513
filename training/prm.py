"""Step-labelled data for process-reward-model (PRM) training, rows of ``mart_prm_steps``.

Format: TRL's *stepwise supervision* type -- ``prompt`` (str), ``completions`` (list of step
texts), ``labels`` (one bool per step) -- which a PRM trainer tokenizes by joining the steps
with a separator and putting each step's label on its separator token.

Positives: every accepted chain, all steps True (the chains passed the deterministic
verifier, so each step agrees with the report).

Negatives: the same chain with one step made wrong, in one of two ways:

* ``status_flip`` -- a finding the step states is restated with the opposite status
  ("No pleural effusion" -> "There is a pleural effusion"; present -> absent; uncertain ->
  absent). The chain was verified against the labels, so the flipped status contradicts them.
* ``finding_swap`` -- a finding the step states is replaced by another observation with the
  same status, chosen so that the study's labels contradict it ("No pleural effusion" ->
  "No cardiomegaly" when the heart is enlarged). Needs the study's labels; without them only
  flips are made.

The altered step is rewritten as a short sentence in one of several phrasings (seeded), and
the sentence is checked with the shared mention finder (training/findings_text.py, the
same reading the process reward uses) to state exactly the intended wrong finding; a
phrasing that does not read back as intended is not used.

Labels after the altered step: ``after_error="false"`` (default) labels the altered step and
every later one False -- a step's label says whether the reasoning *up to and including it*
is still sound, the reading of Math-Shepherd's labels (a TRL stepwise dataset), so a PRM
scores a chain by its weakest prefix. ``after_error="truncate"`` ends the row at the altered
step instead, as TRL's PRM800K conversion does with the first bad step.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from schemas.base import stable_id
from training.findings_text import step_findings, structured_findings
from training.radrscore import normalise_label

AfterError = Literal["false", "truncate"]

# How to name each observation in a rewritten sentence: (noun phrase, article for "There is ...").
_SURFACE: dict[str, tuple[tuple[str, str], ...]] = {
    "Atelectasis": (("atelectasis", ""),),
    "Cardiomegaly": (("cardiomegaly", ""), ("cardiac enlargement", "")),
    "Consolidation": (("consolidation", ""), ("focal consolidation", "")),
    "Edema": (("pulmonary edema", ""), ("edema", "")),
    "Enlarged Cardiomediastinum": (("enlarged cardiomediastinum", "an "), ("widened mediastinum", "a ")),
    "Fracture": (("fracture", "a "), ("rib fracture", "a ")),
    "Lung Lesion": (("pulmonary nodule", "a "), ("lung mass", "a ")),
    "Lung Opacity": (("opacity", "an "), ("airspace opacity", "an ")),
    "Pleural Effusion": (("pleural effusion", "a "), ("pleural effusion", "")),
    "Pneumonia": (("pneumonia", ""),),
    "Pneumothorax": (("pneumothorax", "a "), ("pneumothorax", "")),
    "Support Devices": (("support device", "a "), ("endotracheal tube", "an ")),
}
_TEMPLATES: dict[str, tuple[str, ...]] = {
    "present": ("There is {a}{p}.", "{A}{p} is seen.", "Findings are consistent with {a}{p}."),
    "absent": ("There is no {p}.", "No {p} is seen.", "There is no evidence of {p}."),
    "uncertain": ("{A}{p} cannot be excluded.", "There may be {a}{p}."),
}
_FLIP = {"present": "absent", "absent": "present", "uncertain": "absent"}
# What a label value makes false, per stated status (for the swap target).
_CONTRADICTED_BY = {
    "present": {"negative", "not_mentioned"},
    "absent": {"positive"},
    "uncertain": {"negative", "not_mentioned"},
}


def statement(observation: str, status: str, rng: random.Random) -> str | None:
    """A sentence stating ``observation`` with ``status`` that reads back as exactly that finding."""
    surfaces = list(_SURFACE.get(observation, ()))
    templates = list(_TEMPLATES.get(status, ()))
    candidates = [(t, p, a) for t in templates for p, a in surfaces]
    rng.shuffle(candidates)
    for template, phrase, article in candidates:
        text = template.format(p=phrase, a=article, A=article.capitalize() if article else "")
        if not article and text[0].islower():
            text = text[0].upper() + text[1:]
        read = {(o, s) for o, s, _ in step_findings(text)}
        if (observation, status) in read and not any(o == observation and s != status for o, s in read):
            return text
    return None


def group_chain_steps(step_rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """int_chain_steps rows -> [{"chain_id", "sample_id", "steps": [rows by step_index]}], sorted by chain_id."""
    chains: dict[str, dict[str, Any]] = {}
    for row in step_rows:
        c = chains.setdefault(str(row["chain_id"]), {"chain_id": str(row["chain_id"]),
                                                    "sample_id": str(row["sample_id"]), "steps": []})
        c["steps"].append(dict(row))
    for c in chains.values():
        c["steps"].sort(key=lambda r: r["step_index"])
    return [chains[k] for k in sorted(chains)]


def build_prm_rows(
    chains_with_steps: Iterable[Mapping[str, Any]],
    samples: Mapping[str, Mapping[str, Any]] | Iterable[Mapping[str, Any]],
    seed: int,
    *,
    labels: Mapping[str, Mapping[str, Any]] | None = None,
    after_error: AfterError = "false",
    flips_per_chain: int = 1,
    swaps_per_chain: int = 1,
) -> list[dict[str, Any]]:
    """mart_prm_steps rows (without lineage) for accepted chains plus perturbed negatives.

    ``chains_with_steps``: [{"chain_id", "sample_id", "steps": [{"text", "findings", ...}]}]
    (see :func:`group_chain_steps`), or int_chain_steps rows directly. ``samples``: sample_id ->
    int_vqa_samples row (or the rows). ``labels``: study_id -> {observation: value}, needed
    for finding swaps. Deterministic in ``seed``: each chain draws from its own generator.
    """
    if after_error not in ("false", "truncate"):
        raise ValueError(f"after_error must be 'false' or 'truncate', got {after_error!r}")
    chains = list(chains_with_steps)
    if chains and "steps" not in chains[0]:
        chains = group_chain_steps(chains)
    by_id = samples if isinstance(samples, Mapping) else {str(s["sample_id"]): s for s in samples}
    rows: list[dict[str, Any]] = []
    for chain in sorted(chains, key=lambda c: str(c["chain_id"])):
        sample = by_id.get(str(chain["sample_id"]))
        if sample is None:
            continue  # a chain whose sample is gone (stale partition): nothing to prompt with
        steps = [s for s in chain["steps"] if str(s.get("text") or "").strip()]
        if not steps:
            continue
        texts = [str(s["text"]).strip() for s in steps]
        base = dict(chain_id=str(chain["chain_id"]), sample_id=str(chain["sample_id"]), task=str(sample["task"]),
                    split=str(sample.get("split") or ""), prompt=str(sample["question"]))
        rows.append(_row(base, texts, [True] * len(texts), "none", None, None))

        rng = random.Random(f"prm\x1f{seed}\x1f{chain['chain_id']}")
        study_labels = (labels or {}).get(str(sample.get("study_id")))
        used: set[tuple[int, str]] = set()
        for kind, count in (("status_flip", flips_per_chain), ("finding_swap", swaps_per_chain)):
            for _ in range(count):
                made = _perturb(kind, steps, study_labels, rng, used)
                if made is None:
                    break
                index, new_text, detail = made
                new_texts = texts[:index] + [new_text] + texts[index + 1:]
                step_labels = [True] * index + [False] * (len(texts) - index)
                if after_error == "truncate":
                    new_texts, step_labels = new_texts[: index + 1], step_labels[: index + 1]
                rows.append(_row(base, new_texts, step_labels, kind, index, detail))
    return rows


def _row(base: Mapping[str, Any], texts: Sequence[str], labels: Sequence[bool], kind: str,
         index: int | None, detail: str | None) -> dict[str, Any]:
    return dict(
        prm_id=stable_id("prm", base["chain_id"], kind, index, detail),
        **base,
        completions=list(texts),
        labels=list(labels),
        perturbation=kind,
        perturbed_step=index,
        detail=detail,
    )


def _perturb(
    kind: str,
    steps: Sequence[Mapping[str, Any]],
    study_labels: Mapping[str, Any] | None,
    rng: random.Random,
    used: set[tuple[int, str]],
) -> tuple[int, str, str] | None:
    """(step index, new step text, detail) for one perturbation, or None when none is possible."""
    chain_obs = {o for s in steps for o, _, _ in structured_findings(s.get("findings"))}
    options = []
    for i, s in enumerate(steps):
        for obs, status, _ in sorted(structured_findings(s.get("findings")), key=lambda f: (f[0], f[1])):
            if obs in _SURFACE and status in _FLIP and (i, f"{kind}:{obs}") not in used:
                options.append((i, obs, status))
    rng.shuffle(options)
    for i, obs, status in options:
        if kind == "status_flip":
            new_obs, new_status = obs, _FLIP[status]
        else:
            if not study_labels:
                return None
            bad = _CONTRADICTED_BY[status]
            targets = sorted(
                o for o in _SURFACE
                if o not in chain_obs and normalise_label(study_labels.get(o)) in bad
            )
            if not targets:
                continue
            new_obs, new_status = rng.choice(targets), status
        text = statement(new_obs, new_status, rng)
        if text is None:
            continue
        used.add((i, f"{kind}:{obs}"))
        return i, text, f"{obs} {status} -> {new_obs} {new_status}"
    return None
