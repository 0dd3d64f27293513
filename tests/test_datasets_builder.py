"""Dataset marts: TRL formats, versions stable across re-runs, no test sample in a training mart."""

from __future__ import annotations

import json

from training.datasets import DEFAULT_MIXTURE, build_marts, mixture_sample


def _sample(i: int, split: str, task: str = "binary") -> dict:
    return dict(
        sample_id=f"s{i}", task=task, study_id=f"st{i}", split=split,
        question="Does this chest X-ray show Edema?\nA) Yes\nB) No", options=["Yes", "No"],
        answer_letter=None if task == "open" else "B", answer_text="No",
        answer_findings=["Edema", "Pleural Effusion"] if task == "open" else [], image_paths=[f"/img/{i}.jpg"],
    )


def _chain(i: int) -> dict:
    steps = [
        dict(step_index=1, kind="conclusion", text="So the answer is B.", findings=[]),
        dict(step_index=0, kind="observation", text="The lungs show no edema.",
             findings=[dict(observation="Edema", status="absent", anatomy=None)]),
    ]
    return dict(text=f"chain {i}", steps=steps)


def test_marts_formats_and_split_separation():
    samples = [_sample(1, "train"), _sample(2, "test"), _sample(3, "validate", "open"), _sample(4, "test")]
    chains = {"s1": _chain(1), "s2": _chain(2), "s3": _chain(3)}
    labels = {"st1": {"Edema": "negative"}, "st2": {"Edema": "negative"}}
    m = build_marts(samples, chains, labels)
    assert {r["sample_id"] for r in m.benchmark} == {"s2"}  # s4 has no gold chain
    train_ids = {r["sample_id"] for r in m.sft} | {r["sample_id"] for r in m.rl}
    assert train_ids == {"s1", "s3"} and not train_ids & {"s2", "s4"}
    chain_rows = [r for r in m.sft if r["variant"] == "chain"]
    msgs = json.loads(chain_rows[0]["messages_json"])
    assert [t["role"] for t in msgs] == ["user", "assistant"]
    assert msgs[0]["content"][0] == {"type": "image"} and "<think>" in msgs[0]["content"][-1]["text"]
    assert msgs[1]["content"][0]["text"].endswith("<answer>B</answer>")
    assert [r["variant"] for r in m.sft if r["sample_id"] == "s1"] == ["chain", "answer_only"]
    rl = {r["sample_id"]: r for r in m.rl}
    assert rl["s3"]["solution"] == "Edema, Pleural Effusion"
    steps = json.loads(rl["s1"]["gold_steps"])
    assert [s["kind"] for s in steps] == ["observation", "conclusion"]
    assert json.loads(rl["s1"]["gold_labels"]) == {"Edema": "negative"}
    assert rl["s1"]["weight"] == DEFAULT_MIXTURE["binary"]
    assert m.used_samples == {"s1", "s2", "s3"}


def test_version_is_stable_and_tracks_inputs():
    samples = [_sample(1, "train"), _sample(2, "test")]
    chains = {"s1": _chain(1), "s2": _chain(2)}
    v1 = build_marts(samples, chains, {}).dataset_version
    assert build_marts(list(reversed(samples)), chains, {}).dataset_version == v1
    chains2 = {**chains, "s1": {**_chain(1), "text": "changed"}}
    assert build_marts(samples, chains2, {}).dataset_version != v1
    assert build_marts(samples, chains, {}, mixture={"binary": 0.5}).dataset_version != v1


def test_mixture_sample_follows_weights():
    rows = [dict(task="binary", weight=0.1)] * 10 + [dict(task="temporal", weight=0.0)] * 10
    got = mixture_sample(rows, 200, seed=1)
    assert len(got) == 200 and all(r["task"] == "binary" for r in got)
    assert mixture_sample(rows, 50, seed=3) == mixture_sample(rows, 50, seed=3)


def test_mixture_sample_gives_each_task_its_weight_share_whatever_its_size():
    # 90 binary rows at 0.1 and 10 temporal rows at 0.05: temporal gets 0.05 / 0.15 of the draw, not 10 %.
    rows = [dict(task="binary", weight=0.1, i=i) for i in range(90)] + \
           [dict(task="temporal", weight=0.05, i=i) for i in range(10)]
    got = mixture_sample(rows, 3000, seed=2)
    share = sum(r["task"] == "temporal" for r in got) / len(got)
    assert abs(share - 1 / 3) < 0.03
    # Within a task, rows are equally likely: every binary row is drawn.
    assert {r["i"] for r in got if r["task"] == "binary"} == set(range(90))
