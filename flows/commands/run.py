"""`radchain run`: the pipeline on a source (or on the bundled demo corpus when none is given)."""

from __future__ import annotations

from pathlib import Path

import typer

from flows.cli_support import UsageError, clear_errors, console, print_arrow

DEMO_STUDIES = 400


def register(app: typer.Typer) -> None:
    @app.command()
    @clear_errors
    def run(
        source: Path | None = typer.Option(None, help="MIMIC-CXR tree or a CSV/Parquet/JSONL table of reports; "
                                                       "default: the bundled synthetic demo corpus"),
        stages: str = typer.Option("all", help="comma-separated stages (ingest,label,tasks,mine,datasets) or 'all'"),
        extractor: str = typer.Option("auto", help="chain extractor: rules | llm | auto (llm when an endpoint is set)"),
        id_col: str = typer.Option("study_id", "--id-col", help="table sources: study id column"),
        text_col: str | None = typer.Option("text", "--text-col", help="table sources: full report text column"),
        findings_col: str | None = typer.Option(None, "--findings-col", help="table sources: FINDINGS column"),
        impression_col: str | None = typer.Option(None, "--impression-col", help="table sources: IMPRESSION column"),
        patient_col: str | None = typer.Option(None, "--patient-col", help="table sources: patient id column"),
        split_col: str | None = typer.Option(None, "--split-col", help="table sources: split column"),
        date_col: str | None = typer.Option(None, "--date-col", help="table sources: study date column"),
        image_col: str | None = typer.Option(None, "--image-col", help="table sources: image path column"),
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
            image_col=image_col,
        )
        results = pipeline_flow(source=spec, stages=chosen, options=options)

        import pyarrow as pa

        from flows.artifacts import stage_count_rows

        print_arrow(pa.Table.from_pylist(stage_count_rows(results)), "table", title="radchain run")
        console.print(f"warehouse: {settings.duckdb_path}")
        if train:
            from flows.training_flows import train_flow

            from flows.commands.train_cmds import print_evaluation

            out = train_flow(config=config, max_examples=max_examples or None, max_eval_per_task=max_eval_per_task)
            console.print(f"trained on {out['dataset_version']}: SFT {out['sft']['status']}, GRPO "
                          f"{out['grpo']['status']}")
            print_evaluation(out["evaluation"])


def ensure_demo_corpus(out: Path, studies: int, seed: int) -> Path:
    """Generate the synthetic demo corpus once; later runs reuse it (same seed, same bytes)."""
    from extractors.synthetic import generate_corpus

    marker = out / ".complete"
    wanted = f"{studies}:{seed}"
    if not (marker.exists() and marker.read_text() == wanted):
        generate_corpus(out, studies=studies, seed=seed)
        marker.write_text(wanted)
    return out
