"""Stage windows: which steps an edit touches, and the stage each edited step counts as.

A window is a named stage ("early", "middle", "final": t windows of the preset's `Stages`,
the paper's by default), whose steps all edit as that stage, as in the paper's experiments,
or a custom (t_min, t_max), whose steps each edit as the stage of their own t. A step's
stage picks its default strength and, by default, its SAE: the one trained at the stage's
t; "nearest" gives each step the SAE trained nearest to its own t.
"""

from core.diffusion.presets import PAPER_STAGES, Stages

Window = str | tuple[float, float]
SAE_CHOICES = ("stage", "nearest")
"""How an edited step picks its SAE: the one of its stage's t, or the one nearest its own t."""


def stage_window(window: Window, stages: Stages = PAPER_STAGES) -> tuple[float, float]:
    """A named stage's (t_min, t_max), or an explicit one checked."""
    if isinstance(window, str):
        if window not in stages.windows:
            names = ", ".join(stages.windows)
            raise ValueError(f"unknown stage {window!r}; choose {names} or a t range")
        return stages.windows[window]
    low, high = (float(v) for v in window)
    if not 0 <= low <= high <= 1:
        raise ValueError(f"a t range needs 0 <= t_min <= t_max <= 1, got ({low}, {high})")
    return low, high


def stage_at(t: float, stages: Stages = PAPER_STAGES) -> str:
    """The stage a step at `t` belongs to. Where windows share a bound (the paper's: early
    [0.6, 1], middle [0.2, 0.6], final [0, 0.2]) a step exactly on it belongs to the stage
    that ends there, the earlier one (t = 0.6 is early, t = 0.2 middle)."""
    return next(name for name, (low, _) in stages.windows.items() if t >= low)


def step_stage(window: Window, t: float, stages: Stages = PAPER_STAGES) -> str:
    """The stage whose SAE and default strength edit a step at `t`: a named stage's for every
    step in it; in a custom window, the stage of `t` itself."""
    return window if isinstance(window, str) else stage_at(t, stages)


def stages_in(window: Window, stages: Stages = PAPER_STAGES) -> list[str]:
    """The stages whose steps a window can edit, from the earliest."""
    if isinstance(window, str):
        return [window]
    low, high = stage_window(window, stages)
    names = list(stages.windows)
    return names[names.index(stage_at(high, stages)) : names.index(stage_at(low, stages)) + 1]


def sae_t(sae_choice: str, stage: str, t: float, stages: Stages = PAPER_STAGES) -> float:
    """The t whose SAE (the bank's nearest to it) edits a step at `t` counted as `stage`."""
    return t if sae_choice == "nearest" else stages.sae_t[stage]
