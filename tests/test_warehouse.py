"""The warehouse: atomic partition writes, replace-on-rerun, views, read-only SQL, lineage."""

from __future__ import annotations

import json
import os

import duckdb
import polars as pl
import pytest
from typer.testing import CliRunner

from schemas import Lineage, Rejection, Section
from schemas.base import TableRecord, arrow_schema_of, stable_id
from warehouse import Warehouse, WarehouseError, catalog

LIN = Lineage(run_id="run1", batch_id="b0", code_version="test/1")


def _rej(i: int) -> dict:
    return dict(rejection_id=f"r{i}", stage="ingest", entity_id=f"s{i}", reason_code="EMPTY", detail="empty file")


@pytest.fixture
def wh(tmp_path) -> Warehouse:
    return Warehouse(tmp_path / "wh").ensure()


def test_every_table_has_layer_prefix_and_lineage_columns():
    names = [s.name for s in catalog()]
    assert {"raw_reports", "stg_sections", "int_labels", "int_rejections", "audit_stage_counts"} <= set(names)
    for spec in catalog():
        cols = arrow_schema_of(spec.model).names
        assert cols[:3] == ["run_id", "batch_id", "code_version"], spec.name
        assert spec.layer in ("raw", "stg", "int", "mart", "fct", "audit")
        assert spec.description and spec.key


def test_empty_tables_are_queryable_views(wh):
    got = wh.sql("select count(*) as n from stg_sections").to_pylist()
    assert got == [{"n": 0}]
    # the view exposes the model's columns even before any data lands
    cols = wh.sql("select * from stg_sections limit 0").column_names
    assert cols == Section.column_names()


def test_rerun_replaces_partition_instead_of_duplicating(wh):
    wh.write(Rejection, "b0", [_rej(1), _rej(2)], LIN)
    wh.write(Rejection, "b1", [_rej(3)], LIN)
    assert wh.count("int_rejections") == 3
    wh.write(Rejection, "b0", [_rej(1), _rej(2)], LIN)
    assert wh.count("int_rejections") == 3
    rows = wh.sql("select run_id, batch_id, code_version from int_rejections").to_pylist()
    assert all(r == {"run_id": "run1", "batch_id": "b0", "code_version": "test/1"} for r in rows)


def test_write_leaves_no_temporary_files_and_cleans_stale_ones(wh):
    wh.write(Rejection, "b0", [_rej(1)], LIN)
    d = wh.table_dir("int_rejections")
    assert not list(d.glob(".*tmp*"))
    (d / ".b9.parquet.tmp-123").write_bytes(b"half written")
    wh.ensure()
    assert not list(d.glob(".*tmp*"))
    assert wh.count("int_rejections") == 1


def test_schema_mismatch_is_a_clear_error(wh):
    with pytest.raises(WarehouseError, match="columns missing"):
        wh.write(Rejection, "b0", pl.DataFrame({"rejection_id": ["x"]}), LIN)
    with pytest.raises(WarehouseError, match="unsafe partition"):
        wh.write(Rejection, "../evil", [_rej(1)], LIN)


@pytest.mark.parametrize("stmt", [
    "create table x (a int)", "drop view stg_sections", "insert into x values (1)",
    "copy (select 1) to '/tmp/radchain-should-not-exist.csv'", "attach '/tmp/other.db'", "select 1; drop view int_labels",
])
def test_sql_is_read_only(wh, stmt):
    with pytest.raises(WarehouseError, match="read-only"):
        wh.sql(stmt)
    assert not os.path.exists("/tmp/radchain-should-not-exist.csv")


def test_duckdb_file_is_readable_by_other_clients(wh):
    wh.write(Rejection, "b0", [_rej(1)], LIN)
    with duckdb.connect(str(wh.duckdb_path), read_only=True) as con:
        assert con.sql("select reason_code from int_rejections").fetchall() == [("EMPTY",)]


def test_views_are_rebuilt_only_when_their_definition_or_file_changed(wh, monkeypatch):
    assert wh.refresh_views() is False  # ensure() just built them
    wh.write(Rejection, "b0", [_rej(1), _rej(2)], LIN)
    assert wh.refresh_views() is False  # a new partition needs no rebuild: the views glob the folder
    assert wh.sql("select count(*) as n from int_rejections").to_pylist() == [{"n": 2}]

    with duckdb.connect(str(wh.duckdb_path)) as con:  # someone rewrote the file (duckdb CLI, read-write)
        con.execute("CREATE OR REPLACE VIEW int_rejections AS SELECT 1 AS n")
    assert wh.refresh_views() is True
    assert wh.sql("select count(*) as n from int_rejections").to_pylist() == [{"n": 2}]

    wh.duckdb_path.unlink()
    assert wh.refresh_views() is True and wh.duckdb_path.is_file()

    from warehouse import views  # a derived view's SQL changed (a new release)

    monkeypatch.setitem(views.VIEWS, "v_test_only", "SELECT 42 AS answer")
    assert wh.refresh_views() is True
    assert wh.sql("select answer from v_test_only").to_pylist() == [{"answer": 42}]
    assert wh.refresh_views() is False
    assert wh.refresh_views(force=True) is True
    assert not list(wh.root.glob(".*.tmp-*"))


def test_call_journal_keeps_rows_per_run_and_batch_until_discarded(tmp_path):
    from datetime import UTC, datetime

    from warehouse.llm_journal import SQLiteCallJournal

    when = datetime(2026, 11, 30, 4, 5, 6, tzinfo=UTC)
    journal = SQLiteCallJournal(tmp_path / "cache")
    journal.append("dead", "b1", dict(request_hash="h1", cost_usd=0.5, error_code=None, created_at=when))
    journal.append("dead", "b1", dict(request_hash="h2", cost_usd=0.25, error_code="TIMEOUT", created_at=when))
    journal.append("dead", "b2", dict(request_hash="h3", cost_usd=0.0, error_code=None, created_at=when))
    journal.append("live", "b1", dict(request_hash="h4", cost_usd=0.0, error_code=None, created_at=when))
    journal.close()

    journal = SQLiteCallJournal(tmp_path / "cache")  # what a later process sees
    left = journal.left_by_other_runs("b1", "live")
    assert list(left) == ["dead"]
    assert [r["request_hash"] for r in left["dead"]] == ["h1", "h2"]  # in the order they were made
    assert left["dead"][1] == dict(request_hash="h2", cost_usd=0.25, error_code="TIMEOUT", created_at=when)
    journal.discard("dead", "b1")
    assert journal.left_by_other_runs("b1", "live") == {}
    assert len(journal) == 2  # b2's row and the live run's own row stay
    journal.close()


def test_polars_scan_reads_all_partitions(wh):
    wh.write(Rejection, "b0", [_rej(1)], LIN)
    wh.write(Rejection, "b1", [_rej(2), _rej(3)], LIN)
    assert sorted(wh.read(Rejection)["entity_id"].to_list()) == ["s1", "s2", "s3"]
    assert wh.partitions("int_rejections") == ["b0", "b1"]


def test_stable_ids_are_deterministic():
    assert stable_id("a", 1) == stable_id("a", 1)
    assert stable_id("a", 1) != stable_id("a1")
    assert len(stable_id("x")) == 16


def test_cli_sql_and_tables(radchain_home):
    from flows.cli import app
    from radchain.settings import get_settings

    wh = Warehouse(get_settings().warehouse_dir).ensure()
    wh.write(Rejection, "b0", [_rej(1)], LIN)
    runner = CliRunner()
    res = runner.invoke(app, ["sql", "select entity_id, reason_code from int_rejections", "--format", "json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == [{"entity_id": "s1", "reason_code": "EMPTY"}]
    res = runner.invoke(app, ["sql", "select entity_id from int_rejections", "--format", "csv"])
    assert res.stdout.splitlines() == ["entity_id", "s1"]
    # Text a spreadsheet would run as a formula (a hostile report) is defused; numbers are left alone.
    res = runner.invoke(app, ["sql", "select '=HYPERLINK(\"http://x\")' as t, '@SUM(1)' as u, -3 as n, 'ok-3' as v",
                              "--format", "csv"])
    assert res.stdout.splitlines() == ["t,u,n,v", "\"'=HYPERLINK(\"\"http://x\"\")\",'@SUM(1),-3,ok-3"]
    res = runner.invoke(app, ["sql", "delete from int_rejections"])
    assert res.exit_code == 2 and "read-only" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["tables", "--format", "json"])
    listed = {r["table"]: r for r in json.loads(res.stdout)}
    assert listed["int_rejections"]["rows"] == 1 and listed["int_rejections"]["layer"] == "int"
    from warehouse.views import VIEWS

    assert set(listed) == set(TableRecord.registry) | set(VIEWS)  # the views too, with no row count
    assert {listed[v]["layer"] for v in VIEWS} == {"view"} and listed["v_runs"]["rows"] is None
