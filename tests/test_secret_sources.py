"""Where the LLM API key comes from: the environment or a Prefect Secret block, never radchain.toml.

The Secret block tests use Prefect's real (temporary, local) API: a block is saved, the mine
stage resolves the key from it and mines against the fake OpenAI server, which insists on
that key (401 otherwise). Then everything under RADCHAIN_HOME, the captured logs, and the
flow's logs, runs and artifacts in Prefect are searched for the key.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

from radchain.secrets import (
    SecretInConfigError,
    SecretNotFoundError,
    resolve_api_key,
    secret_paths,
    with_api_key,
)

KEY = "sk-block-" + uuid.uuid4().hex  # unique per session: any hit below is this test's key


def _write_toml(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


# ---- the TOML file ------------------------------------------------------------------------------
@pytest.mark.parametrize("body,where", [
    ('[llm]\nmodel = "m"\napi_key = "sk-in-toml-123"\n', "llm.api_key"),
    ('[llm]\nOPENAI_API_KEY = ' + '"sk-in-toml-123"\n', "llm.OPENAI_API_KEY"),  # split: not a real key
    ('api_key = "sk-in-toml-123"\n', "api_key"),
    ('[llm]\napi-key = "sk-in-toml-123"\n', "llm.api-key"),
])
def test_a_key_in_the_config_file_is_refused(tmp_path, monkeypatch, body, where):
    from radchain.settings import Settings

    monkeypatch.setenv("RADCHAIN_CONFIG", str(_write_toml(tmp_path / "radchain.toml", body)))
    with pytest.raises(SecretInConfigError) as info:
        Settings()
    message = str(info.value)
    assert where in message and "OPENAI_API_KEY" in message and "api_key_block" in message
    assert "sk-in-toml-123" not in message
    assert isinstance(info.value, ValueError)


def test_a_block_name_in_the_config_file_is_fine(tmp_path, monkeypatch):
    from radchain.settings import Settings

    monkeypatch.setenv("RADCHAIN_CONFIG", str(_write_toml(
        tmp_path / "radchain.toml", '[llm]\napi_key_block = "openai-api-key"\nmax_tokens_hint = 3\n')))
    s = Settings()
    assert s.llm.api_key_block == "openai-api-key" and s.llm.api_key is None
    assert secret_paths({"llm": {"tokens_per_minute": 5, "api_key": ""}}) == []  # empty is no secret


def test_cli_refuses_a_key_in_the_config_file_in_one_line(tmp_path, monkeypatch):
    from flows.cli import app
    from radchain.settings import reset_settings_cache

    monkeypatch.setenv("RADCHAIN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RADCHAIN_CONFIG", str(_write_toml(tmp_path / "radchain.toml",
                                                          '[llm]\napi_key = "sk-in-toml-123"\n')))
    reset_settings_cache()
    try:
        for args in (["run", "--stages", "ingest", "--source", str(tmp_path)], ["sql", "SELECT 1"]):
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 2, result.output
            err = result.stderr.strip()
            assert err.startswith("error:") and "\n" not in err and "llm.api_key" in err
            assert "sk-in-toml-123" not in result.output + result.stderr and "Traceback" not in err
    finally:
        reset_settings_cache()


# ---- resolution order ---------------------------------------------------------------------------
def test_environment_wins_and_nothing_configured_means_no_key(monkeypatch):
    from radchain.settings import LLMSettings

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert resolve_api_key(LLMSettings()) is None
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    # The block does not exist: it is never looked up while the environment has a key.
    llm = LLMSettings(api_key_block="no-such-block-" + uuid.uuid4().hex)
    assert resolve_api_key(llm).get_secret_value() == "sk-from-env"
    copy = with_api_key(llm.model_copy(update={"api_key": None}))
    assert copy.api_key.get_secret_value() == "sk-from-env"
    assert "sk-from-env" not in repr(copy) and "sk-from-env" not in str(copy.model_dump())


def test_a_missing_block_is_a_clear_error(monkeypatch):
    from radchain.settings import LLMSettings

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    name = "no-such-block-" + uuid.uuid4().hex[:8]
    with pytest.raises(SecretNotFoundError, match=name) as info:
        resolve_api_key(LLMSettings(api_key_block=name))
    assert isinstance(info.value, ValueError)


# ---- a real Secret block through the mine stage -------------------------------------------------
@pytest.fixture(scope="module")
def block_name():
    from prefect.blocks.system import Secret

    name = "radchain-test-" + uuid.uuid4().hex[:10]
    Secret(value=KEY).save(name)
    yield name
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            doc = client.read_block_document_by_name(name, block_type_slug="secret")
            client.delete_block_document(doc.id)
    except Exception:  # best effort: the Prefect home is a per-session temporary folder
        pass


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A small corpus through ingest, label and tasks (rules): a warehouse ready for mining."""
    from extractors.synthetic import generate_corpus
    from flows.pipeline import make_context, run_stages
    from flows.stages.common import SourceSpec
    from radchain.settings import Settings

    root = tmp_path_factory.mktemp("secrets")
    generate_corpus(root / "corpus", studies=12, seed=4, images=False)
    ctx = make_context(Settings(home=root / "home", batch_size=6), SourceSpec(path=root / "corpus"),
                       extractor="rules", show_progress=False)
    run_stages(ctx, ["ingest", "label", "tasks"])
    assert ctx.warehouse.count("int_vqa_samples") > 5
    return dict(root=root, warehouse=ctx.settings.warehouse_dir)


def test_block_value_is_resolved(block_name, monkeypatch):
    from radchain.settings import LLMSettings

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    key = resolve_api_key(LLMSettings(api_key_block=block_name))
    assert isinstance(key, SecretStr) and key.get_secret_value() == KEY


def _grep_tree(root: Path, needle: bytes) -> list[str]:
    hits = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            try:
                if needle in p.read_bytes():
                    hits.append(str(p))
            except OSError:
                pass
    return hits


def test_mine_stage_uses_the_block_key_and_leaks_it_nowhere(block_name, prepared, tmp_path, monkeypatch, caplog,
                                                           capfd):
    from prefect.client.orchestration import get_client

    from flows.pipeline import pipeline_flow
    from radchain.settings import get_settings, reset_settings_cache
    from radchain.testing import FakeOpenAIServer
    from flows.testing import chain_responder
    from warehouse import Warehouse

    home = tmp_path / "home"
    shutil.copytree(prepared["warehouse"], home / "warehouse")
    responder = chain_responder(Warehouse(home / "warehouse")).warm()
    caplog.set_level(logging.DEBUG)
    with FakeOpenAIServer(responder=responder, api_key=KEY) as server:
        monkeypatch.setenv("RADCHAIN_HOME", str(home))
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("RADCHAIN_LLM_API_KEY_BLOCK", block_name)
        monkeypatch.setenv("RADCHAIN_LLM_REQUESTS_PER_MINUTE", "0")
        monkeypatch.setenv("RADCHAIN_LLM_TOKENS_PER_MINUTE", "0")
        reset_settings_cache()
        try:
            settings = get_settings()
            assert settings.llm.api_key is None and settings.llm.api_key_block == block_name
            state = pipeline_flow(stages=["mine"], options={"extractor": "llm", "show_progress": False},
                                  return_state=True)
            results = state.result()
            # The shared settings object never got the key.
            assert get_settings().llm.api_key is None
        finally:
            reset_settings_cache()
        statuses = dict(server.statuses)
    # The server accepted the key from the block (it answers 401 to anything else).
    assert statuses.get(200, 0) > 0 and 401 not in statuses
    wh = Warehouse(home / "warehouse")
    assert wh.count("int_chains") > 0 and sum(r.outputs for r in results["mine"]) == wh.count("int_chains")

    needle = KEY.encode()
    assert _grep_tree(home, needle) == []  # warehouse (Parquet, DuckDB), LLM cache, runs ...
    captured = capfd.readouterr()
    assert KEY not in captured.out + captured.err
    assert KEY not in "\n".join(r.getMessage() + repr(r.args) for r in caplog.records)
    # What Prefect recorded about the run: logs, flow and task runs (parameters), artifacts.
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        artifacts = client.read_artifacts()
    recorded = json.dumps([flow_run.model_dump(mode="json"), [lg.model_dump(mode="json") for lg in logs],
                           [t.model_dump(mode="json") for t in task_runs],
                           [a.model_dump(mode="json") for a in artifacts]], default=str)
    assert task_runs and artifacts
    assert KEY not in recorded


def test_missing_block_stops_the_llm_run_with_a_clear_error(prepared, tmp_path, monkeypatch):
    from flows.pipeline import make_context, run_stages
    from radchain.settings import Settings

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    home = tmp_path / "home"
    shutil.copytree(prepared["warehouse"], home / "warehouse")
    settings = Settings(home=home)
    name = "absent-" + uuid.uuid4().hex[:8]
    settings.llm = settings.llm.model_copy(update={"base_url": "https://api.example.invalid/v1",
                                                   "api_key": None, "api_key_block": name})
    ctx = make_context(settings, None, extractor="llm", show_progress=False)
    with pytest.raises(SecretNotFoundError, match=name):
        run_stages(ctx, ["mine"])
    wh = ctx.warehouse
    assert not wh.table_dir("int_chains").exists() or wh.count("int_chains") == 0
