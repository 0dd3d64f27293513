"""The PHI guard: detection, which endpoints it covers, and that flagged text never leaves.

The end-to-end tests run the real mine stage (LLM extractor) against the fake OpenAI server on
127.0.0.1; the guard screens loopback endpoints like any other (no opt-out is set), so
``server.received_text()`` proves that no flagged text arrived.
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
    ("account", "Acct #12345678"),
    ("record", "Accession no. 98765432"),
    ("record", "record 12345678 reviewed"),
    ("address", "Lives at 12 Main Street."),
    ("address", "Home: 4400 Old Mill Rd. Apt 2"),
    ("email", "Send to jane.doe@example.org please."),
    ("age", "A 97-year-old woman with cough."),
    ("fax", "Fax results to (617) 555-0100."),
    ("health_plan", "Medicare number 1EG4TE5MK73."),
    ("license", "Signed, license no. A1234567."),
    ("vehicle", "Struck by a car, plate 7ABC123."),
    ("device", "Pacemaker serial no. PJN123456."),
    ("url", "Images at https://pacs.hospital.example/study/1."),
    ("ip", "Sent from workstation 10.1.22.7."),
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
    assert PhiGuard().applies_to("http://127.0.0.1:9/v1")  # a local proxy may forward to a hosted API
    assert PhiGuard().applies_to("http://localhost:8000/v1")
    assert not PhiGuard(allow_hosts=["My-Resource.openai.azure.com"]).applies_to(remote)
    assert PhiGuard(allow_hosts=["other.example"]).applies_to(remote)
    assert not PhiGuard(allow_hosts=["127.0.0.1:9"]).applies_to("http://127.0.0.1:9/v1")
    assert PhiGuard(allow_hosts=["127.0.0.1:9"]).applies_to("http://127.0.0.1:10/v1")
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

    monkeypatch.setenv("RADCHAIN_LLM_PHI_ALLOW_HOSTS", '["llm.hospital.example"]')
    llm = LLMSettings()
    assert llm.phi_allow_hosts == ["llm.hospital.example"] and not llm.phi_allow_all
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
        settings = llm_settings_for(server)
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
    from flows.testing import chain_responder
    from warehouse import Warehouse

    home = corpus["root"] / name
    shutil.copytree(corpus["warehouse"], home / "warehouse")
    responder = responder or chain_responder(Warehouse(home / "warehouse")).warm()
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
    out = _mine(corpus, "enforced")
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
    dict(phi_allow_hosts=["127.0.0.1"]),
    dict(phi_allow_hosts=["localhost", "127.0.0.1"]),
    dict(phi_allow_all=True),
], ids=["host-allowed", "hosts-allowed", "allow-all"])
def test_exempt_endpoints_receive_everything(corpus, overrides):
    out = _mine(corpus, "exempt-" + "-".join(f"{k}{len(str(v))}" for k, v in sorted(overrides.items())), **overrides)
    assert out["rejections"].filter(pl.col("reason_code") == REASON_CODE).height == 0
    for bit in corpus["sampled_bits"]:  # the identifiers of every flagged study that has samples
        assert bit in out["received"], bit


def test_refine_requests_are_guarded_too(corpus):
    """A model reply with a name in it, fed back in the refinement turn, is stopped there."""
    from flows.testing import chain_responder
    from warehouse import Warehouse

    base = chain_responder(Warehouse(corpus["warehouse"])).warm()
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

    out = _mine(corpus, "refine", responder=responder)
    rejected = out["rejections"].filter(pl.col("entity_id") == target).row(0, named=True)
    assert rejected["reason_code"] == REASON_CODE and "name" in rejected["detail"]
    assert "a request" in rejected["detail"] and "Holloway" not in rejected["detail"]
    # The server wrote the name (its reply) but never received it back.
    assert "Holloway" not in out["received"]
    blocked = out["calls"].filter((pl.col("sample_id") == target) & (pl.col("error_code") == "BLOCKED"))
    assert blocked.height == 1 and blocked["attempts"].to_list() == [0] and blocked["stage"][0] == "refine"
    assert re.search(r"\bDr\. Holloway\b", json.dumps(out["calls"].to_dicts(), default=str)) is None


# ---- issue 14: the gaps, every Safe Harbor kind, generated variants, real reports ----------------------
from hypothesis import HealthCheck, given  # noqa: E402
from hypothesis import settings as hsettings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# The forms that reached a recording endpoint before (issue 14), each with the kind it must be flagged as.
GAPS = [
    ("name", "Discussed with Dr.Smith at the bedside."), ("phone", "Call 617 555 0199."),
    ("phone", "Call 6175550199."), ("date", "Prior study 14.03.2187."), ("date", "Prior study 14-Mar-2187."),
    ("record", "M.R.N. 12345678"), ("record", "Unit No: 1234567"), ("ssn", "SSN 123 45 6789"),
    ("address", "Lives at 123 main st."), ("age", "97 years old female with cough."),
]


@pytest.mark.parametrize("kind,text", GAPS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(GAPS)])
def test_issue14_gaps_are_flagged(kind, text):
    assert kind in phi_kinds(text), (text, phi_kinds(text))


@pytest.mark.parametrize("text", ["___", "XXXX", "Dr. XXXX", "DR. XXXX", "Dr. ___", "XXXX-year-old male",
                                  "Comparison XXXX, XXXX. Heart size normal.", "Dr.___ was notified.",
                                  "Patient is an 89 year old man.", "Age 45.", "2 views, 14 images, 3.5 cm."])
def test_placeholders_and_clinical_numbers_are_not_phi(text):
    assert phi_kinds(text) == [], [(h.kind, text[h.start:h.end]) for h in find_phi(text)]


def test_the_guard_screens_loopback_endpoints_by_default():
    from radchain.settings import LLMSettings

    guard = PhiGuard.from_settings(LLMSettings())
    for url in ("http://127.0.0.1:8000/v1", "http://localhost:11434/v1", "http://[::1]:9/v1", None):
        assert guard.applies_to(url), url
    with pytest.raises(PhiBlocked):
        guard([{"role": "user", "content": "Seen by Dr.Smith."}], "http://127.0.0.1:8000/v1")


_FIRST = st.sampled_from(["Smith", "Holloway", "O'Brien", "McDonald", "Nguyen", "Garcia-Lopez", "Lee"])
_D = st.integers(0, 9).map(str)


def _digits(n: int) -> st.SearchStrategy[str]:
    return st.lists(_D, min_size=n, max_size=n).map("".join)


_AREA = st.tuples(st.integers(2, 9), _digits(2)).map(lambda t: f"{t[0]}{t[1]}")
_EXCH = st.tuples(st.integers(2, 9), _digits(2)).map(lambda t: f"{t[0]}{t[1]}")
_MON = st.sampled_from(["Jan", "Feb", "Mar", "Apr", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec", "March",
                        "JAN", "MAR", "DEC", "September"])
_YEARS = st.integers(1900, 2199).map(str)
_DAYS = st.integers(1, 28)

VARIANTS: dict[str, st.SearchStrategy[str]] = {
    "name": st.tuples(st.sampled_from(["Dr.", "Dr ", "Dr. ", "DR. ", "Mr. ", "Mrs ", "Ms. ", "Doctor ", "Prof. "]),
                      _FIRST).map("".join),
    "date": st.one_of(
        st.tuples(_DAYS, st.integers(1, 12), _YEARS, st.sampled_from(".-/"))
        .map(lambda t: f"{t[0]:02d}{t[3]}{t[1]:02d}{t[3]}{t[2]}"),
        st.tuples(_DAYS, _MON, _YEARS, st.sampled_from(["-", " ", "/"])).map(lambda t: f"{t[0]}{t[3]}{t[1]}{t[3]}{t[2]}"),
        st.tuples(_MON, _DAYS, _YEARS).map(lambda t: f"{t[0]} {t[1]}, {t[2]}"),
        st.tuples(st.integers(1, 12), _DAYS, _YEARS).map(lambda t: f"{t[0]}/{t[1]}/{t[2]}"),
        st.tuples(_YEARS, st.integers(1, 12), _DAYS).map(lambda t: f"{t[0]}-{t[1]:02d}-{t[2]:02d}"),
    ),
    "age": st.tuples(st.integers(90, 119), st.sampled_from([" years old", "-year-old", " year old", " yo", " y/o",
                                                              " yrs old"])).map(lambda t: f"{t[0]}{t[1]}")
    | st.integers(90, 119).map(lambda a: f"aged {a}"),
    "phone": st.tuples(_AREA, _EXCH, _digits(4), st.sampled_from(["-", ".", " ", ""]))
    .map(lambda t: f"{t[0]}{t[3]}{t[1]}{t[3]}{t[2]}")
    | st.tuples(_AREA, _EXCH, _digits(4)).map(lambda t: f"({t[0]}) {t[1]}-{t[2]}"),
    "fax": st.tuples(st.sampled_from(["Fax", "FAX:", "fax no."]), _AREA, _EXCH, _digits(4))
    .map(lambda t: f"{t[0]} {t[1]}-{t[2]}-{t[3]}"),
    "ssn": st.tuples(_digits(3), _digits(2), _digits(4), st.sampled_from(["-", " "]))
    .map(lambda t: f"SSN {t[0]}{t[3]}{t[1]}{t[3]}{t[2]}"),
    "record": st.tuples(st.sampled_from(["MRN", "M.R.N.", "MRN:", "MR#", "Unit No:", "unit number", "Medical record #",
                                         "Accession no.", "Hospital No."]), _digits(8)).map(" ".join),
    "health_plan": st.tuples(st.sampled_from(["Member ID", "policy no.", "Medicare number", "Subscriber #"]),
                             st.sampled_from(["", "ABC", "W"]), _digits(7)).map(lambda t: f"{t[0]} {t[1]}{t[2]}"),
    "account": st.tuples(st.sampled_from(["Acct #", "Account number", "acct no.", "Billing #"]), _digits(8))
    .map(" ".join),
    "license": st.tuples(st.sampled_from(["License no.", "Licence #", "DEA", "NPI", "Certificate number"]),
                         st.sampled_from(["", "A", "MD"]), _digits(7)).map(lambda t: f"{t[0]} {t[1]}{t[2]}"),
    "vehicle": st.tuples(st.sampled_from(["plate", "License plate", "VIN"]), _digits(3))
    .map(lambda t: f"{t[0]} 7AB{t[1]}" if t[0] != "VIN" else f"VIN 1HGCM826{t[1]}A00435"),
    "device": st.tuples(st.sampled_from(["Serial no.", "S/N", "serial #", "UDI", "Device ID"]), _digits(6))
    .map(lambda t: f"{t[0]} X{t[1]}"),
    "url": st.tuples(st.sampled_from(["http://", "https://", "www."]), st.sampled_from(["pacs", "portal"]), _digits(2))
    .map(lambda t: f"{t[0]}{t[1]}{t[2]}.hospital.example/study"),
    "ip": st.tuples(*[st.integers(1, 255)] * 4).map(lambda t: ".".join(map(str, t))),
    "address": st.tuples(st.integers(1, 99999), st.sampled_from(["Main", "main", "Old Mill", "elm", "Beacon"]),
                         st.sampled_from(["Street", "St", "st", "Avenue", "ave", "Rd.", "road", "Drive", "Lane"]))
    .map(lambda t: f"{t[0]} {t[1]} {t[2]}")
    | st.tuples(st.sampled_from(["Boston, MA", "Houston, TX", "zip", "Zip code:"]), _digits(5)).map(" ".join),
    "email": st.tuples(st.sampled_from(["jane.doe", "j_smith", "rad+1"]), st.sampled_from(["example.org", "hosp.edu"]))
    .map("@".join),
}
_CONTEXT = st.sampled_from([("", ""), ("Findings discussed with ", " by telephone."), ("(", ")"), ("Ref: ", "."),
                            ("IMPRESSION: No effusion. ", " Lungs are clear."), ("\n ", "\n")])


def test_variants_cover_every_kind():
    assert set(VARIANTS) == set(KINDS)


@pytest.mark.parametrize("kind", sorted(VARIANTS))
def test_generated_variants_of_each_kind_are_flagged(kind):
    @hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
    @given(VARIANTS[kind], _CONTEXT)
    def check(value, context):
        text = context[0] + value + context[1]
        assert kind in phi_kinds(text), (kind, text, phi_kinds(text))

    check()


def _iu_reports() -> list[str]:
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real" / "iu-xray" / "indiana_reports.csv"
    if not path.exists():
        pytest.skip(f"the real IU X-ray reports are not at {path}")
    frame = pl.read_csv(path, infer_schema_length=0)
    cols = ["indication", "comparison", "findings", "impression"]
    return ["\n".join(f"{c.upper()}: {r[c]}" for c in cols if r[c]) for r in frame.iter_rows(named=True)]


def test_real_deidentified_iu_reports_are_almost_never_flagged():
    """3,851 real de-identified reports (XXXX placeholders): measured 0 flagged."""
    texts = _iu_reports()
    assert len(texts) > 3800
    flagged = [t for t in texts if phi_kinds(t)]
    assert len(flagged) <= 3, [(phi_kinds(t), t[:200]) for t in flagged[:5]]
