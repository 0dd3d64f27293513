"""Benchmark the synthetic corpus generator: studies/s, peak RSS and disk use.

    python bench/corpus.py --studies 227835 --no-images     # MIMIC-CXR's size
    python bench/corpus.py --studies 20000 --images

The corpus is written under a temporary folder in /tmp (or --out) and deleted afterwards
unless --keep is given.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from extractors.synthetic import generate_corpus

MIMIC_STUDIES = 227_835


def peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS; this project runs on Linux).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def disk_usage_mib(root: Path) -> float:
    total = 0
    for path in root.rglob("*"):
        if path.is_file():
            total += path.stat().st_size
    return total / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=MIMIC_STUDIES)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--images", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None, help="folder to write (default: a new folder in /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the corpus instead of deleting it")
    args = parser.parse_args(argv)
    if args.studies < 1:
        print("error: --studies must be at least 1", file=sys.stderr)
        return 2

    out = args.out or Path(tempfile.mkdtemp(prefix="radchain-bench-corpus-", dir="/tmp"))
    rss_before = peak_rss_mib()
    try:
        summary = generate_corpus(out, studies=args.studies, seed=args.seed, images=args.images,
                                  image_size=args.image_size)
        rss_after = peak_rss_mib()
        started = time.perf_counter()
        size = disk_usage_mib(out)
        walk_s = time.perf_counter() - started
        print(f"studies            {summary.studies:,}")
        print(f"patients           {summary.patients:,}")
        print(f"images (rows)      {summary.images:,}   JPGs written {summary.images_written:,}")
        print(f"temporal pairs     {summary.temporal_pairs:,}")
        print(f"wall               {summary.wall_s:.1f} s")
        print(f"throughput         {summary.studies_per_s:,.0f} studies/s")
        print(f"peak RSS           {rss_after:.0f} MiB (before generating: {rss_before:.0f} MiB)")
        print(f"on disk            {size:,.0f} MiB of file contents (measured in {walk_s:.1f} s)")
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
