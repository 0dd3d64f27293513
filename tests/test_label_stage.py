"""The label stage on a tiny warehouse, and `radchain eval-labeler`."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from flows.stages import label
from flows.stages.common import RunContext, SourceSpec
from flows.stages.runner import execute_batch, finish_stage
from radchain.settings import Settings
from schemas.audit import Rejection
from schemas.base import Lineage
from schemas.ingest import RawReport, Section
from schemas.labels import OBSERVATIONS, Label
from warehouse import Warehouse

BATCH = "b00000"
REPORTS = {
    # In the CSV; the CSV says Atelectasis is uncertain while the rules read it as positive.
    "50000001": {"findings": "No effusion.  Possible atelectasis.\n Left basilar atelectasis.",
                 "impression": "Small left\n pneumothorax."},
    "50000002": {"findings": "Mild pulmonary edema.  The lungs are otherwise clear."},  # rules only
    "50000003": {"indication": "Cough."},  # no findings text, no CSV row: rejected
    "50000004": {"indication": "Fever."},  # no findings text, but the CSV labels it
}
CSV_ROWS = {
    "50000001": {"Pneumothorax": "1.0", "Pleural Effusion": "0.0", "Atelectasis": "-1.0", "Edema": "-1.0"},
    "50000004": {"No Finding": "1.0"},
}


def _report_text(sections: dict[str, str]) -> tuple[str, list[tuple[str, int, int]]]:
    text, spans = "                                 FINAL REPORT\n", []
    for name, body in sections.items():
        text += f" {name.upper()}: \n \n "
        spans.append((name, len(text), len(text) + len(body)))
        text += body + "\n \n"
    return text, spans


def _write_source(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    cols = ["subject_id", "study_id", *sorted(OBSERVATIONS)]
    lines = [",".join(cols)]
    for sid, values in CSV_ROWS.items():
        lines.append(",".join(["10000001", sid, *(values.get(o, "") for o in sorted(OBSERVATIONS))]))
    (root / "mimic-cxr-2.0.0-chexpert.csv").write_text("\n".join(lines) + "\n")
    return root


def _write_batch(wh: Warehouse, batch: str, reports: dict[str, dict[str, str]]) -> dict[str, str]:
    lineage = Lineage(run_id="ingest-run", batch_id=batch, code_version="test")
    raw, sections, texts = [], [], {}
    for sid, parts in reports.items():
        text, spans = _report_text(parts)
        texts[sid] = text
        raw.append(dict(study_id=sid, patient_id="10000001", source=f"s{sid}.txt", text=text, n_chars=len(text),
                        content_hash=sid))
        for i, (name, s, e) in enumerate(spans):
            row = dict(section_id=f"{sid}:{i}", study_id=sid, ordinal=i, name=name, header=name.upper(), start=s,
                       end=e, text=text[s:e])
            if "inferred" in Section.model_fields:
                row["inferred"] = False
            sections.append(row)
    wh.write(RawReport, batch, raw, lineage)
    wh.write(Section, batch, sections, lineage)
    return texts


@pytest.fixture
def stage_ctx(tmp_path) -> tuple[RunContext, dict[str, str]]:
    wh = Warehouse(tmp_path / "warehouse").ensure()
    texts = _write_batch(wh, BATCH, REPORTS)
    source = SourceSpec(path=_write_source(tmp_path / "mimic"), kind="mimic")
    ctx = RunContext(settings=Settings(home=tmp_path), warehouse=wh, run_id="run-1", source=source)
    return ctx, texts


def _labels(ctx: RunContext) -> pl.DataFrame:
    return ctx.warehouse.read(Label.__table__)


def test_stage_end_to_end(stage_ctx) -> None:
    ctx, texts = stage_ctx
    assert label.LabelStage(ctx).plan() == [BATCH]
    result = execute_batch(label.LabelStage(ctx), BATCH)
    assert (result.inputs, result.outputs, result.rejected) == (4, 3, 1)

    labels = _labels(ctx)
    assert labels.group_by("study_id").len().sort("study_id").rows() == [
        ("50000001", 14), ("50000002", 14), ("50000004", 14)]
    assert set(labels["observation"]) == set(OBSERVATIONS)
    assert set(labels["run_id"]) == {"run-1"} and set(labels["batch_id"]) == {BATCH}
    row = {(r["study_id"], r["observation"]): r for r in labels.to_dicts()}

    # CSV labels win, with the rule labeler's sentence when one states the same value.
    ptx = row[("50000001", "Pneumothorax")]
    assert (ptx["value"], ptx["source"], ptx["section"]) == ("positive", "chexpert_csv", "impression")
    sentence = texts["50000001"][ptx["sentence_start"]:ptx["sentence_end"]]
    assert sentence == ptx["sentence"] == "Small left\n pneumothorax."
    atel = row[("50000001", "Atelectasis")]
    assert (atel["value"], atel["sentence"]) == ("uncertain", "Possible atelectasis.")
    edema = row[("50000001", "Edema")]  # the CSV says uncertain; no sentence says so
    assert (edema["value"], edema["sentence"], edema["sentence_start"]) == ("uncertain", None, None)
    assert row[("50000001", "Cardiomegaly")]["value"] == "not_mentioned"

    # Rules where the CSV has no row.
    ed2 = row[("50000002", "Edema")]
    assert (ed2["value"], ed2["source"], ed2["section"], ed2["sentence"]) == (
        "positive", "rules", "findings", "Mild pulmonary edema.")
    assert row[("50000002", "No Finding")]["value"] == "not_mentioned"

    # No findings text, but CSV labels: kept.
    assert row[("50000004", "No Finding")]["value"] == "positive"
    assert row[("50000004", "No Finding")]["source"] == "chexpert_csv"

    rejections = ctx.warehouse.read("int_rejections")
    assert rejections.select("stage", "entity_id", "reason_code").rows() == [("label", "50000003", "NO_FINDINGS_TEXT")]
    audit = ctx.warehouse.read("audit_stage_counts").filter(pl.col("stage") == "label")
    assert audit.select("inputs", "outputs", "rejected", "skipped").rows() == [(4, 3, 1, 0)]


def test_rerun_replaces_rows_and_finalize_drops_stale_partitions(stage_ctx) -> None:
    ctx, _ = stage_ctx
    execute_batch(label.LabelStage(ctx), BATCH)
    result = execute_batch(label.LabelStage(ctx), BATCH)
    assert _labels(ctx).height == 3 * 14
    # A partition left by an ingest batch that no longer exists.
    stale = Lineage(run_id="old", batch_id="b99999", code_version="test")
    ctx.warehouse.write(Label, "b99999", [dict(study_id="1", observation="Edema", value="positive", source="rules")],
                        stale)
    ctx.warehouse.write(Rejection, "label-b99999", [], stale)
    # The runner's cleanup after the batches: only what this run's batches wrote stays.
    done = finish_stage(label.LabelStage(ctx), [result])
    assert done.partitions == {Label.__table__: [BATCH]}
    assert ctx.warehouse.partitions(Label.__table__) == [BATCH]
    assert "label-b99999" not in ctx.warehouse.partitions("int_rejections")
    assert "label-" + BATCH in ctx.warehouse.partitions("int_rejections")


def test_without_a_source_csv_every_label_comes_from_the_rules(stage_ctx) -> None:
    ctx, _ = stage_ctx
    ctx.source = None
    result = execute_batch(label.LabelStage(ctx), BATCH)
    assert (result.outputs, result.rejected) == (2, 2)
    assert set(_labels(ctx)["source"]) == {"rules"}


def test_a_generic_table_source_with_label_columns(stage_ctx, tmp_path) -> None:
    ctx, _ = stage_ctx
    table = tmp_path / "reports.csv"
    pl.DataFrame({"study_id": ["50000002"], "text": ["x"], "Edema": ["0.0"]}).write_csv(table)
    ctx.source = SourceSpec(path=table, kind="table")
    execute_batch(label.LabelStage(ctx), BATCH)
    rows = {(r["study_id"], r["observation"]): r for r in _labels(ctx).to_dicts()}
    assert (rows[("50000002", "Edema")]["value"], rows[("50000002", "Edema")]["source"]) == ("negative", "table")
    assert rows[("50000002", "Pneumonia")]["source"] == "rules"  # a column the table lacks


def test_missing_sections_partition_and_corrupt_csv(stage_ctx) -> None:
    ctx, _ = stage_ctx
    (ctx.source.path / "mimic-cxr-2.0.0-chexpert.csv").write_bytes(b"\xff\xfe\x00garbage")
    (ctx.warehouse.table_dir(Section.__table__) / f"{BATCH}.parquet").unlink()
    result = execute_batch(label.LabelStage(ctx), BATCH)  # no crash: everything is rejected (no text, no labels)
    assert (result.outputs, result.rejected) == (0, 4)


# ---- CLI -----------------------------------------------------------------------------------

runner = CliRunner()


def _cli(*args: str):
    from flows.cli import app

    return runner.invoke(app, ["eval-labeler", *args])


def test_cli_default_shows_exact_agreement() -> None:
    from extractors.resources import REPORTS as bundled

    result = _cli("--reports", str(bundled / "labeled_reports.csv"))
    assert result.exit_code == 0, result.output
    assert "exact match: 4/4 studies (100.0%) on 14 shared observations" in result.output


def test_cli_json() -> None:
    result = _cli("--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["studies"] == 4 and data["exact_matches"] == 4 and data["exact_match_rate"] == 1.0
    assert {s["observation"] for s in data["scores"]} == set(OBSERVATIONS)


def test_cli_separate_gold_with_aliases(tmp_path) -> None:
    reports = tmp_path / "reports.jsonl"
    reports.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "report": "No pneumothorax. Small left effusion."},
        {"id": "b", "report": "Possible pneumothorax."},
    ]) + "\n")
    gold = tmp_path / "gold.csv"
    gold.write_text("case,effusion,ptx,age\na,1,0,50\nb,,1,60\n")
    aliases = tmp_path / "aliases.yaml"
    aliases.write_text("effusion: Pleural Effusion\nptx: Pneumothorax\n")
    result = _cli("--reports", str(reports), "--id-col", "id", "--gold", str(gold), "--gold-id-col", "case",
                  "--aliases", str(aliases), "-f", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["observations"] == ["Pneumothorax", "Pleural Effusion"]
    assert data["studies"] == 2 and data["exact_matches"] == 1
    assert data["mismatches"] == [{"study_id": "b", "observation": "Pneumothorax", "gold": "positive",
                                   "predicted": "uncertain", "sentence": "Possible pneumothorax."}]


@pytest.mark.parametrize("args", [
    ("--reports", "/no/such/file.csv"),
    ("--text-col", "nope"),
    ("--format", "xml"),
    ("--mimic", "/no/such/dir"),
    ("--id-col", "missing"),
])
def test_cli_errors_are_one_line_exit_2(args) -> None:
    result = _cli(*args)
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def test_cli_mimic_tree(tmp_path) -> None:
    from extractors.synthetic import generate_corpus as generate

    generate(tmp_path / "corpus", 20, seed=3, images=False)
    result = _cli("--mimic", str(tmp_path / "corpus"), "-f", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["studies"] == 20 and data["missing_predictions"] == 0
    assert data["exact_matches"] >= 15  # the generator's labels are what its text states


def test_pipeline_runs_the_label_stage(stage_ctx) -> None:
    from flows.pipeline import run_stages

    ctx, _ = stage_ctx
    results = run_stages(ctx, ["label"])
    assert [(r.batch_id, r.outputs, r.rejected) for r in results["label"]] == [(BATCH, 3, 1)]
    counts = ctx.warehouse.sql("SELECT value, count(*) AS n FROM int_labels GROUP BY value ORDER BY value").to_pylist()
    assert sum(r["n"] for r in counts) == 42
