"""The SQL questions of README.md, answered against a demo warehouse built by the real flow.

The warehouse: the synthetic demo corpus (40 studies) through every stage with the rule
backend, then the mine stage twice through the LLM backend against a fake OpenAI-compatible
server (the second run, forced, is served from the response cache), then the datasets stage. Every
query in the document runs as written (placeholders filled with real ids) and must answer
with rows; several answers are checked against the tables they summarise.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SQL_DOC = REPO / "README.md"


def llm_prompt_version() -> str:
    """The prompt version the LLM backend uses by default (the single-call protocol)."""
    from extractors.chains.llm_backend import DEFAULT_PROMPT_VERSIONS
    from radchain.settings import LLMSettings

    return DEFAULT_PROMPT_VERSIONS[LLMSettings().protocol]

_QUESTION = re.compile(r"^#### (?:(\d+)\. )?(.+?)\n(.*?)```sql\n(.*?)```", re.M | re.S)


def documented_questions() -> list[tuple[str, str, str]]:
    """(number or '', title, sql) for every '#### ' heading followed by a SQL block."""
    text = SQL_DOC.read_text(encoding="utf-8")
    return [(m.group(1) or "", m.group(2).strip(), m.group(4).strip()) for m in _QUESTION.finditer(text)]


QUESTIONS = documented_questions()


def chain_responder(body: dict) -> str:
    """A stand-in LLM: writes a plausible chain from what the prompt gives it (labels, answer, report).

    It quotes the report sentence that names each finding, states the status the labels ask
    for and concludes with the given answer, so the verifier accepts many chains and rejects
    some (a finding the report names in words the responder does not look for)."""
    from radchain.testing.fake_openai import fenced_blocks, wants_json

    if not wants_json(body):
        return "Plan: check each finding the question names, then answer."
    user = next((m["content"] for m in body.get("messages") or []
                 if m.get("role") == "user" and isinstance(m.get("content"), str)
                 and "Correct answer:" in m["content"]), "")
    blocks = fenced_blocks(user)
    report = blocks[0] if blocks else ""
    task = (re.search(r"^Task type: (\w+)", user, re.M) or [None, "binary"])[1]
    answer = (re.search(r"^Correct answer: (.*)$", user, re.M) or [None, ""])[1].strip()
    labels = re.findall(r"^- (.+?): .*\(state it as (\w+)\)\s*$", user, re.M)
    sentences = [s.strip() for s in re.split(r"(?<=\.)\s+", report)
                 if len(s.strip()) > 12 and "___" not in s and ":" not in s]
    steps = [{"kind": "plan", "text": "Check " + ", ".join(n for n, _ in labels) + " on the image.",
              "findings": [], "evidence": []}]
    for name, status in labels:
        key = name.split()[-1].lower()
        quote = next((s for s in sentences if key in s.lower()), None)
        evidence = [] if (status == "absent" and quote is None) else [
            {"quote": quote or (sentences or [report])[0], "start": None, "end": None}]
        steps.append({"kind": "observation", "text": f"On this image, {name.lower()} is {status}.",
                      "findings": [{"observation": name, "status": status, "anatomy": None}], "evidence": evidence})
    if task == "temporal":
        steps.append({"kind": "comparison", "text": "Comparing the two images shows how it changed.",
                      "findings": [], "evidence": []})
    steps.append({"kind": "conclusion", "text": f"Therefore the answer is {answer}.", "findings": [], "evidence": []})
    return json.dumps({"steps": steps})


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A demo warehouse with rule-mined data, LLM-mined chains, rejections, LLM calls and cache hits."""
    from flows.commands.run import ensure_demo_corpus
    from flows.pipeline import ALL_STAGES, pipeline_flow
    from flows.stages.common import SourceSpec
    from radchain.settings import get_settings, reset_settings_cache
    from radchain.testing import FakeOpenAIServer
    from warehouse import Warehouse

    home = tmp_path_factory.mktemp("sql-demo") / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RADCHAIN_HOME", str(home))
        reset_settings_cache()
        settings = get_settings()
        spec = SourceSpec(path=ensure_demo_corpus(settings.demo_corpus_dir, 40, settings.seed))
        quiet = {"show_progress": False}
        pipeline_flow(source=spec, stages=list(ALL_STAGES), options={"extractor": "rules", **quiet})
        with FakeOpenAIServer(responder=chain_responder) as server:
            mp.setenv("OPENAI_BASE_URL", server.base_url)
            mp.setenv("OPENAI_API_KEY", "sk-fake-test-key")
            reset_settings_cache()
            pipeline_flow(source=spec, stages=["mine"], options={"extractor": "llm", **quiet})
            # Mined again on purpose (force: unchanged batches are otherwise reused without asking the LLM):
            # every request is answered by the response cache.
            pipeline_flow(source=spec, stages=["mine"], options={"extractor": "llm", "force": True, **quiet})
        mp.delenv("OPENAI_BASE_URL")
        mp.delenv("OPENAI_API_KEY")
        reset_settings_cache()
        pipeline_flow(source=spec, stages=["datasets"], options=quiet)
        wh = Warehouse(settings.warehouse_dir)
        yield wh
    reset_settings_cache()


def one(wh, query: str):
    rows = wh.sql(query).to_pylist()
    assert rows, f"no row for {query}"
    return next(iter(rows[0].values()))


@pytest.fixture(scope="module")
def placeholders(demo) -> dict[str, str]:
    study = one(demo, "SELECT c.study_id FROM int_chains c JOIN int_labels l USING (study_id) "
                      "WHERE l.value = 'positive' GROUP BY 1 ORDER BY count(DISTINCT c.chain_id) DESC, 1 LIMIT 1")
    return dict(
        sample_id=one(demo, "SELECT entity_id FROM int_rejections WHERE stage = 'mine' ORDER BY 1 LIMIT 1"),
        study_id=study,
        chain_id=one(demo, "SELECT chain_id FROM int_chains WHERE extractor = 'llm' ORDER BY 1 LIMIT 1"),
    )


def fill(sql: str, values: dict[str, str]) -> str:
    def sub(m: re.Match) -> str:
        assert m.group(1) in values, f"unknown placeholder <{m.group(1)}>"
        return values[m.group(1)]

    return re.sub(r"<(\w+)>", sub, sql)


def test_the_document_has_ten_numbered_questions():
    numbers = [int(n) for n, _, _ in QUESTIONS if n]
    assert numbers == list(range(1, 11))


def test_the_catalog_block_is_generated_from_the_catalog():
    from warehouse import catalog
    from warehouse.catalog_doc import BEGIN, END, catalog_markdown, main, replace_block

    text = SQL_DOC.read_text(encoding="utf-8")
    assert replace_block(text, catalog_markdown()) == text, (
        "README.md's table catalog is stale: run python -m warehouse.catalog_doc --update README.md")
    assert main(["--check", str(SQL_DOC)]) == 0
    block = text.split(BEGIN, 1)[1].split(END, 1)[0]
    for spec in catalog():
        assert f"| `{spec.name}` | {spec.layer} |" in block
        assert f"**{spec.name}**" in block
    assert "`run_id`, `batch_id`, `code_version`" in block
    assert "| `v_chain_steps` |" in block


@pytest.mark.parametrize("number,title,sql", QUESTIONS, ids=[(n or "more") + "-" + t[:40] for n, t, _ in QUESTIONS])
def test_documented_question_answers(demo, placeholders, number, title, sql):
    rows = demo.sql(fill(sql, placeholders)).to_pylist()
    assert rows, f"{title}: no answer"
    check = CHECKS.get(number)
    if check:
        check(demo, placeholders, rows)


# ---- what some answers must agree with ---------------------------------------------------------
def _q1(wh, ph, rows):
    assert {r["stage"] for r in rows} == {"mine"}
    assert all(r["reason_code"] and r["detail"] and r["run_id"] for r in rows)
    assert rows[0]["prompt_version"] == llm_prompt_version() and rows[0]["llm_calls"] > 0


def _q2(wh, ph, rows):
    assert sum(r["chains"] for r in rows) == one(wh, "SELECT count(*) FROM int_chains")
    assert sum(r["steps"] for r in rows) == one(wh, "SELECT count(*) FROM int_chain_steps")
    assert all(r["min_steps"] >= 2 for r in rows)


def _q3(wh, ph, rows):
    mine_inputs = one(wh, "SELECT sum(inputs) FROM audit_stage_counts WHERE stage = 'mine'")
    assert sum(r["samples"] for r in rows) == mine_inputs
    assert all(0 <= r["rejection_rate"] <= 1 for r in rows)
    assert any(0 < r["rejection_rate"] < 1 for r in rows)


def _q4(wh, ph, rows):
    llm = [r for r in rows if r["prompt_version"] == llm_prompt_version()]
    assert llm and llm[0]["accepted_chains"] > 0 and llm[0]["cost_usd"] > 0 and llm[0]["usd_per_accepted_chain"] > 0


def _q5(wh, ph, rows):
    assert any(r["quotes"] for r in rows)
    assert {r["step_index"] for r in rows} >= {0, 1}


def _q6(wh, ph, rows):
    assert sum(r["labels"] for r in rows) == one(wh, "SELECT count(*) FROM int_labels")


def _q7(wh, ph, rows):
    assert sum(r["total"] for r in rows) == one(wh, "SELECT count(*) FROM int_vqa_samples")
    assert all(r["train"] + r["validate"] + r["test"] == r["total"] for r in rows)


def _q8(wh, ph, rows):
    assert [r["stage"] for r in rows] == ["datasets"]  # the last demo run built the datasets only
    assert all(r["balanced"] for r in rows)


def _q9(wh, ph, rows):
    assert len(rows) == 2
    assert rows[0]["cache_hit_rate"] < 1 and rows[0]["cost_usd"] > 0
    assert rows[1]["cache_hit_rate"] == 1 and rows[1]["cost_usd"] == 0


def _q10(wh, ph, rows):
    assert {r["chain_id"] for r in rows} == {ph["chain_id"]}
    assert all(r["request_hash"] and r["status"] == "ok" for r in rows)
    assert rows[0]["model"] and rows[0]["prompt_version"] == llm_prompt_version()


CHECKS = {"1": _q1, "2": _q2, "3": _q3, "4": _q4, "5": _q5, "6": _q6, "7": _q7, "8": _q8, "9": _q9, "10": _q10}


# ---- the views ----------------------------------------------------------------------------------
def test_views_agree_with_their_tables(demo):
    assert one(demo, "SELECT count(*) FROM v_chain_evidence WHERE NOT quote_matches") == 0
    assert one(demo, "SELECT count(*) FROM v_chain_evidence") == one(
        demo, "SELECT sum(len(evidence)) FROM int_chain_steps")
    assert one(demo, "SELECT count(*) FROM v_chain_steps") == one(demo, "SELECT count(*) FROM int_chain_steps")
    outcomes = demo.sql("SELECT outcome, count(*) AS n FROM v_mine_outcomes GROUP BY 1").to_pylist()
    by = {r["outcome"]: r["n"] for r in outcomes}
    assert by["accepted"] == one(demo, "SELECT count(*) FROM int_chains")
    assert by["rejected"] == one(demo, "SELECT count(*) FROM int_rejections WHERE stage = 'mine'")
    assert one(demo, "SELECT count(*) FROM v_rejections") == one(demo, "SELECT count(*) FROM int_rejections")
    assert one(demo, "SELECT sum(calls) FROM v_llm_spend") == one(demo, "SELECT count(*) FROM int_llm_calls")
    # Rows are keyed: no chain, sample or label appears twice after four runs. (Not int_llm_calls: a
    # refinement that repeats an earlier request is a second ledger row, served from the cache.)
    for table, key in (("int_chains", "chain_id"), ("int_vqa_samples", "sample_id"), ("int_rejections", "rejection_id"),
                       ("int_labels", "study_id, observation"), ("int_chain_steps", "chain_id, step_index")):
        assert one(demo, f"SELECT count(*) - count(DISTINCT ({key})) FROM {table}") == 0, table


def test_every_pipeline_run_published_its_artifacts(demo):
    """stage-counts, rejection-reasons, llm-spend and dataset-versions, keyed, one per run."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    runs = [r["run_id"] for r in demo.sql("SELECT run_id, sum(calls) AS calls FROM v_llm_spend GROUP BY 1 "
                                          "ORDER BY min(first_call_at)").to_pylist()]
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=["stage-counts", "rejection-reasons", "llm-spend", "dataset-versions"])))
    by_run: dict[str, dict[str, object]] = {}
    for a in arts:
        by_run.setdefault(str(a.flow_run_id), {})[a.key] = a
    for run_id in runs:
        keys = by_run.get(run_id, {})
        assert {"stage-counts", "rejection-reasons", "llm-spend"} <= set(keys), run_id
        data = keys["llm-spend"].data
        total = (json.loads(data) if isinstance(data, str) else data)[-1]
        assert total["stage"] == "total"
        assert total["calls"] == one(demo, f"SELECT count(*) FROM int_llm_calls WHERE run_id = '{run_id}'")
    datasets_run = one(demo, "SELECT run_id FROM fct_dataset_versions ORDER BY built_at DESC LIMIT 1")
    assert "dataset-versions" in by_run[datasets_run]


# ---- other clients -------------------------------------------------------------------------------
def _reader(path: Path, query: str, hold_s: float = 0.0) -> subprocess.Popen:
    code = textwrap.dedent(f"""
        import duckdb, sys, time
        con = duckdb.connect({str(path)!r}, read_only=True)
        print(con.sql({query!r}).fetchall()[0][0], flush=True)
        time.sleep({hold_s})
        print(con.sql({query!r}).fetchall()[0][0], flush=True)
    """)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_the_duckdb_file_is_readable_by_several_clients_at_once(demo):
    import duckdb

    chains = one(demo, "SELECT count(*) FROM int_chains")
    with duckdb.connect(str(demo.duckdb_path), read_only=True) as con:
        assert con.sql("SELECT count(*) FROM v_chain_steps").fetchall()[0][0] > 0
        other = _reader(demo.duckdb_path, "SELECT count(*) FROM int_chains")
        out, err = other.communicate(timeout=120)
        assert other.returncode == 0, err
        assert out.split() == [str(chains), str(chains)]
        assert con.sql("SELECT count(*) FROM int_chains").fetchall()[0][0] == chains
        assert one(demo, "SELECT count(*) FROM int_chains") == chains  # `radchain sql` meanwhile


def test_a_reader_holding_the_file_open_does_not_block_a_writer(demo):
    """A notebook left open on the warehouse must not make the nightly run fail when it refreshes
    the views (Warehouse.refresh_views builds them in a new file and renames it into place)."""
    reader = _reader(demo.duckdb_path, "SELECT count(*) FROM int_labels", hold_s=3.0)
    try:
        first = reader.stdout.readline().strip()
        assert first.isdigit(), reader.stderr.read()
        assert demo.refresh_views(force=True)  # what a stage does when a view's definition changed
        assert one(demo, "SELECT count(*) FROM int_labels") == int(first)
        out, err = reader.communicate(timeout=120)
        assert reader.returncode == 0, err
        assert out.strip() == first  # the reader kept working on the views it opened
    finally:
        if reader.poll() is None:
            reader.kill()
