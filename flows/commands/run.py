"""`radchain run`: the pipeline on a source (or on the bundled demo corpus when none is given)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from flows.cli_support import UsageError, clear_errors, console, err_console, print_arrow

DEMO_STUDIES = 400


def register(app: typer.Typer) -> None:
    @app.command()
    @clear_errors
    def run(
        source: Path | None = typer.Option(None, help="MIMIC-CXR tree or a CSV/Parquet/JSONL table of reports; "
                                                       "default: the bundled synthetic demo corpus"),
        stages: str = typer.Option("all", help="comma-separated stage names or 'all' (the stages in DAG order: "
                                                  "`radchain run --stages x` lists them)"),
        extractor: str = typer.Option("auto", help="chain extractor: rules | llm | auto (llm when an endpoint is set)"),
        id_col: str = typer.Option("study_id", "--id-col", help="table sources: study id column"),
        text_col: str | None = typer.Option("text", "--text-col", help="table sources: full report text column"),
        findings_col: str | None = typer.Option(None, "--findings-col", help="table sources: FINDINGS column"),
        impression_col: str | None = typer.Option(None, "--impression-col", help="table sources: IMPRESSION column"),
        patient_col: str | None = typer.Option(None, "--patient-col", help="table sources: patient id column"),
        split_col: str | None = typer.Option(None, "--split-col", help="table sources: split column"),
        date_col: str | None = typer.Option(None, "--date-col", help="table sources: study date column"),
        image_col: str | None = typer.Option(None, "--image-col", help="table sources: image path column"),
        trim_ids: bool = typer.Option(False, "--trim-ids", help="table sources: strip blanks around ids "
                                                                "(default: ids are kept exactly as written)"),
        demo_studies: int = typer.Option(DEMO_STUDIES, help="size of the demo corpus generated when --source is absent"),
        seed: int | None = typer.Option(None, help="sampling seed (default from settings)"),
        batch_size: int | None = typer.Option(None, help="reports per batch (default from settings)"),
        train: bool = typer.Option(False, "--train", help="then SFT → GRPO → evaluate on the new dataset version "
                                                          "(tiny-cpu config unless --config)"),
        config: str = typer.Option("tiny-cpu", help="training config for --train"),
        max_examples: int | None = typer.Option(64, help="--train: cap training rows (smoke-sized by default; "
                                                         "0: no cap)"),
        max_eval_per_task: int | None = typer.Option(10, help="--train: cap benchmark samples per task"),
        runner: str = typer.Option("default", help="where a stage's batches run: default (one after another "
                                                   "in this process) | dask (a Dask cluster, through prefect-dask)"),
        dask_address: str | None = typer.Option(None, "--dask-address",
                                                help="--runner dask: scheduler of an existing cluster, e.g. "
                                                     "tcp://host:8786 (default: a local cluster, one worker "
                                                     "process per core)"),
        dask_workers: int | None = typer.Option(None, "--dask-workers",
                                                help="--runner dask without --dask-address: worker processes "
                                                     "of the local cluster (default: cores)"),
        budget: float | None = typer.Option(None, "--budget", help="LLM spend cap of this run in USD (default: "
                                            "RADCHAIN_LLM_BUDGET_USD); samples past it are skipped (BUDGET)"),
        llm_mode: str | None = typer.Option(None, "--llm-mode", help="how mining calls the model: sync (chat "
                                            "completions) | batch (the OpenAI Batch API, half price); default "
                                            "RADCHAIN_LLM_MODE or sync"),
        protocol: str | None = typer.Option(None, "--protocol", help="LLM protocol: single | paper (default: "
                                            "RADCHAIN_LLM_PROTOCOL or single)"),
        prompt_version: str | None = typer.Option(None, "--prompt-version", help="LLM prompt version, e.g. "
                                                  "single-v3 (few-shot, a cacheable 1,280-token prefix); default: "
                                                  "the protocol's (single-v2, paper-v1)"),
        min_acceptance: float | None = typer.Option(None, "--min-acceptance", help="quality gate: the run fails when "
                                                    "mining accepts less than this share of the samples it decided "
                                                    "(default RADCHAIN_CHECKS_MIN_ACCEPTANCE or 0.5)"),
        dry_run: bool = typer.Option(False, "--dry-run", help="run the local stages before mine, then print the "
                                     "cost estimate of mining (radchain estimate) instead of calling the model"),
    ) -> None:
        """Run the pipeline stages as a Prefect flow and print per-stage counts."""
        from radchain.runtime import prepare_environment

        settings = prepare_environment()
        if batch_size is not None:
            if batch_size < 1:
                raise UsageError("--batch-size must be at least 1")
            settings.batch_size = batch_size
        if seed is not None:
            settings.seed = seed

        from flows.pipeline import ALL_STAGES, pipeline_flow
        from flows.stages.common import SourceSpec

        chosen = list(ALL_STAGES) if stages.strip() == "all" else [s.strip() for s in stages.split(",") if s.strip()]
        unknown = [s for s in chosen if s not in ALL_STAGES]
        if unknown or not chosen:
            raise UsageError(f"unknown stages {unknown}; choose from {', '.join(ALL_STAGES)}")
        if extractor not in ("auto", "rules", "llm"):
            raise UsageError("--extractor must be rules, llm or auto")
        options: dict = {"extractor": extractor}
        if budget is not None:
            if budget < 0:
                raise UsageError("--budget must be >= 0")
            options["budget_usd"] = budget
        if llm_mode is not None:
            from radchain.settings import LLM_MODES

            if llm_mode not in LLM_MODES:
                raise UsageError(f"--llm-mode must be one of {', '.join(LLM_MODES)}")
            options["llm_mode"] = llm_mode
        if protocol is not None:
            options["protocol"] = protocol
        if min_acceptance is not None:
            if not 0.0 <= min_acceptance <= 1.0:
                raise UsageError("--min-acceptance must be between 0 and 1")
            options["min_acceptance"] = min_acceptance
        if prompt_version is not None:
            options["prompt_version"] = prompt_version
        if runner != "default" or dask_address or dask_workers is not None:
            from flows.runners import RunnerError, RunnerSpec

            options.update(runner=runner, dask_address=dask_address, dask_workers=dask_workers)
            try:
                RunnerSpec.from_options(options)
            except RunnerError as e:
                raise UsageError(f"--runner: {e}") from None

        if source is None:
            source = ensure_demo_corpus(settings.demo_corpus_dir, demo_studies, settings.seed)
        elif not source.exists():
            raise UsageError(f"source {source} does not exist")
        spec = SourceSpec(
            path=source.resolve(), id_col=id_col, text_col=text_col, findings_col=findings_col,
            impression_col=impression_col, patient_col=patient_col, split_col=split_col, date_col=date_col,
            image_col=image_col, trim_ids=trim_ids,
        )
        if dry_run:
            before_mine = [s for s in chosen if ALL_STAGES.index(s) < ALL_STAGES.index("mine")]
            if before_mine:
                pipeline_flow(source=spec, stages=before_mine, options=options)
            from flows.commands.estimate import print_estimate

            print_estimate(settings, protocol=protocol, mode=llm_mode, budget=budget, prompt_version=prompt_version)
            return
        from flows.lifeline import start_reaper
        from flows.checks import DataCheckFailed
        from flows.stages.runner import final_errors

        start_reaper()  # Prefect's temporary server (and a local Dask cluster) die with this process, SIGKILL too
        try:
            results = pipeline_flow(source=spec, stages=chosen, options=options)
        except (*final_errors(), DataCheckFailed) as e:  # a stage stopped for good (mine: the LLM endpoint is
            # down) or a data check failed: one line, exit code 1 (`radchain check` and v_runs show every check)

            from flows.cli_support import one_line

            err_console.print(f"[bold red]error:[/] run failed: {escape(one_line(str(e)))}", highlight=False,
                              soft_wrap=True)
            raise typer.Exit(1) from None

        import pyarrow as pa


        from flows.artifacts import image_counts, run_notes, stage_count_rows
        from warehouse import Warehouse

        print_arrow(pa.Table.from_pylist(stage_count_rows(results)), "table", title="radchain run")
        wh = Warehouse(settings.warehouse_dir)
        if "ingest" in results:
            c = image_counts(wh)
            console.print(f"images: {c['listed']} listed, {c.get('ok', 0)} ok, {c.get('missing', 0)} missing, "
                          f"{c.get('corrupt', 0)} corrupt")
        notes = run_notes(wh, spec, results)
        for note in notes:
            err_console.print(f"[bold yellow]warning:[/] {escape(note)}", highlight=False, soft_wrap=True)
        console.print(f"warehouse: {escape(str(settings.duckdb_path))}")
        line = budget_line(settings, results)
        if line:
            console.print(line)
        if any(n.startswith("the tasks stage built no samples") for n in notes):
            raise typer.Exit(1)  # a run that produced nothing to mine is not a success
        if train:
            from flows.training_flows import train_flow

            from flows.commands.train_cmds import print_trained

            print_trained(train_flow(config=config, max_examples=max_examples or None,
                                     max_eval_per_task=max_eval_per_task))


def ensure_demo_corpus(out: Path, studies: int, seed: int) -> Path:
    """Generate the synthetic demo corpus once; later runs reuse it (same seed, same bytes)."""
    from extractors.synthetic import generate_corpus

    marker = out / ".complete"
    wanted = f"{studies}:{seed}"
    if not (marker.exists() and marker.read_text() == wanted):
        generate_corpus(out, studies=studies, seed=seed)
        marker.write_text(wanted)
    return out


def budget_line(settings, results) -> str | None:
    """The closing line of a run whose mining a budget cut short (or None)."""
    mine = results.get("mine") or []
    skipped = sum(r.skipped for r in mine if r.skip_reason and "BUDGET" in r.skip_reason)
    if not skipped:
        return None
    return (f"[bold red]budget reached[/]: {skipped} samples were not mined (skipped, reason BUDGET in "
            f"audit_stage_counts); raise --budget / RADCHAIN_LLM_BUDGET_USD and re-run to mine them "
            f"(mined samples are cached and cost nothing again)")
