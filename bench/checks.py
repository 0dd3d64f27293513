"""Benchmark: what the data checks (and the run's audit row) cost in a 20,000-study pipeline run.

    python bench/checks.py                     # generate a 20,000-study corpus in a temp folder
    python bench/checks.py --corpus DIR        # reuse a MIMIC-layout corpus
    python bench/checks.py --studies 5000      # a smaller run

Runs ingest -> label -> tasks -> mine (rule backend) -> datasets through flows.pipeline.run_stages
(no Prefect: the stage work alone, so the checks' share is not diluted by orchestration), and after
each stage does what the pipeline flow does there (flows/checks.py ``RunAudit.after_stage``: the
stage's audit_runs row, then every check of the tables it wrote, their fct_check_results partition),
timing that separately. Prints the stage wall time, the checks' wall time per stage, the number of
checks, and the overhead as a percentage of the run without them. Floor: overhead < 5 %; exit 1 above.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_TMP = Path(tempfile.mkdtemp(prefix="radchain-bench-checks-"))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

FLOOR_OVERHEAD_PCT = 5.0
STAGES = ["ingest", "label", "tasks", "mine", "datasets"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", type=int, default=20_000, help="studies to generate (ignored with --corpus)")
    ap.add_argument("--corpus", type=Path, help="an existing MIMIC-layout corpus to reuse")
    ap.add_argument("--keep", type=Path, help="generate the corpus here and keep it")
    args = ap.parse_args(argv)

    from radchain.runtime import prepare_environment
    from radchain.settings import Settings

    settings = Settings(home=_TMP / "home")
    prepare_environment(settings)

    from extractors.synthetic import generate_corpus
    from flows.checks import RunAudit
    from flows.pipeline import make_context, run_stages
    from flows.stages.common import SourceSpec

    corpus = args.corpus
    if corpus is None:
        corpus = args.keep or (_TMP / "corpus")
        if not (corpus / ".complete").exists():
            t0 = time.perf_counter()
            generate_corpus(corpus, studies=args.studies, seed=13, images=False)
            (corpus / ".complete").write_text(str(args.studies))
            print(f"corpus: {args.studies} studies generated in {time.perf_counter() - t0:.1f} s ({corpus})")
    ctx = make_context(settings=settings, source=SourceSpec(path=corpus), extractor="rules", show_progress=False)
    stage_wall: dict[str, float] = {}
    check_wall: dict[str, float] = {}
    n_checks: dict[str, int] = {}
    t_audit = time.perf_counter()
    audit = RunAudit(ctx, STAGES, flow="bench-checks")
    check_wall["(run start)"] = time.perf_counter() - t_audit

    def on_stage(name, out, wall):
        stage_wall[name] = wall
        t0 = time.perf_counter()
        outcomes = audit.after_stage(name, out)
        check_wall[name] = time.perf_counter() - t0
        n_checks[name] = len(outcomes)
        failed = [o.check.name for o in outcomes if not o.passed]
        slowest = sorted(outcomes, key=lambda o: -o.wall_s)[:2]
        print("            slowest: " + ", ".join(f"{o.check.name} {o.wall_s:.3f} s" for o in slowest))
        print(f"  {name:9s} stage {wall:7.2f} s   checks {check_wall[name]:6.3f} s ({len(outcomes)} checks"
              + (f"; failed: {', '.join(failed)}" if failed else "") + ")", flush=True)

    t0 = time.perf_counter()
    results = run_stages(ctx, STAGES, on_stage=on_stage)
    t_end = time.perf_counter()
    audit.finish(None)
    check_wall["(run end)"] = time.perf_counter() - t_end
    total = time.perf_counter() - t0
    studies = sum(r.inputs for r in results["ingest"])
    checks_s = sum(check_wall.values())
    run_s = total - checks_s
    pct = 100.0 * checks_s / run_s
    print(f"studies: {studies}; samples: {sum(r.inputs for r in results['mine'])}; "
          f"chains: {sum(r.outputs for r in results['mine'])}")
    print(f"run without checks: {run_s:.2f} s; checks + run audit: {checks_s:.3f} s "
          f"({sum(n_checks.values())} check runs after 5 stages)")
    print(f"checks overhead: {pct:.2f} % of the run (floor < {FLOOR_OVERHEAD_PCT:.0f} %)")
    ok = pct < FLOOR_OVERHEAD_PCT
    print("PASS" if ok else "FAIL: the checks cost more than the floor allows")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
