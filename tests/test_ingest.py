"""The ingest stage: MIMIC trees and report tables in, raw/stg tables and rejections out."""

from __future__ import annotations

import json
import time
from pathlib import Path

import polars as pl
import pytest

from extractors.resources import REPORTS
from extractors.sources import MAX_REPORT_BYTES, SourceError, plan_batches, synthesize_report
from flows.pipeline import make_context, run_stages
from flows.stages import ingest
from flows.stages.common import SourceSpec
from radchain.settings import Settings
from warehouse import Warehouse

EXAMPLE_BYTES = (REPORTS / "example_report_from_MIT-LCP_docs.txt").read_bytes()
TABLES = ("raw_reports", "stg_sections", "stg_studies", "stg_images", "int_rejections", "audit_stage_counts",
          "fct_materializations")


def _jpeg(path: Path) -> None:
    """A real (decodable) JPEG: ingest opens every image with Pillow."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (32, 24), color=100).save(path, "JPEG")


def mimic_report(findings: str, impression: str, indication: str = "___ year old man with cough") -> bytes:
    """A report in MIMIC-CXR byte layout: title line, one leading space on every line."""
    lines = [" " * 33 + "FINAL REPORT", " EXAMINATION:  CHEST (PA AND LAT)", " ",
             f" INDICATION:  {indication}", " ", " COMPARISON:  ___", " ", " FINDINGS: ", " "]
    lines += [f" {line}" for line in findings.splitlines()]
    lines += [" ", " IMPRESSION: ", " ", f" {impression}", ""]
    return "\n".join(lines).encode("utf-8")


def write_report(root: Path, patient: str, study: str, data: bytes) -> Path:
    path = root / "files" / f"p{patient[:2]}" / f"p{patient}" / f"s{study}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def mimic_tree(tmp_path) -> Path:
    """Six good studies of three patients, metadata, split CSV and two image files."""
    root = tmp_path / "mimic"
    write_report(root, "10000032", "50414267", EXAMPLE_BYTES)
    write_report(root, "10000032", "53189527", mimic_report("Heart size is normal.\nLungs are clear.",
                                                            "No acute cardiopulmonary process."))
    write_report(root, "10000032", "56699142", mimic_report("Small left effusion.", "Small left pleural effusion."))
    write_report(root, "10000764", "57375967", mimic_report("Right lower lobe opacity.", "Pneumonia."))
    write_report(root, "10000898", "50771383", mimic_report("Mild edema.", "Mild pulmonary edema."))
    # No headers at all: the paragraph fallback makes findings + impression.
    write_report(root, "10000898", "54205396",
                 b" " * 33 + b"FINAL REPORT\n The lungs are clear.\n \n No pneumothorax.\n")
    for study, dicom in (("50414267", "02aa804e-bde0afdd"), ("53189527", "2a2277a9-b0ded155")):
        img = root / "files" / "p10" / "p10000032" / f"s{study}" / f"{dicom}.jpg"
        img.parent.mkdir(parents=True, exist_ok=True)
        _jpeg(img)
    (root / "mimic-cxr-2.0.0-metadata.csv").write_text(
        "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,StudyDate,StudyTime\n"
        "02aa804e-bde0afdd,10000032,50414267,CHEST (PA AND LAT),PA,3056,2544,21800506,213014.531\n"
        "2a2277a9-b0ded155,10000032,53189527,CHEST (PA AND LAT),LATERAL,3056,2544,21800626,165500.312\n"
        "68b5c4b1-227d0485,10000032,56699142,CHEST (PORTABLE AP),AP,3056,2544,21800723,80556.875\n"
        "ea030e7a-2e3b1346,10000764,57375967,CHEST (PA AND LAT),PA,3056,2544,21321005,123700.0\n"
    )
    (root / "mimic-cxr-2.0.0-split.csv").write_text(
        "dicom_id,study_id,subject_id,split\n"
        "02aa804e-bde0afdd,50414267,10000032,validate\n"
        "ea030e7a-2e3b1346,57375967,10000764,test\n"
    )
    return root


def context(home: Path, source: Path | None, batch_size: int = 2, **spec):
    settings = Settings(home=home, batch_size=batch_size)
    return make_context(settings, SourceSpec(path=source, **spec) if source else None)


def counts(wh: Warehouse) -> dict[str, int]:
    return {t: wh.count(t) for t in TABLES}


def assert_offsets_hold(wh: Warehouse) -> None:
    joined = wh.read("stg_sections").join(wh.read("raw_reports").select("study_id", pl.col("text").alias("report")),
                                          on="study_id")
    assert joined.height > 0
    for row in joined.iter_rows(named=True):
        assert row["report"][row["start"]:row["end"]] == row["text"], row["section_id"]


def assert_audit_balanced(wh: Warehouse) -> None:
    audit = wh.read("audit_stage_counts")
    assert audit.height > 0
    for row in audit.iter_rows(named=True):
        assert row["inputs"] == row["outputs"] + row["rejected"] + row["skipped"], row
    rejected = wh.read("int_rejections").filter(pl.col("stage") == "ingest").height
    assert audit["rejected"].sum() == rejected


# ---- MIMIC tree --------------------------------------------------------------------------------

def test_mimic_tree_is_ingested_with_studies_priors_and_images(tmp_path, mimic_tree):
    ctx = context(tmp_path / "home", mimic_tree)
    results = run_stages(ctx, ["ingest"])
    wh = ctx.warehouse
    assert [r.batch_id for r in results["ingest"]] == ["b00000", "b00001", "b00002"]
    reports = wh.read("raw_reports")
    assert sorted(reports["study_id"]) == ["50414267", "50771383", "53189527", "54205396", "56699142", "57375967"]
    example = reports.filter(pl.col("study_id") == "50414267").row(0, named=True)
    assert example["text"] == EXAMPLE_BYTES.decode() and example["patient_id"] == "10000032"
    assert example["source"].endswith("files/p10/p10000032/s50414267.txt")
    assert_offsets_hold(wh)
    sections = wh.read("stg_sections")
    assert sections.filter(pl.col("study_id") == "50414267")["name"].to_list() == [
        "preamble", "examination", "indication", "technique", "comparison", "findings", "impression"]
    inferred = sections.filter(pl.col("study_id") == "54205396").select("name", "text", "inferred").rows()
    assert inferred == [("preamble", "FINAL REPORT", False), ("findings", "The lungs are clear.", True),
                        ("impression", "No pneumothorax.", True)]

    studies = {r["study_id"]: r for r in wh.read("stg_studies").iter_rows(named=True)}
    assert len(studies) == 6
    # Patient 10000032: three dated studies in time order, each pointing at the previous one.
    assert [studies[s]["study_order"] for s in ("50414267", "53189527", "56699142")] == [0, 1, 2]
    assert studies["50414267"]["prior_study_id"] is None
    assert studies["53189527"]["prior_study_id"] == "50414267"
    assert studies["56699142"]["prior_study_id"] == "53189527"
    assert studies["56699142"]["study_datetime"].strftime("%Y-%m-%d %H:%M:%S") == "2180-07-23 08:05:56"
    # Undated studies get an order but no prior (time order unknown).
    assert studies["54205396"]["prior_study_id"] is None and studies["50771383"]["prior_study_id"] is None
    # Split: from the CSV, then the patient's split, then the deterministic hash.
    assert studies["50414267"]["split"] == "validate" and studies["53189527"]["split"] == "validate"
    assert studies["57375967"]["split"] == "test"
    assert studies["50771383"]["split"] in ("train", "validate", "test")
    assert studies["50414267"]["n_images"] == 1 and studies["56699142"]["n_images"] == 0
    assert all(s["has_findings"] and s["has_impression"] for s in studies.values())

    images = {r["dicom_id"]: r for r in wh.read("stg_images").iter_rows(named=True)}
    assert set(images) == {"02aa804e-bde0afdd", "2a2277a9-b0ded155", "68b5c4b1-227d0485", "ea030e7a-2e3b1346"}
    assert images["02aa804e-bde0afdd"]["exists"] and images["02aa804e-bde0afdd"]["view_position"] == "PA"
    assert not images["68b5c4b1-227d0485"]["exists"]
    assert Path(images["2a2277a9-b0ded155"]["path"]).is_file()
    assert_audit_balanced(wh)


def test_images_are_found_on_disk_without_metadata(tmp_path, mimic_tree):
    (mimic_tree / "mimic-cxr-2.0.0-metadata.csv").unlink()
    ctx = context(tmp_path / "home", mimic_tree / "files")  # the files/ folder itself works too
    run_stages(ctx, ["ingest"])
    images = ctx.warehouse.read("stg_images")
    assert sorted(images["dicom_id"]) == ["02aa804e-bde0afdd", "2a2277a9-b0ded155"]
    assert images["exists"].all() and images["view_position"].is_null().all()


def test_every_bad_input_becomes_a_rejection_with_its_reason(tmp_path, mimic_tree):
    write_report(mimic_tree, "10000999", "59000001", b"")
    write_report(mimic_tree, "10000999", "59000002", b"  \n \n   ")
    write_report(mimic_tree, "10000999", "59000003",
                 " FINDINGS: Caf\u00e9 au lait.\n IMPRESSION: Normal.\n".encode("latin-1"))
    write_report(mimic_tree, "10000999", "59000004", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4)
    big = write_report(mimic_tree, "10000999", "59000005", b" FINDINGS: " + b"clear lungs " * 450_000)
    assert big.stat().st_size > 5 * MAX_REPORT_BYTES
    write_report(mimic_tree, "10000999", "59000006", b" " * 33 + b"FINAL REPORT\n ___\n \n ___\n")
    # The same study id under another patient: the first in path order wins.
    write_report(mimic_tree, "19999999", "50414267", mimic_report("Different.", "Different."))
    write_report(mimic_tree, "10000999", "59000007", b"\x01\x02\x03\x04\x05 FINDINGS \x06\x07\x08\x0e\x0f" * 20)

    ctx = context(tmp_path / "home", mimic_tree, batch_size=3)
    t0 = time.perf_counter()
    run_stages(ctx, ["ingest"])
    assert time.perf_counter() - t0 < 20
    wh = ctx.warehouse
    reasons = dict(wh.read("int_rejections").select("entity_id", "reason_code").rows())
    assert reasons == {
        "59000001": "EMPTY", "59000002": "EMPTY", "59000003": "ENCODING", "59000004": "BINARY",
        "59000005": "TOO_LARGE", "59000006": "NO_SECTIONS", "50414267": "DUPLICATE_ID", "59000007": "BINARY",
    }
    duplicate = wh.read("int_rejections").filter(pl.col("reason_code") == "DUPLICATE_ID").row(0, named=True)
    assert "p19999999" in duplicate["detail"] and "p10000032" in duplicate["detail"]
    kept = wh.read("raw_reports").filter(pl.col("study_id") == "50414267")
    assert kept.height == 1 and "p10000032" in kept["source"][0]
    assert wh.count("raw_reports") == 6
    assert_audit_balanced(wh)
    # The same answer through SQL, as a data engineer would ask it.
    rows = wh.sql("SELECT reason_code, n FROM v_rejection_reasons WHERE stage = 'ingest'").to_pylist()
    by_reason = {r["reason_code"]: r["n"] for r in rows}
    assert by_reason["EMPTY"] == 2 and by_reason["BINARY"] == 2
    balanced = wh.sql("SELECT balanced, inputs FROM v_stage_counts WHERE stage = 'ingest'").to_pylist()
    assert balanced == [{"balanced": True, "inputs": 14}]


def test_rerun_is_idempotent_and_removes_stale_partitions(tmp_path, mimic_tree):
    write_report(mimic_tree, "10000999", "59000001", b"")
    home = tmp_path / "home"
    ctx = context(home, mimic_tree, batch_size=2)
    run_stages(ctx, ["ingest"])
    first = counts(ctx.warehouse)
    assert first["raw_reports"] == 6 and first["int_rejections"] == 1
    ctx2 = context(home, mimic_tree, batch_size=2)
    run_stages(ctx2, ["ingest"])
    assert counts(ctx2.warehouse) == first
    assert set(ctx2.warehouse.read("raw_reports")["run_id"]) == {ctx2.run_id}
    # A bigger batch size means fewer batches: the old partitions must not linger.
    ctx3 = context(home, mimic_tree, batch_size=100)
    run_stages(ctx3, ["ingest"])
    wh = ctx3.warehouse
    assert wh.partitions("raw_reports") == ["b00000"]
    assert wh.partitions("audit_stage_counts") == ["ingest-b00000"]
    assert counts(wh)["raw_reports"] == 6 and counts(wh)["stg_sections"] == first["stg_sections"]
    assert counts(wh)["int_rejections"] == 1
    assert_audit_balanced(wh)


# ---- report tables -----------------------------------------------------------------------------

def _table_rows() -> list[dict]:
    return [
        dict(study_id="A1", patient="P1", date="2020-01-02", split="train", image="img/a1.jpg",
             text=EXAMPLE_BYTES.decode(), findings="Lungs are clear.", impression="No acute process."),
        dict(study_id="A2", patient="P1", date="2020-03-04", split=None, image=None,
             text="Heart size normal and lungs are clear. No effusion",
             findings=None, impression="Stable cardiomegaly."),
        dict(study_id="A3", patient="P2", date="not a date", split="test", image="img/missing.jpg",
             text="FINDINGS: Mild edema.\nIMPRESSION: Edema.", findings="Mild edema.\nModerate effusion.",
             impression=None),
        dict(study_id="A1", patient="P3", date=None, split=None, image=None, text="Duplicate.",
             findings="Duplicate.", impression="Duplicate."),
        dict(study_id="", patient="P4", date=None, split=None, image=None, text="No id.", findings="x",
             impression="y"),
        dict(study_id="A6", patient="P4", date=None, split=None, image=None, text="   ", findings=None,
             impression=None),
    ]


def _write_table(path: Path, rows: list[dict]) -> Path:
    df = pl.DataFrame(rows)
    if path.suffix == ".csv":
        df.write_csv(path)
    elif path.suffix == ".parquet":
        df.write_parquet(path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_table_with_a_text_column(tmp_path, suffix):
    (tmp_path / "img").mkdir()
    _jpeg(tmp_path / "img" / "a1.jpg")
    table = _write_table(tmp_path / f"reports{suffix}", _table_rows())
    ctx = context(tmp_path / "home", table, patient_col="patient", date_col="date", split_col="split",
                  image_col="image")
    run_stages(ctx, ["ingest"])
    wh = ctx.warehouse
    reports = {r["study_id"]: r for r in wh.read("raw_reports").iter_rows(named=True)}
    assert set(reports) == {"A1", "A2", "A3"}
    assert reports["A1"]["text"] == EXAMPLE_BYTES.decode() and reports["A1"]["source"].endswith("#row=0")
    assert reports["A3"]["patient_id"] == "P2"
    assert_offsets_hold(wh)
    sections = wh.read("stg_sections")
    assert sections.filter(pl.col("study_id") == "A3").select("name", "text").rows() == [
        ("findings", "Mild edema."), ("impression", "Edema.")]
    reasons = sorted(wh.read("int_rejections")["reason_code"])
    assert reasons == ["DUPLICATE_ID", "EMPTY", "MISSING_ID"]
    studies = {r["study_id"]: r for r in wh.read("stg_studies").iter_rows(named=True)}
    assert studies["A2"]["prior_study_id"] == "A1" and studies["A2"]["study_order"] == 1
    assert studies["A2"]["split"] == "train"  # inherits its patient's split
    assert studies["A3"]["study_datetime"] is None and studies["A3"]["split"] == "test"
    images = {r["dicom_id"]: r for r in wh.read("stg_images").iter_rows(named=True)}
    assert images["A1/a1"]["exists"] and not images["A3/missing"]["exists"]
    assert studies["A1"]["n_images"] == 1
    assert_audit_balanced(wh)


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_table_with_findings_and_impression_columns(tmp_path, suffix):
    rows = [r for r in _table_rows() if r["study_id"]]
    table = _write_table(tmp_path / f"reports{suffix}", rows)
    ctx = context(tmp_path / "home", table, batch_size=4, text_col=None, findings_col="findings",
                  impression_col="impression", patient_col="patient")
    run_stages(ctx, ["ingest"])
    wh = ctx.warehouse
    reports = {r["study_id"]: r["text"] for r in wh.read("raw_reports").iter_rows(named=True)}
    assert reports["A1"] == synthesize_report("Lungs are clear.", "No acute process.")
    assert reports["A1"] == " FINDINGS: Lungs are clear.\n \n IMPRESSION: No acute process.\n"
    assert_offsets_hold(wh)
    bodies = {(r["study_id"], r["name"]): r["text"] for r in wh.read("stg_sections").iter_rows(named=True)}
    assert bodies[("A1", "findings")] == "Lungs are clear."
    assert bodies[("A1", "impression")] == "No acute process."
    assert bodies[("A3", "findings")] == "Mild edema.\nModerate effusion."
    assert ("A3", "impression") not in bodies and ("A2", "findings") not in bodies
    studies = {r["study_id"]: r for r in wh.read("stg_studies").iter_rows(named=True)}
    assert studies["A3"]["has_findings"] and not studies["A3"]["has_impression"]
    assert sorted(wh.read("int_rejections")["reason_code"]) == ["DUPLICATE_ID", "EMPTY"]
    assert_audit_balanced(wh)


def test_csv_with_bytes_that_are_not_utf8_rejects_only_that_row(tmp_path):
    table = tmp_path / "reports.csv"
    table.write_bytes(b"study_id,text\nS1,FINDINGS: clear.\nS2,FINDINGS: caf\xe9 clear.\nS3,IMPRESSION: ok.\n")
    ctx = context(tmp_path / "home", table)
    run_stages(ctx, ["ingest"])
    assert sorted(ctx.warehouse.read("raw_reports")["study_id"]) == ["S1", "S3"]
    assert ctx.warehouse.read("int_rejections").select("entity_id", "reason_code").rows() == [("S2", "ENCODING")]


def test_csv_with_quoted_multiline_reports_keeps_rows_in_batches(tmp_path):
    rows = [dict(study_id=f"S{i:03d}", text=f" FINDINGS: line one {i}\n line two, \"quoted\"\n \n IMPRESSION: ok {i}.")
            for i in range(23)]
    table = _write_table(tmp_path / "reports.csv", rows)
    ctx = context(tmp_path / "home", table, batch_size=5)
    results = run_stages(ctx, ["ingest"])
    assert len(results["ingest"]) == 5
    reports = ctx.warehouse.read("raw_reports").sort("study_id")
    assert reports["study_id"].to_list() == [r["study_id"] for r in rows]
    assert reports["text"].to_list() == [r["text"] for r in rows]
    assert reports.filter(pl.col("study_id") == "S017")["source"][0].endswith("#row=17")


def test_unusable_sources_raise_clear_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(SourceError, match="does not exist"):
        plan_batches(SourceSpec(path=missing), 10)
    table = _write_table(tmp_path / "reports.csv", [dict(study_id="S1", body="x")])
    with pytest.raises(SourceError, match="column 'text' not found.*study_id, body"):
        plan_batches(SourceSpec(path=table), 10)
    with pytest.raises(SourceError, match="column 'impr' not found"):
        plan_batches(SourceSpec(path=table, text_col=None, findings_col="body", impression_col="impr"), 10)
    with pytest.raises(SourceError, match="column 'pat' not found"):
        plan_batches(SourceSpec(path=table, text_col="body", patient_col="pat"), 10)
    odd = tmp_path / "reports.xlsx"
    odd.write_bytes(b"PK")
    with pytest.raises(SourceError, match="unknown table format"):
        plan_batches(SourceSpec(path=odd), 10)
    (tmp_path / "empty-tree" / "files").mkdir(parents=True)
    with pytest.raises(SourceError, match="no reports found"):
        plan_batches(SourceSpec(path=tmp_path / "empty-tree"), 10)
    with pytest.raises(SourceError, match="needs a source"):
        ingest.IngestStage(context(tmp_path / "home", None)).plan()
    assert issubclass(SourceError, ValueError)  # the CLI turns ValueError into exit code 2


def test_corrupt_metadata_csv_is_a_clear_error(tmp_path, mimic_tree):
    (mimic_tree / "mimic-cxr-2.0.0-metadata.csv").write_text("dicom_id,subject_id\nabc,1\n")
    ctx = context(tmp_path / "home", mimic_tree)
    with pytest.raises(SourceError, match="mimic-cxr-2.0.0-metadata.csv lacks a required column"):
        run_stages(ctx, ["ingest"])


def test_batches_are_deterministic(tmp_path, mimic_tree):
    spec = SourceSpec(path=mimic_tree)
    first, again = plan_batches(spec, 4), plan_batches(spec, 4)
    assert first == again
    assert [b.batch_id for b in first] == ["b00000", "b00001"]
    assert first[0].items[0] == "files/p10/p10000032/s50414267.txt"


# ---- the real Prefect flow ---------------------------------------------------------------------

def test_prefect_flow_end_to_end_into_duckdb(radchain_home, mimic_tree):
    from flows.pipeline import pipeline_flow
    from radchain.settings import get_settings

    write_report(mimic_tree, "10000999", "59000001", b"")
    results = pipeline_flow(source=SourceSpec(path=mimic_tree), stages=["ingest"])
    assert sum(r.outputs for r in results["ingest"]) == 6
    wh = Warehouse(get_settings().warehouse_dir)
    assert wh.duckdb_path.is_file()
    assert wh.sql("SELECT count(*) AS n FROM raw_reports").to_pylist() == [{"n": 6}]
    impressions = wh.sql(
        "SELECT r.study_id, substr(r.text, s.start + 1, s.\"end\" - s.start) = s.text AS exact "
        "FROM stg_sections s JOIN raw_reports r USING (study_id) WHERE s.name = 'impression' ORDER BY 1"
    ).to_pylist()
    assert len(impressions) == 6 and all(r["exact"] for r in impressions)
    prior = wh.sql("SELECT prior_study_id FROM stg_studies WHERE study_id = '53189527'").to_pylist()
    assert prior == [{"prior_study_id": "50414267"}]
    assert wh.sql("SELECT reason_code FROM int_rejections").to_pylist() == [{"reason_code": "EMPTY"}]
    run_ids = wh.sql("SELECT DISTINCT run_id FROM raw_reports").to_pylist()
    assert len(run_ids) == 1 and wh.sql("SELECT count(*) AS n FROM stg_images").to_pylist() == [{"n": 4}]
    # An unusable source fails the flow with the reader's error (the CLI prints it, exit 2).
    with pytest.raises(SourceError, match="does not exist"):
        pipeline_flow(source=SourceSpec(path=mimic_tree / "missing"), stages=["ingest"])


@pytest.mark.parametrize("mode,size,progressive", [("L", (64, 48), False), ("RGB", (300, 17), True),
                                                   ("L", (1, 1), False), ("RGB", (2048, 1536), False)])
def test_quick_jpeg_check_agrees_with_pillow(tmp_path, mode, size, progressive):
    """The Pillow-free JPEG path reads the same size Pillow does, and leaves every defect to Pillow."""
    from PIL import Image

    from extractors.sources import IMAGE_CORRUPT, IMAGE_OK, _jpeg_quick_check, inspect_image

    path = tmp_path / "x.jpg"
    Image.new(mode, size, color=120 if mode == "L" else (10, 120, 200)).save(path, "JPEG", progressive=progressive)
    quick = _jpeg_quick_check(path)
    with Image.open(path) as im:
        assert quick is not None and quick.status == IMAGE_OK and (quick.width, quick.height) == im.size
    truncated = tmp_path / "t.jpg"
    truncated.write_bytes(path.read_bytes()[:-40])
    assert _jpeg_quick_check(truncated) is None  # no end marker: decided on the Pillow path
    assert inspect_image(truncated).status == IMAGE_CORRUPT
    two_bytes = tmp_path / "two.jpg"
    two_bytes.write_bytes(b"\xff\xd8")
    assert _jpeg_quick_check(two_bytes) is None and inspect_image(two_bytes).status == IMAGE_CORRUPT
