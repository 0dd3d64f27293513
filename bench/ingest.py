"""Benchmark of the ingest stage: end to end (direct and through Prefect) and the parser alone.

    python bench/ingest.py --studies 20000            # generate a corpus in a temp folder
    python bench/ingest.py --corpus DIR               # reuse a MIMIC-layout corpus

Prints reports/s of ingest + sections end to end (file reads and Parquet writes included)
called through flows.pipeline.run_stages without Prefect and through the Prefect flow,
their ratio, the section parser alone (median of 5 repeats) and peak RSS.
Floors on a 2-core machine: end to end >= 10,000 reports/s, parser >= 30,000 reports/s,
peak RSS < 1.5 GB at MIMIC-CXR size (227,835 studies).
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Offline, quiet Prefect in a throwaway home (set before Prefect is imported).
_TMP = Path(tempfile.mkdtemp(prefix="radchain-bench-"))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
from radchain.runtime import prepare_environment  # noqa: E402
from radchain.settings import Settings  # noqa: E402

prepare_environment(Settings(home=_TMP))

FLOOR_END_TO_END = 10_000
FLOOR_PARSER = 30_000
FLOOR_RSS_MB = 1536

# ---- a small local MIMIC-layout writer (used when extractors.synthetic is not available) -----

_FINDINGS = [
    "The lungs are clear without focal consolidation.", "No pleural effusion or pneumothorax is seen.",
    "Heart size is normal.", "The cardiomediastinal silhouette is within normal limits.",
    "There is mild pulmonary vascular congestion.", "Small left pleural effusion is new.",
    "Right lower lobe opacity may reflect atelectasis or pneumonia.", "Moderate cardiomegaly is stable.",
    "Endotracheal tube terminates 4 cm above the carina.", "Right PICC line tip is in the mid SVC.",
    "Degenerative changes are seen in the thoracic spine.", "There is no acute osseous abnormality.",
    "Bibasilar atelectasis is present.", "Interval increase in the right pleural effusion.",
]
_IMPRESSIONS = [
    "No acute cardiopulmonary process.", "Small left pleural effusion.", "Mild pulmonary edema.",
    "Right lower lobe pneumonia.", "Stable cardiomegaly without edema.", "Support devices in standard position.",
]
_IMPRESSION_HEADERS = ["IMPRESSION"] * 20 + ["IMPRESSON", "CONCLUSION", "IMPRESION"]
_VIEWS = ["PA", "LATERAL", "AP", "LL"]


def _wrap(text: str, width: int = 78) -> list[str]:
    lines, line = [], ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return lines + ([line] if line else [])


def _report(rng: random.Random) -> str:
    """About 1 KB in MIMIC byte layout; 3% have no headers at all."""
    findings = " ".join(rng.sample(_FINDINGS, rng.randint(3, 8)))
    impression = " ".join(rng.sample(_IMPRESSIONS, rng.randint(1, 2)))
    out = [" " * 33 + "FINAL REPORT"]
    if rng.random() < 0.03:
        out += [f" {line}" for line in _wrap(findings)] + [" "] + [f" {line}" for line in _wrap(impression)]
        return "\n".join(out) + "\n"
    out += [" EXAMINATION:  CHEST (PA AND LAT)", " ",
            f" INDICATION:  ___ year old {rng.choice(['woman', 'man'])} with {rng.choice(['cough', 'fever', 'sob'])}"
            "  // ?pneumonia", " ", " TECHNIQUE:  Chest PA and lateral", " ", " COMPARISON:  ___", " ",
            " FINDINGS: ", " "]
    out += [f" {line}" for line in _wrap(findings)]
    out += [" ", f" {rng.choice(_IMPRESSION_HEADERS)}: ", " "] + [f" {line}" for line in _wrap(impression)]
    return "\n".join(out) + "\n"


def write_local_corpus(root: Path, n_studies: int, seed: int = 13) -> None:
    rng = random.Random(seed)
    files = root / "files"
    meta = ["dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,"
            "StudyDate,StudyTime"]
    split = ["dicom_id,study_id,subject_id,split"]
    study, patient, written = 50_000_000, 10_000_000, 0
    while written < n_studies:
        patient += rng.randint(1, 50)
        pdir = files / f"p{str(patient)[:2]}" / f"p{patient}"
        pdir.mkdir(parents=True, exist_ok=True)
        which = rng.choices(["train", "validate", "test"], [90, 5, 5])[0]
        for k in range(min(rng.randint(1, 6), n_studies - written)):
            study += rng.randint(1, 40)
            (pdir / f"s{study}.txt").write_text(_report(rng), encoding="utf-8")
            for _ in range(rng.randint(1, 3)):
                dicom = "%08x-%08x-%08x-%08x-%08x" % tuple(rng.getrandbits(32) for _ in range(5))
                meta.append(f"{dicom},{patient},{study},CHEST (PA AND LAT),{rng.choice(_VIEWS)},3056,2544,"
                            f"{2150 + k}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d},"
                            f"{rng.randint(0, 235959)}.{rng.randint(0, 999)}")
                split.append(f"{dicom},{study},{patient},{which}")
            written += 1
    (root / "mimic-cxr-2.0.0-metadata.csv").write_text("\n".join(meta) + "\n")
    (root / "mimic-cxr-2.0.0-split.csv").write_text("\n".join(split) + "\n")


def make_corpus(root: Path, n_studies: int) -> str:
    """extractors.synthetic.generate_corpus when it exists and fits, else the local writer."""
    try:
        from extractors.synthetic import generate_corpus  # type: ignore[import-not-found]
    except ImportError:
        generate_corpus = None
    if generate_corpus is not None:
        try:
            generate_corpus(root, studies=n_studies, seed=13)  # the signature `radchain run` uses
            return "extractors.synthetic.generate_corpus"
        except TypeError:  # a different signature: fall back rather than guess
            shutil.rmtree(root, ignore_errors=True)
    write_local_corpus(root, n_studies)
    return "bench/ingest.py local writer"


# ---- measurements ---------------------------------------------------------------------------

def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def bench_parser(corpus: Path, sample: int) -> tuple[float, int]:
    from extractors.sections import parse_sections
    from extractors.sources import MimicTree

    paths = MimicTree(corpus).list_reports()[:sample]
    texts = [(corpus / p).read_text(encoding="utf-8") for p in paths]
    rates = []
    for _ in range(5):
        t0 = time.perf_counter()
        for t in texts:
            parse_sections(t)
        rates.append(len(texts) / (time.perf_counter() - t0))
    return statistics.median(rates), len(texts)


def bench_direct(corpus: Path, home: Path, batch_size: int) -> tuple[float, float, int]:
    """(wall s, CPU s of this process, reports) of run_stages without Prefect."""
    from flows.pipeline import make_context, run_stages
    from flows.stages.common import SourceSpec
    from radchain.settings import Settings

    ctx = make_context(Settings(home=home, batch_size=batch_size), SourceSpec(path=corpus))
    t0, c0 = time.perf_counter(), time.process_time()
    results = run_stages(ctx, ["ingest"])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return wall, cpu, sum(r.inputs for r in results["ingest"])


def bench_prefect(corpus: Path, home: Path, batch_size: int) -> tuple[float, int]:
    """(wall s, reports) of the Prefect flow; the first call also starts Prefect's local API."""
    os.environ["RADCHAIN_HOME"] = str(home)
    os.environ["RADCHAIN_BATCH_SIZE"] = str(batch_size)
    from radchain.settings import reset_settings_cache

    reset_settings_cache()
    from flows.pipeline import pipeline_flow
    from flows.stages.common import SourceSpec

    t0 = time.perf_counter()
    results = pipeline_flow(source=SourceSpec(path=corpus), stages=["ingest"])
    wall = time.perf_counter() - t0
    return wall, sum(r.inputs for r in results["ingest"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", type=int, default=20_000, help="studies to generate (ignored with --corpus)")
    ap.add_argument("--corpus", type=Path, help="an existing MIMIC-layout corpus to reuse")
    ap.add_argument("--keep", type=Path, help="generate the corpus here and keep it")
    ap.add_argument("--batch-size", type=int, default=5000)
    ap.add_argument("--parser-sample", type=int, default=20_000, help="reports held in memory for the parser run")
    ap.add_argument("--skip-prefect", action="store_true")
    args = ap.parse_args(argv)

    if args.corpus:
        corpus, origin = args.corpus.resolve(), "reused"
    else:
        corpus = (args.keep or _TMP / "corpus").resolve()
        t0 = time.perf_counter()
        origin = make_corpus(corpus, args.studies)
        print(f"corpus: {args.studies} studies by {origin} in {time.perf_counter() - t0:.1f}s at {corpus}")

    parser_rate, n_parsed = bench_parser(corpus, args.parser_sample)
    wall, cpu, n = bench_direct(corpus, _TMP / "home-direct", args.batch_size)
    rss_direct = peak_rss_mb()
    direct_rate = n / wall
    print(f"reports: {n}  batch size: {args.batch_size}  cores: {os.cpu_count()}  "
          f"load average: {os.getloadavg()[0]:.2f}")
    print(f"parser alone:            {parser_rate:>10,.0f} reports/s  (median of 5, {n_parsed} reports)"
          f"  floor {FLOOR_PARSER:,}  {'OK' if parser_rate >= FLOOR_PARSER else 'BELOW'}")
    print(f"ingest direct:           {direct_rate:>10,.0f} reports/s  ({wall:.2f}s wall, run_stages without Prefect;"
          f" {n / cpu:,.0f}/s per CPU second)"
          f"  floor {FLOOR_END_TO_END:,}  {'OK' if direct_rate >= FLOOR_END_TO_END else 'BELOW'}")
    print(f"peak RSS after direct:   {rss_direct:>10,.0f} MB")
    ok = parser_rate >= FLOOR_PARSER and direct_rate >= FLOOR_END_TO_END
    if not args.skip_prefect:
        cold, pn = bench_prefect(corpus, _TMP / "home-prefect", args.batch_size)
        warm, pn2 = bench_prefect(corpus, _TMP / "home-prefect", args.batch_size)
        assert pn == n == pn2, (pn, pn2, n)
        print(f"ingest Prefect flow:     {pn / cold:>10,.0f} reports/s  ({cold:.2f}s, first flow: starts Prefect's"
              f" local API)  Prefect/direct time ratio {cold / wall:.2f}")
        print(f"ingest Prefect (warm):   {pn / warm:>10,.0f} reports/s  ({warm:.2f}s, second flow in the process)"
              f"  Prefect/direct time ratio {warm / wall:.2f}")
    rss = peak_rss_mb()
    print(f"peak RSS:                {rss:>10,.0f} MB (this process, whole run)"
          f"  limit {FLOOR_RSS_MB:,}  {'OK' if rss < FLOOR_RSS_MB else 'ABOVE'}")
    ok = ok and rss < FLOOR_RSS_MB
    shutil.rmtree(_TMP, ignore_errors=True)  # warehouses, Prefect home and a generated corpus
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
