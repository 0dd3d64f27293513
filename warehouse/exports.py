"""Exports of a dataset version: JSONL, Hugging Face `datasets` on disk, and Parquet for verl/EasyR1.

These are the only files radchain writes outside the warehouse for training frameworks; each
export goes to ``out/<dataset_version>/<format>/`` and is replaced whole on a re-export.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from warehouse.store import Warehouse, WarehouseError

FORMATS = ("jsonl", "hf", "verl")
MARTS = {"sft": "mart_sft_examples", "rl": "mart_rl_prompts", "benchmark": "mart_benchmark"}


def _rows(wh: Warehouse, table: str, version: str) -> list[dict[str, Any]]:
    return wh.scan(table).filter(pl.col("dataset_version") == version).sort("sample_id").collect().to_dicts()


def _trl_row(name: str, r: dict[str, Any]) -> dict[str, Any]:
    """Decode the JSON columns into the nested structures TRL reads."""
    out = {k: v for k, v in r.items() if k not in ("run_id", "batch_id", "code_version")}
    if name == "sft":
        out["messages"] = json.loads(out.pop("messages_json"))
    else:
        out["prompt"] = json.loads(out.pop("prompt_json"))
    return out


def _verl_row(r: dict[str, Any], index: int) -> dict[str, Any]:
    """verl's RLHF parquet layout (EasyR1 reads ``problem``/``answer``/``images`` from the same file)."""
    prompt = json.loads(r["prompt_json"])
    text = "".join("<image>" if c.get("type") == "image" else c.get("text", "")
                   for turn in prompt for c in turn["content"])
    return dict(
        data_source="radchain", ability="cxr-reasoning",
        prompt=[dict(role="user", content=text)], images=[dict(image=p) for p in r["images"]],
        reward_model=dict(style="rule", ground_truth=r["solution"]),
        extra_info=dict(index=index, sample_id=r["sample_id"], task=r["task"], split=r.get("split", "test"),
                        gold_steps=r["gold_steps"], gold_labels=r["gold_labels"]),
        problem=text, answer=r["solution"],
    )


def export_dataset(wh: Warehouse, version: str, fmt: str, out: Path) -> dict[str, int]:
    if fmt not in FORMATS:
        raise WarehouseError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    rows = {name: _rows(wh, table, version) for name, table in MARTS.items()}
    if not any(rows.values()):
        raise WarehouseError(f"dataset version {version!r} has no rows; see `radchain sql \"select * from fct_dataset_versions\"`")
    target = Path(out) / version / fmt
    tmp = target.with_name(f".{fmt}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    counts = {}
    for name, rs in rows.items():
        counts[name] = len(rs)
        if fmt == "jsonl":
            with (tmp / f"{name}.jsonl").open("w", encoding="utf-8") as fh:
                for r in rs:
                    fh.write(json.dumps(_trl_row(name, r), ensure_ascii=False, default=str) + "\n")
        elif fmt == "hf":
            from datasets import Dataset

            Dataset.from_list([_trl_row(name, r) for r in rs]).save_to_disk(str(tmp / name))
        elif name != "sft":  # verl/EasyR1 train with RL; the benchmark is their validation file
            pq.write_table(pa.Table.from_pylist([_verl_row(r, i) for i, r in enumerate(rs)]),
                           tmp / f"{'train' if name == 'rl' else 'val'}.parquet")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return counts
