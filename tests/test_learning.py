"""The training path learns, not only runs: the short version of bench/learning.py (SFT then GRPO of the
small-cpu model on a freshly built demo warehouse), scored beside its baselines.

Its speed (about 160 s on 2 quiet cores) is a benchmark figure (bench/README.md), not asserted here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_short_learning_run_lowers_the_loss_and_raises_format_compliance(tmp_path):
    report = tmp_path / "learning.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(REPO / "bench/learning.py"), "--short", "--home", str(tmp_path / "home"),
         "--json", str(report), "--time-limit", "3600", "--threads", "1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=3600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    f = json.loads(report.read_text())
    assert f["sft_steps"] == 300 and f["grpo_steps"] == 2
    assert f["sft_loss_last"] < f["sft_loss_first"]
    assert f["format_after_sft"] > f["format_before"]
    # Per-step output: the loss of every logging step and the reward of every GRPO step.
    assert len([line for line in done.stdout.splitlines() if line.startswith("sft  step")]) == 300 // 10
    assert len(f["grpo_rewards"]) == 2
    # Every phase is scored beside the three baselines, on the same samples, by the same scorer.
    for phase in f["phases"]:
        series = phase["scored"]
        assert set(series) == {"model", "majority", "random", "oracle"}
        n = {name: next(r["n"] for r in rows if r["task"] == "all") for name, rows in series.items()}
        assert len(set(n.values())) == 1 and n["model"] > 0
        oracle = next(r for r in series["oracle"] if r["task"] == "all")
        assert oracle["accuracy"] == 1.0 and oracle["format_compliance"] == 1.0
        assert all(r["n_unparseable"] == r["n"] for r in series["majority"])
