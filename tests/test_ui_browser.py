"""End to end in the Prefect UI: serve, run the nightly `mine` deployment, look at it in Chromium.

Starts the serve machinery (Prefect server on 127.0.0.1, the pools, a cpu worker, the
deployments), runs the pipeline through the `mine` deployment on a 40-study demo corpus,
then renders the flow-run page and the stage-count artifact's page in headless Chromium and
checks the rendered DOM: the run completed, its run graph (the data the UI draws) has the stage DAG's
edges, and the artifact shows the per-stage table. The
deployment run also left its `mine-progress` artifact (progress is on in deployments). Then the
`train` deployment runs as it is scheduled (it waits on the cpu pool while the `sft`, `grpo` and
`evaluate` deployments run on the gpu pool's worker; tiny config) and the SFT curve artifact and
the parent run's summary are rendered: the PNG is in the page, the summary links the jobs' runs
and artifacts.
Screenshots are kept in ``.radchain/test-output/`` (or ``$RADCHAIN_TEST_OUTPUT``).

Skipped only when no Chromium is installed (.ci/run installs it).
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STUDIES = 40
CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"),
                             shutil.which("google-chrome"), "/usr/bin/chromium") if p and Path(p).exists()), None)

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")


def output_dir() -> Path:
    out = Path(os.environ.get("RADCHAIN_TEST_OUTPUT") or REPO / ".radchain" / "test-output")
    out.mkdir(parents=True, exist_ok=True)
    return out


def chromium(url: str, *, screenshot: Path | None = None, budget_ms: int = 15000) -> str:
    """Render a page headless in a fresh profile; returns the DOM (or '' for a screenshot)."""
    with tempfile.TemporaryDirectory(prefix="radchain-chromium-") as profile:
        args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
                "--window-size=1400,1000"]
        args += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
        out = subprocess.run([*args, url], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def visible_text(dom: str) -> str:
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))


def render_until(url: str, wanted: list[str], attempts: int = 3) -> str:
    """The UI loads its data asynchronously: render again (longer budget) until it shows everything."""
    text = ""
    for i in range(attempts):
        text = visible_text(chromium(url, budget_ms=15000 * (i + 1)))
        if all(w in text for w in wanted):
            return text
    missing = [w for w in wanted if w not in text]
    raise AssertionError(f"{url} never showed {missing}; it showed: {text[:3000]}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from extractors.synthetic import generate_corpus
    from flows.deployments import deployment_specs
    from flows.supervisor import ServeStack
    from radchain.settings import Settings

    root = tmp_path_factory.mktemp("ui")
    corpus = generate_corpus(root / "corpus", studies=STUDIES, seed=13).out
    settings = Settings(home=(root / "home").resolve())
    stack = ServeStack(settings, port=0, pools=("cpu", "gpu"), worker_poll_s=2,
                       env={"PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"})
    stack.start(deployment_specs(source=corpus, extractor="rules"), schedules_active=False)
    try:
        yield stack
    finally:
        stack.stop()
        for name in ("server", "worker-cpu", "worker-gpu"):
            log = stack.log_dir / f"{name}.log"
            if log.exists():
                shutil.copy(log, output_dir() / f"ui-{name}.log")


@pytest.fixture(scope="module")
def mine_run(stack):
    """The `mine` deployment run to completion by the cpu worker; its flow run and artifacts."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.deployments import run_deployment

    with stack.api():
        run = run_deployment("radchain-pipeline/mine", timeout=600, poll_interval=2)
        with get_client(sync_client=True) as client:
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    assert run.state.is_completed(), run.state
    return run, {a.key: a for a in artifacts}


def test_the_run_published_its_artifacts(mine_run):
    _, artifacts = mine_run
    assert {"stage-counts", "rejection-reasons", "llm-spend", "dataset-versions"} <= set(artifacts)


def test_the_deployment_run_has_a_progress_artifact(stack, mine_run):
    """A scheduled/deployed mine run shows its progress (deployments no longer turn it off)."""
    run, artifacts = mine_run
    progress = artifacts["mine-progress"]
    assert progress.type == "progress" and progress.data == 100.0
    assert re.fullmatch(r"mine: (\d+)/\1 samples processed", progress.description), progress.description
    render_until(f"{stack.ui_url}/artifacts/artifact/{progress.id}", ["mine-progress", run.name])


@pytest.fixture(scope="module")
def train_run(stack, mine_run):
    """The `train` deployment (its jobs as deployment runs on the gpu pool, tiny config) on the mine run's
    dataset; the parent run and the artifacts of it and its job runs, by key."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, \
        FlowRunFilterParentFlowRunId
    from prefect.deployments import run_deployment

    with stack.api():
        run = run_deployment("radchain-train/train", timeout=900, poll_interval=2,
                             parameters={"max_examples": 4, "max_eval_per_task": 1})  # use_deployments: true
        with get_client(sync_client=True) as client:
            children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[run.id, *(c.id for c in children)])))
    assert run.state.is_completed(), run.state
    return run, {a.key: a for a in artifacts}, children


def test_training_curve_artifact_page_shows_the_chart(stack, train_run):
    run, artifacts, _ = train_run
    assert {"sft-curves", "sft-metrics", "grpo-curves", "grpo-metrics", "eval-results", "train-summary"} <= \
        set(artifacts), sorted(artifacts)
    curves = artifacts["sft-curves"]
    url = f"{stack.ui_url}/artifacts/artifact/{curves.id}"
    render_until(url, ["sft-curves", "logged steps"])
    dom = chromium(url, budget_ms=30000)
    assert re.search(r'<img[^>]+src="data:image/png;base64,', dom), "the curve PNG is not in the rendered page"
    shot = output_dir() / "ui-sft-curves.png"
    chromium(url, screenshot=shot)
    assert shot.stat().st_size > 10_000


def test_the_train_run_summary_links_its_jobs_artifacts(stack, train_run):
    run, artifacts, children = train_run
    # the weekly DAG as deployed: each job a run of its own deployment, on the gpu pool
    assert sorted((c.work_pool_name, c.state.type.value) for c in children) == [("gpu", "COMPLETED")] * 3
    summary = artifacts["train-summary"]
    text = render_until(f"{stack.ui_url}/artifacts/artifact/{summary.id}", ["train-summary", "sft", "grpo",
                                                                            "evaluate", "sft-curves"])
    assert "grpo-curves" in text and "eval-results" in text
    assert re.search(r"\bevaluate \S+ completed accuracy \d\.\d{3} over \d+, \d+ unparseable\b", text), text[:2000]
    for key in ("sft-curves", "grpo-metrics", "eval-results"):
        assert f"/artifacts/artifact/{artifacts[key].id})" in summary.data
    for child in children:
        assert f"[{child.name}](" in summary.data and f"/runs/flow-run/{child.id})" in summary.data
    shot = output_dir() / "ui-train-summary.png"
    chromium(f"{stack.ui_url}/artifacts/artifact/{summary.id}", screenshot=shot)
    assert shot.stat().st_size > 10_000


def test_flow_run_page_shows_the_completed_run(stack, mine_run):
    run, _ = mine_run
    url = f"{stack.ui_url}/runs/flow-run/{run.id}"
    text = render_until(url, [run.name, "Completed", "radchain-pipeline", "mine"])
    assert "Can't connect to Server API" not in text
    shot = output_dir() / "ui-flow-run.png"
    chromium(url, screenshot=shot)
    assert shot.stat().st_size > 10_000


def test_the_run_graph_draws_the_stage_dag(stack, mine_run):
    """The graph the UI draws for the deployment run (its run page reads /flow_runs/{id}/graph-v2, fetched here
    by the browser): task runs named stage[batch] with their counts, and edges stage to stage only, one per
    dependency: ingest -> label -> tasks -> mine -> datasets."""
    import json

    run, _ = mine_run
    dom = chromium(f"{stack.api_url}/flow_runs/{run.id}/graph-v2")
    graph = json.loads(html.unescape(re.search(r"<pre[^>]*>(.*)</pre>", dom, re.S).group(1)))
    labels = {node_id: node["label"] for node_id, node in graph["nodes"]}
    stage_of = {i: re.match(r"([a-z]+)\[", label).group(1) for i, label in labels.items()}
    assert any(re.fullmatch(r"label\[b\d+\] \d+ in, \d+ out, \d+ rejected", lab) for lab in labels.values()), labels
    edges = {(stage_of[p["id"]], stage_of[node_id]) for node_id, node in graph["nodes"] for p in node["parents"]}
    assert {e for e in edges if e[0] != e[1]} == {("ingest", "label"), ("label", "tasks"), ("tasks", "mine"),
                                                  ("mine", "datasets")}
    shot = output_dir() / "ui-run-graph.png"
    chromium(f"{stack.ui_url}/runs/flow-run/{run.id}", screenshot=shot)
    assert shot.stat().st_size > 10_000


def test_stage_count_artifact_page_shows_the_table(stack, mine_run):
    run, artifacts = mine_run
    art = artifacts["stage-counts"]
    url = f"{stack.ui_url}/artifacts/artifact/{art.id}"
    text = render_until(url, ["stage-counts", "inputs", "outputs", "rejected", "ingest", "datasets", run.name])
    # The rendered table holds the run's counts: ingest read every study of the corpus.
    assert re.search(rf"\bingest 1 {STUDIES} {STUDIES} 0 0\b", text), text[:2000]
    for stage in ("label", "tasks", "mine"):
        assert f" {stage} " in text
    shot = output_dir() / "ui-stage-counts.png"
    chromium(url, screenshot=shot)
    assert shot.stat().st_size > 10_000


def test_artifact_key_page_keeps_the_history(stack, mine_run):
    run, _ = mine_run
    # The key's page lists the versions of the artifact, newest first, each described with its run id.
    render_until(f"{stack.ui_url}/artifacts/key/stage-counts", ["stage-counts", f"Per-stage counts of run {run.id}"])


def test_docs_catalog_page_renders_its_lineage_graph(tmp_path):
    """`radchain docs` writes a page that opens from disk (no server, no network) with the lineage graph drawn."""
    from flows.lineage import lineage_edges
    from warehouse.catalog_doc import write_html

    page = write_html(tmp_path / "site", lineage_edges())
    dom = chromium(page.as_uri())
    text = visible_text(dom)
    assert "radchain warehouse catalog" in text and "Lineage" in text
    svg = re.search(r'<svg[^>]*id="lineage".*?</svg>', dom, re.S)
    assert svg, dom[:2000]
    nodes = set(re.findall(r'class="node" data-name="([^"]+)"', svg.group(0)))
    assert {"ingest", "mine", "datasets", "int_chains", "mart_rl_prompts", "v_runs"} <= nodes
    assert 'data-source="mine" data-target="int_chains"' in svg.group(0)
    chromium(page.as_uri(), screenshot=output_dir() / "docs-catalog.png")
    assert (output_dir() / "docs-catalog.png").stat().st_size > 10_000
