"""Agreement of radchain's rules judge with the paper's GPT-4o judge, and the judge's speed on real text.

    python bench/judge_agreement.py [--release ../shared/data/real/release-judge-openi] [--bootstrap 1000]
                                    [--core 0] [--no-semantic]

Prints training.judge_agreement.agreement_on_release for the lexical mode (the RL reward's) and
the semantic mode (MiniLM word pooling), then each mode's speed over the release, in samples per
CPU-second of this process (one core; the shared machine's load does not count) and per wall
second: cold (every cache emptied first; the MiniLM load and its preparation, training/minilm.py,
excluded) and, for the semantic mode,
steady state (the judge has already scored the other model's outputs on the same questions).
Exits non-zero when a floor is missed (issue 13):

* lexical mode: RadRScore per-sample Pearson >= 0.45, each component >= 0.30, and both models
  ranked as the GPT-4o judge ranks them on every component;
* semantic mode: >= 200 samples per CPU-second on one core, both cold and in steady state.

process_reward's own floor (>= 2,000 completions/s) is bench/radrscore.py's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RADRSCORE_FLOOR = 0.45
COMPONENT_FLOOR = 0.30
SEMANTIC_SPEED_FLOOR = 200.0
DEFAULT_RELEASE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "real" / "release-judge-openi"


def _cold() -> None:
    """Empty every cache the judge fills while scoring (training.radrscore.clear_caches); the semantic
    judge's embeddings live in the matcher, which the caller makes anew."""
    from training.radrscore import clear_caches

    clear_caches()


def agreement_misses(report) -> list[str]:
    """The agreement floors a report misses (also checked by bench/real_text.py)."""
    misses = []
    for comp in ("completeness", "factuality", "effectiveness", "radrscore"):
        c = report.correlation(comp)
        floor = RADRSCORE_FLOOR if comp == "radrscore" else COMPONENT_FLOOR
        if c is None or c.pearson is None or c.pearson < floor:
            misses.append(f"{comp} Pearson {None if c is None else c.pearson} < {floor}")
        if report.same_ranking.get(comp) is False:
            misses.append(f"{comp}: models ranked unlike the GPT-4o judge")
    return misses


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--release", type=Path, default=DEFAULT_RELEASE)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--core", type=int, default=0)
    ap.add_argument("--no-semantic", action="store_true")
    args = ap.parse_args()
    from bench.common import pin_to_core

    pin_to_core(args.core)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    from training.judge_agreement import agreement_on_release, format_report, read_release
    from training.radrscore import semantic_judge, score_release_batch

    report = agreement_on_release(args.release, n_boot=args.bootstrap)
    print(format_report(report))
    failures = agreement_misses(report)

    items = [it for it in read_release(args.release) if it.verdict is not None and it.pred.strip()]
    models = sorted({it.model for it in items})

    def timed(fn) -> tuple[float, float]:
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        return time.process_time() - c0, time.perf_counter() - w0

    _cold()
    cpu, wall = timed(lambda: score_release_batch(items))
    print(f"speed, lexical mode, cold: {len(items) / cpu:,.0f} samples per CPU-second "
          f"({len(items) / wall:,.0f}/s wall; {len(items)} samples, one core)")

    if not args.no_semantic:
        matcher, _ = semantic_judge()
        matcher._encoder()  # load MiniLM outside the timing
        sem = agreement_on_release(args.release, semantic=True, n_boot=args.bootstrap, matcher=matcher)
        print(format_report(sem))
        # cold: nothing embedded, nothing read; steady state: the judge has scored the other model's
        # outputs on the same questions (gold steps and the vocabulary seen), the timed model's never.
        _cold()
        matcher, _ = semantic_judge(model=matcher._model)
        matcher._encoder()  # the model, loaded and prepared (training/minilm.py); no text embedded yet
        cpu, wall = timed(lambda: score_release_batch(items, semantic=True, matcher=matcher))
        print(f"speed, semantic mode (MiniLM word pooling), cold: {len(items) / cpu:,.0f} samples per CPU-second "
              f"({len(items) / wall:,.0f}/s wall; {len(matcher._words)} words embedded)")
        # The floor holds cold too: an evaluation scores each sample once, with nothing cached.
        if len(items) / cpu < SEMANTIC_SPEED_FLOOR:
            failures.append(f"semantic mode, cold: {len(items) / cpu:.0f} samples/s < {SEMANTIC_SPEED_FLOOR:.0f}")
        if len(models) >= 2:
            first = [it for it in items if it.model == models[0]]
            second = [it for it in items if it.model != models[0]]
            _cold()
            matcher, _ = semantic_judge(model=matcher._model)
            matcher._encoder()
            score_release_batch(first, semantic=True, matcher=matcher)
            cpu, wall = timed(lambda: score_release_batch(second, semantic=True, matcher=matcher))
            rate = len(second) / cpu
            print(f"speed, semantic mode, steady state ({len(second)} samples of {', '.join(models[1:])} after "
                  f"{len(first)} of {models[0]}): {rate:,.0f} samples per CPU-second ({len(second) / wall:,.0f}/s wall)")
            if rate < SEMANTIC_SPEED_FLOOR:
                failures.append(f"semantic mode {rate:.0f} samples/s < {SEMANTIC_SPEED_FLOOR:.0f}")

    for f in failures:
        print("FAIL:", f)
    print("PASS" if not failures else f"{len(failures)} floor(s) missed")
    return 0 if not failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
