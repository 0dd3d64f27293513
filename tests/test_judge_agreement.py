"""The judge against the paper's: release items, key findings with qualifiers, `radchain judge-agreement --release`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from training.answers import parse_output
from training.judge_agreement import agreement_on_release, compare_judges, read_release, release_verdict
from training.key_findings import KeyFinding, matches, qualifiers_agree
from training.radrscore import GoldChain, release_output, report_reference, score_reasoning

REAL_RELEASE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "real" / "release-judge-openi"
GOLD_STEPS = [
    "There is a small left pleural effusion.",
    "The heart size is normal.",
    "There is no pneumothorax.",
    "Therefore, the answer is B.",
]
REPORT = "Findings: Small left pleural effusion. Heart size normal. No pneumothorax. Impression: Left effusion."
ECHO = ("system\nYou are a helpful assistant.\nuser\nWhich finding? Options:\nA) x\nB) y\nLet's think step by "
        "step. Enclose the reasoning within <think></think> and the answer within <answer></answer>.\nassistant\n")


def _item(pred: str, recalled: int, correct: int, effective: int, ineffective: int, n_pred: int = 2) -> dict:
    return {
        "question": "Which finding?", "answer": "B", "original_report": REPORT, "reason_steps": GOLD_STEPS,
        "pred": pred, "correct": "yes",
        "gt_key_finding": {"key_conclusion": [{"observation": "left effusion", "status": "present"},
                                              {"observation": "pneumothorax", "status": "not present"}]},
        "pred_key_finding": {"key_conclusion": [{"observation": f"f{i}", "status": "x"} for i in range(n_pred)]},
        "recall_res": {"recalled_count": recalled}, "precision_res": {"correct_count": correct},
        "efficiency": {"effective_count": effective, "ineffective_count": ineffective},
    }


GOOD = "There is a small left pleural effusion.\nThere is no pneumothorax.\nThe answer is B."
WRONG_SIDE = "There is a right pleural effusion.\nThere is a pneumothorax.\nThe answer is A."


@pytest.fixture
def release(tmp_path: Path) -> Path:
    root = tmp_path / "release"
    (root / "model_a").mkdir(parents=True)
    (root / "model_b").mkdir()
    a = [_item(GOOD, 2, 2, 3, 0), _item(WRONG_SIDE, 0, 0, 0, 3), _item("", 1, 1, 1, 0),
         {**_item(GOOD, 1, 1, 1, 1), "recall_res": "not json"}]
    b = [_item(ECHO + f"<think>{GOOD}</think><answer>B</answer>", 2, 2, 2, 1),
         _item(ECHO + f"<think>{WRONG_SIDE}</think><answer>A</answer>", 0, 1, 0, 3),
         _item(ECHO + "<think>There is a small left pleural effusion.</think><answer>B</answer>", 1, 1, 1, 0)]
    (root / "model_a" / "openi_single_evaluation_res.json").write_text(json.dumps(a))
    (root / "model_b" / "openi_single_evaluation_res.json").write_text(json.dumps(b))
    return root


def test_plain_string_gold_steps_are_read_from_their_text():
    gold = GoldChain.from_steps(["There is no pneumothorax."])
    assert not gold.empty and ("Pneumothorax", "absent") in gold.key_findings
    mixed = GoldChain.from_steps(["There is no pneumothorax.", {"text": "Cardiomegaly.", "findings": [
        {"observation": "Cardiomegaly", "status": "present", "anatomy": None}]}])
    assert mixed.key_findings == {("Pneumothorax", "absent"), ("Cardiomegaly", "present")}


def test_gold_findings_take_the_status_of_the_conclusion():
    gold = GoldChain.from_steps(["There may be pneumonia in the right lower lobe.",
                                 "On review, there is no pneumonia."])
    assert [(k.finding, k.status) for k in gold.keys if k.finding == "Pneumonia"] == [("Pneumonia", "absent")]


def test_a_wrong_side_change_or_device_does_not_match():
    left = KeyFinding("Pleural Effusion", "present", laterality="left")
    assert matches(left, KeyFinding("Pleural Effusion", "present"))  # side not stated: no conflict
    assert not matches(left, KeyFinding("Pleural Effusion", "present", laterality="right"))
    assert not qualifiers_agree(KeyFinding("Edema", "present", change="improving"),
                                KeyFinding("Edema", "present", change="worsening"))
    assert not qualifiers_agree(KeyFinding("Support Devices", "present", device="picc"),
                                KeyFinding("Support Devices", "present", device="endotracheal tube"))
    assert not qualifiers_agree(KeyFinding("Pneumothorax", "present", severity="mild"),
                                KeyFinding("Pneumothorax", "present", severity="severe"))


def test_qualifiers_are_read_from_each_findings_own_clause():
    from training.findings_text import reasoning_steps

    (step,) = reasoning_steps("There is a small left pleural effusion and a large right pneumothorax.")
    by = {k.finding: k for k in step.key_findings}
    assert (by["Pleural Effusion"].laterality, by["Pleural Effusion"].severity) == ("left", "mild")
    assert (by["Pneumothorax"].laterality, by["Pneumothorax"].severity) == ("right", "severe")
    (tube,) = reasoning_steps("A right PICC line ends in the lower SVC, unchanged.")
    device = next(k for k in tube.key_findings if k.finding == "Support Devices")
    assert device.device == "picc" and device.change == "stable"


def test_wrong_side_scores_below_right_side_on_every_component():
    gold = GoldChain.from_steps(GOLD_STEPS)
    ref = report_reference(REPORT)
    good = score_reasoning(GOOD, gold, None, report=ref)
    wrong = score_reasoning(WRONG_SIDE, gold, None, report=ref)
    for comp in ("completeness", "factuality", "effectiveness"):
        assert getattr(good, comp) > getattr(wrong, comp), comp


def test_release_output_keeps_the_models_own_turn():
    text = release_output(ECHO + "<think> reasoning here </think><answer>B</answer>")
    parsed = parse_output(text)
    assert parsed.think == "reasoning here" and parsed.answer == "B" and not parsed.tagless
    assert release_output("no chat echo") == "no chat echo"


def test_tagless_free_text_is_scored_and_counted():
    parsed = parse_output("1. **Pleura:**\n   - There is no pneumothorax.\n\nThe answer is B.")
    assert parsed.tagless and parsed.answer == "B" and "pneumothorax" in parsed.think
    score = score_reasoning(parsed.think, GoldChain.from_steps(GOLD_STEPS), None, tagless=True)
    assert score.tagless and not score.unparseable and score.completeness > 0


def test_release_verdicts_follow_the_release_averaging():
    v = release_verdict(_item(GOOD, 1, 1, 3, 1, n_pred=4))
    assert (v.completeness, v.factuality, v.effectiveness) == (0.5, 0.25, 0.75)
    assert release_verdict({**_item(GOOD, 1, 1, 0, 0)}) is None  # zero denominator: left out
    assert release_verdict({**_item(GOOD, 1, 1, 1, 1), "pred_key_finding": {"reason_steps": "sorry"}}) is None


def test_agreement_on_a_small_release(release: Path):
    items = read_release(release)
    assert [it.model for it in items] == ["model_a"] * 4 + ["model_b"] * 3
    report = agreement_on_release(release, n_boot=50)
    assert (report.n_items, report.n_no_verdict, report.n_empty_output, report.n_compared) == (7, 1, 1, 5)
    assert report.n_tagless == 2  # model_a's two non-empty outputs have no tags
    by_model = {s.model: s for s in report.systems}
    assert by_model["model_a"].n == 2 and by_model["model_b"].n == 3
    # The good outputs beat the wrong-side ones under both judges: the correlations are positive.
    for comp in ("completeness", "factuality", "effectiveness", "radrscore"):
        c = report.correlation(comp)
        assert c.n == 5 and c.pearson is not None and c.pearson > 0, comp
        assert c.pearson_ci is not None and c.pearson_ci[0] <= c.pearson_ci[1]


def test_compare_judges_ranks_systems():
    from training.judge_agreement import JudgeVerdict, ReleaseItem

    def item(model: str, v: float) -> ReleaseItem:
        return ReleaseItem(model, "t", 0, "", "", "", (), "x", JudgeVerdict(v, v, v))

    pairs = [(item("a", 0.9), JudgeVerdict(0.8, 0.8, 0.2)), (item("a", 0.7), JudgeVerdict(0.6, 0.6, 0.1)),
             (item("b", 0.2), JudgeVerdict(0.3, 0.1, 0.9)), (item("b", 0.1), JudgeVerdict(0.2, 0.2, 0.8))]
    _, systems, same = compare_judges(pairs, n_boot=0)
    assert same["completeness"] is True and same["factuality"] is True and same["effectiveness"] is False


def _app() -> typer.Typer:
    from flows.commands import score

    app = typer.Typer()
    score.register(app)
    return app


def test_cli_judge_agreement_and_score_read_release_files(release: Path):
    result = CliRunner().invoke(_app(), ["judge-agreement", "--release", str(release), "--bootstrap", "20",
                                         "-f", "json"])
    assert result.exit_code == 0, result.output
    assert '"component":"radrscore"' in result.output.replace(" ", "") and "model_b" in result.output
    scored = CliRunner().invoke(_app(), ["score", "--predictions",
                                         str(release / "model_b" / "openi_single_evaluation_res.json")])
    assert scored.exit_code == 0, scored.output
    assert "model_b" in scored.output
    missing = CliRunner().invoke(_app(), ["judge-agreement", "--release", str(release / "nope")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    both = CliRunner().invoke(_app(), ["judge-agreement"])
    assert both.exit_code == 2 and "exactly one" in both.output


@pytest.mark.skipif(not REAL_RELEASE.is_dir(), reason="the real release files are not beside the checkout")
def test_agreement_with_the_papers_judge_on_the_real_release_meets_the_floors():
    report = agreement_on_release(REAL_RELEASE, n_boot=0)
    assert report.n_compared > 900
    assert report.correlation("radrscore").pearson >= 0.45
    for comp in ("completeness", "factuality", "effectiveness"):
        assert report.correlation(comp).pearson >= 0.30, comp


# Reading defects of issue 13 that belong to the shared reader (extractors/mentions.py, being
# rewritten for issue 12). They hold the judge to the sentence's meaning; see the report for which
# still misread on this branch.
@pytest.mark.parametrize("sentence,finding,status", [
    ("These findings support the diagnosis of pneumonia.", "Support Devices", None),
    ("The heart size is normal, ruling out cardiomegaly.", "Cardiomegaly", "absent"),
    ("Pneumonia is unlikely.", "Pneumonia", "absent"),
    ("Pleural effusion is excluded.", "Pleural Effusion", "absent"),
    ("Pleural effusion: not present.", "Pleural Effusion", "absent"),
    ("The chest X-ray does not show signs of pneumothorax.", "Pneumothorax", "absent"),
])
def test_reader_defects_listed_in_issue_13(sentence, finding, status):
    from training.findings_text import reasoning_steps

    statuses = {k.status for s in reasoning_steps(sentence) for k in s.key_findings if k.finding == finding}
    assert statuses == ({status} if status else set()), (sentence, statuses)


def test_markdown_headings_are_not_claims():
    from training.findings_text import reasoning_steps, split_steps

    assert split_steps("**Pneumothorax**:\n- No pneumothorax is seen.") == ["No pneumothorax is seen."]
    steps = reasoning_steps("**Pneumothorax**:\nNo pneumothorax is seen.")
    assert {k.status for s in steps for k in s.key_findings if k.finding == "Pneumothorax"} == {"absent"}
