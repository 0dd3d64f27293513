"""The PHI guard: detection, which endpoints it covers, and that flagged text never leaves.

The end-to-end tests run the real mine stage (LLM extractor) against the fake OpenAI server on
127.0.0.1 with ``phi_enforce_loopback`` set, so the guard treats the loopback test server as it
would a hosted API; ``server.received_text()`` then proves that no flagged text arrived.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from pathlib import Path

import polars as pl
import pytest

from extractors.phi import (
    KINDS,
    REASON_CODE,
    PhiBlocked,
    PhiGuard,
    endpoint_host,
    find_phi,
    is_loopback,
    message_texts,
    phi_kinds,
)

# ---- detection -----------------------------------------------------------------------------------
FLAGGED = [
    ("name", "Findings were discussed with Dr. Smith by telephone."),
    ("name", "Mrs O'Brien tolerated the exam."),
    ("name", "DR. JONES WAS PAGED."),
    ("name", "Dictated by John Smith, MD"),
    ("name", "Dr. J. McDonald reviewed the study."),
    ("date", "Compared with the study of 03/14/2019."),
    ("date", "Prior from 3-14-19 shows no change."),
    ("date", "Exam date 2019-03-14."),
    ("date", "Exam date 2019/03/14."),
    ("date", "Seen on March 14, 2019 as well."),
    ("date", "Seen Mar. 14th 2019 as well."),
    ("date", "Since 14 March 2019 stable."),
    ("date", "Unchanged since March 2019."),
    ("date", "Compared with the radiograph obtained on March 14."),
    ("phone", "Call (617) 555-1234 with results."),
    ("phone", "Call 617-555-1234 with results."),
    ("phone", "Call 617.555.1234 with results."),
    ("phone", "Call +1 617 555 1234 with results."),
    ("phone", "Page x 555-1234."),
    ("ssn", "SSN 123-45-6789."),
    ("record", "MRN: 1234567"),
    ("record", "mrn 00123456"),
    ("record", "MR# 1234567"),
    ("record", "Medical record number 7654321."),
    ("record", "Acct #12345678"),
    ("record", "Accession no. 98765432"),
    ("record", "record 12345678 reviewed"),
    ("address", "Lives at 12 Main Street."),
    ("address", "Home: 4400 Old Mill Rd. Apt 2"),
    ("email", "Send to jane.doe@example.org please."),
]

CLEAN = [
    "Findings were discussed with Dr. ___ by telephone at 10:30 a.m. on ___.",
    "Dr. ___ and Mr. ___ were notified.",
    "MRN: ___",
    "___",
    "A 3.5 x 2.1 cm nodule in the right upper lobe; T12 compression deformity.",
    "Heart size is top normal, 1/2 of the thoracic width. C5-6 fusion hardware.",
    "PA and lateral views of the chest. MR angiography and DR chest were compared.",
    "Small left pleural effusion, 2 cm, unchanged from 2 views.",
    "The lungs may be hyperinflated. There is no pneumothorax.",
    "ET tube 4.5 cm above the carina. NG tube tip in the stomach.",
]


@pytest.mark.parametrize("kind,text", FLAGGED, ids=[f"{k}-{i}" for i, (k, _) in enumerate(FLAGGED)])
def test_each_kind_of_identifier_is_flagged(kind, text):
    assert kind in phi_kinds(text), text
    hits = [h for h in find_phi(text) if h.kind == kind]
    assert hits and all(0 <= h.start < h.end <= len(text) for h in hits)


@pytest.mark.parametrize("text", CLEAN)
def test_deidentified_and_clinical_text_is_not_flagged(text):
    assert phi_kinds(text) == [], [(h.kind, text[h.start:h.end]) for h in find_phi(text)]


def test_bundled_reports_prompts_and_synthetic_corpus_are_clean(tmp_path):
    from extractors.resources import REPORTS
    from extractors.synthetic import generate_corpus

    texts = [p.read_text(errors="replace") for p in REPORTS.iterdir() if p.is_file()]
    texts += [p.read_text() for p in (Path(__file__).parents[1] / "extractors/chains/prompts").glob("*.txt")]
    generate_corpus(tmp_path / "c", studies=150, seed=11, images=False)
    texts += [p.read_text() for p in (tmp_path / "c").rglob("*.txt")]
    assert len(texts) > 150
    flagged = {i: phi_kinds(t) for i, t in enumerate(texts) if phi_kinds(t)}
    assert flagged == {}


def test_kinds_come_in_a_fixed_order_and_odd_inputs_are_harmless():
    text = "jane@example.org, 03/14/2019, Dr. Smith"
    assert phi_kinds(text) == ["name", "date", "email"]
    assert set(phi_kinds(*[t for _, t in FLAGGED])) == set(KINDS)
    assert phi_kinds(None, "", "\x00\u202e") == []
    assert message_texts([{"role": "user", "content": [{"type": "text", "text": "MRN 1234567"},
                                                         {"type": "image_url", "image_url": {"url": "x"}}]},
                          {"role": "system", "content": "a"}, {"role": "user"}]) == ["MRN 1234567", "a"]


# ---- which endpoints --------------------------------------------------------------------------------
@pytest.mark.parametrize("url,loopback", [
    ("http://127.0.0.1:8000/v1", True), ("http://127.8.9.10/v1", True), ("http://localhost:1234/v1", True),
    ("http://LOCALHOST/v1", True), ("http://[::1]:8000/v1", True), ("http://[::ffff:127.0.0.1]/v1", True),
    ("http://vllm.localhost/v1", True), ("localhost:8000/v1", True),
    (None, False), ("https://api.openai.com/v1", False), ("http://10.0.0.5:8000/v1", False),
    ("http://0.0.0.0:8000/v1", False), ("http://localhost.evil.example/v1", False),
    ("http://127.0.0.1.nip.io/v1", False), ("http://192.168.1.2/v1", False), ("", False),
])
def test_loopback_detection(url, loopback):
    assert is_loopback(url) is loopback


def test_policy_remote_is_screened_unless_allowed():
    remote = "https://my-resource.openai.azure.com/openai/v1"
    assert endpoint_host(None) == "api.openai.com"
    assert PhiGuard().applies_to(remote) and PhiGuard().applies_to(None)
    assert not PhiGuard().applies_to("http://127.0.0.1:9/v1")
    assert PhiGuard(enforce_loopback=True).applies_to("http://127.0.0.1:9/v1")
    assert not PhiGuard(allow_hosts=["My-Resource.openai.azure.com"]).applies_to(remote)
    assert PhiGuard(allow_hosts=["other.example"]).applies_to(remote)
    assert not PhiGuard(allow_hosts=["127.0.0.1:9"], enforce_loopback=True).applies_to("http://127.0.0.1:9/v1")
    assert PhiGuard(allow_hosts=["127.0.0.1:9"], enforce_loopback=True).applies_to("http://127.0.0.1:10/v1")
    assert not PhiGuard(allow_all=True).applies_to(None)


def test_guard_raises_with_kinds_only_and_settings_come_from_the_environment(monkeypatch):
    from radchain.settings import LLMSettings

    guard = PhiGuard()
    guard([{"role": "user", "content": "Lungs are clear."}], None)  # clean: nothing raised
    with pytest.raises(PhiBlocked) as info:
        guard([{"role": "user", "content": "Dr. Smith, MRN 1234567"}], "https://api.example.com/v1")
    message = str(info.value)
    assert info.value.kinds == ["name", "record"] and "api.example.com" in message
    assert "Smith" not in message and "1234567" not in message
    assert guard.checked == 2 and guard.refused == 1

    monkeypatch.setenv("RADCHAIN_LLM_PHI_ENFORCE_LOOPBACK", "true")
    monkeypatch.setenv("RADCHAIN_LLM_PHI_ALLOW_HOSTS", '["llm.hospital.example"]')
    llm = LLMSettings()
    assert llm.phi_enforce_loopback and llm.phi_allow_hosts == ["llm.hospital.example"] and not llm.phi_allow_all
    g = PhiGuard.from_settings(llm)
    assert g.applies_to("http://127.0.0.1/v1") and not g.applies_to("https://llm.hospital.example/v1")


# ---- the client hook ----------------------------------------------------------------------------------
def test_client_never_sends_a_flagged_request():
    from extractors.llm import LLMClient
    from radchain.testing import FakeOpenAIServer, llm_settings_for
    from schemas.chains import ReasoningChain

    def msgs(report: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": "Write a chain."}, {"role": "user", "content": f"```\n{report}\n```"}]

    with FakeOpenAIServer() as server:
        settings = llm_settings_for(server, phi_enforce_loopback=True)
        guard = PhiGuard.from_settings(settings)

        async def go():
            async with LLMClient(settings, request_guard=guard, backoff_initial_s=0.01) as client:
                bad = await client.complete_structured(msgs(" FINDINGS: Effusion. Call 617-555-1234."),
                                                       schema=ReasoningChain, stage="single", sample_id="s1",
                                                       prompt_version="t")
                text = await client.complete_text(msgs(" FINDINGS: Seen by Dr. Smith."), stage="plan",
                                                  sample_id="s2", prompt_version="t")
                good = await client.complete_structured(msgs(" FINDINGS: Small left effusion."),
                                                        schema=ReasoningChain, stage="single", sample_id="s3",
                                                        prompt_version="t")
                return bad, text, good

        bad, text, good = asyncio.run(go())
        assert bad.error_code == "BLOCKED" and text.error_code == "BLOCKED"
        assert bad.calls[0]["attempts"] == 0 and bad.calls[0]["status"] == "error"
        assert good.ok and server.requests == 1
        received = server.received_text()
        assert "Small left effusion" in received
        assert "617-555-1234" not in received and "Smith" not in received


# ---- the mine stage, end to end ------------------------------------------------------------------------
# Appended to the impression of some synthetic reports; every string must stay away from the server.
INJECTED = {
    0: "Findings discussed with Dr. Holloway by telephone.",
    1: "Compared with the radiograph of 03/14/2019.",
    2: "Call 617-555-0199 with questions.",
    3: "MRN: 7654321.",
    4: "Patient lives at 12 Elm Street.",
    5: "Copy to referring.doc@example.org.",
}
INJECTED_KINDS = {0: "name", 1: "date", 2: "phone", 3: "record", 4: "address", 5: "email"}
INJECTED_BITS = {0: "Holloway", 1: "03/14/2019", 2: "617-555-0199", 3: "7654321", 4: "12 Elm Street",
                 5: "referring.doc@example.org"}


def _secret_bits() -> list[str]:
    return list(INJECTED_BITS.values())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A synthetic corpus with identifiers written into six reports -> ingest, label, tasks (rules)."""
    from extractors.synthetic import generate_corpus
    from flows.pipeline import make_context, run_stages
    from flows.stages.common import SourceSpec
    from radchain.settings import Settings

    root = tmp_path_factory.mktemp("phi")
    generate_corpus(root / "corpus", studies=24, seed=5, images=False)
    reports = sorted((root / "corpus").rglob("s*.txt"))
    flagged_studies, bits = {}, {}
    for i, sentence in INJECTED.items():
        path = reports[i * 3]
        path.write_text(path.read_text().rstrip("\n") + f"\n {sentence}\n")
        flagged_studies[path.stem[1:]] = INJECTED_KINDS[i]
        bits[path.stem[1:]] = INJECTED_BITS[i]
    ctx = make_context(Settings(home=root / "home", batch_size=8), SourceSpec(path=root / "corpus"),
                       extractor="rules", show_progress=False)
    run_stages(ctx, ["ingest", "label", "tasks"])
    samples = ctx.warehouse.read("int_vqa_samples")
    flagged_samples = samples.filter(pl.col("study_id").is_in(list(flagged_studies)))
    assert flagged_samples.height >= 6 and samples.height - flagged_samples.height >= 10
    sampled = set(flagged_samples["study_id"])
    assert len(sampled) >= 4
    return dict(root=root, warehouse=ctx.settings.warehouse_dir, samples=samples, flagged=flagged_studies,
                sampled_bits=[b for study, b in bits.items() if study in sampled], source=SourceSpec(path=root / "corpus"))


def _mine(corpus, name: str, responder=None, **llm_overrides):
    """Mine stage (LLM) on a fresh copy of the corpus warehouse, against a fresh fake server."""
    from flows.pipeline import make_context, run_stages
    from radchain.settings import Settings
    from radchain.testing import FakeOpenAIServer, llm_settings_for
    from radchain.testing.chain_responder import ChainResponder
    from warehouse import Warehouse

    home = corpus["root"] / name
    shutil.copytree(corpus["warehouse"], home / "warehouse")
    responder = responder or ChainResponder.from_warehouse(Warehouse(home / "warehouse")).warm()
    with FakeOpenAIServer(responder=responder) as server:
        settings = Settings(home=home, batch_size=8)
        settings.llm = llm_settings_for(server, requests_per_minute=0, tokens_per_minute=0, **llm_overrides)
        ctx = make_context(settings, corpus["source"], extractor="llm", show_progress=False)
        results = run_stages(ctx, ["mine"])
        received = server.received_text()
        requests = server.requests
    wh = ctx.warehouse
    for r in results["mine"]:
        assert r.inputs == r.outputs + r.rejected + r.skipped
    return dict(wh=wh, received=received, requests=requests, results=results["mine"],
                rejections=wh.read("int_rejections").filter(pl.col("stage") == "mine"),
                chains=wh.read("int_chains"),
                calls=wh.read("int_llm_calls") if wh.table_dir("int_llm_calls").exists() else pl.DataFrame())


def test_flagged_reports_never_reach_the_endpoint_and_are_rejected(corpus):
    out = _mine(corpus, "enforced", phi_enforce_loopback=True)
    samples = corpus["samples"]
    flagged_ids = set(samples.filter(pl.col("study_id").is_in(list(corpus["flagged"])))["sample_id"])
    clean_ids = set(samples["sample_id"]) - flagged_ids

    # Nothing flagged arrived; clean reports did, and were mined.
    for bit in _secret_bits():
        assert bit not in out["received"], bit
    assert out["requests"] > 0
    accepted = set(out["chains"]["sample_id"])
    assert accepted and accepted <= clean_ids
    assert len(accepted) >= 0.8 * len(clean_ids)

    # Every sample of a flagged study is one PHI_DETECTED rejection naming the kind, never the text.
    phi = out["rejections"].filter(pl.col("reason_code") == REASON_CODE)
    assert set(phi["entity_id"]) == flagged_ids
    study_of = dict(samples.select("sample_id", "study_id").iter_rows())
    for row in phi.iter_rows(named=True):
        kind = corpus["flagged"][study_of[row["entity_id"]]]
        assert f"({kind})" in row["detail"] or f"{kind}," in row["detail"] or f", {kind}" in row["detail"], row
        assert "127.0.0.1" in row["detail"] and row["raw_output"] is None
        for bit in _secret_bits():
            assert bit not in row["detail"]
    # No call was even attempted for them, and every sample is accounted for.
    if out["calls"].height:
        assert not set(out["calls"]["sample_id"]) & flagged_ids
    audit = out["wh"].read("audit_stage_counts").filter(pl.col("stage") == "mine")
    assert audit["inputs"].sum() == samples.height
    assert audit["rejected"].sum() == out["rejections"].height
    assert audit["outputs"].sum() == len(accepted)


@pytest.mark.parametrize("overrides", [
    dict(),  # loopback is exempt by default
    dict(phi_enforce_loopback=True, phi_allow_hosts=["127.0.0.1"]),
    dict(phi_enforce_loopback=True, phi_allow_all=True),
], ids=["loopback-exempt", "host-allowed", "allow-all"])
def test_exempt_endpoints_receive_everything(corpus, overrides):
    out = _mine(corpus, "exempt-" + "-".join(sorted(overrides)) if overrides else "exempt-default", **overrides)
    assert out["rejections"].filter(pl.col("reason_code") == REASON_CODE).height == 0
    for bit in corpus["sampled_bits"]:  # the identifiers of every flagged study that has samples
        assert bit in out["received"], bit


def test_refine_requests_are_guarded_too(corpus):
    """A model reply with a name in it, fed back in the refinement turn, is stopped there."""
    from radchain.testing.chain_responder import ChainResponder
    from warehouse import Warehouse

    base = ChainResponder.from_warehouse(Warehouse(corpus["warehouse"])).warm()
    samples = corpus["samples"].filter(~pl.col("study_id").is_in(list(corpus["flagged"])))
    target = samples.sort("sample_id")["sample_id"][0]

    def responder(body):
        item, _ = base.find(body)
        if item is not None and item.sample_id == target:
            # No conclusion (the verifier refuses it, so a refinement follows) and a name in a step.
            return json.dumps({"steps": [
                {"kind": "plan", "text": "Check the lungs.", "findings": [], "evidence": []},
                {"kind": "observation", "text": "As Dr. Holloway noted, the lungs are clear.", "findings": [],
                 "evidence": []},
            ]})
        return base(body)

    out = _mine(corpus, "refine", responder=responder, phi_enforce_loopback=True)
    rejected = out["rejections"].filter(pl.col("entity_id") == target).row(0, named=True)
    assert rejected["reason_code"] == REASON_CODE and "name" in rejected["detail"]
    assert "a request" in rejected["detail"] and "Holloway" not in rejected["detail"]
    # The server wrote the name (its reply) but never received it back.
    assert "Holloway" not in out["received"]
    blocked = out["calls"].filter((pl.col("sample_id") == target) & (pl.col("error_code") == "BLOCKED"))
    assert blocked.height == 1 and blocked["attempts"].to_list() == [0] and blocked["stage"][0] == "refine"
    assert re.search(r"\bDr\. Holloway\b", json.dumps(out["calls"].to_dicts(), default=str)) is None
