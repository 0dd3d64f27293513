"""Settings: environment variables (``RADCHAIN_*``) and an optional TOML file.

Precedence (highest first): explicit arguments, environment, ``$RADCHAIN_CONFIG`` or
``./radchain.toml``, defaults. Every path radchain writes to hangs off ``home``.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource


def _toml_path() -> Path:
    return Path(os.environ.get("RADCHAIN_CONFIG", "radchain.toml"))


class ModelPrice(BaseModel):
    """USD per 1M tokens of one model: sync input, cached input and output, and the Batch API's prices.

    A price left out falls back: ``cached_input`` to ``input``; ``batch_input``/``batch_output`` to
    the sync price; ``batch_cached_input`` to ``batch_input`` (no stacking of the two discounts
    assumed). The old two-number form ``[input, output]`` is accepted too.
    """

    input: float
    output: float
    cached_input: float | None = None
    batch_input: float | None = None
    batch_output: float | None = None
    batch_cached_input: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_sequence(cls, value: object) -> object:
        if isinstance(value, (list, tuple)):
            names = ("input", "output", "cached_input", "batch_input", "batch_output", "batch_cached_input")
            if not 2 <= len(value) <= len(names):
                raise ValueError(f"a price is [input, output] up to {len(names)} numbers, got {len(value)}")
            return dict(zip(names, value))
        return value

    def rates(self, mode: str = "sync") -> tuple[float, float, float]:
        """(input, cached input, output) USD per 1M tokens in ``mode`` (sync | batch)."""
        cached = self.input if self.cached_input is None else self.cached_input
        if mode != "batch":
            return self.input, cached, self.output
        b_in = self.input if self.batch_input is None else self.batch_input
        b_out = self.output if self.batch_output is None else self.batch_output
        b_cached = b_in if self.batch_cached_input is None else self.batch_cached_input
        return b_in, b_cached, b_out


LLM_MODES = ("sync", "batch")


class LLMSettings(BaseSettings):
    """An OpenAI-compatible endpoint. The key is read from the environment only."""

    model_config = SettingsConfigDict(env_prefix="RADCHAIN_LLM_", extra="ignore", populate_by_name=True)

    base_url: str | None = Field(default=None, validation_alias="OPENAI_BASE_URL")
    api_key: SecretStr | None = Field(default=None, validation_alias="OPENAI_API_KEY", repr=False)
    model: str = "gpt-4o-2024-08-06"
    protocol: str = "single"  # "single" (default) or "paper" (the release's three calls)
    max_concurrency: int = 16  # requests in flight per mine batch
    # A Prefect global concurrency limit shared by every worker (created by `radchain serve/deploy`).
    concurrency_limit_name: str = "llm-calls"
    global_concurrency: int = 32
    requests_per_minute: int = 500
    tokens_per_minute: int = 800_000
    timeout_s: float = 60.0
    max_attempts: int = 6
    # Retry backoff (extractors.llm.client): exponential from backoff_initial_s, capped at backoff_max_s, plus
    # jitter; a Retry-After header from the server takes precedence.
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    # Circuit breaker (extractors.llm.client): after this many consecutive attempts that cannot reach the
    # endpoint, the mine stage stops and the run fails (0: never). A batch of at least preflight_min_samples
    # samples first sends one GET /models (0: never), so a dead endpoint fails the stage in seconds.
    breaker_failures: int = 8
    preflight_min_samples: int = 20
    refine_rounds: int = 2
    temperature: float = 0.0
    # USD per 1M tokens per model (ModelPrice: input, output, cached input, Batch API input/output);
    # a user edits this for their model. OpenAI's list prices (GPT-4o-2024-08-06: $2.50 in, $1.25 cached,
    # $10 out; Batch API half of that). A model that is not in the table costs nothing (a local server).
    price_per_mtok: dict[str, ModelPrice] = {
        "gpt-4o-2024-08-06": ModelPrice(input=2.5, cached_input=1.25, output=10.0, batch_input=1.25,
                                        batch_output=5.0),
        "gpt-4o": ModelPrice(input=2.5, cached_input=1.25, output=10.0, batch_input=1.25, batch_output=5.0),
        "gpt-4o-mini": ModelPrice(input=0.15, cached_input=0.075, output=0.6, batch_input=0.075, batch_output=0.3),
    }
    # Spend cap of one run in USD (RADCHAIN_LLM_BUDGET_USD; `radchain run --budget` per run): mining stops
    # taking new samples when spent + the estimate of those in flight would pass it (extractors.llm.budget).
    budget_usd: float | None = None
    # How mining calls the model: "sync" (chat completions, concurrently) or "batch" (the OpenAI Batch API:
    # half the price, answers within the completion window; extractors.llm.batch).
    mode: str = "sync"
    batch_completion_window: str = "24h"
    batch_poll_s: float = 30.0  # seconds between polls of a running batch
    batch_max_requests: int = 50_000  # the API's per-batch limits: requests and input-file bytes
    batch_max_bytes: int = 200_000_000
    # `radchain estimate`: output tokens per call and refinement calls per sample assumed when the ledger
    # has no history for the prompt version (0.05: bench/mine.py's fault mix makes about 1.09 ledger calls per
    # accepted `single` chain, refinements and repairs together).
    estimate_output_tokens: int = 450
    estimate_refine_rate: float = 0.05
    # A Prefect Secret block holding the key, read when OPENAI_API_KEY is not set (radchain.secrets).
    api_key_block: str | None = None
    # PHI guard (extractors.phi), on for every endpoint (loopback ones too): endpoints (hosts, or
    # host:port) that may receive text the guard flags, or all of them -- the only ways to opt out.
    phi_allow_hosts: list[str] = []
    phi_allow_all: bool = False

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the API key: settings travel inside the run context to every task (and over
        the network to Dask workers); the key is resolved where a call is made (radchain.secrets)."""
        state = super().__getstate__()
        if state["__dict__"].get("api_key") is not None:
            state = {**state, "__dict__": {**state["__dict__"], "api_key": None}}
        return state


class CheckSettings(BaseSettings):
    """Thresholds of the data checks and quality gates (schemas/ declares the checks; flows/checks.py runs them)."""

    model_config = SettingsConfigDict(env_prefix="RADCHAIN_CHECKS_", extra="ignore")

    # The mine gate: a run whose mine stage accepts less than this share of the samples it decided
    # (accepted / (accepted + rejected); budget-skipped samples aside) ends Failed, and builds no dataset.
    # RADCHAIN_CHECKS_MIN_ACCEPTANCE; `radchain run --min-acceptance` per run.
    min_acceptance: float = Field(default=0.5, ge=0.0, le=1.0)
    # Warn when a stage of a run rejects more than this share of its inputs.
    max_rejection_rate: float = Field(default=0.5, ge=0.0, le=1.0)
    # Warn when an option task answers one letter in more than this share of its samples (balanced sampling).
    max_answer_share: float = Field(default=0.7, ge=0.0, le=1.0)

    def params(self) -> dict[str, float]:
        return dict(min_acceptance=self.min_acceptance, max_rejection_rate=self.max_rejection_rate,
                    max_answer_share=self.max_answer_share)


class _CheckedTomlSource(TomlConfigSettingsSource):
    """The TOML file, refused when it holds an API key (keys come from the environment or a Secret block)."""

    def __init__(self, settings_cls: type[BaseSettings], toml_file: Path) -> None:
        super().__init__(settings_cls, toml_file=toml_file)
        from radchain.secrets import reject_secrets_in_config

        reject_secrets_in_config(self.toml_data, toml_file)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RADCHAIN_", extra="ignore", env_nested_delimiter="__")

    home: Path = Path(".radchain")
    batch_size: int = 5000
    seed: int = 13
    llm: LLMSettings = Field(default_factory=LLMSettings)
    checks: CheckSettings = Field(default_factory=CheckSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _CheckedTomlSource(settings_cls, toml_file=_toml_path()))

    # Derived locations: one folder holds everything a run writes.
    @property
    def warehouse_dir(self) -> Path:
        return self.home / "warehouse"

    @property
    def duckdb_path(self) -> Path:
        return self.warehouse_dir / "warehouse.duckdb"

    @property
    def parquet_dir(self) -> Path:
        return self.warehouse_dir / "parquet"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def prefect_home(self) -> Path:
        return self.home / "prefect"

    @property
    def demo_corpus_dir(self) -> Path:
        return self.home / "demo-corpus"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    s = Settings()
    s.home = s.home.resolve()
    return s


def reset_settings_cache() -> None:
    """Tests change RADCHAIN_HOME between cases."""
    get_settings.cache_clear()
