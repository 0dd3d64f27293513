"""The five VQA task builders: sampling invariants, determinism, temporal labels, rejections."""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extractors.tasks import (
    TaskCaps, TaskConfig, build_tasks, check_patient_splits, classify_progression, format_question, id_key,
    label_sources, prepare, read_temporal_csv,
)
from extractors.tasks.multi import wrong_sets
from schemas.labels import OBSERVATIONS, TARGET_OBSERVATIONS, TEMPORAL_OBSERVATIONS
from schemas.vqa import ANSWER_INSTRUCTION, VqaSample

VALUES = ("positive", "negative", "uncertain", "not_mentioned")
CUES = ("Increased {f}.", "Decreased {f}.", "Unchanged {f}.", "{f} is present.", "No new {f}.")


# ---- a small synthetic corpus -------------------------------------------------------------------

def make_corpus(n_patients: int = 150, seed: int = 0) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Patients with 1-3 studies each (prior links), two images per study, 14 labels per study."""
    rng = random.Random(seed)
    studies, images, labels = [], [], []
    n = 0
    for p in range(n_patients):
        patient = f"{10000000 + p}"
        split = rng.choices(["train", "validate", "test"], [0.6, 0.2, 0.2])[0]
        prior = None
        for order in range(rng.randint(1, 3)):
            n += 1
            study = f"{50000000 + n}"
            studies.append(dict(study_id=study, patient_id=patient, study_order=order, prior_study_id=prior,
                                split=split, n_images=2, has_findings=True, has_impression=True))
            for j, view in enumerate(("LATERAL", "PA")):
                images.append(dict(dicom_id=f"dcm{n}-{j}", study_id=study, path=f"files/p{patient}/s{study}/{j}.jpg",
                                   view_position=view, exists=True))
            values = {o: rng.choices(VALUES, [0.2, 0.35, 0.05, 0.4])[0] for o in TARGET_OBSERVATIONS}
            if not any(v == "positive" for v in values.values()) and rng.random() < 0.5:
                values["No Finding"] = "positive"
            for obs in OBSERVATIONS:
                value = values.get(obs, "not_mentioned")
                sentence = None
                if value in ("positive", "negative"):
                    sentence = rng.choice(CUES).format(f=obs.lower()) if value == "positive" else f"No {obs.lower()}."
                labels.append(dict(study_id=study, observation=obs, value=value, sentence=sentence))
            prior = study
    return pl.DataFrame(labels), pl.DataFrame(studies), pl.DataFrame(images)


@pytest.fixture(scope="module")
def corpus():
    return make_corpus()


@pytest.fixture(scope="module")
def built(corpus):
    return build_tasks(*corpus, config=TaskConfig(seed=7, caps=TaskCaps(binary=20, single=6, multi=15, open=25,
                                                                        temporal=9)))


def label_map(labels: pl.DataFrame) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = defaultdict(dict)
    for sid, obs, value in labels.select("study_id", "observation", "value").iter_rows():
        out[sid][obs] = value
    return out


# ---- question format ----------------------------------------------------------------------------

def test_question_embeds_options_and_instruction(built):
    sample = built.samples["binary"][0]
    finding = sample["findings"][0]
    assert sample["question"] == (
        f"Does this chest X-ray show {finding.lower()}?\nOptions:\nA) Yes\nB) No\n{ANSWER_INSTRUCTION}"
    )
    assert sample["options"] == ["Yes", "No"]
    assert format_question("Which findings are in this chest X-ray?", []) == (
        f"Which findings are in this chest X-ray?\n{ANSWER_INSTRUCTION}"
    )


def test_every_row_fits_the_table_schema(built):
    lineage = dict(run_id="r", batch_id="b", code_version="v")
    for rows in built.samples.values():
        for row in rows[:20]:
            VqaSample(**row, **lineage)


# ---- binary -------------------------------------------------------------------------------------

def test_binary_is_balanced_per_finding_and_split_and_capped(built, corpus):
    labels = label_map(corpus[0])
    per_group = Counter()
    for s in built.samples["binary"]:
        finding = s["findings"][0]
        value = labels[s["study_id"]][finding]
        assert value in ("positive", "negative")  # uncertain never used
        assert s["answer_letter"] == ("A" if value == "positive" else "B")
        assert s["answer_text"] == ("Yes" if value == "positive" else "No")
        assert s["answer_findings"] == ([finding] if value == "positive" else [])
        per_group[(s["split"], finding, value)] += 1
    groups = {(split, f) for split, f, _ in per_group}
    assert len(groups) > 20
    for split, f in groups:
        assert per_group[(split, f, "positive")] == per_group[(split, f, "negative")] <= 10


# ---- single -------------------------------------------------------------------------------------

def test_single_answer_points_at_true_finding_and_distractors_are_negative(built, corpus):
    labels = label_map(corpus[0])
    assert built.samples["single"]
    for s in built.samples["single"]:
        lab = labels[s["study_id"]]
        assert len(s["options"]) == 4 == len(set(s["options"]))
        truth = s["options"]["ABCD".index(s["answer_letter"])]
        assert truth == s["answer_text"] == s["answer_findings"][0]
        if truth == "No Finding":
            assert lab["No Finding"] == "positive"
            assert not any(lab[o] == "positive" for o in TARGET_OBSERVATIONS)
        else:
            assert lab[truth] == "positive"
        for option in s["options"]:
            if option != truth:
                assert lab[option] == "negative"
    per_class = Counter((s["split"], s["answer_text"]) for s in built.samples["single"])
    assert max(per_class.values()) <= 6
    assert any(s["answer_text"] == "No Finding" for s in built.samples["single"])
    # No Finding is an option only in the single task.
    for task in ("binary", "multi", "open", "temporal"):
        for s in built.samples[task]:
            assert "No Finding" not in s["options"] and all("No Finding" not in o for o in s["options"])


def test_single_skips_a_study_with_fewer_than_three_negatives():
    labels = pl.DataFrame([
        dict(study_id="1", observation="Edema", value="positive", sentence=None),
        dict(study_id="1", observation="Fracture", value="negative", sentence=None),
        dict(study_id="1", observation="Pneumothorax", value="negative", sentence=None),
    ])
    studies = pl.DataFrame([dict(study_id="1", patient_id="p", split="test", has_findings=True, has_impression=True)])
    images = pl.DataFrame([dict(dicom_id="d", study_id="1", path="a.jpg", view_position="PA", exists=True)])
    result = build_tasks(labels, studies, images)
    assert result.samples["single"] == []
    assert result.skip_reasons["single"] == {"TOO_FEW_NEGATIVES": 1}
    assert result.samples["open"]  # the study still yields other tasks


# ---- multi --------------------------------------------------------------------------------------

def test_multi_sets_have_equal_size_and_one_true_set(built, corpus):
    labels = label_map(corpus[0])
    assert built.samples["multi"]
    for s in built.samples["multi"]:
        lab = labels[s["study_id"]]
        positives = [o for o in OBSERVATIONS if lab.get(o) == "positive" and o in TARGET_OBSERVATIONS]
        assert 2 <= len(positives) <= 5
        sets = [o.split(", ") for o in s["options"]]
        assert len(s["options"]) == 4 == len(set(s["options"]))
        assert {len(x) for x in sets} == {len(positives)}
        truth = sets["ABCD".index(s["answer_letter"])]
        assert truth == positives == s["answer_findings"]  # canonical order
        n_negatives = sum(lab.get(o) == "negative" for o in TARGET_OBSERVATIONS)
        negatives_suffice = math.comb(len(positives) + n_negatives, len(positives)) - 1 >= 3
        for wrong in sets:
            if wrong != truth:
                assert set(wrong) != set(truth)
                assert all(lab.get(o) != "uncertain" for o in wrong)
                # built from negatives when they allow 3 distinct sets, else from unmentioned ones too
                wrong_members = [lab.get(o) for o in wrong if o not in positives]
                assert wrong_members
                allowed = {"negative"} if negatives_suffice else {"negative", "not_mentioned"}
                assert set(wrong_members) <= allowed
    assert Counter(s["split"] for s in built.samples["multi"])["train"] <= 15


def test_wrong_sets_fall_back_to_unmentioned_findings_only_when_needed():
    rng = random.Random(0)
    sets = wrong_sets([1, 2], [3], [4, 5], rng)
    assert sets is not None and len(set(sets)) == 3 and (1, 2) not in sets
    assert wrong_sets([1, 2], [3], [], random.Random(0)) is None  # only 2 distinct wrong sets exist
    only_negatives = wrong_sets([1, 2], [3, 4], [9], random.Random(0))
    assert all(9 not in s for s in only_negatives)


# ---- open ---------------------------------------------------------------------------------------

def test_open_answer_is_the_positive_findings(built, corpus):
    labels = label_map(corpus[0])
    assert any(s["answer_text"] == "No Finding" for s in built.samples["open"])
    for s in built.samples["open"]:
        lab = labels[s["study_id"]]
        positives = [o for o in TARGET_OBSERVATIONS if lab[o] == "positive"]
        assert s["options"] == [] and s["answer_letter"] is None
        assert set(s["answer_findings"]) == (set(positives) or {"No Finding"})
        assert s["answer_text"] == ", ".join(s["answer_findings"])
        assert s["question"].startswith("Which findings are in this chest X-ray?\n")
    assert max(Counter(s["split"] for s in built.samples["open"]).values()) <= 25


# ---- temporal -----------------------------------------------------------------------------------

@pytest.mark.parametrize("sentence,value,expected", [
    ("Increased right pleural effusion.", "positive", "worsening"),
    ("Moderate pulmonary edema is unchanged.", "positive", "stable"),
    ("Interval improvement in the left lower lobe consolidation.", "positive", "improving"),
    ("Persistent but increased effusion.", "positive", "worsening"),
    ("The pneumothorax has resolved.", "negative", "improving"),
    ("No new consolidation.", "positive", None),
    ("No pleural effusion, unchanged from prior.", "negative", None),
    ("Increased edema and decreased effusion.", "positive", None),
    ("Right pleural effusion.", "positive", None),
    ("", "positive", None),
])
def test_progression_from_comparison_language(sentence, value, expected):
    label, reason = classify_progression(sentence, value)
    assert label == expected, reason


def test_temporal_from_comparison_language(built, corpus):
    labels, studies, _ = corpus
    prior_of = dict(studies.select("study_id", "prior_study_id").iter_rows())
    sentence_of = {(s, o): t for s, o, t in labels.select("study_id", "observation", "sentence").iter_rows()}
    assert built.samples["temporal"]
    seen = Counter()
    for s in built.samples["temporal"]:
        finding = s["findings"][0]
        assert finding in TEMPORAL_OBSERVATIONS
        assert s["options"] == ["stable", "worsening", "improving"]
        assert s["options"]["ABC".index(s["answer_letter"])] == s["answer_text"]
        assert s["prior_study_id"] == prior_of[s["study_id"]] is not None
        assert s["image_paths"][0].endswith(f"s{s['prior_study_id']}/1.jpg")  # the prior's PA image first
        assert s["image_paths"][1].endswith(f"s{s['study_id']}/1.jpg")
        expected, _ = classify_progression(sentence_of[(s["study_id"], finding)], "positive")
        assert s["answer_text"] == expected
        seen[(s["split"], finding)] += 1
    assert max(seen.values()) <= 9
    assert built.skip_reasons["temporal"]["NO_PRIOR"] > 0


def _csv(rows: list[dict]) -> pl.DataFrame:
    cols = ["dicom_id", "study_id", "subject_id", "previous_dicom_id", "previous_study_id",
            "consolidation_progression", "edema_progression", "pleural_effusion_progression",
            "pneumonia_progression", "pneumothorax_progression"]
    return pl.DataFrame([{c: r.get(c) for c in cols} for r in rows], schema={c: pl.String for c in cols})


def test_temporal_labels_from_ms_cxr_t_csv(corpus, tmp_path):
    labels, studies, images = corpus
    pairs = [r for r in studies.iter_rows(named=True) if r["prior_study_id"]][:3]
    a, b, c = pairs
    csv = _csv([
        # MIMIC-style ids with a prefix and a float artefact still match the warehouse ids
        dict(dicom_id=f"dcm{int(a['study_id']) - 50000000}-0", study_id=f"s{a['study_id']}",
             previous_study_id=f"{a['prior_study_id']}.0", edema_progression="Worsening",
             pneumothorax_progression="stable"),
        # a dicom of another study is ignored: the study's primary image stands in
        dict(dicom_id=f"dcm{int(a['study_id']) - 50000000}-0", study_id=b["study_id"],
             previous_study_id=b["prior_study_id"], consolidation_progression="improving"),
        dict(study_id=c["study_id"], previous_study_id="99999999", edema_progression="stable"),  # prior unknown
        dict(study_id="12345", previous_study_id=b["prior_study_id"], edema_progression="stable"),  # study unknown
    ])
    path = tmp_path / "ms-cxr-t_temporal-classification.csv"
    csv.write_csv(path)
    result = build_tasks(labels, studies, images, temporal_csv=read_temporal_csv(path), config=TaskConfig(seed=1))
    got = {(s["study_id"], s["findings"][0]): s for s in result.samples["temporal"]}
    assert set(got) == {(a["study_id"], "Edema"), (a["study_id"], "Pneumothorax"), (b["study_id"], "Consolidation")}
    assert got[(a["study_id"], "Edema")]["answer_text"] == "worsening"
    assert got[(a["study_id"], "Edema")]["answer_letter"] == "B"
    assert got[(a["study_id"], "Pneumothorax")]["answer_letter"] == "A"
    assert got[(b["study_id"], "Consolidation")]["answer_letter"] == "C"
    # the CSV's current dicom (the lateral image here) is used, not the study's primary image
    assert got[(a["study_id"], "Edema")]["image_paths"][1].endswith(f"s{a['study_id']}/0.jpg")
    assert got[(b["study_id"], "Consolidation")]["image_paths"] == [
        f"files/p{b['patient_id']}/s{b['prior_study_id']}/1.jpg", f"files/p{b['patient_id']}/s{b['study_id']}/1.jpg"]
    reasons = result.skip_reasons["temporal"]
    assert reasons["PRIOR_MISSING"] == 1 and reasons["CSV_STUDY_UNKNOWN"] == 1
    # "both": CSV pairs plus language-derived pairs for what the CSV does not cover
    both = build_tasks(labels, studies, images, temporal_csv=read_temporal_csv(path),
                       config=TaskConfig(seed=1, temporal_source="both"))
    assert len(both.samples["temporal"]) > len(result.samples["temporal"])
    assert got[(a["study_id"], "Edema")]["sample_id"] in {s["sample_id"] for s in both.samples["temporal"]}


def test_temporal_prior_must_belong_to_the_patient_and_have_an_image():
    studies = pl.DataFrame([
        dict(study_id="1", patient_id="p1", split="train", prior_study_id=None, has_findings=True, has_impression=True),
        dict(study_id="2", patient_id="p1", split="train", prior_study_id="1", has_findings=True, has_impression=True),
        dict(study_id="3", patient_id="p2", split="train", prior_study_id="1", has_findings=True, has_impression=True),
        dict(study_id="4", patient_id="p3", split="train", prior_study_id="5", has_findings=True, has_impression=True),
        dict(study_id="5", patient_id="p3", split="train", prior_study_id=None, has_findings=True, has_impression=True),
    ])
    images = pl.DataFrame([dict(dicom_id=f"d{i}", study_id=str(i), path=f"{i}.jpg", view_position="PA", exists=True)
                           for i in (1, 2, 3, 4)])
    labels = pl.DataFrame([dict(study_id=str(i), observation="Edema", value="positive", sentence="Worsening edema.")
                           for i in (2, 3, 4)])
    result = build_tasks(labels, studies, images)
    assert [(s["study_id"], s["image_paths"]) for s in result.samples["temporal"]] == [("2", ["1.jpg", "2.jpg"])]
    reasons = result.skip_reasons["temporal"]
    assert reasons["PRIOR_OTHER_PATIENT"] == 1 and reasons["PRIOR_NO_IMAGE"] == 1
    assert {r.study_id: r.reason_code for r in result.rejections} == {"1": "NO_LABELS", "5": "NO_IMAGE"}


def test_label_sources_and_id_key():
    assert label_sources("auto", True) == ("csv",) and label_sources("auto", False) == ("language",)
    assert label_sources("both", True) == ("csv", "language") and label_sources("csv", False) == ()
    ids = pl.DataFrame({"x": ["s50414267", "50414267.0", " 050414267 ", "p10000032"]})
    assert ids.select(id_key(pl.col("x")))["x"].to_list() == ["50414267", "50414267", "50414267", "10000032"]


def test_unreadable_csv_is_none(tmp_path):
    assert read_temporal_csv(tmp_path / "missing.csv") is None
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    assert read_temporal_csv(bad) is None


# ---- splits, determinism, accounting --------------------------------------------------------------

def test_no_patient_in_two_splits(built):
    check_patient_splits(built.samples)
    splits = defaultdict(set)
    for rows in built.samples.values():
        for s in rows:
            splits[s["patient_id"]].add(s["split"])
    assert all(len(v) == 1 for v in splits.values())
    with pytest.raises(AssertionError):
        check_patient_splits({"binary": [dict(patient_id="p", split="train"), dict(patient_id="p", split="test")]})


def test_patient_with_conflicting_splits_is_rejected(corpus):
    labels, studies, images = corpus
    patient = studies.filter(pl.col("study_order") == 1)["patient_id"][0]
    ids = studies.filter(pl.col("patient_id") == patient)["study_id"].to_list()
    broken = studies.with_columns(
        split=pl.when(pl.col("study_id") == ids[0]).then(pl.lit("test")).otherwise(pl.lit("train"))
    )
    result = build_tasks(labels, broken, images)
    reasons = {r.study_id: r.reason_code for r in result.rejections}
    assert all(reasons[i] == "SPLIT_CONFLICT" for i in ids)
    assert not any(s["patient_id"] == patient for rows in result.samples.values() for s in rows)


def _ids(result) -> list[str]:
    return [s["sample_id"] for rows in result.samples.values() for s in rows]


def test_same_seed_same_samples_other_seed_different(corpus, built):
    caps = TaskCaps(binary=20, single=6, multi=15, open=25, temporal=9)
    again = build_tasks(*corpus, config=TaskConfig(seed=7, caps=caps))
    assert again.samples == built.samples
    labels, studies, images = corpus
    shuffled = build_tasks(labels.sample(fraction=1.0, shuffle=True, seed=3),
                           studies.sample(fraction=1.0, shuffle=True, seed=4),
                           images.sample(fraction=1.0, shuffle=True, seed=5), config=TaskConfig(seed=7, caps=caps))
    assert sorted(_ids(shuffled)) == sorted(_ids(built))  # input row order does not matter
    other = build_tasks(*corpus, config=TaskConfig(seed=8, caps=caps))
    for task in ("binary", "single", "multi", "open", "temporal"):
        a = {s["sample_id"] for s in built.samples[task]}
        b = {s["sample_id"] for s in other.samples[task]}
        assert a != b, task
    assert len(set(_ids(built))) == len(_ids(built))


def test_option_letters_are_spread(built):
    for task in ("single", "multi"):
        letters = Counter(s["answer_letter"] for s in built.samples[task])
        assert len(letters) >= 3, (task, letters)


def test_rejection_reasons_and_accounting():
    def study(sid, **kw):
        row = dict(study_id=sid, patient_id=f"p{sid}", split="train", has_findings=True, has_impression=True)
        return {**row, **kw}

    studies = pl.DataFrame([
        study("ok"), study("notext", has_findings=False, has_impression=False), study("noimage"),
        study("unc"), study("nolabels"), study("nosplit", split=None),
    ])
    images = pl.DataFrame([dict(dicom_id=f"d{s}", study_id=s, path=f"{s}.jpg", view_position="PA", exists=True)
                           for s in ("ok", "notext", "unc", "nolabels", "nosplit")])
    lab = [dict(study_id=s, observation="Edema", value="positive", sentence=None)
           for s in ("ok", "notext", "noimage", "nosplit")]
    lab += [dict(study_id="unc", observation=o, value=v, sentence=None)
            for o, v in (("Edema", "uncertain"), ("Fracture", "not_mentioned"), ("Pleural Other", "positive"))]
    result = build_tasks(pl.DataFrame(lab), studies, images)
    assert {r.study_id: r.reason_code for r in result.rejections} == {
        "notext": "NO_FINDINGS_TEXT", "noimage": "NO_IMAGE", "unc": "ONLY_UNCERTAIN", "nolabels": "NO_LABELS",
        "nosplit": "NO_SPLIT",
    }
    assert (result.inputs, result.outputs, result.rejected, result.skipped) == (6, 1, 5, 0)
    assert result.sample_counts() == {"binary": 0, "single": 0, "multi": 0, "open": 1, "temporal": 0}


def test_accounting_balances_with_skips(built):
    assert built.inputs == built.outputs + built.rejected + built.skipped
    assert built.skipped > 0 and built.outputs > 0
    summary = built.summary()
    assert summary["samples"]["binary"] == len(built.samples["binary"])


def test_primary_image_prefers_existing_frontal_then_falls_back():
    images = pl.DataFrame([
        dict(dicom_id="a1", study_id="a", path="a_lat.jpg", view_position="LATERAL", exists=True),
        dict(dicom_id="a2", study_id="a", path="a_pa_missing.jpg", view_position="PA", exists=False),
        dict(dicom_id="a3", study_id="a", path="a_ap.jpg", view_position="AP", exists=True),
        dict(dicom_id="b1", study_id="b", path="b_lat.jpg", view_position="LATERAL", exists=False),
        dict(dicom_id="b2", study_id="b", path="b_unknown.jpg", view_position=None, exists=False),
    ])
    studies = pl.DataFrame([dict(study_id=s, patient_id=s, split="train", has_findings=True, has_impression=True)
                            for s in ("a", "b")])
    corpus = prepare(None, studies, images)
    # b's files are all missing while the source has images: gated IMAGE_MISSING, no image path for anyone.
    assert dict(corpus.studies.select("study_id", "image_path").iter_rows()) == {"a": "a_ap.jpg", "b": None}
    assert dict(corpus.studies.select("study_id", "gate").iter_rows()) == {"a": None, "b": "IMAGE_MISSING"}
    # A reports-only source (no image file exists at all) falls back to a path, as text-only data.
    only_missing = prepare(None, studies, images.with_columns(exists=pl.lit(False)))
    assert dict(only_missing.studies.select("study_id", "image_path").iter_rows()) == \
        {"a": "a_pa_missing.jpg", "b": "b_unknown.jpg"}
    assert only_missing.studies["gate"].is_null().all()
    # A broken file is never used, and a study left with only broken files is IMAGE_CORRUPT.
    corrupt = images.with_columns(status=pl.Series(["ok", "missing", "ok", "corrupt", "missing"]))
    gated = prepare(None, studies, corrupt).studies
    assert dict(gated.select("study_id", "gate").iter_rows()) == {"a": None, "b": "IMAGE_CORRUPT"}


def test_bad_input_never_crashes():
    assert build_tasks(None, None, None).inputs == 0
    empty = build_tasks(pl.DataFrame(), pl.DataFrame(), pl.DataFrame())
    assert empty.samples["binary"] == [] and empty.rejections == []
    studies = pl.DataFrame({"study_id": ["1", None, "", "1"], "patient_id": [None, "p", "p", "q"],
                            "split": ["train", "train", "test", "test"], "has_findings": [True, None, True, True]})
    labels = pl.DataFrame({"study_id": ["1", "1", "1", None], "observation": ["edema", "Bogus", "Edema", "Fracture"],
                           "value": ["POSITIVE", "positive", "negative", "weird"]})
    images = pl.DataFrame({"study_id": ["1"], "path": ["x.jpg"], "exists": [None]})
    result = build_tasks(labels, studies, images, temporal_csv=pl.DataFrame({"study_id": ["1"], "junk": ["x"]}),
                         config=TaskConfig(temporal_source="both"))
    assert result.inputs == 1
    assert result.inputs == result.outputs + result.rejected + result.skipped
    # "edema" positive and "Edema" negative contradict: the pair counts as uncertain
    assert result.rejections[0].reason_code == "ONLY_UNCERTAIN"


def test_config_from_options():
    cfg = TaskConfig.from_options({"caps": {"binary": 10}, "temporal_source": "both"}, default_seed=5)
    assert cfg.seed == 5 and cfg.caps.binary == 10 and cfg.caps.single == TaskCaps().single
    assert TaskConfig.from_options({"seed": 3, "task_types": ["open"]}).tasks == ("open",)
    for bad in ({"caps": {"binray": 1}}, {"caps": {"binary": -1}}, {"seed": "x"}, {"temporal_source": "x"},
                {"task_types": ["nope"]}, {"caps": [1]}):
        with pytest.raises(ValueError):
            TaskConfig.from_options(bad)


def test_task_subset_and_zero_caps(corpus):
    result = build_tasks(*corpus, config=TaskConfig(tasks=("open",), caps=TaskCaps(open=0)))
    assert list(result.samples) == ["open"] and result.samples["open"] == []
    assert result.outputs == 0 and result.skipped > 0
    assert result.inputs == result.outputs + result.rejected + result.skipped


_ids_st = st.sampled_from(["1", "2", "3", "4", " 5 ", "", None])
_text_st = st.one_of(st.none(), st.text(max_size=12))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    studies=st.lists(st.fixed_dictionaries(dict(
        study_id=_ids_st, patient_id=st.sampled_from(["p", "q", None]), prior_study_id=_ids_st,
        split=st.sampled_from(["train", "test", "", None]), has_findings=st.sampled_from([True, False, None]),
        has_impression=st.sampled_from([True, False, None]))), max_size=8),
    labels=st.lists(st.fixed_dictionaries(dict(
        study_id=_ids_st, observation=st.sampled_from([*OBSERVATIONS, "edema", "Nonsense", None]),
        value=st.sampled_from([*VALUES, "POSITIVE", "maybe", None]),
        sentence=st.one_of(st.none(), st.sampled_from(["Increased edema.", "No new effusion.", "Resolved."]),
                           st.text(max_size=20)))), max_size=40),
    images=st.lists(st.fixed_dictionaries(dict(
        dicom_id=_text_st, study_id=_ids_st, path=_text_st, view_position=st.sampled_from(["PA", "AP", "LL", None]),
        exists=st.sampled_from([True, False, None]))), max_size=8),
    source=st.sampled_from(["auto", "language", "both", "csv"]),
)
def test_arbitrary_small_inputs_never_crash_and_balance(studies, labels, images, source):
    frame = lambda rows: pl.DataFrame(rows, infer_schema_length=None) if rows else None  # noqa: E731
    csv = pl.DataFrame({"study_id": ["s1", "2"], "previous_study_id": ["1", None],
                        "edema_progression": ["worsening", "bogus"]})
    result = build_tasks(frame(labels), frame(studies), frame(images), temporal_csv=csv,
                         config=TaskConfig(temporal_source=source))
    assert result.inputs == result.outputs + result.rejected + result.skipped
    check_patient_splits(result.samples)
    for rows in result.samples.values():
        for row in rows:
            VqaSample(**row, run_id="r", batch_id="b", code_version="v")


def test_ids_and_mart_order_do_not_depend_on_where_the_corpus_lies(corpus):
    """The same corpus under two roots (two radchain homes) gives the same sample ids, dataset version and
    mart row order. Ids used to hash absolute image paths, so two fresh builds of one demo corpus trained
    on the same rows in another order (another SFT result from the same config and seed)."""
    from training.datasets import build_marts

    labels, studies, images = corpus
    caps = TaskCaps(binary=20, single=6, multi=15, open=25, temporal=9)
    built = {}
    for root in ("/tmp/home-a/demo-corpus/", "/srv/other/place/demo-corpus/"):
        moved = images.with_columns(path=pl.lit(root) + pl.col("path"))
        built[root] = build_tasks(labels, studies, moved, config=TaskConfig(seed=7, caps=caps))
    a, b = built.values()
    assert _ids(a) == _ids(b) and len(_ids(a)) > 100

    def strip(rows, root):
        return [{**r, "image_paths": [p.removeprefix(root) for p in r["image_paths"]]} for r in rows]

    for task in a.samples:
        assert strip(a.samples[task], "/tmp/home-a/demo-corpus/") == strip(
            b.samples[task], "/srv/other/place/demo-corpus/"), task
    marts = [build_marts([s for rows in r.samples.values() for s in rows], {}, label_map(labels))
             for r in (a, b)]
    assert marts[0].dataset_version == marts[1].dataset_version
    for name in ("sft", "rl", "benchmark"):
        ids = [[row["sample_id"] for row in getattr(m, name)] for m in marts]
        assert ids[0] == ids[1], name
    assert marts[0].sft
