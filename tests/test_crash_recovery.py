"""Crash recovery: SIGKILL `radchain run` at a random point inside each stage, run it again, and get
exactly the tables of an uninterrupted run, with no half-written Parquet anywhere.

The pipeline runs as a real subprocess (`python -m flows.cli run ...`) on a small synthetic corpus
with a small batch size, so ingest, label and mine write several partitions each. An uninterrupted
reference run records when each warehouse file first appears; each trial then picks, with a seeded
RNG, a stage, a file of that stage (or the stage's start) and a delay shorter than the gap to the
stage's next file, and kills the run's whole process group there. Which stage was actually cut is
read back from the files present at the kill (a stage is cut when the previous stage finished and
this one did not); a draw that lands elsewhere is redrawn. All runs talk to one Prefect server
started here, so a run does not pay for starting a temporary API.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.stages.contract import stage_names
from warehouse import Warehouse
from warehouse_support import table_hashes

REPO = Path(__file__).resolve().parents[1]
STUDIES = 80
BATCH_SIZE = 20  # 4 batches in ingest, label and mine
STAGES = tuple(stage_names())  # every stage, in DAG order
SEED = 20240611
MAX_DRAWS_PER_STAGE = 6
RUN_TIMEOUT_S = 240
# Tables a stage writes (besides the shared ones, whose partitions are named "<stage>-<batch>").
STAGE_TABLES = {
    "raw_reports": "ingest", "stg_sections": "ingest", "stg_studies": "ingest", "stg_images": "ingest",
    "int_labels": "label", "int_vqa_samples": "tasks", "int_chains": "mine", "int_chain_steps": "mine",
    "int_llm_calls": "mine", "mart_sft_examples": "datasets", "mart_rl_prompts": "datasets",
    "mart_benchmark": "datasets", "fct_dataset_versions": "datasets",
}
SHARED_TABLES = ("audit_stage_counts", "int_rejections", "fct_materializations")
WAREHOUSE_READY = "<warehouse>"  # pseudo-file: the run created its warehouse folders (it is under way)


# ---- helpers -------------------------------------------------------------------------------------
def stage_of(rel: str) -> str | None:
    """The stage that writes warehouse file ``table/partition.parquet``."""
    if "/" not in rel:
        return None
    table, name = rel.split("/", 1)
    if table in SHARED_TABLES:
        prefix = name.split("-", 1)[0]
        return prefix if prefix in STAGES else None
    return STAGE_TABLES.get(table)


def parquet_files(home: Path) -> set[str]:
    root = home / "warehouse" / "parquet"
    if not root.is_dir():
        return set()
    out = set()
    for d in root.iterdir():
        try:
            names = os.listdir(d)
        except (FileNotFoundError, NotADirectoryError):
            continue
        out.update(f"{d.name}/{n}" for n in names if n.endswith(".parquet") and n != "_schema.parquet"
                   and not n.startswith("."))
    return out


def tmp_files(home: Path) -> list[Path]:
    return sorted((home / "warehouse").rglob(".*.tmp-*"))


def assert_all_parquet_readable(home: Path) -> int:
    n = 0
    for f in (home / "warehouse" / "parquet").rglob("*.parquet"):
        if f.name.startswith("."):
            continue
        pq.read_table(f)  # raises on a truncated or half-written file
        n += 1
    return n


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Pipeline:
    """`radchain run` as a subprocess in its own process group, against one Prefect server."""

    def __init__(self, corpus: Path, env: dict[str, str], logs: Path):
        self.corpus, self.env, self.logs = corpus, env, logs
        self.n = 0

    def start(self, home: Path) -> subprocess.Popen:
        self.n += 1
        env = dict(self.env, RADCHAIN_HOME=str(home))
        cmd = [sys.executable, "-m", "flows.cli", "run", "--source", str(self.corpus), "--stages", ",".join(STAGES),
               "--batch-size", str(BATCH_SIZE), "--extractor", "rules"]
        with open(self.logs / f"run-{self.n}.log", "wb") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        proc.log_path = self.logs / f"run-{self.n}.log"  # type: ignore[attr-defined]
        return proc

    def run(self, home: Path, watch: bool = False) -> dict[str, float]:
        """Run to completion; with ``watch``, return when each warehouse file first appeared."""
        t0 = time.monotonic()
        proc = self.start(home)
        seen: dict[str, float] = {}
        while proc.poll() is None:
            if watch:
                now = time.monotonic() - t0
                for f in parquet_files(home) - seen.keys():
                    seen[f] = now
                if WAREHOUSE_READY not in seen and (home / "warehouse" / "parquet").is_dir():
                    seen[WAREHOUSE_READY] = now
            if time.monotonic() - t0 > RUN_TIMEOUT_S:
                kill_group(proc)
                pytest.fail(f"radchain run did not finish in {RUN_TIMEOUT_S} s")
            time.sleep(0.005 if watch else 0.05)
        assert proc.returncode == 0, proc.log_path.read_text(errors="replace")[-4000:]  # type: ignore[attr-defined]
        return seen


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and anything it started (its own session)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def stage_cut(files: set[str], complete: dict[str, set[str]]) -> str | None:
    """The stage a run was in when it died: the first stage whose files are not all there."""
    for s in STAGES:
        if not complete[s] <= files:
            return s
    return None


def _trigger(home: Path, mark_file: str | None, prev_files: set[str] | None):
    """When to start the kill delay: a given file appeared, the previous stage is complete, or the
    run created its warehouse (stage ingest's start)."""
    if mark_file is not None:
        return lambda: mark_file in parquet_files(home)
    if prev_files is not None:
        return lambda: prev_files <= parquet_files(home)
    return (home / "warehouse" / "parquet").is_dir


# ---- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from extractors.synthetic import generate_corpus

    root = tmp_path_factory.mktemp("crash")
    corpus = root / "corpus"
    generate_corpus(corpus, studies=STUDIES, seed=7, images=False)
    logs = root / "logs"
    logs.mkdir()
    port = _free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RADCHAIN_", "OPENAI_"))}
    base.update(PREFECT_HOME=str(root / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
                PREFECT_LOGGING_LEVEL="WARNING", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    with open(logs / "server.log", "wb") as server_log:
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=dict(base, PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(port)),
            stdout=server_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        import httpx

        api = f"http://127.0.0.1:{port}/api"
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (logs / "server.log").read_text(errors="replace")[-3000:]
            try:
                if httpx.get(f"{api}/health", timeout=2).json() is True:
                    break
            except (httpx.HTTPError, ValueError):
                pass
            assert time.monotonic() < deadline, "the Prefect server did not start"
            time.sleep(0.5)
        pipe = Pipeline(corpus, dict(base, PREFECT_API_URL=api), logs)
        ref_home = root / "reference"
        seen = pipe.run(ref_home, watch=True)
        yield dict(root=root, pipe=pipe, ref_home=ref_home, seen=seen,
                   ref_hashes=table_hashes(Warehouse(ref_home / "warehouse")))
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(server.pid, signal.SIGKILL)


# ---- tests ---------------------------------------------------------------------------------------
def test_reference_run_writes_every_stage_in_several_partitions(setup):
    by_stage: dict[str, list[str]] = {s: [] for s in STAGES}
    for f in setup["seen"]:
        if stage_of(f):
            by_stage[stage_of(f)].append(f)
    for s in STAGES:
        assert by_stage[s], f"no file of stage {s} seen"
    audits = {s: [f for f in by_stage[s] if f.startswith("audit_stage_counts/")] for s in STAGES}
    for s in ("ingest", "label", "mine"):
        assert len(audits[s]) == STUDIES // BATCH_SIZE, (s, audits[s])
    assert setup["ref_hashes"]["int_chains"][0] > 0 and setup["ref_hashes"]["mart_sft_examples"][0] > 0
    assert not tmp_files(setup["ref_home"])


def test_sigkill_in_every_stage_then_rerun_gives_the_uninterrupted_tables(setup):
    pipe, seen, root = setup["pipe"], setup["seen"], setup["root"]
    rng = random.Random(SEED)
    # Each stage's files in the order they appeared, with their times (seconds after the run started).
    timeline = {s: sorted((t, f) for f, t in seen.items() if stage_of(f) == s) for s in STAGES}
    complete = {s: {f for _, f in timeline[s]} for s in STAGES}
    done_at = {s: timeline[s][-1][0] for s in STAGES}

    trials = []
    crashed_found = 0
    for stage in STAGES:
        prev = STAGES[STAGES.index(stage) - 1] if stage != "ingest" else None
        # A kill time drawn uniformly over the stage's span in the reference run, replayed relative to
        # the last landmark before it: the stage's start (previous stage complete) or one of its files.
        t_start = done_at[prev] if prev else seen[WAREHOUSE_READY]
        marks = [(t_start, None)] + [(t, f) for t, f in timeline[stage][:-1]]
        for draw in range(MAX_DRAWS_PER_STAGE):
            t_kill = rng.uniform(t_start, done_at[stage])
            t_mark, mark_file = max((m for m in marks if m[0] <= t_kill), key=lambda m: m[0])
            delay = (t_kill - t_mark) / (1 + draw)  # a redraw (the kill landed after the stage) aims earlier
            home = root / f"trial-{stage}-{draw}"
            proc = pipe.start(home)
            trigger = _trigger(home, mark_file, complete[prev] if prev else None)
            t0 = time.monotonic()
            while proc.poll() is None and not trigger():
                assert time.monotonic() - t0 < RUN_TIMEOUT_S, "the run never reached the kill point"
                time.sleep(0.002)
            if proc.poll() is None:
                time.sleep(delay)
            alive = proc.poll() is None
            kill_group(proc)
            files = parquet_files(home)
            cut = stage_cut(files, complete) if alive else None
            leftovers = tmp_files(home)
            # Atomic partitions: whatever the kill interrupted, every visible Parquet file is whole.
            readable = assert_all_parquet_readable(home)
            trials.append(dict(stage=stage, draw=draw, cut=cut, mark=mark_file, delay=round(delay, 4),
                               files=len(files), readable=readable, tmp_left=len(leftovers)))
            if cut != stage:
                continue  # landed in another stage (or after the run): redraw, not counted
            pipe.run(home)  # the re-run, to completion
            assert not tmp_files(home), f"temporary files left after the re-run: {tmp_files(home)}"
            assert_all_parquet_readable(home)
            hashes = table_hashes(Warehouse(home / "warehouse"))
            diff = {t for t in hashes if hashes[t] != setup["ref_hashes"][t]}
            assert not diff, f"killed in {stage} ({trials[-1]}), re-run differs from the reference in {diff}"

            # The DuckDB views work after the re-run (the file was rewritten, not left half-built).
            n = Warehouse(home / "warehouse").sql("select count(*) n from int_chains").to_pylist()[0]["n"]
            assert n == setup["ref_hashes"]["int_chains"][0]
            # Run history: the re-run Completed; the killed run (if it got as far as its first audit row)
            # no longer reads Running: the re-run found it and marked it Crashed, naming itself.
            runs = Warehouse(home / "warehouse").sql(
                "select run_id, state, reason from audit_runs order by started_at").to_pylist()
            assert runs[-1]["state"] == "Completed" and len(runs) <= 2, runs
            for killed in runs[:-1]:
                assert killed["state"] == "Crashed" and runs[-1]["run_id"] in killed["reason"], runs
            crashed_found += len(runs) - 1
            break
        else:
            pytest.fail(f"no kill landed inside stage {stage} in {MAX_DRAWS_PER_STAGE} draws: {trials}")
    counted = [t for t in trials if t["cut"] == t["stage"]]
    print("crash trials:", json.dumps(trials, indent=None))
    assert [t["stage"] for t in counted] == list(STAGES)
    assert crashed_found >= len(STAGES) - 1  # every kill after ingest leaves a Running row to close
