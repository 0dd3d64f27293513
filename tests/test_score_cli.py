"""`radchain score` and `radchain judge-agreement` end to end on a small warehouse built in a fixture."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import schemas  # noqa: F401
import schemas.eval  # noqa: F401  (registers the evaluation tables until schemas/__init__ imports it)
from schemas.base import Lineage
from schemas.chains import ChainStepRow
from schemas.labels import Label
from schemas.vqa import VqaSample

EFFUSION_NO = "There is no pleural effusion."
HEART_BIG = "The heart is enlarged, consistent with cardiomegaly."
CONCLUSION = "Therefore, the answer is B."
LINEAGE = Lineage(run_id="test", batch_id="b0", code_version="test")


def _sample(sid: str, task: str, study: str, letter: str | None, findings: list[str]) -> dict:
    options = [] if task == "open" else ["Yes", "No"]
    return dict(sample_id=sid, task=task, study_id=study, prior_study_id=None, patient_id="p1", split="test",
                question="Q?", options=options, answer_letter=letter, answer_text=letter or ", ".join(findings),
                findings=findings, answer_findings=findings, image_paths=["x.jpg"])


def _step(chain: str, sid: str, i: int, text: str, obs: str | None = None, status: str | None = None) -> dict:
    findings = [dict(observation=obs, status=status, anatomy=None)] if obs else []
    return dict(chain_id=chain, sample_id=sid, step_index=i, kind="observation", text=text, findings=findings,
                evidence=[])


@pytest.fixture
def warehouse(radchain_home):
    from radchain.settings import get_settings
    from warehouse import Warehouse

    wh = Warehouse(get_settings().warehouse_dir).ensure()
    wh.write(VqaSample, "b0", [
        _sample("s-bin", "binary", "st1", "B", ["Pleural Effusion"]),
        _sample("s-bin2", "binary", "st1", "A", ["Cardiomegaly"]),
        _sample("s-open", "open", "st1", None, ["Cardiomegaly"]),
        _sample("s-nochain", "binary", "st1", "A", ["Cardiomegaly"]),
    ], LINEAGE)
    steps = []
    for sid, chain in (("s-bin", "c1"), ("s-bin2", "c2"), ("s-open", "c3")):
        steps += [_step(chain, sid, 0, EFFUSION_NO, "Pleural Effusion", "absent"),
                  _step(chain, sid, 1, HEART_BIG, "Cardiomegaly", "present"),
                  _step(chain, sid, 2, CONCLUSION)]
    wh.write(ChainStepRow, "b0", steps, LINEAGE)
    wh.write(Label, "b0", [
        dict(study_id="st1", observation="Pleural Effusion", value="negative", source="rules"),
        dict(study_id="st1", observation="Cardiomegaly", value="positive", source="rules"),
    ], LINEAGE)
    return wh


def _app() -> typer.Typer:
    from flows.commands import score

    app = typer.Typer()
    score.register(app)
    return app


def _write_predictions(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _think(*lines: str) -> str:
    return "<think>\n" + "\n".join(lines) + "\n</think>"


PREDICTIONS = [
    {"sample_id": "s-bin", "output": _think(EFFUSION_NO, HEART_BIG, CONCLUSION) + "<answer>B</answer>"},
    {"sample_id": "s-bin2", "output": "A"},  # a bare letter: answer A (right), no reasoning: unparseable
    {"sample_id": "s-open", "output": _think(HEART_BIG) + "<answer>Cardiomegaly</answer>"},
    {"sample_id": "s-nochain", "output": _think(HEART_BIG) + "<answer>A</answer>"},
    {"sample_id": "ghost-1", "output": "<think>x</think><answer>A</answer>"},
]


def test_score_writes_results_and_reports_unknown_ids(warehouse, tmp_path):
    preds = _write_predictions(tmp_path / "preds.jsonl", PREDICTIONS)
    result = CliRunner().invoke(_app(), ["score", "--predictions", str(preds), "--model", "tiny",
                                         "--checkpoint", "step-1"])
    assert result.exit_code == 0, result.output
    assert "ghost-1" in result.output and "binary" in result.output
    eval_id = re.search(r"eval_id: ([0-9a-f]+)", result.output).group(1)

    rows = {r["task"]: r for r in warehouse.read("fct_eval_results").to_dicts()}
    assert set(rows) == {"binary", "open", "all"}
    every = rows["all"]
    assert every["eval_id"] == eval_id and every["model"] == "tiny" and every["checkpoint"] == "step-1"
    assert (every["n"], every["n_unknown"], every["n_unparseable"], every["n_no_gold_chain"]) == (4, 1, 1, 1)
    assert every["n_tagless"] == 1  # the bare "A"
    assert rows["binary"]["n"] == 3 and rows["binary"]["accuracy"] == 1.0
    assert rows["open"]["accuracy"] == 1.0
    # completeness: s-bin 1, s-bin2 0 (unparseable), s-open (1 of 2 key findings + 1 of 3 statements) / 5;
    # s-nochain has no gold chain
    assert every["completeness"] == pytest.approx((1 + 0 + 2 / 5) / 3)
    assert every["factuality"] == pytest.approx((1 + 0 + 1 + 1) / 4)
    assert every["effectiveness"] == pytest.approx((1 + 0 + 1) / 3)
    assert every["radrscore"] == pytest.approx((every["completeness"] + every["factuality"]
                                                + every["effectiveness"]) / 3)
    preds_rows = warehouse.read("fct_predictions")
    assert preds_rows.height == 4 and set(preds_rows["eval_id"]) == {eval_id}

    # re-scoring the same file replaces its rows instead of adding new ones
    again = CliRunner().invoke(_app(), ["score", "--predictions", str(preds), "--model", "tiny",
                                        "--checkpoint", "step-1"])
    assert again.exit_code == 0, again.output
    assert warehouse.read("fct_eval_results").height == 3
    # and the tables are queryable through the read-only SQL entry point
    n = warehouse.sql("SELECT count(*) AS n FROM fct_predictions").to_pylist()[0]["n"]
    assert n == 4


@pytest.mark.parametrize("content,message", [
    ("not json\n", "not a JSON object"),
    ('{"output": "x"}\n', "needs a sample_id"),
    ('{"sample_id": "s"}\n', "needs an output"),
    ("", "holds no predictions"),
])
def test_bad_prediction_files_fail_with_one_line(warehouse, tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    result = CliRunner().invoke(_app(), ["score", "--predictions", str(path)])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_score_without_a_warehouse_is_a_usage_error(radchain_home, tmp_path):
    preds = _write_predictions(tmp_path / "p.jsonl", PREDICTIONS[:1])
    result = CliRunner().invoke(_app(), ["score", "--predictions", str(preds)])
    assert result.exit_code == 2 and "radchain run" in result.output


def _verdict_responder(body: dict) -> str:
    """A stand-in judge: recalls every key finding, supports every step, calls stated findings correct."""
    user = next(m["content"] for m in body["messages"] if m["role"] == "user")
    key = re.search(r"KEY FINDINGS OF THE REFERENCE\n(.*?)\n\n", user, re.S).group(1)
    cand = re.search(r"CANDIDATE STEPS\n(.*?)\n\n", user, re.S).group(1)
    n_key = 0 if key == "(none)" else len(key.splitlines())
    n_steps = 0 if cand == "(none)" else len(cand.splitlines())
    return json.dumps({
        "stated_findings": [{"observation": "Cardiomegaly", "status": "present", "correct": True}],
        "key_findings": [{"index": i, "recalled": True} for i in range(1, n_key + 1)],
        "steps": [{"index": i, "supported": i % 2 == 1} for i in range(1, n_steps + 1)],
    })


def test_llm_judge_and_agreement_through_the_fake_server(warehouse, tmp_path, monkeypatch):
    import radchain.testing.fake_openai as fake
    from radchain.settings import reset_settings_cache

    preds = _write_predictions(tmp_path / "preds.jsonl", PREDICTIONS)
    with fake.FakeOpenAIServer(responder=_verdict_responder) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        reset_settings_cache()
        result = CliRunner().invoke(_app(), ["score", "--predictions", str(preds), "--judge", "llm"])
        assert result.exit_code == 0, result.output
        # unparseable output costs no request; ghost ids are not judged
        assert server.requests == 3
        rows = {r["task"]: r for r in warehouse.read("fct_eval_results").to_dicts()}
        assert rows["all"]["judge"] == "llm" and rows["all"]["completeness"] == pytest.approx(2 / 3)
        calls = warehouse.read("int_llm_calls")
        assert calls.height == 3 and set(calls["stage"]) == {"judge"}

        agreement = CliRunner().invoke(_app(), ["judge-agreement", "--predictions", str(preds), "-f", "json"])
        assert agreement.exit_code == 0, agreement.output
        assert server.requests == 3  # every verdict came from the response cache
    rows = {r["component"]: r for r in json.loads(agreement.output.strip().splitlines()[-1])}
    assert set(rows) == {"completeness", "factuality", "effectiveness", "radrscore"}
    assert rows["factuality"]["n"] == 3


def test_llm_judge_requests_pass_the_phi_guard(warehouse, tmp_path, monkeypatch):
    """A judge prompt quotes the model's reasoning: one naming a doctor is not sent to a guarded endpoint."""
    import radchain.testing.fake_openai as fake
    from radchain.settings import reset_settings_cache

    leaky = [{"sample_id": "s-bin", "output": _think("Reviewed with Dr. Smith on 03/14/2019.", EFFUSION_NO,
                                                       CONCLUSION) + "<answer>B</answer>"},
             {"sample_id": "s-open", "output": _think(HEART_BIG) + "<answer>Cardiomegaly</answer>"}]
    preds = _write_predictions(tmp_path / "leaky.jsonl", leaky)
    with fake.FakeOpenAIServer(responder=_verdict_responder) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        reset_settings_cache()
        result = CliRunner().invoke(_app(), ["score", "--predictions", str(preds), "--judge", "llm"])
        assert result.exit_code == 0, result.output
        assert server.requests == 1, "only the clean sample was judged by the LLM"
        assert "Smith" not in server.received_text() and "03/14/2019" not in server.received_text()
    assert "the llm judge failed on 1 samples" in " ".join(result.output.split())
    calls = warehouse.read("int_llm_calls")
    assert sorted(calls["error_code"].fill_null("-").to_list()) == ["-", "BLOCKED"]


def test_llm_judge_without_an_endpoint_is_a_usage_error(warehouse, tmp_path):
    preds = _write_predictions(tmp_path / "p.jsonl", PREDICTIONS[:1])
    result = CliRunner().invoke(_app(), ["score", "--predictions", str(preds), "--judge", "llm"])
    assert result.exit_code == 2 and "OPENAI_BASE_URL" in result.output


def test_score_file_is_the_evaluation_jobs_entry_point(warehouse, tmp_path):
    from flows.evaluation import score_file

    preds = _write_predictions(tmp_path / "ckpt.jsonl", PREDICTIONS)
    eval_id, report = score_file(preds, model="m", checkpoint="c", write=False)
    assert report.model == "m" and report.unknown_ids == ["ghost-1"]
    assert [r.task for r in report.per_task] == ["binary", "open", "all"]
    assert warehouse.count("fct_eval_results") == 0  # write=False writes nothing
    again, _ = score_file(preds, model="m", checkpoint="c", write=True)
    assert again == eval_id and warehouse.count("fct_eval_results") == 3


def _gold_without_a_warehouse():
    """The fixture's gold, built from the same row dicts without writing them anywhere."""
    from training.radrscore import gold_from_rows

    samples = [_sample("s-bin", "binary", "st1", "B", ["Pleural Effusion"]),
               _sample("s-bin2", "binary", "st1", "A", ["Cardiomegaly"]),
               _sample("s-open", "open", "st1", None, ["Cardiomegaly"]),
               _sample("s-nochain", "binary", "st1", "A", ["Cardiomegaly"])]
    steps = [_step(chain, sid, i, text, obs, status)
             for sid, chain in (("s-bin", "c1"), ("s-bin2", "c2"), ("s-open", "c3"))
             for i, (text, obs, status) in enumerate([(EFFUSION_NO, "Pleural Effusion", "absent"),
                                                      (HEART_BIG, "Cardiomegaly", "present"),
                                                      (CONCLUSION, None, None)])]
    labels = [dict(study_id="st1", observation="Pleural Effusion", value="negative"),
              dict(study_id="st1", observation="Cardiomegaly", value="positive")]
    return gold_from_rows(samples, steps, labels)


def test_scoring_is_plain_code_and_says_how_many_samples_each_score_averages(tmp_path):
    """training/scoring.py scores a file against gold it is handed (no warehouse, no settings) and gives
    each score its count: the same figures as the CLI test above, with the samples behind them."""
    from training.scoring import read_predictions, score_records

    preds = _write_predictions(tmp_path / "p.jsonl", PREDICTIONS)
    records, _ = read_predictions(preds)
    scored = score_records(records, _gold_without_a_warehouse(), preds, model="m", checkpoint="c")
    rows = {r["task"]: r for r in scored.task_rows()}
    every = rows["all"]
    assert (every["n"], every["n_unparseable"]) == (4, 1)
    # completeness: s-nochain has no gold chain; factuality: all four; effectiveness: s-nochain again
    assert (every["accuracy_n"], every["completeness_n"], every["factuality_n"], every["effectiveness_n"],
            every["radrscore_n"], every["format_compliance_n"]) == (4, 3, 4, 3, 4, 4)
    assert every["completeness"] == pytest.approx((1 + 0 + 2 / 5) / 3)
    assert (rows["binary"]["accuracy_n"], rows["open"]["accuracy_n"]) == (3, 1)
    assert len(scored.prediction_rows()) == 4 and len(scored.result_rows(datetime.now(UTC))) == 3
    # the id is the file's: the same bytes scored the same way are the same evaluation
    again = score_records(records, _gold_without_a_warehouse(), preds, model="m", checkpoint="c")
    assert again.eval_id == scored.eval_id


def test_an_all_unparseable_evaluation_reads_as_such(tmp_path):
    """Every output empty (no reasoning, no answer): n, n_unparseable = n, and zeros with their counts."""
    from training.scoring import read_predictions, score_records

    preds = _write_predictions(tmp_path / "junk.jsonl", [{"sample_id": sid, "output": ""}
                                                          for sid in ("s-bin", "s-bin2", "s-open", "s-nochain")])
    records, _ = read_predictions(preds)
    every = {r["task"]: r for r in score_records(records, _gold_without_a_warehouse(), preds, model="junk")
             .task_rows()}["all"]
    assert (every["n"], every["n_unparseable"], every["n_no_answer"]) == (4, 4, 4)
    assert (every["accuracy"], every["format_compliance"]) == (0.0, 0.0)
    assert (every["accuracy_n"], every["format_compliance_n"]) == (4, 4)
