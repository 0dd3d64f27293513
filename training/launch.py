"""Multi-GPU training jobs: the ``accelerate launch`` command for SFT or GRPO, and reading back its result.

A Prefect job on the gpu pool (flows/training_flows.py) exports its rows to JSONL, runs the command
built here (one process per GPU, DeepSpeed ZeRO-2/3 through configs/accelerate/*.yaml), and records the
``train_result.json`` that the main process of the launched job writes beside its checkpoint
(training.sft.write_result). Plain code: no Prefect, no warehouse.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from training.config import REPO_CONFIGS, LaunchSettings
from training.sft import TrainResult

REPO_DIR = REPO_CONFIGS.parent
RESULT_FILE = "train_result.json"
LOG_FILE = "launch.log"


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_processes(launch: LaunchSettings) -> int:
    """World size: the config's num_processes, else one per visible GPU (1 without a GPU)."""
    return launch.num_processes or max(1, visible_gpus())


def accelerate_config_path(launch: LaunchSettings) -> Path | None:
    if launch.accelerate_config is None:
        return None
    path = Path(launch.accelerate_config)
    path = path if path.is_absolute() else REPO_DIR / path
    if not path.exists():
        raise FileNotFoundError(f"accelerate config {path} does not exist")
    return path


def launch_command(
    kind: str,
    launch: LaunchSettings,
    config: str,
    data: Path,
    out_dir: Path,
    init_checkpoint: str | None = None,
    rewards: Sequence[tuple[str, float]] = (),
    python: str = sys.executable,
) -> list[str]:
    """``python -m accelerate.commands.launch [--config_file F] --num_processes N [--cpu] -m training.<kind> ...``.

    ``rewards``: (module:function, weight) pairs for GRPO. The interpreter is this one, so the launched
    processes use the worker's environment.
    """
    if kind not in ("sft", "grpo"):
        raise ValueError(f"kind must be sft or grpo, got {kind!r}")
    cmd = [python, "-m", "accelerate.commands.launch"]
    config_file = accelerate_config_path(launch)
    if config_file is not None:
        cmd += ["--config_file", str(config_file)]
    processes = resolve_processes(launch)
    cmd += ["--num_processes", str(processes), "--num_machines", "1"]
    if processes > 1:
        cmd += ["--multi_gpu"] if config_file is None else []
    if launch.cpu:
        cmd += ["--cpu"]
    cmd += ["-m", f"training.{kind}", "--config", config, "--out", str(out_dir)]
    if kind == "sft":
        cmd += ["--train", str(data)]
    else:
        if not rewards:
            raise ValueError("GRPO needs at least one reward")
        cmd += ["--prompts", str(data)]
        if init_checkpoint:
            cmd += ["--init", str(init_checkpoint)]
        for target, weight in rewards:
            cmd += ["--reward", f"{target}={weight}"]
    return cmd


def write_rows(rows: Iterable[Mapping[str, Any]], path: Path) -> Path:
    """The job's rows as JSONL (image paths stay paths), the input of the launched script."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(dict(row), default=str, ensure_ascii=False) + "\n")
    return path


def run_launched(cmd: Sequence[str], out_dir: Path, env: Mapping[str, str] | None = None,
                 timeout_s: float | None = None) -> TrainResult:
    """Run the command with its output in out_dir/launch.log; the TrainResult its main process wrote.

    A failed launch raises with the log's tail, so the job's registry row carries the reason."""
    import os

    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / LOG_FILE
    run_env = dict(os.environ if env is None else env)
    run_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_DIR), run_env.get("PYTHONPATH", "")) if p)
    with log.open("w", encoding="utf-8") as fh:
        done = subprocess.run(list(cmd), cwd=REPO_DIR, env=run_env, stdout=fh, stderr=subprocess.STDOUT,
                              timeout=timeout_s)
    result_path = out_dir / RESULT_FILE
    if done.returncode != 0 or not result_path.exists():
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"accelerate launch exited {done.returncode}; {LOG_FILE} ends:\n{tail}")
    data = json.loads(result_path.read_text())
    result = TrainResult(checkpoint=data["checkpoint"], metrics=data["metrics"], status=data["status"])
    result.metrics["launch"] = {"command": list(cmd), "log": str(log)}
    return result
