"""Which checkpoint a training run hands to evaluation: the GRPO policy or the SFT model it started from.

GRPO raises the reward of *sampled* answers; evaluation decodes greedily. On a small model the two can
part ways: its greedy answers follow a few templates, so one nudged decision flips the greedy answer of
twenty prompts at once, and from one SFT start the benchmark accuracy fell 0.500 -> 0.412 while the
sampled reward rose (bench/README.md, "Greedy answers move in clusters"). So after GRPO both checkpoints
answer the validate split greedily, GRPO's own reward functions score the answers, and evaluation gets
the checkpoint with the higher mean (a tie keeps GRPO). The validate split is neither trained on nor
the benchmark, so the benchmark's figures stay held out. This is the usual "best checkpoint on the
validation set", with two candidates.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal


def paired_rise(before: Sequence[float], after: Sequence[float]) -> dict[str, float]:
    """Mean of after - before over the same prompts, its standard error and t = mean / se, and how
    many prompts got better and worse."""
    diffs = [a - b for a, b in zip(after, before, strict=True)]
    if not diffs:
        return {"before": 0.0, "after": 0.0, "rise": 0.0, "se": float("inf"), "t": 0.0, "n": 0, "better": 0,
                "worse": 0}
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("inf")
    return {"before": statistics.fmean(before), "after": statistics.fmean(after), "rise": mean, "se": se,
            "t": mean / se if se > 0 else (float("inf") if mean > 0 else 0.0), "n": len(diffs),
            "better": sum(d > 1e-9 for d in diffs), "worse": sum(d < -1e-9 for d in diffs)}


@dataclass(frozen=True)
class CheckpointChoice:
    """The checkpoint to evaluate and why. ``reward_*`` are mean rewards of greedy answers on the same
    validate prompts (None where no comparison was made)."""

    chosen: Literal["grpo", "sft"]
    checkpoint: str
    reason: str
    n: int = 0
    reward_sft: float | None = None
    reward_grpo: float | None = None
    rise: float | None = None  # reward_grpo - reward_sft, paired over the prompts
    se: float | None = None
    t: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One phrase for logs and the train summary."""
        if self.reward_sft is None:
            return f"evaluating the {self.chosen.upper()} checkpoint: {self.reason}"
        return (f"evaluating the {self.chosen.upper()} checkpoint: greedy reward on {self.n} validate prompts "
                f"SFT {self.reward_sft:.3f}, GRPO {self.reward_grpo:.3f} ({self.rise:+.3f}, t {self.t:.2f})")


def keep_trained(reason: str, trained_checkpoint: str) -> CheckpointChoice:
    """No comparison (switched off, no validate prompts, no start checkpoint): the GRPO checkpoint."""
    return CheckpointChoice(chosen="grpo", checkpoint=trained_checkpoint, reason=reason)


def choose_checkpoint(start_checkpoint: str, trained_checkpoint: str, start_rewards: Sequence[float],
                      trained_rewards: Sequence[float]) -> CheckpointChoice:
    """The higher mean reward over the same prompts wins; a tie keeps the trained (GRPO) checkpoint.

    The mean, not a significance test: both candidates are finished models and the one that answers the
    validate split better is the better guess for the benchmark. The paired se and t are recorded so a
    reader sees how close the call was."""
    if not start_rewards:
        return keep_trained("no validate prompts to compare on", trained_checkpoint)
    rise = paired_rise(start_rewards, trained_rewards)
    grpo_wins = rise["rise"] >= 0
    return CheckpointChoice(
        chosen="grpo" if grpo_wins else "sft", checkpoint=trained_checkpoint if grpo_wins else start_checkpoint,
        reason=("GRPO's greedy answers score at least as high on the validate split" if grpo_wins
                else "GRPO's greedy answers score lower on the validate split than its SFT start"),
        n=int(rise["n"]), reward_sft=rise["before"], reward_grpo=rise["after"], rise=rise["rise"], se=rise["se"],
        t=rise["t"])


def compare_on_validate(start_checkpoint: str, trained_checkpoint: str, rows: Sequence[Mapping[str, Any]],
                        funcs: Sequence[Callable[..., Any]], weights: Sequence[float], max_new_tokens: int
                        ) -> CheckpointChoice:
    """Greedy answers of both checkpoints to ``rows`` (validate prompts with their reward columns),
    scored with GRPO's weighted reward (training.rewards.weighted_rewards), then ``choose_checkpoint``."""
    from training.generate import generate
    from training.rewards import weighted_rewards

    if not rows:
        return keep_trained("no validate prompts to compare on", trained_checkpoint)
    rewards = [weighted_rewards(funcs, weights, rows, generate(checkpoint, rows, max_new_tokens=max_new_tokens))
               for checkpoint in (start_checkpoint, trained_checkpoint)]
    return choose_checkpoint(start_checkpoint, trained_checkpoint, *rewards)
