"""Throughput of the rule labeler beside medspaCy's default ConText pipeline.

    python bench/labeler.py [--studies 3000] [--repeats 5] [--medspacy-reports 400]

Both label the FINDINGS and IMPRESSION text of the same synthetic MIMIC-like reports
(extractors.synthetic.generate_corpus; a small built-in sentence mixer when the
generator is missing) in one process on one core. Figures are the median of several
repeats, in reports per second of CPU time (process time: robust to other jobs on a
shared machine) and of wall time. The floor for ours is 2,000 reports/s.

medspaCy runs ``medspacy.load()`` (its tokenizer, PyRuSH sentencizer, target matcher and
default ConText rules) plus one target rule per CheXpert lexicon phrase. Its labels are
aggregated like ours (positive > uncertain > negative) and both are scored against the
corpus's chexpert CSV, so the ratio is between two labelers doing the same job.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, as the floor says
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FLOOR_REPORTS_PER_S = 2000.0


def corpus(studies: int, seed: int) -> tuple[list[tuple[str, list[tuple[str, int, int]]]], dict | None]:
    """(text, sections) per report, and gold labels (study index -> observation -> value)."""
    from extractors.sections import parse_sections

    try:
        from extractors.synthetic import generate_corpus
    except ImportError:
        generate_corpus = None
    if generate_corpus is None:
        return _mixed_reports(studies, seed), None
    from extractors.chexpert_csv import read_chexpert_csv
    from extractors.label_eval import long_to_labels, read_mimic_reports

    with tempfile.TemporaryDirectory(prefix="radchain-bench-") as tmp:
        generate_corpus(Path(tmp), studies, seed=seed, images=False)
        reports, csv_path = read_mimic_reports(tmp)
        gold_by_id = long_to_labels(read_chexpert_csv(csv_path))
    items = [(text, [(s.name, s.start, s.end) for s in parse_sections(text)]) for _, text in reports]
    gold = {i: gold_by_id.get(sid, {}) for i, (sid, _) in enumerate(reports)}
    return items, gold


def _mixed_reports(n: int, seed: int) -> list[tuple[str, list[tuple[str, int, int]]]]:
    sentences = [
        "No pneumothorax.", "There is a small left pleural effusion.", "Heart size is normal.",
        "Mild bibasilar atelectasis.", "No focal consolidation, pleural effusion, or pneumothorax.",
        "Right PICC line tip in the SVC.", "Opacity at the right base may represent atelectasis versus pneumonia.",
        "The cardiomediastinal silhouette is stable.", "Mild pulmonary vascular congestion.",
        "Degenerative changes of the thoracic spine.", "Pneumonia cannot be excluded.",
    ]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        findings = "  ".join(rng.sample(sentences, 6))
        impression = "  ".join(rng.sample(sentences, 2))
        text = f" FINDINGS:\n \n {findings}\n \n IMPRESSION:\n \n {impression}\n"
        f0 = text.index(findings)
        i0 = text.index(impression, f0 + len(findings))
        out.append((text, [("findings", f0, f0 + len(findings)), ("impression", i0, i0 + len(impression))]))
    return out


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median CPU seconds and median wall seconds of ``fn()`` over ``repeats`` runs."""
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return statistics.median(cpu), statistics.median(wall)


# ---- medspaCy ---------------------------------------------------------------------------

def medspacy_labeler():
    """A function (text, sections) list -> per-report observation values, via medspaCy."""
    try:
        from loguru import logger

        logger.disable("PyRuSH")  # PyRuSH logs every sentence split at DEBUG level
    except ImportError:
        pass
    import medspacy
    from medspacy.ner import TargetRule

    from extractors.mentions import OTHER_FINDING, _lexicon

    nlp = medspacy.load()
    rules = []
    for core, phrases in _lexicon(False).phrases.items():
        for ph in phrases:
            if ph.exclusion or ph.observation == OTHER_FINDING:
                continue
            words = core.split()
            pattern = [{"LOWER": w} for w in words[:-1]]
            pattern.append({"LOWER": {"REGEX": f"^{words[-1]}"}} if not ph.right_boundary else {"LOWER": words[-1]})
            rules.append(TargetRule(core, ph.observation, pattern=pattern))
    nlp.get_pipe("medspacy_target_matcher").add(rules)
    rank = {"positive": 3, "uncertain": 2, "negative": 1}

    def label(items):
        pieces = [(text[s:e], i) for i, (text, secs) in enumerate(items)
                  for name, s, e in secs if name in ("findings", "impression")]
        out = [dict() for _ in items]
        for doc, i in nlp.pipe(pieces, as_tuples=True):
            for ent in doc.ents:
                value = "uncertain" if ent._.is_uncertain else "negative" if ent._.is_negated else "positive"
                if rank[value] > rank.get(out[i].get(ent.label_), 0):
                    out[i][ent.label_] = value
        return out

    return label


def exact_rate(predicted: list[dict], gold: dict | None, observations: list[str]) -> float | None:
    if not gold:
        return None
    hits = 0
    for i, pred in enumerate(predicted):
        g = gold.get(i, {})
        hits += all(pred.get(o, "not_mentioned") == g.get(o, "not_mentioned") for o in observations)
    return hits / len(predicted) if predicted else None


def long_sentence(kb: int, repeats: int) -> dict:
    """One report of ``kb`` KB written as a single sentence (clauses joined by commas, no full
    stop: a pasted export), against the same clauses as separate sentences. The labeler resolves a
    mention against the cues of its sentence, so the single sentence holds thousands of cues."""
    from extractors.labeler import label_report

    clause = "there is a small left pleural effusion and mild cardiomegaly without pneumothorax"
    n = kb * 1000 // (len(clause) + 2)
    one = "FINDINGS: " + ", ".join([clause] * n) + "."
    many = "FINDINGS: " + ". ".join([clause.capitalize()] * n) + "."
    cpu_one, _ = timed(lambda: label_report(one), repeats)
    cpu_many, _ = timed(lambda: label_report(many), repeats)
    return {"long_report_kb": round(len(one) / 1000), "long_single_sentence_s_cpu": round(cpu_one, 3),
            "long_as_sentences_s_cpu": round(cpu_many, 3),
            "long_single_over_sentences": round(cpu_one / cpu_many, 2)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--medspacy-reports", type=int, default=400, help="medspaCy is slow: label this many")
    parser.add_argument("--medspacy-repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--no-medspacy", action="store_true")
    parser.add_argument("--long-kb", type=int, default=900,
                        help="also time one report of this many KB with no full stop (0: skip)")
    args = parser.parse_args(argv)

    from extractors.labeler import label_reports
    from schemas.labels import OBSERVATIONS

    items, gold = corpus(args.studies, args.seed)
    label_reports(items[:50])  # warm-up: builds the lexicon, the spaCy pipeline and the matcher
    cpu, wall = timed(lambda: label_reports(items), args.repeats)
    ours = label_reports(items)
    ours_values = [{o: e.value for o, e in lab.items() if e.value != "not_mentioned"} for lab in ours]
    targets = [o for o in OBSERVATIONS if o != "No Finding"]  # medspaCy has no No Finding logic
    result = {
        "reports": len(items),
        "source": "extractors.synthetic" if gold is not None else "built-in sentence mixer",
        "ours_reports_per_s_cpu": round(len(items) / cpu, 1),
        "ours_reports_per_s_wall": round(len(items) / wall, 1),
        "ours_exact_match_13": exact_rate(ours_values, gold, targets),
        "floor_reports_per_s": FLOOR_REPORTS_PER_S,
    }
    if not args.no_medspacy:
        subset = items[: args.medspacy_reports]
        med = medspacy_labeler()
        med(subset[:10])
        m_cpu, m_wall = timed(lambda: med(subset), args.medspacy_repeats)
        med_values = med(subset)
        result.update({
            "medspacy_reports": len(subset),
            "medspacy_reports_per_s_cpu": round(len(subset) / m_cpu, 1),
            "medspacy_reports_per_s_wall": round(len(subset) / m_wall, 1),
            "medspacy_exact_match_13": exact_rate(med_values, gold, targets),
            "ours_exact_match_13_same_subset": exact_rate(ours_values[: len(subset)], gold, targets),
        })
        result["speedup_cpu"] = round(result["ours_reports_per_s_cpu"] / result["medspacy_reports_per_s_cpu"], 1)
    result["meets_floor"] = result["ours_reports_per_s_cpu"] >= FLOOR_REPORTS_PER_S
    if args.long_kb:
        result.update(long_sentence(args.long_kb, args.medspacy_repeats))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["meets_floor"] else 1)
