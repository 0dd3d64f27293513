"""The synthetic MIMIC-CXR-style corpus: layout, bytes, CSVs, label consistency, CLI."""

from __future__ import annotations

import csv
import hashlib
import itertools
import re
from collections import defaultdict
from pathlib import Path

import pytest
from typer.testing import CliRunner

from extractors.resources import REPORTS
from extractors.synthetic import (
    CHEXPERT_COLUMNS,
    FINAL_REPORT_LINE,
    MARKER_NAME,
    METADATA_COLUMNS,
    MIMIC_CSV_NAMES,
    SPLIT_COLUMNS,
    TEMPORAL_COLUMNS,
    FindingAttrs,
    generate_corpus,
    wrap_sentences,
)
from extractors.synthetic_phrases import (
    COMBOS,
    NEG,
    OBS_CODES,
    POS,
    PROGRESSION,
    SINGLES,
    UNC,
    knowledge_map,
    mention_lexicon,
    mentioned_observations,
)

CODE_OF = {name: code for code, name in OBS_CODES.items()}
REPORT_PATH = re.compile(r"files/p(1\d)/p(1\d{7})/s(5\d{7})\.txt$")
DICOM_ID = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}$")
NEG_CUE = re.compile(r"\b(no|without|not|normal|unremarkable)\b", re.I)
UNC_CUE = re.compile(r"cannot be excluded|may represent|\bpossible\b|concerning for|\bversus\b", re.I)
# Cues that reach back to a mention before them ("Heart size is normal", "... cannot be excluded"),
# and "versus", which hedges the term right before it ("atelectasis versus pneumonia").
POST_CUE = re.compile(r"\b(not|normal|unremarkable)\b|cannot be excluded|^\w+(?: \w+)? versus\b", re.I)


# ---------------------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("small") / "corpus"
    return out, generate_corpus(out, studies=300, seed=13, images=True)


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("big") / "corpus"
    return out, generate_corpus(out, studies=2500, seed=7, images=False)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def report_path(out: Path, subject: str, study: str) -> Path:
    return out / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def clauses(report: str) -> list[str]:
    """Sentence-like pieces: sentences, header/body splits, and 'but' clauses."""
    flat = " ".join(line.strip() for line in report.splitlines())
    return [c for c in re.split(r"\.\s+|\.$|:\s+|\s+but\s+", flat) if c.strip()]


def first_mention(clause: str, code: str) -> int | None:
    """Where the earliest mention phrase of ``code`` starts in ``clause`` (lexicon match)."""
    mentions, excluded, regexes = mention_lexicon()[code]
    hay = " " + clause.lower() + " "
    for phrase in excluded:
        hay = hay.replace(phrase, " " * len(phrase))
    hits = [i for p in mentions if (i := hay.find(p)) >= 0]
    hits += [m.start() for r in regexes if (m := r.search(hay))]
    return min(hits) - 1 if hits else None


def is_positive_statement(clause: str, code: str) -> bool:
    """No negation or uncertainty cue before the mention, and none reaching back to it."""
    at = first_mention(clause, code)
    before, after = clause[:at], clause[at:]
    return not (NEG_CUE.search(before) or UNC_CUE.search(before) or POST_CUE.search(after))


def check_report(report: str, labels: dict[str, str]) -> list[str]:
    """Problems with how the report states its CheXpert labels (empty when consistent)."""
    problems = []
    pieces = clauses(report)
    for column in CHEXPERT_COLUMNS:
        code, value = CODE_OF[column], labels[column]
        if code == "nf":
            continue
        mentioning = [c for c in pieces if code in mentioned_observations(c)]
        if value == "":
            if mentioning:
                problems.append(f"{column} blank but mentioned: {mentioning[0]!r}")
            continue
        if not mentioning:
            problems.append(f"{column}={value} never mentioned")
            continue
        if value == "1.0":
            positive = [c for c in mentioning if is_positive_statement(c, code)]
            if not positive:
                problems.append(f"{column}=1.0 only stated with a cue before it: {mentioning}")
        elif value == "0.0":
            bad = [c for c in mentioning if not NEG_CUE.search(c) or is_positive_statement(c, code)]
            if bad:
                problems.append(f"{column}=0.0 stated without negation: {bad[0]!r}")
        elif value == "-1.0":
            bad = [c for c in mentioning if not UNC_CUE.search(c) or is_positive_statement(c, code)]
            if bad:
                problems.append(f"{column}=-1.0 stated without uncertainty: {bad[0]!r}")
    nf_phrases = [c for c in pieces if "nf" in mentioned_observations(c)]
    if labels["No Finding"] == "1.0" and nf_phrases:
        problems.append(f"No Finding=1.0 beside a finding outside the labels: {nf_phrases[0]!r}")
    return problems


# ---------------------------------------------------------------------------------------
# layout and bytes
# ---------------------------------------------------------------------------------------
def test_csv_names_are_mimic_names() -> None:
    assert MIMIC_CSV_NAMES == {
        "metadata": "mimic-cxr-2.0.0-metadata.csv",
        "split": "mimic-cxr-2.0.0-split.csv",
        "chexpert": "mimic-cxr-2.0.0-chexpert.csv",
        "temporal": "ms-cxr-t_temporal-classification.csv",
    }


def test_layout_and_byte_format(small) -> None:
    out, summary = small
    reports = sorted(out.glob("files/p*/p*/s*.txt"))
    assert len(reports) == summary.studies == 300
    example_first_line = (REPORTS / "example_report_from_MIT-LCP_docs.txt").read_text().splitlines()[0]
    assert " " + FINAL_REPORT_LINE == example_first_line
    for path in reports:
        m = REPORT_PATH.search(path.relative_to(out).as_posix())
        assert m, path
        assert m.group(2).startswith(m.group(1))  # pXX is the subject id's first two digits
        raw = path.read_bytes()
        assert raw.endswith(b"\n") and b"\r" not in raw
        lines = raw.decode("utf-8").split("\n")[:-1]
        assert lines[0] == example_first_line
        for line in lines[1:]:
            # every line starts with exactly one space (blank lines are a lone space)
            assert line == " " or (line.startswith(" ") and not line.startswith("  ")), repr(line)
            assert len(line) <= 80, repr(line)
        text = raw.decode()
        assert re.search(r"^ (FINDINGS|IMPRESSION|IMPRESSON|CONCLUSION|FINDINGS AND IMPRESSION|[A-Z ]+RADIOGRAPHS?):",
                         text, re.M), text
        assert "___" in text  # de-identification placeholders


def test_sections_headers_and_variants(big) -> None:
    out, _ = big
    headers: dict[str, int] = defaultdict(int)
    numbered = no_findings = no_impression = 0
    for path in out.glob("files/p*/p*/s*.txt"):
        text = path.read_text()
        found = set(re.findall(r"^ ([A-Z][A-Z &]+):", text, re.M))
        for h in found:
            headers[h] += 1
        numbered += bool(re.search(r"^ 2\.  ", text, re.M))
        no_findings += not (found & {"FINDINGS", "FINDINGS AND IMPRESSION"} or any("RADIOGRAPH" in h for h in found))
        no_impression += not (found & {"IMPRESSION", "IMPRESSON", "CONCLUSION", "FINDINGS AND IMPRESSION"})
    for expected in ("EXAMINATION", "INDICATION", "TECHNIQUE", "COMPARISON", "FINDINGS", "IMPRESSION",
                     "IMPRESSON", "CONCLUSION", "FINDINGS AND IMPRESSION", "HISTORY", "REASON FOR EXAMINATION"):
        assert headers[expected] > 0, (expected, dict(headers))
    assert headers["IMPRESSION"] > 10 * headers["IMPRESSON"]  # typos stay rare
    assert numbered > 0 and no_findings > 0 and no_impression > 0


def test_example_report_format_reproduced(small) -> None:
    """A standard report has the example's exact shape: blank line after 'FINDINGS: '."""
    out, _ = small
    for path in out.glob("files/p*/p*/s*.txt"):
        text = path.read_text()
        if " FINDINGS: \n \n" in text and " EXAMINATION:  CHEST (PA AND LAT)\n \n INDICATION:  " in text:
            assert text.startswith(" " + FINAL_REPORT_LINE + "\n EXAMINATION:  ")
            return
    pytest.fail("no report in the standard layout")


def test_wrap_keeps_two_spaces_between_sentences_and_width() -> None:
    lines = wrap_sentences(["Large left pleural effusion is new.", "Small right effusion is new."] * 4)
    assert all(len(line) <= 78 for line in lines)
    assert "new.  Small" in " ".join(lines) or "new.  Large" in " ".join(lines)
    assert wrap_sentences(["a b"], "FINDINGS:") == ["FINDINGS:  a b"]
    assert wrap_sentences([]) == []


# ---------------------------------------------------------------------------------------
# determinism and re-runs
# ---------------------------------------------------------------------------------------
def test_same_seed_same_bytes_and_different_seed_differs(tmp_path) -> None:
    a = generate_corpus(tmp_path / "a", studies=60, seed=5)
    b = generate_corpus(tmp_path / "b", studies=60, seed=5)
    c = generate_corpus(tmp_path / "c", studies=60, seed=6)
    da, db, dc = tree_digest(a.out), tree_digest(b.out), tree_digest(c.out)
    assert da == db
    assert da != dc
    assert any(name.endswith(".jpg") for name in da)


def test_bytes_do_not_depend_on_the_hash_seed(tmp_path) -> None:
    """Separate interpreters with different PYTHONHASHSEED write the same corpus."""
    import os
    import subprocess
    import sys

    code = "import sys; from extractors.synthetic import generate_corpus; generate_corpus(sys.argv[1], 40, seed=11)"
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        subprocess.run([sys.executable, "-c", code, str(tmp_path / hash_seed)], env=env, check=True, timeout=120)
    assert tree_digest(tmp_path / "1") == tree_digest(tmp_path / "2")


def test_rerun_replaces_its_own_files_only(tmp_path) -> None:
    out = tmp_path / "corpus"
    generate_corpus(out, studies=40, seed=1, images=False)
    (out / "notes.txt").write_text("mine")
    summary = generate_corpus(out, studies=10, seed=1, images=False)
    assert len(list(out.glob("files/p*/p*/s*.txt"))) == 10 == summary.studies
    assert (out / "notes.txt").read_text() == "mine"
    assert '"complete": true' in (out / MARKER_NAME).read_text()


def test_progress_and_bad_input(tmp_path) -> None:
    seen: list[int] = []
    generate_corpus(tmp_path / "p", studies=25, seed=2, images=False, progress=seen.append)
    assert seen and seen[-1] == 25 and seen == sorted(seen)
    (tmp_path / "afile").write_text("x")
    for kwargs in ({"studies": 0}, {"studies": -3}, {"studies": "10"}, {"studies": 5, "image_size": 2},
                   {"studies": 5, "seed": "x"}):
        with pytest.raises(ValueError):
            generate_corpus(tmp_path / "q", **kwargs)
    with pytest.raises(ValueError):
        generate_corpus(tmp_path / "afile", studies=5)


# ---------------------------------------------------------------------------------------
# CSVs
# ---------------------------------------------------------------------------------------
def test_csv_columns_and_cross_references(small) -> None:
    out, summary = small
    meta, split = read_csv(summary.metadata_csv), read_csv(summary.split_csv)
    chex, temporal = read_csv(summary.chexpert_csv), read_csv(summary.temporal_csv)
    assert list(meta[0]) == list(METADATA_COLUMNS)
    assert list(split[0]) == list(SPLIT_COLUMNS)
    assert list(chex[0]) == ["subject_id", "study_id", *CHEXPERT_COLUMNS]
    assert list(temporal[0]) == list(TEMPORAL_COLUMNS)
    assert len(chex) == summary.studies and len(meta) == len(split) == summary.images == summary.images_written
    assert [(r["dicom_id"], r["study_id"], r["subject_id"]) for r in meta] == \
           [(r["dicom_id"], r["study_id"], r["subject_id"]) for r in split]
    per_study: dict[str, int] = defaultdict(int)
    for r in meta:
        assert DICOM_ID.match(r["dicom_id"]), r["dicom_id"]
        assert 10_000_000 <= int(r["subject_id"]) <= 19_999_999 and 50_000_000 <= int(r["study_id"]) <= 59_999_999
        assert re.fullmatch(r"2[12]\d{6}", r["StudyDate"]) and 0 <= float(r["StudyTime"]) < 240000
        assert r["ViewPosition"] in ("PA", "AP", "LATERAL", "LL")
        assert int(r["Rows"]) > 1000 and int(r["Columns"]) > 1000
        jpg = report_path(out, r["subject_id"], r["study_id"]).with_suffix("") / f"{r['dicom_id']}.jpg"
        assert jpg.read_bytes()[:2] == b"\xff\xd8"
        per_study[r["study_id"]] += 1
    assert set(per_study.values()) <= {1, 2, 3} and len(set(per_study.values())) >= 2
    assert len({r["study_id"] for r in chex}) == summary.studies  # unique study ids
    for r in chex:
        assert report_path(out, r["subject_id"], r["study_id"]).exists()
        assert r["study_id"] in per_study
        assert all(r[c] in ("1.0", "0.0", "-1.0", "") for c in CHEXPERT_COLUMNS)


def test_no_images_still_lists_dicoms(big) -> None:
    out, summary = big
    assert summary.images_written == 0 and summary.images >= summary.studies
    assert not list(itertools.islice(out.rglob("*.jpg"), 1))


def test_labels_agree_with_report_text(big) -> None:
    out, summary = big
    rows = read_csv(summary.chexpert_csv)[::2]  # a sample keeps the test quick
    failures = []
    for r in rows:
        text = report_path(out, r["subject_id"], r["study_id"]).read_text()
        problems = check_report(text, r)
        if problems:
            failures.append((r["study_id"], problems, text))
    assert not failures, failures[:3]


def test_label_distribution_is_mimic_like(big) -> None:
    _, summary = big
    n = summary.studies
    counts = summary.label_counts
    assert 0.2 < counts["No Finding"]["1.0"] / n < 0.45
    assert counts["No Finding"]["0.0"] == counts["No Finding"]["-1.0"] == 0
    for column in CHEXPERT_COLUMNS:
        if column != "No Finding":
            assert counts[column]["1.0"] > 0, column  # every observation occurs
    for column in ("Pneumonia", "Atelectasis", "Edema", "Pleural Effusion", "Lung Lesion"):
        assert counts[column]["-1.0"] > 0, column
    for column in ("Pneumothorax", "Pleural Effusion", "Cardiomegaly", "Consolidation", "Edema"):
        assert counts[column]["0.0"] > 0, column


def test_no_finding_follows_chexpert_rule(big) -> None:
    _, summary = big
    for r in read_csv(summary.chexpert_csv):
        others = [c for c in CHEXPERT_COLUMNS if c not in ("No Finding", "Support Devices")]
        if r["No Finding"] == "1.0":
            assert all(r[c] in ("", "0.0") for c in others), r
        else:
            assert r["No Finding"] == ""


def test_tricky_phrasing_occurs(big) -> None:
    out, _ = big
    text = "\n".join(p.read_text() for p in itertools.islice(out.glob("files/p*/p*/s*.txt"), 2500))
    flat = re.sub(r"\s+", " ", text)
    assert "cardiomegaly without" in flat.lower()
    assert "atelectasis versus pneumonia" in flat
    assert re.search(r"No pneumothorax but|There is no pneumothorax, but", flat)
    assert "cannot be excluded" in flat and "concerning for" in flat and "may represent" in flat
    assert re.search(r"No focal consolidation, pleural effusion, or pneumothorax", flat)


def test_split_is_per_patient_and_covers_all_splits(small, big) -> None:
    for _, summary in (small, big):
        by_patient: dict[str, set[str]] = defaultdict(set)
        for r in read_csv(summary.split_csv):
            by_patient[r["subject_id"]].add(r["split"])
        assert all(len(s) == 1 for s in by_patient.values())
        splits = [next(iter(s)) for s in by_patient.values()]
        assert set(splits) == {"train", "validate", "test"}
        share = splits.count("test") / len(splits)
        # under 2000 studies 80/10/10 (validate and test never tiny), else MIMIC's 97/1/2
        assert 0.09 <= share <= 0.11 if summary.studies < 2000 else 0.015 <= share <= 0.03, share
        assert summary.splits == {k: splits.count(k) for k in ("train", "validate", "test")}


def test_tiny_corpus_has_every_split(tmp_path) -> None:
    summary = generate_corpus(tmp_path / "t", studies=3, seed=4, images=False)
    splits = {r["split"] for r in read_csv(summary.split_csv)}
    if summary.patients >= 3:
        assert splits == {"train", "validate", "test"}
    assert "train" in splits


def test_priors_in_time_order_with_comparisons(big) -> None:
    out, summary = big
    studies: dict[str, list[tuple[str, str]]] = defaultdict(list)  # subject -> [(study, datetime)]
    seen = set()
    for r in read_csv(summary.metadata_csv):
        if r["study_id"] not in seen:
            seen.add(r["study_id"])
            studies[r["subject_id"]].append((r["study_id"], f"{r['StudyDate']}{float(r['StudyTime']):013.3f}"))
    sizes = [len(v) for v in studies.values()]
    assert max(sizes) <= 6 and sizes.count(1) > sizes.count(6) and max(sizes) >= 4
    assert len(studies) == summary.patients
    for subject, items in studies.items():
        times = [t for _, t in items]
        assert times == sorted(times) and len(set(times)) == len(times), subject
        for i, (study, _) in enumerate(items):
            comparison = re.search(r"^ COMPARISONS?:  (.*)$", report_path(out, subject, study).read_text(), re.M)
            assert comparison, study
            assert comparison.group(1).startswith("None") == (i == 0), (study, comparison.group(1))


def test_temporal_rows_reference_consecutive_studies_and_text(big) -> None:
    out, summary = big
    order: dict[str, list[str]] = defaultdict(list)
    frontal: dict[str, str] = {}
    for r in read_csv(summary.metadata_csv):
        if r["study_id"] not in frontal:
            frontal[r["study_id"]] = r["dicom_id"]
            order[r["subject_id"]].append(r["study_id"])
    chex = {r["study_id"]: r for r in read_csv(summary.chexpert_csv)}
    cues = knowledge_map()["progression_cues"]
    rows = read_csv(summary.temporal_csv)
    assert len(rows) == summary.temporal_pairs and len(rows) > 20
    columns = {"consolidation_progression": "Consolidation", "edema_progression": "Edema",
               "pleural_effusion_progression": "Pleural Effusion", "pneumonia_progression": "Pneumonia",
               "pneumothorax_progression": "Pneumothorax"}
    seen_labels = set()
    for r in rows:
        seq = order[r["subject_id"]]
        i = seq.index(r["study_id"])
        assert i > 0 and seq[i - 1] == r["previous_study_id"]
        assert frontal[r["study_id"]] == r["dicom_id"] and frontal[r["previous_study_id"]] == r["previous_dicom_id"]
        text = re.sub(r"\s+", " ", report_path(out, r["subject_id"], r["study_id"]).read_text()).lower()
        labelled = {c: v for c, v in r.items() if c in columns and v}
        assert labelled and set(labelled.values()) <= {"improving", "stable", "worsening"}
        for column, trend in labelled.items():
            seen_labels.add(trend)
            assert chex[r["study_id"]][columns[column]] == "1.0"
            assert any(cue in text for cue in cues[trend]), (trend, text)
    assert seen_labels == {"improving", "stable", "worsening"}


# ---------------------------------------------------------------------------------------
# templates against the lexicons
# ---------------------------------------------------------------------------------------
def _attr_samples() -> dict[str, list[FindingAttrs]]:
    return {code: [FindingAttrs(code, loc, size, devices=("ett",)) for loc in range(7) for size in range(4)]
            for code in OBS_CODES}


def test_every_template_names_exactly_what_it_declares() -> None:
    samples = _attr_samples()
    templates = [t for ts in SINGLES.values() for t in ts] + list(COMBOS)
    for tpl in templates:
        declared = {code for code, _ in tpl.expresses}
        for i in range(0, 28, 3):
            text = tpl.text.format_map({code: attrs[i] for code, attrs in samples.items()})
            assert mentioned_observations(text) - {"nf"} == declared, (text, declared)
    for (code, _), texts in PROGRESSION.items():
        for text in texts:
            filled = text.format_map({c: attrs[4] for c, attrs in samples.items()})
            assert mentioned_observations(filled) - {"nf"} == {code}, filled


def test_each_status_has_a_template_usable_in_a_normal_study() -> None:
    for (code, status), templates in SINGLES.items():
        assert templates
        if status == NEG:
            assert any("nf" not in mentioned_observations(t.text) for t in templates), code
    assert {s for _, s in SINGLES} == {POS, NEG, UNC}


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------
def test_cli_generates_and_rejects_bad_arguments(tmp_path) -> None:
    from flows.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["demo-data", "--out", str(tmp_path / "cli"), "--studies", "12", "--seed", "3",
                             "--no-images"])
    assert ok.exit_code == 0, ok.output
    assert "studies" in ok.output and (tmp_path / "cli" / MIMIC_CSV_NAMES["chexpert"]).exists()
    (tmp_path / "plainfile").write_text("x")
    for args in (["--studies", "0"], ["--studies", "-4"], ["--studies", "5", "--image-size", "1"],
                 ["--out", str(tmp_path / "plainfile"), "--studies", "5"]):
        if "--out" not in args:
            args = ["--out", str(tmp_path / "bad"), *args]
        result = runner.invoke(app, ["demo-data", *args])
        assert result.exit_code == 2, (args, result.output)
        assert "error" in result.output.lower()
        assert "Traceback" not in result.output
