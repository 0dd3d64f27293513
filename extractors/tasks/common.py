"""What the five task builders share: configuration, seeded choice, question text, sample rows.

Determinism: every random choice draws from a ``random.Random`` seeded with a string built
from the run seed and the choice's own key (task, split, finding, study). A string seed is
hashed with SHA-512 by Python, so it does not depend on PYTHONHASHSEED, and a choice for one
group never depends on how many other groups came before it.

Question layout (what the model sees, stored in ``question``)::

    <stem>
    Options:
    A) <option 1>
    B) <option 2>
    <ANSWER_INSTRUCTION>

``options`` holds the option texts alone, in letter order; the open task has no options
block and an empty ``options`` list.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import polars as pl

from schemas.base import stable_id
from schemas.labels import OBSERVATIONS, TARGET_OBSERVATIONS
from schemas.vqa import ANSWER_INSTRUCTION, TASKS

LETTERS = "ABCDEFGH"

# Observation ranks: lists of findings are kept as ranks into OBSERVATIONS so that every
# option text lists its findings in one canonical order (the order never hints at the answer).
RANK = {name: i for i, name in enumerate(OBSERVATIONS)}
NO_FINDING = "No Finding"
NO_FINDING_RANK = RANK[NO_FINDING]
TARGET_RANKS = tuple(RANK[o] for o in TARGET_OBSERVATIONS)
# Observations the tasks use at all: the 12 targets plus No Finding (Pleural Other is dropped).
USED_RANKS = (*TARGET_RANKS, NO_FINDING_RANK)

POSITIVE, NEGATIVE, UNCERTAIN = "positive", "negative", "uncertain"


@dataclass(frozen=True)
class TaskCaps:
    """Sampling caps. Every cap applies per split, so train, validate and test each get samples."""

    binary: int = 200  # per finding per split; half Yes, half No
    single: int = 100  # per true class (12 findings + No Finding) per split
    multi: int = 500  # per split
    open: int = 1000  # per split
    temporal: int = 200  # per finding per split, spread evenly over stable/worsening/improving


@dataclass(frozen=True)
class TaskConfig:
    seed: int = 13
    caps: TaskCaps = field(default_factory=TaskCaps)
    # Where temporal labels come from: "auto" = the MS-CXR-T CSV when given, else comparison
    # language; "csv" / "language" = only that source; "both" = CSV first, language for the rest.
    temporal_source: str = "auto"
    tasks: tuple[str, ...] = TASKS
    # Reject studies whose image files are all missing (IMAGE_MISSING): True, False, or None = only when
    # some image of the source exists (a reports-only MIMIC tree keeps its samples as text-only data).
    require_images: bool | None = None

    @classmethod
    def from_options(cls, options: Mapping[str, Any], default_seed: int = 13) -> "TaskConfig":
        """Build from stage options; a wrong option is a configuration error, so it raises clearly."""
        seed = options.get("seed")
        seed = default_seed if seed is None else seed
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"tasks: seed must be an integer, got {seed!r}")
        raw_caps = options.get("caps") or {}
        if not isinstance(raw_caps, Mapping):
            raise ValueError(f"tasks: caps must be a mapping of task -> int, got {raw_caps!r}")
        known = {f.name for f in fields(TaskCaps)}
        unknown = set(raw_caps) - known
        if unknown:
            raise ValueError(f"tasks: unknown caps {sorted(unknown)}; known: {sorted(known)}")
        for name, value in raw_caps.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"tasks: cap {name!r} must be a non-negative integer, got {value!r}")
        source = options.get("temporal_source", "auto")
        if source not in ("auto", "csv", "language", "both"):
            raise ValueError(f"tasks: temporal_source must be auto, csv, language or both, got {source!r}")
        # "task_types", not "tasks": stage options share one namespace with the stage names.
        tasks = tuple(options.get("task_types") or TASKS)
        bad = [t for t in tasks if t not in TASKS]
        if bad:
            raise ValueError(f"tasks: unknown tasks {bad}; known: {list(TASKS)}")
        require_images = options.get("require_images")
        if require_images not in (None, True, False):
            raise ValueError(f"tasks: require_images must be true, false or unset, got {require_images!r}")
        return cls(seed=seed, caps=replace(TaskCaps(), **raw_caps), temporal_source=source, tasks=tasks,
                   require_images=require_images)


def rng_for(seed: int, *key: Any) -> random.Random:
    """A generator owned by one choice (a sampling group or one sample's option order)."""
    return random.Random("\x1f".join(map(str, (seed, *key))))


def choose_indices(n: int, k: int, rng: random.Random) -> list[int]:
    """k of n positions without replacement, in ascending order (candidates come sorted by id)."""
    k = max(0, min(n, k))
    return sorted(rng.sample(range(n), k))


def names(ranks: Sequence[int]) -> list[str]:
    """Observation names of ranks, in canonical order."""
    return [OBSERVATIONS[r] for r in sorted(ranks)]


def format_question(stem: str, options: Sequence[str]) -> str:
    lines = [stem]
    if options:
        lines.append("Options:")
        lines.extend(f"{LETTERS[i]}) {text}" for i, text in enumerate(options))
    lines.append(ANSWER_INSTRUCTION)
    return "\n".join(lines)


@dataclass(frozen=True)
class StudyRef:
    """The columns of a study every sample row copies."""

    study_id: str
    patient_id: str
    split: str
    image_path: str


def image_name(path: str) -> str:
    """An image's name inside its study, independent of where the corpus lies (either separator)."""
    return str(path).replace("\\", "/").rsplit("/", 1)[-1]


def make_sample(
    task: str,
    study: StudyRef,
    stem: str,
    options: Sequence[str],
    answer_index: int | None,
    answer_text: str,
    findings: Sequence[str],
    answer_findings: Sequence[str],
    image_paths: Sequence[str] | None = None,
    prior_study_id: str | None = None,
) -> dict[str, Any]:
    """One int_vqa_samples row (without lineage). The id hashes what makes the sample itself.

    Images enter the id by file name (the DICOM id in MIMIC's layout), not by path: the path holds
    where the corpus lies (a radchain home, a mount point), and an id hashing it made the same corpus
    built in two folders give other ids, another dataset version and, since marts are read in
    sample-id order, another training order (different SFT results from the same config).
    """
    question = format_question(stem, options)
    paths = list(image_paths) if image_paths is not None else [study.image_path]
    return dict(
        sample_id=stable_id(task, study.study_id, prior_study_id, question, *(image_name(p) for p in paths)),
        task=task,
        study_id=study.study_id,
        prior_study_id=prior_study_id,
        patient_id=study.patient_id,
        split=study.split,
        question=question,
        options=list(options),
        answer_letter=None if answer_index is None else LETTERS[answer_index],
        answer_text=answer_text,
        findings=list(findings),
        answer_findings=list(answer_findings),
        image_paths=paths,
    )


def shuffled_options(options: Sequence[Any], true_index: int, rng: random.Random) -> tuple[list[Any], int]:
    """Shuffle options; return them with the new position of the true one."""
    order = list(range(len(options)))
    rng.shuffle(order)
    return [options[i] for i in order], order.index(true_index)


def round_robin_take(groups: Sequence[Sequence[Any]], cap: int) -> list[Any]:
    """Take items from each (already shuffled) group in turn until ``cap``: as even as the data allows."""
    taken: list[Any] = []
    depth = 0
    while len(taken) < cap:
        progressed = False
        for group in groups:
            if depth < len(group) and len(taken) < cap:
                taken.append(group[depth])
                progressed = True
        if not progressed:
            break
        depth += 1
    return taken


@dataclass
class TaskOutput:
    """What one builder returns. ``eligible`` = studies that were candidates before capping, so
    the stage can tell a study not chosen by the caps (skipped) from one no task could use."""

    task: str
    samples: list[dict[str, Any]] = field(default_factory=list)
    eligible: set[str] = field(default_factory=set)
    # Why candidate (study, finding) pairs could not become samples, e.g. TOO_FEW_NEGATIVES.
    skip_reasons: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, n: int = 1) -> None:
        if n:
            self.skip_reasons[reason] = self.skip_reasons.get(reason, 0) + n


def pick_rows(frame: pl.DataFrame, k: int, rng: random.Random, order: Sequence[str] = ("study_id",)) -> list[dict]:
    """Seeded choice of k rows. Sorting first makes the choice independent of input row order."""
    frame = frame.sort(list(order))
    return frame[choose_indices(frame.height, k, rng)].to_dicts()


def study_ref(row: Mapping[str, Any]) -> StudyRef:
    return StudyRef(str(row["study_id"]), str(row["patient_id"]), str(row["split"]), str(row["image_path"]))
