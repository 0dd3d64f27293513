"""The training path learns, not only runs: the short version of bench/learning.py (SFT then GRPO of the
small-cpu model on a freshly built demo warehouse), scored beside its baselines.

The short version trains on the binary questions (the shortest chains) so that 120 SFT steps learn the
layout; its speed (<= 90 s, bench/README.md) is the benchmark's own floor, not asserted here, because a
loaded machine runs it several times slower.
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
    assert f["sft_steps"] == 120 and f["grpo_steps"] == 1
    assert f["sft_loss_last"] < f["sft_loss_first"]
    assert f["format_before"] == 0.0 and f["format_after_sft"] > f["format_before"]
    # The trained task learned the layout: most binary answers after SFT are well formed.
    after_sft = next(p for p in f["phases"] if p["phase"] == "after_sft")
    binary = next(r for r in after_sft["scored"]["model"] if r["task"] == "binary")
    assert binary["format_compliance"] >= 0.5, binary
    # Per-step output: the loss of every logging step and the reward of every GRPO step.
    assert len([line for line in done.stdout.splitlines() if line.startswith("sft  step")]) == 120 // 10
    assert len(f["grpo_rewards"]) == 1
    assert [line for line in done.stdout.splitlines() if line.startswith("grpo step")]
    # GRPO's reward is scored on the held-out prompts of its task for the SFT and the GRPO checkpoint
    # alike: the validate RL prompts (4 per task in the short version) and the benchmark samples, pooled.
    assert f["grpo_trained_tasks"] == ["binary"]
    heldout = f["grpo_heldout_reward"]
    assert f["grpo_heldout_reward_validate"]["n"] == f["grpo_heldout_reward_per_task"]["binary"]["n"] == 4
    assert heldout["n"] == 4 + 4  # + the 4 binary benchmark samples
    assert heldout["better"] + heldout["worse"] <= heldout["n"]
    # The floor reads answers sampled at GRPO's temperature (the mean over the seeds per prompt); the
    # greedy answers' rise is reported beside it on the same prompts.
    assert f["grpo_heldout_reward_greedy"]["n"] == heldout["n"]
    per_prompt = f["heldout_rewards"]
    assert len(per_prompt["sft_sampled"]) == len(per_prompt["grpo_sampled"]) == len(per_prompt["sample_id"]) >= 8
    assert f["grpo_sampling"]["temperature"] == f["grpo_settings"]["temperature"]
    # Every phase is scored beside the three baselines, on the same samples, by the same scorer.
    for phase in f["phases"]:
        series = phase["scored"]
        assert set(series) == {"model", "majority", "random", "oracle"}
        n = {name: next(r["n"] for r in rows if r["task"] == "all") for name, rows in series.items()}
        assert len(set(n.values())) == 1 and n["model"] > 0
        oracle = next(r for r in series["oracle"] if r["task"] == "all")
        assert oracle["accuracy"] == 1.0 and oracle["format_compliance"] == 1.0
        assert all(r["n_unparseable"] == r["n"] for r in series["majority"])
    assert f["grpo_benchmark_reward"]["n"] == n["model"]
    # The checkpoint `radchain train` would evaluate: the higher greedy reward on every validate prompt.
    choice, validate = f["selection"], f["grpo_heldout_reward_all_tasks"]
    per_task = f["grpo_heldout_reward_per_task"]  # up to 4 validate prompts of each task
    assert set(per_task) == {"binary", "single", "multi", "open", "temporal"}
    assert choice["n"] == validate["n"] == sum(r["n"] for r in per_task.values()) > 4
    assert (choice["reward_sft"], choice["reward_grpo"]) == (validate["before"], validate["after"])
    assert choice["chosen"] == ("sft" if choice["reward_grpo"] < choice["reward_sft"] else "grpo")
    assert f["accuracy_selected"] == f[f"accuracy_after_{choice['chosen']}"]
