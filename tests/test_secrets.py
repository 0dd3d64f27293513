"""The API key never lands on disk or in logs.

The LLM mine path runs through the Prefect flow with ``OPENAI_API_KEY`` set to a distinctive
string, against a fake server that *checks* the key (so it was really sent, in the
Authorization header, which is where it belongs), with faults that exercise the retry,
repair and refinement paths and their log lines; then once more with the server refusing
the key (401), so the error paths run too. Every file under RADCHAIN_HOME and PREFECT_HOME
(Parquet decoded, since it is compressed; the DuckDB file, the SQLite response cache and
Prefect's database as raw bytes, WAL files included) and every captured log record and
line of output (a handler at DEBUG on the radchain, openai, httpx, httpcore, prefect and root loggers) is then searched for the key.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

# Imported here, not in the test: Prefect configures logging when it is imported, which could
# detach handlers installed earlier.
import flows.pipeline  # noqa: F401

SECRET = "sk-" + "test-radchain-SECRET-123456789"  # split so secret scanners do not flag a fake key
LOGGERS = ("radchain", "openai", "httpx", "httpx2", "httpcore", "httpcore2", "prefect", "")


def files_containing(root: Path, needle: str) -> list[str]:
    """Files under ``root`` that contain ``needle``: Parquet by value (it is compressed), the rest by bytes."""
    raw = needle.encode()
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.suffix == ".parquet":
            try:
                rows = pq.read_table(path).to_pylist()
            except Exception:  # noqa: BLE001 - an unreadable file is searched as bytes below
                rows = None
            if rows is not None:
                if needle in json.dumps(rows, default=str):
                    found.append(str(path))
                continue
        if raw in path.read_bytes():
            found.append(str(path))
    return found


def test_the_search_finds_a_key_in_compressed_parquet(tmp_path):
    """The search is not vacuous: a key in a zstd Parquet column is found."""
    pq.write_table(pa.table({"x": ["a", f"Bearer {SECRET}"]}), tmp_path / "t.parquet", compression="zstd")
    (tmp_path / "plain.txt").write_text(f"key={SECRET}\n")
    (tmp_path / "clean.txt").write_text("nothing here\n")
    assert files_containing(tmp_path, SECRET) == [str(tmp_path / "plain.txt"), str(tmp_path / "t.parquet")]


class Collect(logging.Handler):
    """Every record at DEBUG and above, formatted, whatever handlers Prefect installs meanwhile."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.names: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        self.names.add(record.name)
        self.lines.append(f"{record.name} {record.getMessage()} {record.__dict__!r}")


@pytest.fixture
def collected():
    handler = Collect()
    loggers = [logging.getLogger(name) for name in LOGGERS]
    saved = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
        lg.addHandler(handler)
    yield handler
    for lg, level in saved:
        lg.removeHandler(handler)
        lg.setLevel(level)


def test_api_key_is_not_stored_or_logged(radchain_home, monkeypatch, capsys, collected, tmp_path):
    from extractors.synthetic import generate_corpus
    from flows.pipeline import make_context, pipeline_flow, run_stages
    from flows.stages.common import SourceSpec
    from radchain.settings import get_settings, reset_settings_cache
    from radchain.testing import FakeOpenAIServer
    from flows.testing import chain_responder

    corpus = tmp_path / "corpus"
    generate_corpus(corpus, studies=20, seed=5, images=False)
    ctx = make_context(source=SourceSpec(path=corpus), extractor="rules", show_progress=False)
    run_stages(ctx, ["ingest", "label", "tasks"])
    n_samples = ctx.warehouse.read("int_vqa_samples").height

    responder = chain_responder(ctx.warehouse)
    faults = dict(rate_limit=0.05, malformed_json=0.05, ungrounded=0.05)
    with FakeOpenAIServer(responder=responder, api_key=SECRET, faults=faults, seed=2, retry_after_s=0.05) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", SECRET)
        monkeypatch.setenv("RADCHAIN_LLM_PROTOCOL", "paper")  # four kinds of prompt, free text included
        monkeypatch.setenv("RADCHAIN_LLM_REQUESTS_PER_MINUTE", "0")
        monkeypatch.setenv("RADCHAIN_LLM_TOKENS_PER_MINUTE", "0")
        reset_settings_cache()
        assert get_settings().llm.api_key.get_secret_value() == SECRET
        assert SECRET not in repr(get_settings()) and SECRET not in str(get_settings().model_dump())

        # Run 1: the server accepts the key (it answers 401 to any other).
        pipeline_flow(stages=["mine"], options={"extractor": "llm", "show_progress": False})
        chains = ctx.warehouse.read("int_chains")
        assert chains.height > 0.9 * n_samples and set(chains["protocol"].to_list()) == {"paper"}
        assert server.statuses[200] > 0 and server.statuses[401] == 0
        assert sum(server.faults_served.values()) > 0

        # Run 2: the key is refused; the cache is emptied so every call really goes out and fails.
        server.api_key = "sk-some-other-key"
        for f in get_settings().cache_dir.glob("*"):
            f.unlink()
        # Every sample rejected: the mine gate (flows/checks.py) fails the run, naming no key.
        from flows.checks import DataCheckFailed

        with pytest.raises(DataCheckFailed, match="mine_acceptance") as failed:
            pipeline_flow(stages=["mine"], options={"extractor": "llm", "show_progress": False})
        assert SECRET not in str(failed.value)
        rejections = ctx.warehouse.read("int_rejections").filter(pl.col("stage") == "mine")
        assert rejections.height == n_samples
        assert set(rejections["reason_code"].to_list()) == {"LLM_AUTH_FAILED"}
        assert server.statuses[401] > 0

    # ---- nothing stored ----------------------------------------------------------------------
    homes = [radchain_home, Path(os.environ["PREFECT_HOME"])]
    searched = [p for h in homes if h.exists() for p in h.rglob("*") if p.is_file()]
    kinds = {p.suffix for p in searched}
    assert {".parquet", ".duckdb", ".sqlite3"} <= kinds, kinds  # the warehouse, its views and the LLM cache
    for home in homes:
        assert files_containing(home, SECRET) == [], f"the API key was written under {home}"

    # ---- nothing logged or printed -----------------------------------------------------------
    assert collected.lines, "logging was captured"
    assert "radchain.llm" in collected.names  # retries and repair turns were logged
    assert any(name.startswith("openai") for name in collected.names)  # the openai client's DEBUG lines too
    leaked = [line for line in collected.lines if SECRET in line]
    assert leaked == [], leaked[:3]
    out = capsys.readouterr()
    assert SECRET not in out.out and SECRET not in out.err
