"""MIMIC-CXR-size benchmark of the non-LLM pipeline: ingest → label → tasks → mine (rules) → datasets.

    python bench/mimic_scale.py                          # 227,835 studies generated under a temp folder
    python bench/mimic_scale.py --corpus DIR             # reuse a corpus (generated there if DIR is empty)
    python bench/mimic_scale.py --corpus DIR --dask      # also the Prefect flow on a local Dask cluster
    python bench/mimic_scale.py --studies 20000          # a smaller run

Runs the same stage functions twice, each on a fresh warehouse: directly (flows.pipeline.run_stages,
no Prefect) and through the Prefect flow (flows.pipeline.pipeline_flow, default in-process runner,
Prefect's temporary local API started by the flow as `radchain run` does). With --dask, a third run
uses the flow with runner=dask (LocalCluster, one worker process per core).

Prints, per run: wall time per stage, units/s per stage (reports for ingest/label/tasks, samples
for mine/datasets), the whole run's wall and CPU time, and peak RSS of this process plus all its
children (psutil, sampled every 0.2 s: the temporary Prefect API and Dask workers included).
Prefect overhead = (flow wall - direct wall) / flow wall.

Corpus generation (images off) is timed but not counted. Floors on the 2-core development machine:
non-LLM stages under 8 minutes at MIMIC size, peak RSS under 3 GB, Prefect overhead under 10%.
Exit code 1 when a floor is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_TMP = Path(tempfile.mkdtemp(prefix="radchain-mimic-bench-"))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# A busy machine may need more than the default 20 s to start the temporary Prefect API.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
from radchain.runtime import prepare_environment  # noqa: E402
from radchain.settings import Settings  # noqa: E402
from flows.stages.contract import stage_names  # noqa: E402

prepare_environment(Settings(home=_TMP))

MIMIC_STUDIES = 227_835
STAGES = stage_names()  # every stage, in DAG order (flows/stages/contract.py)
FLOOR_WALL_S = 8 * 60
FLOOR_RSS_MB = 3 * 1024
FLOOR_OVERHEAD = 0.10


class PeakRSS:
    """Peak of (RSS of this process + RSS of all its descendants), sampled in a thread.

    CPU of children counts from when the measurement starts. ``own_children_only`` leaves out
    children that were already running then (the temporary Prefect API, for a direct run)."""

    def __init__(self, every_s: float = 0.2, own_children_only: bool = False):
        import psutil

        self._proc = psutil.Process()
        self._skip: set[int] = set()
        self._cpu0: dict[int, float] = {}
        for c in self._proc.children(recursive=True):
            try:
                t = c.cpu_times()
            except psutil.Error:
                continue
            self._cpu0[c.pid] = t.user + t.system
            if own_children_only:
                self._skip.add(c.pid)
        self.every_s = every_s
        self.peak = 0
        self.peak_pss = 0  # shared pages split between the processes that map them
        self.by_process: dict[int, tuple[int, str]] = {}  # pid -> (peak RSS, what it is)
        self.cpu_children: dict[int, float] = {}  # pid -> last seen user+system CPU seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        import psutil

        total = total_pss = 0
        for p in [self._proc, *self._proc.children(recursive=True)]:
            if p.pid in self._skip:
                continue
            try:
                mem = p.memory_full_info()
                rss = mem.rss
                if p.pid != self._proc.pid:
                    t = p.cpu_times()
                    self.cpu_children[p.pid] = t.user + t.system - self._cpu0.get(p.pid, 0.0)
                if p.pid not in self.by_process:
                    self.by_process[p.pid] = (0, _role(p, self._proc.pid))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            total += rss
            total_pss += getattr(mem, "pss", rss)
            self.by_process[p.pid] = (max(rss, self.by_process[p.pid][0]), self.by_process[p.pid][1])
        self.peak = max(self.peak, total)
        self.peak_pss = max(self.peak_pss, total_pss)
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every_s)

    def __enter__(self) -> "PeakRSS":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20

    @property
    def peak_pss_mb(self) -> float:
        return self.peak_pss / 2**20

    def breakdown(self) -> str:
        """Peak RSS per kind of process (each process's own peak; they need not coincide)."""
        kinds: dict[str, list[int]] = {}
        for rss, role in self.by_process.values():
            kinds.setdefault(role, []).append(rss)
        return ", ".join(f"{role} {'/'.join(f'{r / 2**20:,.0f}' for r in sorted(v, reverse=True))} MB"
                         for role, v in sorted(kinds.items()))


def _role(p, me: int) -> str:
    if p.pid == me:
        return "this process"
    try:
        cmd = " ".join(p.cmdline())
    except Exception:  # noqa: BLE001 - gone or unreadable: counted, just not named
        return "other"
    if "uvicorn" in cmd or "prefect.server" in cmd:
        return "Prefect temporary API"
    if "multiprocessing" in cmd or "spawn_main" in cmd:
        return "Dask worker"
    return "other"


def ensure_corpus(path: Path, studies: int) -> tuple[Path, float, str]:
    """(corpus, seconds spent generating, how): a folder that already holds a corpus is reused as is."""
    from extractors.synthetic import MARKER_NAME, generate_corpus

    path = path.resolve()
    if (path / "files").is_dir():
        try:
            meta = json.loads((path / MARKER_NAME).read_text())
        except (OSError, ValueError):
            meta = {}
        return path, 0.0, f"reused ({meta.get('studies', 'unknown number of')} studies)"
    t0 = time.perf_counter()
    generate_corpus(path, studies=studies, seed=13, images=False)
    return path, time.perf_counter() - t0, f"generated {studies} studies (images off)"


def _clear_process_caches() -> None:
    """Per-process caches a second run in the same process would otherwise inherit (fair comparison)."""
    import importlib

    label = importlib.import_module("flows.stages.label")
    label._cached_long.cache_clear()


def _units(results: dict) -> dict[str, int]:
    return {s: sum(r.inputs for r in results.get(s, [])) for s in STAGES}


def run_direct(corpus: Path, home: Path, batch_size: int) -> dict:
    from flows.pipeline import make_context, run_stages
    from flows.stages.common import SourceSpec
    from radchain.settings import Settings

    _clear_process_caches()
    walls: dict[str, float] = {}
    with PeakRSS(own_children_only=True) as rss:
        t0, c0 = time.perf_counter(), time.process_time()
        ctx = make_context(Settings(home=home, batch_size=batch_size), SourceSpec(path=corpus),
                           extractor="rules", show_progress=False)
        results = run_stages(ctx, STAGES, on_stage=lambda s, out, w: walls.__setitem__(s, w))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return dict(name="direct (run_stages, no Prefect)", walls=walls, wall=wall, cpu=cpu, rss_mb=rss.peak_mb,
                pss_mb=rss.peak_pss_mb, units=_units(results), cpu_tree=cpu + sum(rss.cpu_children.values()),
                rss_by=rss.breakdown())


def run_flow(corpus: Path, home: Path, batch_size: int, **options) -> dict:
    os.environ["RADCHAIN_HOME"] = str(home)
    os.environ["RADCHAIN_BATCH_SIZE"] = str(batch_size)
    from radchain.settings import reset_settings_cache

    reset_settings_cache()
    from flows import pipeline
    from flows.stages.common import SourceSpec

    _clear_process_caches()
    with PeakRSS() as rss:
        t0, c0 = time.perf_counter(), time.process_time()
        results = pipeline.pipeline_flow(source=SourceSpec(path=corpus), stages=STAGES,
                                         options={"extractor": "rules", "show_progress": False, **options})
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    name = "Prefect flow, " + ("runner=dask" if options.get("runner") == "dask" else "default runner")
    return dict(name=name, walls=dict(pipeline.LAST_STAGE_WALLS), wall=wall, cpu=cpu, rss_mb=rss.peak_mb,
                pss_mb=rss.peak_pss_mb, units=_units(results), cpu_tree=cpu + sum(rss.cpu_children.values()),
                rss_by=rss.breakdown())


def prefect_cold_start() -> float:
    """Seconds for a first, empty flow in this process: it starts Prefect's temporary local API
    (and creates its database when PREFECT_HOME is new), as the first flow of `radchain run` does.
    Later flows in the process reuse that API, so the timed pipeline flows are warm."""
    from prefect import flow

    @flow(name="radchain-bench-warmup", persist_result=False)
    def warmup() -> None:
        return None

    t0 = time.perf_counter()
    warmup()
    return time.perf_counter() - t0


def report(run: dict) -> None:
    print(f"\n== {run['name']}")
    print(f"   {'stage':<9} {'wall s':>8} {'units':>9} {'units/s':>9}")
    for s in STAGES:
        w, n = run["walls"].get(s, float("nan")), run["units"][s]
        unit = "reports" if s in ("ingest", "label", "tasks") else "samples"
        print(f"   {s:<9} {w:>8.1f} {n:>9,} {n / w if w else 0:>9,.0f}  {unit}/s")
    stage_sum = sum(run["walls"].values())
    print(f"   total wall {run['wall']:.1f} s (stages {stage_sum:.1f} s, outside stages {run['wall'] - stage_sum:.1f} s);"
          f" CPU of this process {run['cpu']:.1f} s; end-to-end {run['units']['ingest'] / run['wall']:,.0f} reports/s")
    print(f"   CPU of the process tree {run['cpu_tree']:.1f} s (children: last reading before they exited)")
    print(f"   peak RSS (process + children) {run['rss_mb']:,.0f} MB (peak PSS {run['pss_mb']:,.0f} MB); "
          f"per process: {run['rss_by']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", type=int, default=MIMIC_STUDIES, help="studies to generate (ignored when --corpus "
                                                                         "already holds a corpus)")
    ap.add_argument("--corpus", type=Path, help="corpus folder to reuse (generated there when it holds none); "
                                                "default: a temporary folder, removed at the end")
    ap.add_argument("--batch-size", type=int, default=5000)
    ap.add_argument("--work", type=Path, help="folder for the warehouses (default: a temporary folder)")
    ap.add_argument("--skip-direct", action="store_true")
    ap.add_argument("--skip-prefect", action="store_true")
    ap.add_argument("--dask", action="store_true", help="also run the flow with runner=dask")
    ap.add_argument("--dask-workers", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=1, help="direct and Prefect runs, alternated; the fastest "
                                                              "of each is compared (load on a shared machine)")
    args = ap.parse_args(argv)

    corpus_dir = args.corpus or (_TMP / "corpus")
    corpus, gen_s, how = ensure_corpus(corpus_dir, args.studies)
    work = (args.work or _TMP / "work").resolve()
    print(f"corpus: {corpus} — {how}" + (f" in {gen_s:.1f} s (not counted)" if gen_s else ""))
    print(f"batch size {args.batch_size}; cores {os.cpu_count()}; load average {os.getloadavg()[0]:.2f}")

    runs: list[dict] = []
    cold = None
    for i in range(args.repeats):
        tag = f" #{i + 1}" if args.repeats > 1 else ""
        if not args.skip_direct:
            runs.append(run_direct(corpus, work / f"direct{i}", args.batch_size))
            runs[-1]["name"] += tag
            report(runs[-1])
        if not args.skip_prefect:
            if cold is None:
                cold = prefect_cold_start()
                print(f"\nPrefect temporary API cold start (first flow of the process, new PREFECT_HOME): {cold:.1f} s")
            runs.append(run_flow(corpus, work / f"prefect{i}", args.batch_size))
            runs[-1]["name"] += tag
            report(runs[-1])
    if args.dask:
        runs.append(run_flow(corpus, work / "dask", args.batch_size, runner="dask", dask_workers=args.dask_workers))
        report(runs[-1])

    ok = True
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    for r in runs:
        fast, small = r["wall"] < FLOOR_WALL_S, r["rss_mb"] < FLOOR_RSS_MB
        ok = ok and small and fast
        print(f"{r['name']:<40} wall {r['wall']:7.1f} s (floor {FLOOR_WALL_S} s: {'OK' if fast else 'ABOVE'})"
              f"   peak RSS {r['rss_mb']:7,.0f} MB (floor {FLOOR_RSS_MB:,}: {'OK' if small else 'ABOVE'}; "
              f"PSS {r['pss_mb']:,.0f} MB)")
    directs = [r for r in runs if r["name"].startswith("direct")]
    flows = [r for r in runs if "default runner" in r["name"]]
    if directs and flows:
        d, f = min(directs, key=lambda r: r["wall"]), min(flows, key=lambda r: r["wall"])
        overhead = (f["wall"] - d["wall"]) / f["wall"]
        cold_overhead = (f["wall"] + cold - d["wall"]) / (f["wall"] + cold)
        cpu_overhead = (f["cpu_tree"] - d["cpu_tree"]) / f["cpu_tree"]
        good = overhead < FLOOR_OVERHEAD
        ok = ok and good
        print(f"Prefect overhead (fastest of {len(flows)} flow vs fastest of {len(directs)} direct): wall ratio "
              f"{f['wall'] / d['wall']:.3f}, overhead {100 * overhead:.1f}% of the flow's wall time "
              f"(floor {100 * FLOOR_OVERHEAD:.0f}%: {'OK' if good else 'ABOVE'})")
        print(f"  with the temporary API's cold start added ({cold:.1f} s, a first `radchain run` on a new "
              f"PREFECT_HOME): {100 * cold_overhead:.1f}%")
        print(f"  in CPU seconds of the process tree (load-independent): {d['cpu_tree']:.1f} direct vs "
              f"{f['cpu_tree']:.1f} flow, overhead {100 * cpu_overhead:.1f}%")
    dask = next((r for r in runs if r["name"].endswith("runner=dask")), None)
    if dask and flows:
        f = min(flows, key=lambda r: r["wall"])
        print(f"Dask fan-out: {f['wall'] / dask['wall']:.2f}x the default runner's speed (wall)")
    if args.corpus is None:
        shutil.rmtree(_TMP / "corpus", ignore_errors=True)
    if args.work is None:
        shutil.rmtree(_TMP, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
