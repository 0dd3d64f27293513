"""Benchmark of the mine stage with the LLM extractor against the fake OpenAI server.

    python bench/mine.py                          # 2,000 samples, server in its own process
    python bench/mine.py --samples 500 --repeats 1 --in-process

The fake server (radchain.testing, answers from radchain.testing.chain_responder) runs in a
separate process by default, so its HTTP handling does not compete with the client for the
GIL; ``--in-process`` runs it as a thread of this process instead. The mine stage is called
through flows.pipeline.run_stages (no Prefect), on a warehouse built once by ingest, label and
tasks from a synthetic corpus, trimmed to exactly ``--samples`` samples.

Prints (medians where repeated):

(a) throughput with no faults, ``single`` protocol: HTTP requests per second over the whole
    stage (reading inputs, verification and Parquet writes included) as a fraction of the
    ideal ``concurrency / latency`` (32 / 0.1 s = 320 req/s). Floor 0.85.
(b) ``single`` versus ``paper`` in the same run, with the fault mix of tests/test_mine_llm.py
    (5% 429, 2% 500, 1% timeouts, 2% malformed, 2% schema-invalid, 2% ungrounded, 2%
    contradictions), fresh caches: HTTP requests, ledger rows and tokens per accepted chain,
    and the acceptance rate. Floor: single uses <= 0.5x the tokens of paper per accepted chain,
    at an equal or higher acceptance rate. The same figures without faults are printed too.
(c) the re-run of (a) over the same samples: its wall time as a fraction of the first run's
    (floor <= 0.1) and its HTTP requests (must be 0).
(d) dollars per accepted chain at GPT-4o-2024-08-06 prices (the settings' price table: $2.50 in,
    $1.25 cached in, $10 out per 1M tokens; Batch API $1.25 / $5), side by side in one run with the
    content faults of (b) (and 5% failed batch requests in batch mode), fresh caches, the fake
    server's prompt caching on: the release's protocol (``paper``, sync) vs ``single`` sync and
    batch, each with the default prompt (``single-v2``, a 559-token static prefix: below the
    1,024 tokens prompt caching needs) and with the few-shot prompt (``single-v3``, a 1,280-token
    static prefix that is cached). Floor: ``single`` + batch <= 0.25x the release's dollars per
    accepted chain, at an acceptance rate no lower. The few-shot prompt is kept as the default only
    if it is cheaper per accepted chain (the figures print the acceptance gain it would need).

The process exits 1 when any floor is missed.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def workdir() -> Path:
    """A throwaway folder (created once per process that asks: the server process never does)."""
    global _TMP
    if _TMP is None:
        _TMP = Path(tempfile.mkdtemp(prefix="radchain-bench-mine-"))
        from radchain.runtime import prepare_environment
        from radchain.settings import Settings

        prepare_environment(Settings(home=_TMP))  # PREFECT_HOME etc., before Prefect is imported
    return _TMP


_TMP: Path | None = None

FLOOR_THROUGHPUT = 0.85
FLOOR_TOKEN_RATIO = 0.5
FLOOR_RERUN = 0.1
FLOOR_BATCH_COST = 0.25  # single + batch dollars per accepted chain / the release's (paper, sync)
CONTENT_FAULTS = {k: v for k, v in dict(malformed_json=0.02, schema_invalid=0.02, ungrounded=0.02,
                                        contradiction=0.02).items()}
BATCH_FAILURE_RATE = 0.05
FAULTS = dict(rate_limit=0.05, server_error=0.02, timeout=0.01, malformed_json=0.02, schema_invalid=0.02,
              ungrounded=0.02, contradiction=0.02)
CLIENT_TIMEOUT_S = 2.0


# ---- the fake server, in this process or in its own --------------------------------------------------
def _server_kwargs(latency: float, concurrency: int) -> dict[str, Any]:
    return dict(latency_s=latency, max_concurrency=concurrency, retry_after_s=0.05, batch_delay_s=0.05,
                timeout_sleep_s=2 * CLIENT_TIMEOUT_S)


def _stats(server) -> dict[str, Any]:
    phase = (None if server.first_request_at is None or server.last_response_at is None
             else server.last_response_at - server.first_request_at)
    return dict(requests=server.requests, statuses=dict(server.statuses), faults=dict(server.faults_served),
                batches=len(server.batches), batch_lines_failed=server.batch_lines_failed,
                max_in_flight=server.max_in_flight, in_flight=server.in_flight, request_phase_s=phase,
                served_ms=1000 * server.served_s / max(1, server.requests))


def _serve(conn, warehouse_dir: str, latency: float, concurrency: int) -> None:
    """Child process: start the server, then answer commands from the parent until 'stop'."""
    from radchain.testing import FakeOpenAIServer
    from flows.testing import chain_responder

    responder = chain_responder(warehouse_dir).warm()
    server = FakeOpenAIServer(responder=responder, **_server_kwargs(latency, concurrency)).start()
    # The responder's tables are a million objects: a full collection over them paused the server
    # for up to 130 ms (answers late by that much, the mean latency 104 ms instead of 101 ms).
    gc.freeze()
    conn.send(server.base_url)
    while True:
        cmd, arg = conn.recv()
        if cmd == "stop":
            server.stop()
            conn.send(None)
            return
        if cmd == "dbg":
            conn.send((getattr(server, "dbg", []), getattr(server, "dbg2", []))); server.dbg = []; server.dbg2 = []; continue
        if cmd == "reset":
            server.reset_counters()
            server.clear_prompt_cache()  # each run starts with a cold provider prompt cache
        elif cmd == "faults":
            server.faults = dict(arg)
            server.seed = arg.get("_seed", 0) if isinstance(arg, dict) else 0
            server.faults.pop("_seed", None)
            server.batch_failure_rate = server.faults.pop("_batch_failure_rate", 0.0)
        conn.send(dict(_stats(server), misses=responder.misses))


class RemoteServer:
    def __init__(self, warehouse_dir: Path, latency: float, concurrency: int) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, str(warehouse_dir), latency, concurrency), daemon=True)
        self.proc.start()
        if not self.conn.poll(120):
            raise RuntimeError("the fake server process did not start")
        self.base_url = self.conn.recv()

    def _ask(self, cmd: str, arg: Any = None) -> Any:
        self.conn.send((cmd, arg))
        return self.conn.recv()

    def stats(self) -> dict[str, Any]:
        return self._ask("stats")

    def reset(self) -> None:
        self._ask("reset")

    def set_faults(self, faults: dict[str, float], seed: int = 0) -> None:
        self._ask("faults", {**faults, "_seed": seed})

    def cpu_s(self) -> float | None:
        """CPU seconds the server process has used (Linux /proc), to tell client from server cost."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return None

    def stop(self) -> None:
        try:
            self._ask("stop")
        finally:
            self.proc.join(timeout=30)


class LocalServer:
    def __init__(self, warehouse_dir: Path, latency: float, concurrency: int) -> None:
        from radchain.testing import FakeOpenAIServer
        from flows.testing import chain_responder

        self.responder = chain_responder(warehouse_dir).warm()
        self.server = FakeOpenAIServer(responder=self.responder, **_server_kwargs(latency, concurrency)).start()
        self.base_url = self.server.base_url

    def stats(self) -> dict[str, Any]:
        return dict(_stats(self.server), misses=self.responder.misses)

    def reset(self) -> None:
        self.server.reset_counters()
        self.server.clear_prompt_cache()

    def set_faults(self, faults: dict[str, float], seed: int = 0) -> None:
        faults = dict(faults)
        self.server.batch_failure_rate = faults.pop("_batch_failure_rate", 0.0)
        self.server.faults, self.server.seed = faults, seed

    def cpu_s(self) -> float | None:
        return None  # one process: client and server CPU cannot be told apart

    def stop(self) -> None:
        self.server.stop()


# ---- the warehouse -------------------------------------------------------------------------------------
def build_warehouse(home: Path, samples: int, seed: int) -> tuple[Path, dict[str, int]]:
    """Corpus -> ingest, label, tasks (rules), then int_vqa_samples trimmed to ``samples`` rows."""
    import polars as pl

    from extractors.synthetic import generate_corpus
    from flows.pipeline import make_context, run_stages
    from flows.stages.common import SourceSpec
    from radchain.settings import Settings
    from schemas.vqa import VqaSample

    studies = max(50, int(samples / 4) + 50)  # about 6.8 samples per study with these caps
    corpus = home.parent / "corpus"
    generate_corpus(corpus, studies=studies, seed=seed, images=False)
    settings = Settings(home=home)
    caps = dict(binary=10_000, single=10_000, multi=10_000, open=10_000, temporal=10_000)
    ctx = make_context(settings, SourceSpec(path=corpus), extractor="rules", show_progress=False, caps=caps)
    run_stages(ctx, ["ingest", "label", "tasks"])
    wh = ctx.warehouse
    all_samples = wh.read("int_vqa_samples")
    if all_samples.height < samples:
        raise SystemExit(f"only {all_samples.height} samples from {studies} studies; raise the corpus size")
    keep = set(all_samples.sort("sample_id")["sample_id"].head(samples).to_list())
    for task in wh.partitions("int_vqa_samples"):  # the tasks stage writes one partition per task
        part = all_samples.filter(pl.col("task") == task)
        if part.height:
            lineage = ctx.lineage(part["batch_id"][0], "tasks-v1")
            wh.write(VqaSample, task, part.filter(pl.col("sample_id").is_in(list(keep))), lineage)
    wh.refresh_views()
    if wh.read("int_vqa_samples").height != samples:
        raise SystemExit("trimming int_vqa_samples failed")
    per_task = dict(wh.read("int_vqa_samples").group_by("task").len().iter_rows())
    return settings.warehouse_dir, dict(studies=studies, **per_task)


# ---- one mine run ----------------------------------------------------------------------------------------
def mine_once(home: Path, base_url: str, protocol: str, concurrency: int, server, mode: str = "sync",
              prompt_version: str | None = None) -> dict[str, Any]:
    import polars as pl
    from pydantic import SecretStr

    from flows.pipeline import make_context, run_stages
    from radchain.settings import LLMSettings, Settings

    settings = Settings(home=home)
    settings.llm = LLMSettings().model_copy(update=dict(
        base_url=base_url, api_key=SecretStr("sk-bench"), protocol=protocol, max_concurrency=concurrency,
        requests_per_minute=1_000_000, tokens_per_minute=1_000_000_000, timeout_s=CLIENT_TIMEOUT_S,
        mode=mode, batch_poll_s=0.02,
    ))
    ctx = make_context(settings, extractor="llm", show_progress=False, prompt_version=prompt_version)
    server.reset()
    server_cpu0 = server.cpu_s()
    cpu0, t0 = time.process_time(), time.perf_counter()
    results = run_stages(ctx, ["mine"])["mine"]
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    server_cpu1 = server.cpu_s()
    server_cpu = None if server_cpu0 is None or server_cpu1 is None else server_cpu1 - server_cpu0
    stats = server.stats()
    calls = ctx.warehouse.read("int_llm_calls").filter(pl.col("run_id") == ctx.run_id)
    fresh = calls.filter(~pl.col("cache_hit"))
    accepted = sum(r.outputs for r in results)
    inputs = sum(r.inputs for r in results)
    tokens = int(fresh["prompt_tokens"].sum() + fresh["completion_tokens"].sum()) if fresh.height else 0
    return dict(
        protocol=protocol, wall_s=wall, cpu_s=cpu, server_cpu_s=server_cpu, requests=stats["requests"], max_in_flight=stats["max_in_flight"],
        request_phase_s=stats.get("request_phase_s"), server_ms_per_answer=stats.get("served_ms"),
        misses=stats["misses"], faults=stats["faults"], samples=inputs, accepted=accepted,
        acceptance=accepted / inputs if inputs else 0.0, ledger_rows=calls.height, fresh_rows=fresh.height,
        attempts=int(fresh["attempts"].sum()) if fresh.height else 0, tokens=tokens,
        cache_hits=int(calls["cache_hit"].sum()) if calls.height else 0,
        usd=float(fresh["cost_usd"].sum()) if fresh.height else 0.0,
        prompt_tokens=int(fresh["prompt_tokens"].sum()) if fresh.height else 0,
        cached_tokens=int(fresh["cached_tokens"].sum()) if fresh.height else 0,
        batches=stats.get("batches", 0),
    )


def copy_home(warehouse_dir: Path, home: Path) -> Path:
    if home.exists():
        shutil.rmtree(home)
    shutil.copytree(warehouse_dir, home / "warehouse")
    return home


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} ms/request"


# ---- main ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="repeats of (a)/(c); the median is reported")
    parser.add_argument("--seed", type=int, default=13, help="corpus seed")
    parser.add_argument("--fault-seed", type=int, default=1)
    parser.add_argument("--in-process", action="store_true", help="run the fake server in this process")
    parser.add_argument("--skip-protocols", action="store_true", help="skip (b)")
    parser.add_argument("--skip-cost", action="store_true", help="skip (d)")
    parser.add_argument("--only-cost", action="store_true", help="run (d) only")
    args = parser.parse_args(argv)

    import logging

    logging.getLogger("radchain.llm").setLevel(logging.ERROR)  # retries are expected under the fault mix
    t_setup = time.perf_counter()
    tmp = workdir()
    warehouse_dir, corpus_info = build_warehouse(tmp / "built" / "home", args.samples, args.seed)
    print(f"warehouse: {args.samples} samples {corpus_info} in {time.perf_counter() - t_setup:.1f}s", flush=True)
    # Imports the stage makes on first use (openai's types alone take about 2 s), so rep 1 is not charged for them.
    import extractors.chains.llm_backend  # noqa: F401
    import extractors.chains.verify  # noqa: F401
    import extractors.llm.client  # noqa: F401
    import warehouse.llm_cache  # noqa: F401

    try:
        import extractors.phi  # noqa: F401  (the PHI guard, when the stage has it)
        import radchain.secrets  # noqa: F401
    except ImportError:
        pass
    server_cls = LocalServer if args.in_process else RemoteServer
    server = server_cls(warehouse_dir, args.latency, args.concurrency)
    ideal = args.concurrency / args.latency
    out: dict[str, Any] = dict(samples=args.samples, latency_s=args.latency, concurrency=args.concurrency,
                               ideal_req_per_s=ideal, server="in-process thread" if args.in_process else "own process",
                               cpus=os.cpu_count(), load_avg_before=os.getloadavg())
    try:
        # (a) + (c): no faults, single protocol; each repeat on a fresh cache, then the re-run on the full one.
        server.set_faults({})
        firsts, reruns = [], []
        for rep in range(0 if args.only_cost else args.repeats):
            # A fresh warehouse and an empty cache each time: the mine stage reuses batches whose inputs did not
            # change, so a first run over partitions already mined would mine nothing.
            home = copy_home(warehouse_dir, tmp / "a" / "home")
            first = mine_once(home, server.base_url, "single", args.concurrency, server)
            again = mine_once(home, server.base_url, "single", args.concurrency, server)
            first["req_per_s"] = first["requests"] / first["wall_s"]
            first["fraction_of_ideal"] = first["req_per_s"] / ideal
            first["client_cpu_ms_per_request"] = 1000 * first["cpu_s"] / max(1, first["requests"])
            first["server_cpu_ms_per_request"] = (None if first["server_cpu_s"] is None else
                                                  1000 * first["server_cpu_s"] / max(1, first["requests"]))
            first["load_avg"] = os.getloadavg()[0]
            # The request phase alone (first request received to last answer sent, on the server's
            # clock): what the client sustains once the stage's reads, verification backlog and
            # Parquet writes before and after it are left out. Reported beside the whole-stage figure.
            phase = first.get("request_phase_s")
            first["phase_fraction_of_ideal"] = (first["requests"] / phase / ideal) if phase else None
            again["fraction_of_first"] = again["wall_s"] / first["wall_s"]
            firsts.append(first)
            reruns.append(again)
            print(f"(a) rep {rep + 1}: {first['requests']} requests in {first['wall_s']:.2f}s = "
                  f"{first['req_per_s']:.0f} req/s = {first['fraction_of_ideal']:.3f} of ideal {ideal:.0f}; "
                  f"client CPU {first['client_cpu_ms_per_request']:.2f} ms/request (server "
                  f"{_ms(first['server_cpu_ms_per_request'])}); load average {first['load_avg']:.1f}; max in flight "
                  f"{first['max_in_flight']}; server answered in {first['server_ms_per_answer']:.1f} ms (mean); accepted "
                  f"{first['accepted']}/{first['samples']}; request phase "
                  f"{'n/a' if first['phase_fraction_of_ideal'] is None else format(first['phase_fraction_of_ideal'], '.3f')} "
                  f"of ideal", flush=True)
            print(f"(c) rep {rep + 1}: re-run {again['wall_s']:.2f}s = {again['fraction_of_first']:.3f} of the first; "
                  f"{again['requests']} requests; {again['cache_hits']} cache hits", flush=True)
        med = statistics.median
        if not args.skip_cost:
            out["d"] = cost_comparison(args, server, warehouse_dir, tmp)
        if args.only_cost:
            return _verdicts(out, args)
        out["a"] = dict(
            req_per_s_median=med(f["req_per_s"] for f in firsts),
            fraction_of_ideal_median=med(f["fraction_of_ideal"] for f in firsts),
            fraction_of_ideal_all=[round(f["fraction_of_ideal"], 3) for f in firsts],
            request_phase_fraction_median=med(f["phase_fraction_of_ideal"] or 0.0 for f in firsts),
            wall_s_median=med(f["wall_s"] for f in firsts),
            client_cpu_ms_per_request_median=med(f["client_cpu_ms_per_request"] for f in firsts),
            server_cpu_ms_per_request=[f["server_cpu_ms_per_request"] for f in firsts],
            load_avg=[f["load_avg"] for f in firsts],
            max_in_flight=max(f["max_in_flight"] for f in firsts),
            server_ms_per_answer=[round(f["server_ms_per_answer"], 2) for f in firsts],
            floor=FLOOR_THROUGHPUT,
        )
        # One Python process cannot go faster than one request per client-CPU-cost, however idle the machine.
        out["a"]["cpu_bound_ceiling_fraction"] = 1000 / out["a"]["client_cpu_ms_per_request_median"] / ideal
        out["c"] = dict(
            fraction_of_first_median=med(r["fraction_of_first"] for r in reruns),
            fraction_of_first_all=[round(r["fraction_of_first"], 3) for r in reruns],
            rerun_wall_s_median=med(r["wall_s"] for r in reruns),
            rerun_ms_per_sample_median=med(1000 * r["wall_s"] / r["samples"] for r in reruns),
            requests_max=max(r["requests"] for r in reruns),
            floor=FLOOR_RERUN,
        )

        # (b): both protocols, fresh caches, without faults and with the fault mix.
        if not args.skip_protocols and not args.only_cost:
            out["b"] = {}
            for label, faults in (("no_faults", {}), ("fault_mix", FAULTS)):
                runs = {}
                for protocol in ("single", "paper"):
                    server.set_faults(faults, seed=args.fault_seed)
                    home = copy_home(warehouse_dir, tmp / f"b-{label}-{protocol}" / "home")
                    r = mine_once(home, server.base_url, protocol, args.concurrency, server)
                    r["requests_per_accepted"] = r["requests"] / max(1, r["accepted"])
                    r["calls_per_accepted"] = r["fresh_rows"] / max(1, r["accepted"])
                    r["tokens_per_accepted"] = r["tokens"] / max(1, r["accepted"])
                    runs[protocol] = r
                    print(f"(b) {label:9s} {protocol:6s}: accepted {r['accepted']}/{r['samples']} "
                          f"({r['acceptance']:.4f}); {r['requests_per_accepted']:.3f} HTTP requests, "
                          f"{r['calls_per_accepted']:.3f} ledger calls, {r['tokens_per_accepted']:.0f} tokens "
                          f"per accepted chain; {r['wall_s']:.1f}s; faults {r['faults']}", flush=True)
                ratio = runs["single"]["tokens_per_accepted"] / runs["paper"]["tokens_per_accepted"]
                out["b"][label] = dict(
                    single={k: runs["single"][k] for k in ("acceptance", "requests_per_accepted",
                                                           "calls_per_accepted", "tokens_per_accepted")},
                    paper={k: runs["paper"][k] for k in ("acceptance", "requests_per_accepted",
                                                         "calls_per_accepted", "tokens_per_accepted")},
                    token_ratio_single_over_paper=ratio,
                    acceptance_single_ge_paper=runs["single"]["acceptance"] >= runs["paper"]["acceptance"],
                    misses=runs["single"]["misses"] + runs["paper"]["misses"],
                )
                print(f"(b) {label}: single/paper tokens per accepted chain = {ratio:.3f} (floor <= "
                      f"{FLOOR_TOKEN_RATIO}); acceptance single {runs['single']['acceptance']:.4f} vs paper "
                      f"{runs['paper']['acceptance']:.4f}", flush=True)
            out["b"]["floor"] = FLOOR_TOKEN_RATIO
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    return _verdicts(out, args)


def cost_comparison(args: argparse.Namespace, server: Any, warehouse_dir: Path, tmp: Path) -> dict[str, Any]:
    """(d): dollars per accepted chain of the release's protocol vs single (+ few-shot) sync and batch."""
    variants = [  # label, protocol, mode, prompt version
        ("paper sync", "paper", "sync", None),
        ("single sync", "single", "sync", "single-v2"),
        ("single+fewshot sync", "single", "sync", "single-v3"),
        ("single batch", "single", "batch", "single-v2"),
        ("single+fewshot batch", "single", "batch", "single-v3"),
    ]
    runs: dict[str, dict[str, Any]] = {}
    for label, protocol, mode, version in variants:
        faults = dict(CONTENT_FAULTS, _batch_failure_rate=BATCH_FAILURE_RATE if mode == "batch" else 0.0)
        server.set_faults(faults, seed=args.fault_seed)
        home = copy_home(warehouse_dir, tmp / f"d-{label.replace(' ', '-').replace('+', '-')}" / "home")
        r = mine_once(home, server.base_url, protocol, args.concurrency, server, mode=mode, prompt_version=version)
        r["usd_per_accepted"] = r["usd"] / max(1, r["accepted"])
        r["cached_share"] = r["cached_tokens"] / max(1, r["prompt_tokens"])
        r["calls_per_accepted"] = r["fresh_rows"] / max(1, r["accepted"])
        runs[label] = r
        print(f"(d) {label:21s}: accepted {r['accepted']}/{r['samples']} ({r['acceptance']:.4f}); "
              f"${r['usd']:.4f} = ${1000 * r['usd_per_accepted']:.4f} per 1,000 accepted chains; "
              f"{r['calls_per_accepted']:.3f} calls and {r['tokens'] / max(1, r['accepted']):.0f} tokens per accepted "
              f"chain; cached {r['cached_share']:.1%} of input; {r['batches']} batches; {r['wall_s']:.1f}s",
              flush=True)
    paper = runs["paper sync"]
    out: dict[str, Any] = {"floor": FLOOR_BATCH_COST, "runs": {}}
    for label, r in runs.items():
        out["runs"][label] = {k: r[k] for k in ("acceptance", "usd", "usd_per_accepted", "calls_per_accepted",
                                                "cached_share", "batches", "accepted", "samples")}
        out["runs"][label]["ratio_to_paper"] = r["usd_per_accepted"] / paper["usd_per_accepted"]
        print(f"(d) {label:21s}: ${1000 * r['usd_per_accepted']:.4f} per 1,000 accepted chains = "
              f"{out['runs'][label]['ratio_to_paper']:.3f}x the release's; acceptance {r['acceptance']:.4f}; "
              f"{r['calls_per_accepted']:.3f} ledger calls per accepted; cached input {r['cached_share']:.1%}; "
              f"{r['batches']} batches", flush=True)
    best_batch = runs["single batch"]
    out["batch_ratio"] = best_batch["usd_per_accepted"] / paper["usd_per_accepted"]
    out["batch_acceptance_ge_paper"] = best_batch["acceptance"] >= paper["acceptance"]
    # Few-shot: kept only if cheaper per accepted chain; the acceptance it would need to break even.
    decision = {}
    for mode in ("sync", "batch"):
        plain, few = runs[f"single {mode}"], runs[f"single+fewshot {mode}"]
        usd_per_sample_few = few["usd"] / max(1, few["samples"])
        needed = usd_per_sample_few / plain["usd_per_accepted"]  # acceptance at which few-shot matches plain
        decision[mode] = dict(plain=plain["usd_per_accepted"], fewshot=few["usd_per_accepted"],
                              pays=few["usd_per_accepted"] < plain["usd_per_accepted"],
                              breakeven_acceptance=needed, plain_acceptance=plain["acceptance"],
                              fewshot_acceptance=few["acceptance"])
        print(f"(d) few-shot ({mode}): ${1000 * few['usd_per_accepted']:.4f} vs ${1000 * plain['usd_per_accepted']:.4f} "
              f"per 1,000 accepted chains (acceptance {few['acceptance']:.4f} vs {plain['acceptance']:.4f}); it would "
              f"pay for itself at an acceptance of {needed:.4f} or more -> "
              f"{'KEEP few-shot' if decision[mode]['pays'] else 'do not keep few-shot (single-v2 stays the default)'}",
              flush=True)
    out["fewshot"] = decision
    return out


def _verdicts(out: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    verdicts: dict[str, bool] = {}
    if "d" in out:
        d = out["d"]
        verdicts["d_batch_cost"] = d["batch_ratio"] <= FLOOR_BATCH_COST and d["batch_acceptance_ge_paper"]
        print(f"(d) single + batch / paper sync dollars per accepted chain: {d['batch_ratio']:.3f} (floor "
              f"{FLOOR_BATCH_COST}, acceptance no lower: {d['batch_acceptance_ge_paper']}) -> "
              f"{'PASS' if verdicts['d_batch_cost'] else 'BELOW FLOOR'}")
    if "a" not in out:
        out["verdicts"] = verdicts
        print(json.dumps(out, indent=1, default=str))
        return out
    a, c = out["a"], out["c"]
    verdicts.update({
        "a_throughput": a["fraction_of_ideal_median"] >= FLOOR_THROUGHPUT,
        "c_rerun": c["fraction_of_first_median"] <= FLOOR_RERUN and c["requests_max"] == 0,
    })
    if "b" in out:
        fm = out["b"]["fault_mix"]
        verdicts["b_tokens"] = fm["token_ratio_single_over_paper"] <= FLOOR_TOKEN_RATIO and fm[
            "acceptance_single_ge_paper"]
    out["verdicts"] = verdicts
    out["load_avg_after"] = os.getloadavg()
    print(f"(a) throughput: median {a['req_per_s_median']:.0f} req/s = {a['fraction_of_ideal_median']:.3f} of "
          f"ideal {out['ideal_req_per_s']:.0f} (floor {FLOOR_THROUGHPUT}) -> {'PASS' if verdicts['a_throughput'] else 'BELOW FLOOR'}; "
          f"client CPU {a['client_cpu_ms_per_request_median']:.2f} ms/request caps one process at "
          f"{a['cpu_bound_ceiling_fraction']:.2f} of ideal; load average {out['load_avg_before'][0]:.1f} on "
          f"{out['cpus']} CPUs")
    print(f"(a) request phase only (first request to last answer): median {a['request_phase_fraction_median']:.3f} "
          f"of ideal -> {'PASS' if a['request_phase_fraction_median'] >= FLOOR_THROUGHPUT else 'BELOW FLOOR'} "
          f"(the verdict above, over the whole stage, is the one the floor is judged on)")
    if "b" in out:
        print(f"(b) tokens single/paper (fault mix): {out['b']['fault_mix']['token_ratio_single_over_paper']:.3f} "
              f"(floor {FLOOR_TOKEN_RATIO}) -> {'PASS' if verdicts['b_tokens'] else 'BELOW FLOOR'}")
    print(f"(c) re-run: median {c['fraction_of_first_median']:.3f} of the first run's wall time, "
          f"{c['requests_max']} requests (floor {FLOOR_RERUN}, 0) -> {'PASS' if verdicts['c_rerun'] else 'FAIL'}")
    print(json.dumps(out, indent=1, default=str))
    return out


def exit_code(result: dict[str, Any]) -> int:
    """1 when any floor was missed (a benchmark below its floor must fail the job that runs it)."""
    missed = [k for k, ok in result.get("verdicts", {}).items() if not ok]
    if missed:
        print(f"floors missed: {', '.join(missed)}", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(exit_code(main()))
