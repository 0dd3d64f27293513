"""End to end in the Prefect UI: serve, run the nightly `mine` deployment, look at it in Chromium.

Starts the serve machinery (Prefect server on 127.0.0.1, the pools, a cpu worker, the
deployments), runs the pipeline through the `mine` deployment on a 40-study demo corpus,
then renders the flow-run page and the stage-count artifact's page in headless Chromium and
checks the rendered DOM: the run completed, and the artifact shows the per-stage table.
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
    from flows.commands.serve import ServeStack
    from flows.deployments import deployment_specs
    from radchain.settings import Settings

    root = tmp_path_factory.mktemp("ui")
    corpus = generate_corpus(root / "corpus", studies=STUDIES, seed=13).out
    settings = Settings(home=(root / "home").resolve())
    stack = ServeStack(settings, port=0, pools=("cpu",), worker_poll_s=2,
                       env={"PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"})
    stack.start(deployment_specs(source=corpus, extractor="rules"), schedules_active=False)
    try:
        yield stack
    finally:
        stack.stop()
        for name in ("server", "worker-cpu"):
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


def test_flow_run_page_shows_the_completed_run(stack, mine_run):
    run, _ = mine_run
    url = f"{stack.ui_url}/runs/flow-run/{run.id}"
    text = render_until(url, [run.name, "Completed", "radchain-pipeline", "mine"])
    assert "Can't connect to Server API" not in text
    shot = output_dir() / "ui-flow-run.png"
    chromium(url, screenshot=shot)
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
