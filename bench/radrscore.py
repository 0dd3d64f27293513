"""Throughput of the rules RadRScore judge and of process_reward through TRL's reward signature.

    python bench/radrscore.py [--prompts 256] [--rollouts 8] [--repeats 5] [--core 0]

What is measured, on one core (the process pins itself to ``--core`` when the OS allows):

* **GRPO batch, cold**: one optimisation step's worth of rollouts (prompts x rollouts,
  default 256 x 8 = 2048, as in the release's RL recipe), each a ``<think>`` of about 5 steps
  written the way a model fine-tuned on mined chains writes: most lines close to the gold
  chain's, some rephrased (other wording, severity, side), some with a flipped status, some
  filler. Caches are emptied before every repeat, so the figure includes reading every
  distinct line once; lines repeated across the 8 rollouts of a prompt, or across prompts,
  are read once. This is the figure held to the floor (2,000 completions/s).
* **no repeated line (worst case)**: every step of every completion is a line never seen
  before: the mention finder's raw speed.
* **warm**: the same batch scored again (every line cached): the cost of everything else.

Each figure is the median of ``--repeats`` runs, per wall second and per CPU-second of this
process (one core); the floor is held on the CPU figure, which the shared machine's load does
not distort.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FLOOR = 2000.0

# (observation, status) -> phrasings; {a}: an optional side/region, {s}: an optional severity.
PHRASES = {
    ("Pleural Effusion", "present"): ["There is a {s}{a}pleural effusion.", "A {s}{a}pleural effusion is seen.",
                                      "Blunting of the {a}costophrenic angle indicates a {s}pleural effusion."],
    ("Pleural Effusion", "absent"): ["There is no pleural effusion.", "No pleural effusion is seen.",
                                     "The costophrenic angles are sharp, without effusion."],
    ("Cardiomegaly", "present"): ["The heart is enlarged, consistent with {s}cardiomegaly.",
                                  "There is {s}cardiomegaly.", "The cardiac silhouette is {s}enlarged."],
    ("Cardiomegaly", "absent"): ["The heart size is normal.", "There is no cardiomegaly.",
                                 "The cardiac silhouette is within normal limits."],
    ("Pneumothorax", "absent"): ["There is no pneumothorax.", "No pneumothorax is identified.",
                                 "No evidence of pneumothorax."],
    ("Pneumothorax", "present"): ["There is a {s}{a}pneumothorax.", "A {s}{a}pneumothorax is present."],
    ("Consolidation", "present"): ["There is {s}consolidation in the {a}lower lobe.",
                                   "Focal consolidation is seen at the {a}base."],
    ("Consolidation", "absent"): ["There is no focal consolidation.", "No consolidation is seen."],
    ("Edema", "present"): ["There is {s}pulmonary edema.", "Findings are consistent with {s}interstitial edema."],
    ("Edema", "absent"): ["There is no pulmonary edema.", "No signs of edema are present."],
    ("Pneumonia", "uncertain"): ["Pneumonia at the {a}base cannot be excluded.",
                                 "The opacity may represent {s}pneumonia."],
    ("Pneumonia", "absent"): ["There is no evidence of pneumonia.", "No focal opacity to suggest pneumonia."],
    ("Atelectasis", "present"): ["There is {s}{a}basilar atelectasis.", "Linear opacities reflect {s}atelectasis."],
    ("Support Devices", "present"): ["An endotracheal tube terminates above the carina.",
                                     "A right PICC line ends in the lower SVC."],
}
SEVERITY = ["", "", "small ", "mild ", "moderate ", "large "]
SIDE = ["", "", "left ", "right ", "bilateral "]
FILLER = ["First, I examine the chest radiograph systematically.", "Next, I assess the pleural spaces.",
          "Now the cardiac silhouette is considered.", "Let me look at the lung fields carefully."]
PREFIXES = ["", "On this frontal view, ", "Compared with the prior study, ", "Again, ", "In addition, ",
            "On the lateral view, ", "Looking at the lower lungs, ", "Importantly, ", "As expected, "]
SUFFIXES = ["", " as before", " on the current image", " at this time", " in this patient",
            " on this radiograph", " without other change", " overall"]


FLIP = {"present": "absent", "absent": "present", "uncertain": "absent"}
LABEL_OF = {"present": "positive", "absent": "negative", "uncertain": "uncertain"}


def phrase(rng: random.Random, obs: str, status: str) -> str:
    options = PHRASES.get((obs, status)) or PHRASES[(obs, FLIP[status])]
    return rng.choice(options).format(s=rng.choice(SEVERITY), a=rng.choice(SIDE))


def reword(rng: random.Random, line: str) -> str:
    """A line with an optional lead-in and tail, as sampled rollouts vary their wording."""
    prefix, suffix = rng.choice(PREFIXES), rng.choice(SUFFIXES)
    body = line[0].lower() + line[1:-1] if prefix else line[:-1]
    return prefix + body + suffix + "."


def make_batch(prompts: int, rollouts: int, seed: int = 0) -> tuple[list[str], dict[str, list]]:
    """Completions and the TRL reward kwargs (columns repeated per rollout)."""
    from training.rewards import encode_gold_labels, encode_gold_steps

    rng = random.Random(seed)
    observations = sorted({o for o, _ in PHRASES})
    completions, cols = [], {"solution": [], "task": [], "gold_steps": [], "gold_labels": []}
    for _ in range(prompts):
        chosen = rng.sample(observations, rng.randint(3, 5))
        findings = []
        for obs in chosen:
            statuses = [s for o, s in PHRASES if o == obs]
            findings.append((obs, rng.choice(statuses)))
        gold_steps = [{"text": phrase(rng, o, s), "findings": [{"observation": o, "status": s}]} for o, s in findings]
        gold_steps.append({"text": "Therefore, the answer is B.", "findings": []})
        steps_json = encode_gold_steps(gold_steps)
        labels_json = encode_gold_labels({o: LABEL_OF[s] for o, s in findings})
        for _ in range(rollouts):
            lines = []
            if rng.random() < 0.3:
                lines.append(rng.choice(FILLER))
            for (obs, status), gold in zip(findings, gold_steps):
                r = rng.random()
                if r < 0.45:  # the mined chain's line, as SFT taught it
                    lines.append(gold["text"])
                elif r < 0.85:  # the same finding in the model's own words
                    lines.append(reword(rng, phrase(rng, obs, status)))
                elif r < 0.95:  # a wrong status
                    lines.append(reword(rng, phrase(rng, obs, FLIP[status])))
                # else: the finding is left out
            lines.append("Therefore, the answer is B." if rng.random() < 0.8 else "So the answer is A.")
            completions.append("<think>\n" + "\n".join(lines) + "\n</think>\n<answer>B</answer>")
            for k, v in (("solution", "B"), ("task", "binary"), ("gold_steps", steps_json),
                         ("gold_labels", labels_json)):
                cols[k].append(v)
    return completions, cols


def unique_lines(completions: list[str], seed: int = 1) -> list[str]:
    """The same completions with every line made distinct (no line is ever repeated).

    Lines differ by combinations of ordinary words (prefix, severity, side, suffix), not by
    made-up tokens, so the tokenizer sees the vocabulary a model would write.
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    out = []
    for c in completions:
        think = c.split("<think>\n", 1)[1].split("\n</think>", 1)[0]
        lines = []
        for line in think.splitlines():
            for _ in range(1000):
                body = line[0].lower() + line[1:-1]
                candidate = rng.choice(PREFIXES) + body + rng.choice(SUFFIXES) + "."
                candidate = candidate[0].upper() + candidate[1:]
                for w in rng.sample(SEVERITY[2:], 1):
                    candidate = candidate.replace("a pleural", f"a {w}pleural", 1)
                if candidate not in seen:
                    break
                line = rng.choice([ln for ln in think.splitlines()])
            seen.add(candidate)
            lines.append(candidate)
        out.append("<think>\n" + "\n".join(lines) + "\n</think>\n<answer>B</answer>")
    return out


CPU_TIMES: dict[int, float] = {}  # id(fn) -> median CPU seconds of the last timed() call


def timed(fn, repeats: int, cold: bool) -> float:
    """Median wall seconds of ``repeats`` runs; the median CPU seconds go to CPU_TIMES (on a shared
    machine the wall figure includes waiting for the core, the CPU figure does not)."""
    from training.radrscore import clear_caches

    times, cpu = [], []
    for _ in range(repeats):
        if cold:
            clear_caches()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    CPU_TIMES[id(fn)] = statistics.median(cpu)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--rollouts", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--core", type=int, default=0)
    args = ap.parse_args()
    from bench.common import pin_to_core

    pin_to_core(args.core)

    from training.answers import parse_output
    from training.findings_text import prefetch
    from training.radrscore import gold_chain_from_json, labels_from_json, score_reasoning
    from training.rewards import process_reward

    completions, cols = make_batch(args.prompts, args.rollouts)
    n = len(completions)
    process_reward(completions[:8], **{k: v[:8] for k, v in cols.items()})  # load the finder once

    steps = [line for c in completions for line in parse_output(c).think.splitlines()]
    print(f"batch: {args.prompts} prompts x {args.rollouts} rollouts = {n} completions, "
          f"{len(steps) / n:.1f} steps each, {len(set(steps)) / len(steps):.0%} of lines distinct")

    def rules_judge(batch: list[str]) -> None:
        thinks = [parse_output(c).think for c in batch]
        prefetch(thinks)  # as score_predictions does: a batch's new lines in few finder calls
        for think, g, lab in zip(thinks, cols["gold_steps"], cols["gold_labels"]):
            score_reasoning(think, gold_chain_from_json(g), labels_from_json(lab))

    unique = unique_lines(completions)
    cases = {
        "rules judge, GRPO batch, cold": (lambda: rules_judge(completions), True),
        "process_reward (TRL signature), GRPO batch, cold": (lambda: process_reward(completions, **cols), True),
        "rules judge, no repeated line (worst case)": (lambda: rules_judge(unique), True),
        "process_reward (TRL signature), warm": (lambda: process_reward(completions, **cols), False),
    }
    results = {}
    for name, (fn, cold) in cases.items():
        wall = timed(fn, args.repeats, cold=cold)
        results[name] = (n / wall, n / CPU_TIMES[id(fn)])
    width = max(map(len, results))
    for name, (rate, cpu_rate) in results.items():
        print(f"{name:<{width}}  {rate:>9,.0f} completions/s wall  {cpu_rate:>9,.0f} per CPU-second")
    cold_wall, cold_cpu = results["process_reward (TRL signature), GRPO batch, cold"]
    # The floor is held per CPU-second of this (single-core) process: on the shared development
    # machine the wall figure mostly measures how long the process waited for its core.
    print(f"floor {FLOOR:,.0f}/s on the cold GRPO batch, per CPU-second: {'PASS' if cold_cpu >= FLOOR else 'FAIL'} "
          f"({n} completions in {n / cold_cpu:.2f} CPU-s, {n / cold_wall:.2f} s wall)")
    return 0 if cold_cpu >= FLOOR else 1


if __name__ == "__main__":
    raise SystemExit(main())
