"""What an intervention did: each step in its window, edited with which SAE, CIDs and
strength, or skipped and why."""

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from core.sae.bank import SAEKey


@dataclass(frozen=True)
class StepEdit:
    """What an intervention did at one step of one block and branch."""

    block: str
    index: int
    """The step's position in the schedule (0 = first, noisiest); -1 if t is not in it."""
    t: float
    branch: str
    sae: SAEKey
    """The SAE chosen for the step, whether or not it edited."""
    cids: tuple[int, ...]
    """That SAE's CIDs of the concept."""
    stage: str
    """The stage the step edits as (`core.steer.windows.step_stage`)."""
    strength: float
    skipped: str = ""
    """Why the step was left alone; empty when it was edited."""


@dataclass
class EditRecord:
    """Which steps an intervention edited, with which SAE and CIDs, and which it skipped and why.

    Every step whose t lies in the window, on every edited branch, is one entry. The notes
    are about the whole edit, e.g. a stage whose t the bank has no SAE at.
    """

    steps: list[StepEdit] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def edited(self) -> list[StepEdit]:
        return [step for step in self.steps if not step.skipped]

    def skipped(self) -> list[StepEdit]:
        return [step for step in self.steps if step.skipped]

    def summary(self) -> str:
        """The record in one line, e.g. "edited steps 0–19 with mid_block.attentions.0 (t=1,
        cond), CIDs 12, 40; skipped none"."""
        if not self.steps:
            return "; ".join(["edited no step: no step's t lies in the window", *self.notes])
        several = len({step.strength for step in self.edited()}) > 1
        edited = [
            f"{step_ranges(indices)} with {sae.describe()}, CIDs {list_cids(cids)}"
            + (f" at strength {strength:g}" if several else "")
            for (sae, cids, strength), indices in indices_by(
                self.edited(), lambda s: (s.sae, s.cids, s.strength)
            )
        ]
        skipped = [
            f"skipped {step_ranges(indices)}: {why}"
            for why, indices in indices_by(self.skipped(), lambda s: s.skipped)
        ]
        edited_text = "edited " + "; ".join(edited) if edited else "edited no step"
        return "; ".join([edited_text, *(skipped or ["skipped none"]), *self.notes])


def indices_by(steps: Iterable, key: Callable) -> list[tuple[object, list[int]]]:
    """The steps' indices (anything with an `index`, such as a `StepEdit`) grouped by `key`,
    groups in order of first appearance."""
    groups: dict[object, list[int]] = {}
    for step in steps:
        groups.setdefault(key(step), []).append(step.index)
    return list(groups.items())


def step_ranges(indices: Iterable[int]) -> str:
    """ "step 4" or "steps 0–3, 6": runs of consecutive indices as ranges."""
    values = sorted(set(indices))
    runs: list[list[int]] = []
    for value in values:
        if runs and value == runs[-1][-1] + 1:
            runs[-1].append(value)
        else:
            runs.append([value])
    text = ", ".join(f"{run[0]}–{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)
    return f"step{'s' if len(values) > 1 else ''} {text}"


def list_cids(cids: Sequence[int], shown: int = 8) -> str:
    """ "3, 7, 12" or, for many, the first few and the count."""
    text = ", ".join(map(str, cids[:shown]))
    return text if len(cids) <= shown else f"{text}, ... ({len(cids)} in all)"
