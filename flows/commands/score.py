"""`radchain score` and `radchain judge-agreement`: accuracy and RadRScore of a prediction set.

The scoring itself is training.radrscore.score_predictions (pure, shared with the
evaluation job); this module reads the predictions file and the warehouse gold, runs the
chosen judge, writes fct_eval_results / fct_predictions and prints the table.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from flows.cli_support import UsageError, cell, clear_errors, console, err_console, table_console

VERSION = "score-v1"
_MAX_LISTED = 5


def register(app: typer.Typer) -> None:
    @app.command()
    @clear_errors
    def score(
        predictions: Path = typer.Option(..., "--predictions", "-p",
                                         help='JSONL file, one {"sample_id": ..., "output": ...} per line'),
        model: str | None = typer.Option(None, help="model name for the results (default: the file's 'model' "
                                                    "field, else the file name)"),
        checkpoint: str | None = typer.Option(None, help="checkpoint name or path, recorded with the results"),
        judge: str = typer.Option("rules", help="RadRScore judge: rules (deterministic) | llm (needs an endpoint)"),
        semantic: bool = typer.Option(False, "--semantic", help="rules judge: match what wording leaves open "
                                                                 "by MiniLM embeddings (pooled word vectors)"),
        write: bool = typer.Option(True, "--write/--no-write", help="write fct_eval_results and fct_predictions"),
    ) -> None:
        """Score model outputs against the warehouse gold: accuracy and RadRScore per task.

        A ChestX-Reasoner release results file (a JSON list of items with reason_steps, pred and
        original_report), or a folder of them, is scored against the gold inside it (no warehouse)."""
        if predictions.is_dir() or predictions.suffix.lower() == ".json":
            _score_release(predictions, semantic=semantic)
            return
        eval_id, report = score_file(predictions, model=model, checkpoint=checkpoint, judge=judge,
                                     semantic=semantic, write=write)
        _print_report(report, title=f"radchain score: {report.model} ({judge} judge)")
        if report.unknown_ids:
            shown = ", ".join(report.unknown_ids[:_MAX_LISTED])
            more = f" and {len(report.unknown_ids) - _MAX_LISTED} more" if len(report.unknown_ids) > _MAX_LISTED else ""
            err_console.print(f"[yellow]warning:[/] {len(report.unknown_ids)} sample ids are not in the warehouse "
                              f"and were not scored: {shown}{more}", highlight=False)
        if report.duplicate_ids:
            err_console.print(f"[yellow]warning:[/] {len(report.duplicate_ids)} repeated sample ids; the first "
                              "output of each was scored", highlight=False)
        if report.judge_failures:
            err_console.print(f"[yellow]warning:[/] the llm judge failed on {report.judge_failures} samples; "
                              "the rules judge scored them", highlight=False)
        if write:
            console.print(f"eval_id: {eval_id}  (fct_eval_results, fct_predictions)")

    @app.command("judge-agreement")
    @clear_errors
    def judge_agreement_cmd(
        predictions: Path | None = typer.Option(None, "--predictions", "-p",
                                                help='JSONL file, one {"sample_id": ..., "output": ...} per line '
                                                     "(rules judge vs the llm judge)"),
        release: Path | None = typer.Option(None, "--release",
                                            help="a ChestX-Reasoner release results folder (<model>/*.json with "
                                                 "reason_steps, pred and GPT-4o verdicts) or one such file: "
                                                 "rules judge vs the paper's stored GPT-4o verdicts"),
        semantic: bool = typer.Option(False, "--semantic", help="--release: match by MiniLM embeddings"),
        bootstrap: int = typer.Option(1000, "--bootstrap", help="--release: bootstrap resamples for the intervals"),
        format: str = typer.Option("table", "--format", "-f", help="table | csv | json"),
    ) -> None:
        """Compare radchain's rules judge with an LLM judge: per-component Pearson/Spearman.

        With --release, against the verdicts stored in the release files (no endpoint, no warehouse):
        per-sample correlations overall and per model with bootstrap intervals, system means and
        whether both judges rank the models the same way."""
        import pyarrow as pa

        from flows.cli_support import print_arrow

        if (predictions is None) == (release is None):
            raise UsageError("give exactly one of --predictions or --release")
        if release is not None:
            from training.judge_agreement import agreement_on_release

            if not release.exists():
                raise UsageError(f"{release} does not exist")
            try:
                report = agreement_on_release(release, semantic=semantic, n_boot=bootstrap)
            except ValueError as e:
                raise UsageError(str(e)) from None
            if not report.n_compared:
                raise UsageError(f"{release} holds no release items with GPT-4o verdicts")
            print_arrow(pa.Table.from_pylist(report.as_rows()), format,
                        title=f"judge agreement with the release's GPT-4o verdicts: {report.n_compared} samples "
                              f"({report.n_no_verdict} without verdicts, {report.n_empty_output} empty outputs "
                              f"left out, {report.n_tagless} tagless outputs scored)")
            print_arrow(pa.Table.from_pylist(report.system_rows()), format, title="system-level means")
            return

        from radchain.runtime import prepare_environment
        from training.answers import completion_text, parse_output
        from training.judge_llm import judge_agreement
        from training.radrscore import score_reasoning

        settings = prepare_environment()
        records, _ = read_predictions(predictions)
        _, gold = _load_gold(settings, records)
        llm_scores, failures, _ = _llm_scores(settings, records, gold)
        rules_scores = {}
        for r in records:
            ref = gold.get(str(r["sample_id"]))
            if ref is not None:
                think = parse_output(completion_text(r.get("output"))).think
                rules_scores[ref.sample_id] = score_reasoning(think, ref.chain, ref.labels)
        rows = judge_agreement(rules_scores, llm_scores)
        print_arrow(pa.Table.from_pylist(rows), format, title=f"judge agreement (llm judge failed on {failures})")


# ---- helpers (module level so the evaluation job and tests can reuse them) ------------------------
def score_file(
    predictions: Path,
    *,
    model: str | None = None,
    checkpoint: str | None = None,
    judge: str = "rules",
    semantic: bool = False,
    write: bool = True,
    settings: Any = None,
    baseline: str | None = None,
    baseline_of: str | None = None,
) -> tuple[str, Any]:
    """Score a predictions JSONL against the warehouse gold; write the eval tables when ``write``.

    Returns (eval_id, training.radrscore.ScoreReport). Used by `radchain score` and by the
    evaluation job (flows/evaluation.py), which also scores the baselines (``baseline`` names one,
    ``baseline_of`` the model evaluation it stands beside). Raises UsageError on unusable input.
    """
    from radchain.runtime import prepare_environment
    from training.radrscore import EmbeddingStepMatcher, score_predictions

    settings = settings or prepare_environment()
    if judge not in ("rules", "llm"):
        raise UsageError("--judge must be rules or llm")
    records, file_model = read_predictions(predictions)
    wh, gold = _load_gold(settings, records)
    reasoning_scores, judge_failures, llm_calls = None, 0, []
    if judge == "llm":
        reasoning_scores, judge_failures, llm_calls = _llm_scores(settings, records, gold)
    matcher = EmbeddingStepMatcher(pooling="words") if semantic else None
    report = score_predictions(records, gold, reasoning_scores=reasoning_scores, step_matcher=matcher)
    report.judge_failures = judge_failures
    model_name = model or file_model or predictions.stem
    report.model = model_name
    eval_id = _eval_id(predictions, model_name, checkpoint, judge, semantic)
    report.format_compliance = format_compliance(report)
    if write:
        _write(wh, eval_id, report, model_name, checkpoint, judge, predictions, llm_calls, baseline, baseline_of)
    return eval_id, report


def _score_release(path: Path, *, semantic: bool) -> None:
    """`radchain score` on release items: RadRScore per model and file against the gold they carry."""
    from training.judge_agreement import read_release
    from training.radrscore import average_scores, score_release_batch

    if not path.exists():
        raise UsageError(f"predictions file {path} does not exist")
    try:
        items = read_release(path)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not items:
        raise UsageError(f"{path} holds no release items (a JSON list of objects with reason_steps and pred)")
    scores = score_release_batch(items, semantic=semantic)
    t = Table(title=f"radchain score: {path} (rules judge, {'semantic' if semantic else 'lexical'} matching)")
    for col in ("model", "task", "n", "complete", "factual", "effective", "RadRScore", "unparsed", "tagless"):
        t.add_column(col, justify="left" if col in ("model", "task") else "right")
    groups: dict[tuple[str, str], list[Any]] = {}
    for it, sc in zip(items, scores):
        groups.setdefault((it.model, it.task), []).append(sc)
    for it, sc in zip(items, scores):
        groups.setdefault((it.model, "\uffff"), []).append(sc)  # each model's "all" row after its tasks
    for (model, task), scs in sorted(groups.items()):
        task = "all" if task == "\uffff" else task
        avg = average_scores(scs)
        t.add_row(model, task, str(len(scs)), _fmt(avg.completeness), _fmt(avg.factuality), _fmt(avg.effectiveness),
                  _fmt(avg.radrscore), str(sum(s.unparseable for s in scs)), str(sum(s.tagless for s in scs)))
    console.print(t)


def format_compliance(report: Any) -> dict[str, float | None]:
    """Task (and "all") -> share of well-formed outputs, over the samples the report scored."""
    from training.answers import is_well_formed

    by_task: dict[str, list[bool]] = {}
    for s in report.per_sample:
        ok = is_well_formed(s.output)
        by_task.setdefault(s.task, []).append(ok)
        by_task.setdefault("all", []).append(ok)
    return {task: (sum(v) / len(v) if v else None) for task, v in by_task.items()}


def read_predictions(path: Path) -> tuple[list[dict[str, Any]], str | None]:
    """JSONL records with sample_id and output; returns them and a model name if the file names one."""
    if not path.exists():
        raise UsageError(f"predictions file {path} does not exist")
    records, models = [], set()
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{lineno}: not a JSON object ({e.msg})") from None
            if not isinstance(rec, dict) or rec.get("sample_id") in (None, ""):
                raise UsageError(f"{path}:{lineno}: each line needs a sample_id")
            if "output" not in rec:
                raise UsageError(f"{path}:{lineno}: each line needs an output (use \"\" for an empty one)")
            rec["sample_id"] = str(rec["sample_id"])
            if rec.get("model"):
                models.add(str(rec["model"]))
            records.append(rec)
    if not records:
        raise UsageError(f"{path} holds no predictions")
    return records, (models.pop() if len(models) == 1 else None)


def _load_gold(settings: Any, records: list[dict[str, Any]]) -> tuple[Any, dict[str, Any]]:
    from training.radrscore import gold_from_rows
    from warehouse import Warehouse
    from warehouse.eval_store import count_samples, read_gold_rows

    wh = Warehouse(settings.warehouse_dir)
    if count_samples(wh) == 0:
        raise UsageError(f"no VQA samples in the warehouse at {wh.root}; run `radchain run` first")
    wh.ensure()
    samples, steps, labels = read_gold_rows(wh, (r["sample_id"] for r in records))
    return wh, gold_from_rows(samples, steps, labels)


def _llm_scores(settings: Any, records: list[dict[str, Any]], gold: dict[str, Any]) -> tuple[dict, int, list]:
    """LLM-judge scores of the known samples: (scores by sample id, failures, int_llm_calls rows)."""
    if not settings.llm.base_url and settings.llm.api_key is None:
        raise UsageError("the llm judge needs an endpoint: set OPENAI_BASE_URL (and OPENAI_API_KEY for a hosted API)")
    from extractors.llm.client import LLMClient
    from extractors.phi import PhiGuard
    from radchain.secrets import with_api_key
    from training.answers import completion_text, parse_output
    from training.judge_llm import JudgeItem, LLMJudge
    from warehouse.llm_cache import SQLiteResponseCache

    llm = with_api_key(settings.llm)  # from the environment or a Prefect Secret block, as for mining
    # Judge prompts quote the reference chain (report sentences) and the model's reasoning: a request
    # the PHI guard flags is not sent, and that sample counts as a judge failure (the rules judge scores it).
    guard = PhiGuard.from_settings(llm)

    items, seen = [], set()
    for r in records:
        ref = gold.get(r["sample_id"])
        if ref is None or ref.sample_id in seen:
            continue
        seen.add(ref.sample_id)
        items.append(JudgeItem(ref.sample_id, parse_output(completion_text(r.get("output"))).think, ref.chain,
                               ref.labels))

    async def run() -> list:
        with SQLiteResponseCache.from_settings(settings) as cache:
            async with LLMClient(llm, cache=cache, request_guard=guard) as client:
                return await LLMJudge(client).judge_many(items)

    outcomes = asyncio.run(run())
    scores = {o.sample_id: o.score for o in outcomes if o.score is not None}
    calls = [c for o in outcomes for c in o.llm_calls]
    return scores, sum(o.score is None for o in outcomes), calls


def _eval_id(path: Path, model: str, checkpoint: str | None, judge: str, semantic: bool) -> str:
    from schemas.base import stable_id

    digest = hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
    return stable_id("eval", model, checkpoint, judge, "semantic" if semantic else "lexical", digest)


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.3f}"


def _print_report(report: Any, title: str) -> None:
    t = Table(title=title)
    t.add_column("task", no_wrap=True)
    for col in ("n", "accuracy", "complete", "factual", "effective", "RadRScore", "format", "unparsed", "tagless",
                "no answer", "no chain"):
        t.add_column(col, justify="right")
    last_task = len(report.per_task) - 2  # the row before "all" closes the per-task section
    for i, r in enumerate(report.per_task):
        t.add_row(cell(r.task), str(r.n), _fmt(r.accuracy), _fmt(r.completeness), _fmt(r.factuality),
                  _fmt(r.effectiveness), _fmt(r.radrscore),
                  _fmt(getattr(report, "format_compliance", {}).get(r.task)), str(r.n_unparseable), str(r.n_tagless),
                  str(r.n_no_answer),
                  str(r.n_no_gold_chain), end_section=(i == last_task))
    table_console().print(t)


def _write(wh: Any, eval_id: str, report: Any, model: str, checkpoint: str | None, judge: str, path: Path,
           llm_calls: list[dict[str, Any]], baseline: str | None = None, baseline_of: str | None = None) -> None:
    from radchain import __version__
    from schemas.base import Lineage
    from schemas.llm import LlmCall
    from warehouse.eval_store import write_eval

    now = datetime.now(UTC)
    from prefect.runtime import flow_run

    # The Prefect flow run that scored (evaluate_flow); `radchain score` outside a flow keeps score-<eval_id>.
    lineage = Lineage(run_id=str(flow_run.get_id() or f"score-{eval_id}"), batch_id=eval_id,
                      code_version=f"radchain-{__version__}/{VERSION}")
    results = [
        dict(eval_id=eval_id, model=model, checkpoint=checkpoint, judge=judge, predictions_path=str(path.resolve()),
             scored_at=now, format_compliance=report.format_compliance.get(r.task), baseline=baseline,
             baseline_of=baseline_of, **r.as_dict())
        for r in report.per_task
    ]
    predictions = [
        dict(eval_id=eval_id, sample_id=s.sample_id, task=s.task, model=model, judge=judge, output=s.output,
             answer=s.answer, outcome=s.outcome, unparseable=s.reasoning.unparseable,
             completeness=s.reasoning.completeness, factuality=s.reasoning.factuality,
             effectiveness=s.reasoning.effectiveness, radrscore=s.reasoning.radrscore,
             n_model_steps=s.reasoning.n_steps, n_model_findings=s.reasoning.n_findings)
        for s in report.per_sample
    ]
    write_eval(wh, eval_id, results, predictions, lineage)
    if llm_calls:
        wh.write(LlmCall, f"judge-{eval_id}", llm_calls, lineage)
