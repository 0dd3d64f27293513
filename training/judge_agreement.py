"""How far radchain's rules judge agrees with the paper's GPT-4o judge, on the release's own verdicts.

The ChestX-Reasoner release ships, per model and task, a JSON list of items that hold the
question, the report (``original_report``), the gold reasoning (``reason_steps``, plain
strings), the model's whole output (``pred``) and the GPT-4o judge's work on it (key findings,
``recall_res``, ``precision_res``, ``efficiency``). This module reads such files, scores every
item with the rules judge (training/radrscore.py) and compares the two judges:

* per-sample Pearson and Spearman correlation per component (completeness, factuality,
  effectiveness, RadRScore), over all items and per model, each with a percentile bootstrap
  interval (items resampled with replacement);
* system-level means per model under both judges, and whether the two judges rank the
  models the same way on each component.

The GPT-4o components are computed as the release's ``eval/reasoning_eval.py`` averages them:
completeness = recalled_count / len(gold key findings), factuality = correct_count /
len(prediction key findings), effectiveness = effective / (effective + ineffective); an item
missing any of them (a judge reply that was not JSON, a zero denominator) is left out and
counted. An item whose output is empty is left out too (the release judged text that was not
there, so its verdicts say nothing about an output) and counted as ``n_empty_output``.

Directory layout: ``DIR/<model>/*.json`` (the release's ``eval/res/reasoning_res`` layout), or
``DIR/*.json`` (one model, named after DIR), or a single JSON file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.radrscore import ComponentAverages

COMPONENTS = ("completeness", "factuality", "effectiveness", "radrscore")


# ---- release items -----------------------------------------------------------------------------
# One judge's components for one sample (None = not computable): the same three numbers, and the
# same mean, as a set's component averages.
JudgeVerdict = ComponentAverages


@dataclass(frozen=True)
class ReleaseItem:
    model: str
    task: str  # the file's stem ("openi_single_evaluation_res")
    index: int  # position in the file
    question: str
    answer: str
    report: str
    gold_steps: tuple[str, ...]
    pred: str
    verdict: JudgeVerdict | None  # the release's GPT-4o verdicts; None when any is missing

    @property
    def sample_id(self) -> str:
        return f"{self.model}/{self.task}/{self.index}"


def _key_findings(value: Any) -> list[Any] | None:
    if not isinstance(value, Mapping):
        return None
    for key in ("key_conclusion", "key_conclusions", "key_findings"):
        found = value.get(key)
        if isinstance(found, list):
            return found
    return None


def _ratio(num: Any, den: Any) -> float | None:
    try:
        num, den = float(num), float(den)
    except (TypeError, ValueError):
        return None
    if den <= 0 or math.isnan(num) or math.isnan(den):
        return None
    return num / den


def release_verdict(item: Mapping[str, Any]) -> JudgeVerdict | None:
    """The GPT-4o components of one release item, or None when any of them is missing."""
    gold, pred = _key_findings(item.get("gt_key_finding")), _key_findings(item.get("pred_key_finding"))
    recall, precision, eff = item.get("recall_res"), item.get("precision_res"), item.get("efficiency")
    if gold is None or pred is None or not all(isinstance(x, Mapping) for x in (recall, precision, eff)):
        return None
    completeness = _ratio(recall.get("recalled_count"), len(gold))
    factuality = _ratio(precision.get("correct_count"), len(pred))
    try:
        effective = float(eff.get("effective_count"))
        total = effective + float(eff.get("ineffective_count"))
    except (TypeError, ValueError):
        return None
    effectiveness = _ratio(effective, total)
    if completeness is None or factuality is None or effectiveness is None:
        return None
    return JudgeVerdict(completeness, factuality, effectiveness)


def _step_text(step: Any) -> str:
    if isinstance(step, Mapping):
        return str(step.get("text") or "")
    return str(step) if isinstance(step, str) else ""


def is_release_item(obj: Any) -> bool:
    return isinstance(obj, Mapping) and "reason_steps" in obj and "pred" in obj


def release_items_from(obj: Any, model: str, task: str) -> list[ReleaseItem]:
    """Items of one release JSON document (a list of item objects); other entries are ignored."""
    items = obj if isinstance(obj, list) else []
    out = []
    for i, it in enumerate(items):
        if not is_release_item(it):
            continue
        steps = it.get("reason_steps")
        if isinstance(steps, str):
            steps = [steps]
        gold = tuple(_step_text(s) for s in (steps if isinstance(steps, list) else []))
        out.append(ReleaseItem(
            model=model, task=task, index=i, question=str(it.get("question") or ""),
            answer=str(it.get("answer") or ""), report=str(it.get("original_report") or ""),
            gold_steps=tuple(g for g in gold if g.strip()),
            pred=str(it.get("pred") or ""), verdict=release_verdict(it),
        ))
    return out


def read_release(path: str | Path) -> list[ReleaseItem]:
    """Items of a release directory or file (layouts in the module docstring), in a stable order."""
    path = Path(path)
    if path.is_file():
        files = [(path.parent.name, path)]
    elif path.is_dir():
        subdirs = sorted(p for p in path.iterdir() if p.is_dir())
        files = [(d.name, f) for d in subdirs for f in sorted(d.glob("*.json"))]
        files += [(path.name, f) for f in sorted(path.glob("*.json"))]
    else:
        raise FileNotFoundError(f"{path} does not exist")
    out: list[ReleaseItem] = []
    for model, f in files:
        try:
            doc = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{f}: not a release JSON file ({e})") from None
        out.extend(release_items_from(doc, model, f.stem))
    return out


# ---- statistics --------------------------------------------------------------------------------
def _corr(xs: Sequence[float], ys: Sequence[float]) -> tuple[float | None, float | None]:
    from scipy import stats

    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None, None
    p = float(stats.pearsonr(xs, ys).statistic)
    s = float(stats.spearmanr(xs, ys).statistic)
    return (None if math.isnan(p) else p), (None if math.isnan(s) else s)


def _bootstrap(xs: Sequence[float], ys: Sequence[float], n_boot: int, seed: int) -> tuple[
        tuple[float, float] | None, tuple[float, float] | None]:
    """95% percentile intervals of Pearson and Spearman over resampled pairs."""
    import numpy as np
    from scipy import stats

    if n_boot <= 0 or len(xs) < 3:
        return None, None
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    xb, yb = x[idx], y[idx]

    def pearson_rows(a: Any, b: Any) -> Any:
        a = a - a.mean(axis=1, keepdims=True)
        b = b - b.mean(axis=1, keepdims=True)
        den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
        with np.errstate(invalid="ignore", divide="ignore"):
            return (a * b).sum(axis=1) / den

    pr = pearson_rows(xb, yb)
    sr = pearson_rows(stats.rankdata(xb, axis=1), stats.rankdata(yb, axis=1))

    def interval(v: Any) -> tuple[float, float] | None:
        v = v[~np.isnan(v)]
        if not len(v):
            return None
        return float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))

    return interval(pr), interval(sr)


@dataclass(frozen=True)
class Correlation:
    component: str
    group: str  # "all" or a model name
    n: int
    pearson: float | None
    spearman: float | None
    pearson_ci: tuple[float, float] | None
    spearman_ci: tuple[float, float] | None


@dataclass(frozen=True)
class SystemMeans:
    model: str
    n: int
    release: dict[str, float | None]  # component -> mean under the GPT-4o judge
    rules: dict[str, float | None]  # component -> mean under radchain's judge


@dataclass
class AgreementReport:
    """What `radchain judge-agreement --release` prints (and bench/judge_agreement.py holds to floors)."""

    release_dir: str
    semantic: bool
    n_items: int
    n_compared: int
    n_no_verdict: int
    n_empty_output: int
    n_tagless: int
    correlations: list[Correlation]
    systems: list[SystemMeans]
    same_ranking: dict[str, bool | None]  # component -> both judges order the models the same way
    seconds: float = 0.0
    pairs: list[tuple[ReleaseItem, JudgeVerdict]] = field(default_factory=list, repr=False)

    def correlation(self, component: str, group: str = "all") -> Correlation | None:
        return next((c for c in self.correlations if c.component == component and c.group == group), None)

    def as_rows(self) -> list[dict[str, Any]]:
        rows = []
        for c in self.correlations:
            rows.append(dict(
                group=c.group, component=c.component, n=c.n, pearson=c.pearson,
                pearson_lo=c.pearson_ci[0] if c.pearson_ci else None,
                pearson_hi=c.pearson_ci[1] if c.pearson_ci else None,
                spearman=c.spearman,
                spearman_lo=c.spearman_ci[0] if c.spearman_ci else None,
                spearman_hi=c.spearman_ci[1] if c.spearman_ci else None,
            ))
        return rows

    def system_rows(self) -> list[dict[str, Any]]:
        rows = []
        for s in self.systems:
            for comp in COMPONENTS:
                rows.append(dict(model=s.model, component=comp, n=s.n, gpt4o_judge=s.release[comp],
                                 rules_judge=s.rules[comp],
                                 same_ranking=self.same_ranking.get(comp)))
        return rows


def _mean(values: Iterable[float | None]) -> float | None:
    vs = [v for v in values if v is not None]
    return sum(vs) / len(vs) if vs else None


def compare_judges(
    pairs: Sequence[tuple[ReleaseItem, JudgeVerdict]], *, n_boot: int = 1000, seed: int = 0
) -> tuple[list[Correlation], list[SystemMeans], dict[str, bool | None]]:
    """Correlations (all, then per model), system means and ranking agreement of (item, rules verdict) pairs."""
    models = sorted({it.model for it, _ in pairs})
    groups = [("all", list(pairs))] + [(m, [p for p in pairs if p[0].model == m]) for m in models]
    correlations = []
    for gi, (group, ps) in enumerate(groups):
        for ci, comp in enumerate(COMPONENTS):
            xy = [(getattr(v, comp), getattr(it.verdict, comp)) for it, v in ps]
            xy = [(a, b) for a, b in xy if a is not None and b is not None]
            xs, ys = [a for a, _ in xy], [b for _, b in xy]
            p, s = _corr(xs, ys)
            pci, sci = _bootstrap(xs, ys, n_boot, seed + 97 * gi + ci)
            correlations.append(Correlation(comp, group, len(xy), p, s, pci, sci))
    systems = []
    for m in models:
        ps = [p for p in pairs if p[0].model == m]
        systems.append(SystemMeans(
            m, len(ps),
            release={c: _mean(getattr(it.verdict, c) for it, _ in ps) for c in COMPONENTS},
            rules={c: _mean(getattr(v, c) for _, v in ps) for c in COMPONENTS},
        ))
    same: dict[str, bool | None] = {}
    for c in COMPONENTS:
        if len(systems) < 2:
            same[c] = None
            continue
        a = [s.release[c] for s in systems]
        b = [s.rules[c] for s in systems]
        if any(x is None for x in a + b):
            same[c] = None
            continue
        order_a = sorted(range(len(a)), key=lambda i: -a[i])
        order_b = sorted(range(len(b)), key=lambda i: -b[i])
        same[c] = order_a == order_b
    return correlations, systems, same


# ---- the rules judge on release items -------------------------------------------------------


def score_release_items(items: Sequence[ReleaseItem], *, semantic: bool = False,
                        matcher: Any | None = None) -> list[Any]:
    """ReasoningScore of every item under the rules judge (lexical, or semantic with MiniLM)."""
    from training.radrscore import score_release_batch

    return score_release_batch(items, semantic=semantic, matcher=matcher)


def agreement_on_release(
    release_dir: str | Path, *, semantic: bool = False, n_boot: int = 1000, seed: int = 0,
    matcher: Any | None = None,
) -> AgreementReport:
    """Score every release item with the rules judge and compare with the release's GPT-4o verdicts."""
    import time

    items = read_release(release_dir)
    judged = [it for it in items if it.verdict is not None]
    nonempty = [it for it in judged if it.pred.strip()]
    t0 = time.perf_counter()
    scores = score_release_items(nonempty, semantic=semantic, matcher=matcher)
    seconds = time.perf_counter() - t0
    pairs = [(it, JudgeVerdict(s.completeness, s.factuality, s.effectiveness)) for it, s in zip(nonempty, scores)]
    correlations, systems, same = compare_judges(pairs, n_boot=n_boot, seed=seed)
    return AgreementReport(
        release_dir=str(release_dir), semantic=semantic, n_items=len(items), n_compared=len(pairs),
        n_no_verdict=len(items) - len(judged), n_empty_output=len(judged) - len(nonempty),
        n_tagless=sum(bool(getattr(s, "tagless", False)) for s in scores),
        correlations=correlations, systems=systems, same_ranking=same, seconds=seconds, pairs=pairs,
    )


def format_report(report: AgreementReport) -> str:
    """Plain-text figures (what bench scripts print)."""
    lines = [
        f"release: {report.release_dir}  ({'semantic' if report.semantic else 'lexical'} matching)",
        f"items {report.n_items}: compared {report.n_compared}, no GPT-4o verdict {report.n_no_verdict}, "
        f"empty output {report.n_empty_output}, tagless outputs scored {report.n_tagless}; "
        f"scored in {report.seconds:.1f} s ({report.n_compared / max(report.seconds, 1e-9):,.0f} samples/s)",
        f"{'group':<26}{'component':<15}{'n':>5}{'pearson':>9}  {'95% CI':<15}{'spearman':>9}  {'95% CI':<15}",
    ]

    def ci(v: tuple[float, float] | None) -> str:
        return f"[{v[0]:.2f}, {v[1]:.2f}]" if v else ""

    def f(v: float | None) -> str:
        return "" if v is None else f"{v:.3f}"

    for c in report.correlations:
        lines.append(f"{c.group:<26}{c.component:<15}{c.n:>5}{f(c.pearson):>9}  {ci(c.pearson_ci):<15}"
                     f"{f(c.spearman):>9}  {ci(c.spearman_ci):<15}")
    lines.append("system means (GPT-4o judge / rules judge):")
    for s in report.systems:
        parts = "  ".join(f"{c} {f(s.release[c])}/{f(s.rules[c])}" for c in COMPONENTS)
        lines.append(f"  {s.model:<24} n={s.n:<4} {parts}")
    lines.append("same ranking of models: " + ", ".join(f"{c} {report.same_ranking[c]}" for c in COMPONENTS))
    return "\n".join(lines)
