"""Test doubles wired to the warehouse (test and benchmark infrastructure; the pipeline never uses it).

``radchain/testing`` ships the fake OpenAI server and ``ChainResponder`` as plain code that knows
nothing of flows; building a responder for the samples a warehouse holds needs the mine stage's
own reader (so the responder sees exactly the masked report texts the stage sends), which is
orchestration code, hence here.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from radchain.testing.chain_responder import ChainResponder


def chain_responder(warehouse: Any, sample_ids: Iterable[str] | None = None) -> ChainResponder:
    """A ChainResponder over all samples of ``int_vqa_samples`` (or ``sample_ids``), loaded as the mine
    stage loads them. ``warehouse`` is a ``warehouse.Warehouse`` or its folder."""
    from flows.stages.mine import load_inputs
    from warehouse import Warehouse

    wh = warehouse if isinstance(warehouse, Warehouse) else Warehouse(Path(warehouse))
    if sample_ids is None:
        sample_ids = wh.read("int_vqa_samples")["sample_id"].to_list()
    items, _ = load_inputs(SimpleNamespace(warehouse=wh), sample_ids)  # load_inputs reads ctx.warehouse only
    return ChainResponder(items)
