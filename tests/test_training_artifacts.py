"""The training and evaluation artifacts' content, without a Prefect server: curves drawn from a
TrainResult-shaped curve, the metric rows of a registry row, the parent run's summary links, and an
evaluation whose every output is unparseable reading as such (test_pipeline_e2e and test_ui_browser
read the published artifacts back from a real API)."""

from __future__ import annotations

import json
from types import SimpleNamespace
from uuid import uuid4

from PIL import Image

from flows.evaluation import render_chart, results_table, score_line, unparseable_warning
from flows.training_artifacts import curve_series, headline_figure, metric_rows, render_curves, summary_markdown

# As training/sft.py's summarize() keeps them: one entry per logging step, only the keys logged.
SFT_CURVE = [dict(step=1, epoch=0.5, loss=2.5, learning_rate=1e-3, mean_token_accuracy=0.1),
             dict(step=2, epoch=1.0, loss=2.0, learning_rate=5e-4, mean_token_accuracy=0.3)]
GRPO_CURVE = [{"step": 1, "loss": 0.01, "kl": 0.0, "reward": 0.4, "completions/mean_length": 12.0,
               "rewards/outcome_reward/mean": 0.5, "rewards/format_reward/mean": 0.0}]


def test_curve_panels_hold_the_logged_points():
    sft = dict(curve_series("sft", SFT_CURVE))
    assert sft["loss"] == {"loss": [(1, 2.5), (2, 2.0)]}
    assert sft["token accuracy"] == {"mean_token_accuracy": [(1, 0.1), (2, 0.3)]}
    grpo = dict(curve_series("grpo", GRPO_CURVE))
    # the total reward with each reward function's mean beside it; a key never logged draws no panel line
    assert set(grpo["reward"]) == {"reward", "rewards/format_reward/mean", "rewards/outcome_reward/mean"}
    assert grpo["loss and KL"] == {"loss": [(1, 0.01)], "kl": [(1, 0.0)]}


def test_curves_render_as_png_also_for_a_run_that_logged_nothing(tmp_path):
    for kind, curve in (("sft", SFT_CURVE), ("grpo", GRPO_CURVE), ("sft", [])):
        path = render_curves(kind, curve, tmp_path / f"{kind}-{len(curve)}.png", title=kind)
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width >= 600


def test_metric_rows_and_headline_of_a_finished_and_a_failed_job():
    row = dict(training_run_id="sft-1", kind="sft", status="completed", config_name="tiny-cpu", dataset_version="ds-1",
               n_examples=8, n_skipped=0, init_checkpoint=None, checkpoint="/x/final", wall_s=3.25, error=None,
               metrics_json=json.dumps(dict(train_loss=2.25, steps=2, tokens_per_s=100.0, curve=SFT_CURVE)))
    rows = {r["metric"]: r["value"] for r in metric_rows(row)}
    assert (rows["status"], rows["steps"], rows["train_loss"], rows["checkpoint"]) == ("completed", "2", "2.25",
                                                                                       "/x/final")
    assert "curve" not in rows  # the curve is the chart's, not a table cell
    assert headline_figure(row) == "2 steps, train loss 2.25"
    failed = dict(row, status="failed", error="ValueError: no rows\nTraceback ...", metrics_json="{}")
    assert headline_figure(failed) == "failed: ValueError: no rows"
    assert {r["metric"]: r["value"] for r in metric_rows(failed)}["error"] == "ValueError: no rows"


def test_the_summary_links_each_job_run_and_its_artifacts():
    sft_run, eval_run = uuid4(), uuid4()
    curves, metrics = (SimpleNamespace(key=k, id=uuid4(), data=None) for k in ("sft-curves", "sft-metrics"))
    table = [dict(series="model", task="binary", n=1, n_unparseable=1, accuracy=0.0),
             dict(series="model", task="all", n=2, n_unparseable=1, accuracy=0.5),
             dict(series="oracle", task="all", n=2, n_unparseable=0, accuracy=1.0)]
    results = SimpleNamespace(key="eval-results", id=uuid4(), data=json.dumps(table))  # as the API returns it
    jobs = [dict(kind="sft", flow_run_id=sft_run, flow_run_name="brave-fox", status="completed",
                 checkpoint="/x/final", headline="2 steps, train loss 2.25"),
            dict(kind="evaluate", flow_run_id=eval_run, flow_run_name="calm-owl", status="completed")]
    text = summary_markdown("ds-1", jobs, {str(sft_run): [metrics, curves], str(eval_run): [results]},
                            base="http://127.0.0.1:4200")
    sft_line = next(line for line in text.splitlines() if line.startswith("| sft |"))
    assert f"[brave-fox](http://127.0.0.1:4200/runs/flow-run/{sft_run})" in sft_line
    assert (f"[sft-curves](http://127.0.0.1:4200/artifacts/artifact/{curves.id}), "
            f"[sft-metrics](http://127.0.0.1:4200/artifacts/artifact/{metrics.id})") in sft_line
    assert "2 steps, train loss 2.25" in sft_line and "`/x/final`" in sft_line
    eval_line = next(line for line in text.splitlines() if line.startswith("| evaluate |"))
    assert f"[eval-results](http://127.0.0.1:4200/artifacts/artifact/{results.id})" in eval_line
    assert "| accuracy 0.500 over 2, 1 unparseable |" in eval_line  # the model's "all" row, from its artifact


def _rows(n: int, unparseable: int) -> list[dict]:
    every = dict(task="all", n=n, n_unparseable=unparseable, n_no_answer=unparseable, accuracy=0.0, accuracy_n=n,
                 completeness=0.0, completeness_n=n, factuality=None, factuality_n=0, effectiveness=0.0,
                 effectiveness_n=n, radrscore=0.0, radrscore_n=n, format_compliance=0.0, format_compliance_n=n)
    return [dict(every, task="binary"), every]


def test_an_all_unparseable_evaluation_says_so_in_its_table_summary_and_chart(tmp_path):
    """113 of 113 unparseable: the artifact shows n, n_unparseable and each score's count, a warning, and
    a chart that names it, instead of bare zeros."""
    scored = {"model": _rows(113, 113), "oracle": [dict(r, n_unparseable=0, accuracy=1.0) for r in _rows(113, 0)]}
    table = results_table(scored)
    model_all = next(r for r in table if r["series"] == "model" and r["task"] == "all")
    assert (model_all["n"], model_all["n_unparseable"], model_all["accuracy"], model_all["accuracy_n"]) == \
        (113, 113, 0.0, 113)
    assert model_all["factuality"] is None and model_all["factuality_n"] == 0
    line = score_line(model_all | {"task": "all"})
    assert line.startswith("all: n=113, 113 unparseable (100%), accuracy 0.000 (n=113)")
    assert "factuality n/a (n=0)" in line
    assert "All 113 model outputs were unparseable" in unparseable_warning(scored)
    assert unparseable_warning({"model": _rows(113, 5)}) is None
    chart = render_chart(scored, tmp_path / "eval.png")
    assert chart.stat().st_size > 1000
