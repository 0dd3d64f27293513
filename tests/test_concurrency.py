"""Two writers, one warehouse: the write lock serialises them and the tables stay consistent.

The end-to-end cases run the real CLI (`radchain run`) as separate processes on one
RADCHAIN_HOME: a run that cannot get the lock in time fails with a one-line message naming
the holder; two runs started together both finish, one after the other, and leave exactly
what one run leaves.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.locking import (
    WarehouseLocked,
    describe_holder,
    is_locked,
    lock_path,
    read_holder,
    warehouse_lock,
)
from radchain.testing import radchain_command

RADCHAIN = radchain_command()
STUDIES = 40


def _hold_lock_in_subprocess(warehouse: Path, seconds: float) -> subprocess.Popen:
    code = textwrap.dedent(f"""
        import sys, time
        from flows.locking import warehouse_lock
        with warehouse_lock({str(warehouse)!r}, purpose="test holder"):
            print("locked", flush=True)
            time.sleep({seconds})
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked", proc.stderr.read()
    return proc


# ---- the lock itself -------------------------------------------------------------------------------
def test_lock_is_exclusive_across_processes_and_names_its_holder(tmp_path):
    wh = tmp_path / "warehouse"
    holder = _hold_lock_in_subprocess(wh, 30)
    try:
        assert is_locked(wh)
        info = read_holder(wh)
        assert info["pid"] == holder.pid and info["purpose"] == "test holder"
        t0 = time.monotonic()
        with pytest.raises(WarehouseLocked) as e:
            with warehouse_lock(wh, timeout_s=0.6):
                pass
        assert time.monotonic() - t0 >= 0.5
        message = str(e.value)
        assert f"pid {holder.pid}" in message and "test holder" in message and "0.6 s" in message
        assert "RADCHAIN_LOCK_TIMEOUT_S" in message
    finally:
        holder.kill()
        holder.wait()
    # The kernel drops a flock when its holder dies, even by SIGKILL: no stale lock.
    assert not is_locked(wh)
    with warehouse_lock(wh, timeout_s=0):
        assert is_locked(wh)
        assert read_holder(wh)["pid"] == os.getpid()
    assert read_holder(wh) is None


def test_lock_is_reentrant_within_a_process(tmp_path):
    wh = tmp_path / "warehouse"
    with warehouse_lock(wh, timeout_s=0) as path:
        assert path == lock_path(wh)
        with warehouse_lock(wh, timeout_s=0):  # a subflow asking again must not deadlock
            assert is_locked(wh)
        assert is_locked(wh)
        # ...but another process still cannot take it.
        probe = subprocess.run(
            [sys.executable, "-c", f"from flows.locking import is_locked; print(is_locked({str(wh)!r}))"],
            capture_output=True, text=True, timeout=60)
        assert probe.stdout.strip() == "True", probe.stderr
    assert not is_locked(wh)


def test_a_waiting_writer_gets_the_lock_when_the_holder_finishes(tmp_path):
    wh = tmp_path / "warehouse"
    holder = _hold_lock_in_subprocess(wh, 1.0)
    t0 = time.monotonic()
    with warehouse_lock(wh, timeout_s=60):
        waited = time.monotonic() - t0
    holder.wait(30)
    assert 0.3 < waited < 30


def test_describe_holder_without_information():
    assert describe_holder(None) == "another process"


# ---- the real CLI, twice on one home -----------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from extractors.synthetic import generate_corpus

    out = tmp_path_factory.mktemp("concurrency-corpus") / "corpus"
    generate_corpus(out, studies=STUDIES, seed=13)
    return out


def _start_run(home: Path, corpus: Path, log: Path, **env: str) -> subprocess.Popen:
    environ = {**os.environ, "RADCHAIN_HOME": str(home), "PREFECT_LOGGING_LEVEL": "WARNING", "COLUMNS": "200", **env}
    environ.pop("PREFECT_API_URL", None)
    fh = open(log, "w")  # noqa: SIM115 - closed by the OS when the child exits; read back by name
    return subprocess.Popen([*RADCHAIN, "run", "--source", str(corpus), "--extractor", "rules"],
                            stdout=fh, stderr=subprocess.STDOUT, env=environ, cwd=str(home.parent))


def _stage_counts(output: str) -> dict[str, tuple[int, int, int, int]]:
    """stage -> (inputs, outputs, rejected, skipped) from the table `radchain run` prints."""
    counts = {}
    row = r"│\s*(ingest|label|tasks|mine|datasets)\s*│\s*\d+" + r"\s*│\s*(\d+)" * 4
    for m in re.finditer(row, output):
        counts[m.group(1)] = tuple(int(m.group(i)) for i in range(2, 6))
    return counts


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_run_that_cannot_get_the_lock_fails_with_a_clear_message(tmp_path, corpus):
    home = tmp_path / "home"
    wh = home / "warehouse"
    with warehouse_lock(wh, timeout_s=0, purpose="a nightly run that is still going"):
        run = _start_run(home, corpus, tmp_path / "refused.log", RADCHAIN_LOCK_TIMEOUT_S="2",
                         PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
        assert run.wait(300) == 2
    # Prefect logs the failed flow run with its traceback; the CLI's last word is one clear line.
    last = (tmp_path / "refused.log").read_text().strip().splitlines()[-1]
    assert last.startswith("error: the warehouse ")
    assert f"is being written by pid {os.getpid()}" in last
    assert "a nightly run that is still going" in last
    assert "gave up after waiting 2 s" in last
    # It wrote nothing: the lock is taken before the warehouse is even created.
    assert not (wh / "parquet").exists()


def test_two_simultaneous_runs_serialise_and_leave_what_one_run_leaves(tmp_path, corpus):
    from warehouse import Warehouse, catalog

    home = tmp_path / "home"
    wh_dir = home / "warehouse"
    logs = [tmp_path / "run-a.log", tmp_path / "run-b.log"]
    runs = []
    # Hold the lock while both start, so both are seen waiting; then let them race for it. (They start
    # a second apart: two temporary Prefect servers starting at the same instant on one PREFECT_HOME
    # contend for its SQLite database, which on a loaded machine can exceed Prefect's startup timeout.)
    with warehouse_lock(wh_dir, timeout_s=0, purpose="test gate"):
        for log in logs:
            runs.append(_start_run(home, corpus, log, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180"))
            _wait_for(lambda log=log: "waiting for the warehouse write lock" in log.read_text()
                      or runs[-1].poll() is not None, 400, f"{log.name} to wait for the lock")
            assert runs[-1].poll() is None, log.read_text()[-3000:]
        assert not (wh_dir / "parquet").exists()
    try:
        codes = [r.wait(600) for r in runs]
    finally:
        for r in runs:
            if r.poll() is None:
                r.send_signal(signal.SIGTERM)
    outputs = [log.read_text() for log in logs]
    assert codes == [0, 0], outputs
    counts = [_stage_counts(o) for o in outputs]
    assert set(counts[0]) == {"ingest", "label", "tasks", "mine", "datasets"}, outputs[0]
    assert counts[0] == counts[1]  # the second run saw the first one's warehouse and changed nothing
    ingest, label, tasks, mine = (counts[0][s] for s in ("ingest", "label", "tasks", "mine"))

    wh = Warehouse(wh_dir)
    def n(q: str) -> int:
        return wh.sql(q).to_pylist()[0]["n"]

    # Row counts are those of one run.
    assert ingest[1] == STUDIES
    assert n("SELECT count(*) AS n FROM raw_reports") == ingest[1]
    assert n("SELECT count(DISTINCT study_id) AS n FROM int_labels") == label[1]
    assert n("SELECT count(DISTINCT study_id) AS n FROM int_vqa_samples") == tasks[1]
    assert n("SELECT count(*) AS n FROM int_vqa_samples") == mine[0]
    assert n("SELECT count(*) AS n FROM int_chains") == mine[1]
    assert n("SELECT count(*) AS n FROM int_rejections") == sum(c[2] for c in counts[0].values())
    assert n("SELECT count(*) AS n FROM fct_dataset_versions") == 1
    assert n("SELECT count(*) AS n FROM mart_sft_examples") == n("SELECT sum(n_sft) AS n FROM fct_dataset_versions")
    # Every stage's audit rows come from one run and balance.
    assert n("SELECT count(*) AS n FROM v_stage_counts WHERE NOT balanced") == 0
    assert n("SELECT count(DISTINCT run_id) AS n FROM audit_stage_counts WHERE stage = 'mine'") == 1
    # No key appears twice in any table.
    for spec in catalog():
        if not spec.key or not wh.partitions(spec.name):
            continue
        key = ", ".join(f'"{k}"' for k in spec.key)
        dupes = n(f'SELECT count(*) - count(DISTINCT ({key})) AS n FROM "{spec.name}"')
        assert dupes == 0, f"{spec.name}: {dupes} duplicate keys"
    # Every Parquet file is whole, and no temporary file was left behind.
    files = list((wh_dir / "parquet").rglob("*.parquet"))
    assert len(files) > 20
    for f in files:
        pq.read_table(f)
    assert not [p for p in wh_dir.rglob("*") if ".tmp-" in p.name]
    assert not is_locked(wh_dir)
