"""The emergence view over several prompts and seeds: `python -m core.views.emergence_batch`.

    python -m core.views.emergence_batch --out runs/batch       # the offline preset's defaults
    python -m core.views.emergence_batch --preset sd14 --prompts eval.txt --out runs/sd14

Runs the app's emergence view for every prompt and seed, with the same steps, block,
branch and words, and pools each step's IoU over the runs and words (`core.views.batch`).
Writes into --out: batch.csv (one row per word, "all" first, and step; nan where no value
is defined), batch.png (mean IoU vs t with a band of one standard deviation) and runs.json
(each run's prompt, seed, words, references and IoUs per step, null where undefined).
"""

import sys
from dataclasses import dataclass
from pathlib import Path

from simple_parsing import field as option

from core.diffusion.hooks import BRANCHES
from core.diffusion.presets import PRESETS, default_preset_name, get_preset
from core.runtime import command
from core.training.activations import read_prompts
from core.views.batch import BatchResult, RunScores, run_batch, summary_line, write_batch
from core.views.model_cache import ModelCache

DEFAULT_PROMPTS = 3
"""Prompts taken from the preset's file when none are given."""

REPEATED = {"action": "append", "type": str, "nargs": None}
"""A repeatable option: each occurrence adds one string (simple_parsing would nest lists)."""


@dataclass(kw_only=True)
class BatchConfig:
    """Settings of `python -m core.views.emergence_batch`."""

    out: str
    """Output folder: batch.csv, batch.png and runs.json."""
    preset: str | None = option(default=None, choices=sorted(PRESETS))
    """Preset: pipeline, SAEs, dictionaries, prompts and app defaults (default: toy if its
    weights are here, else tiny)."""
    saes: str | None = None
    """SAE bank folder or Hub repo, with its concept dictionaries (default: the preset's)."""
    prompt: list[str] = option(default_factory=list, metavar="TEXT", **REPEATED)
    """A prompt, instead of a --prompts file; repeat the option for more (default: none)."""
    prompts: str | None = None
    """Text file, one prompt per line (default: the preset's prompt file)."""
    limit: int | None = None
    """Use at most this many prompts of the file (default: 3 of the preset's file, all of a
    file given)."""
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    """Seeds, each run with every prompt."""
    steps: int | None = None
    """Denoising steps (default: the preset's)."""
    block: str | None = None
    """Block whose SAEs predict (default: the one the preset's emergence tab opens on)."""
    branch: str = option(default="cond", choices=BRANCHES)
    """CFG branch of the SAEs and of the cross-attention maps."""
    words: str = ""
    """Comma-separated target words (default: empty, each prompt's nouns)."""
    device: str | None = None
    """Device (default: cuda if available, else cpu)."""

    def __post_init__(self) -> None:
        """Fill in the preset's defaults."""
        self.preset = self.preset or default_preset_name()
        preset = get_preset(self.preset)
        self.steps = self.steps or preset.steps
        self.block = self.block or preset.app.block
        if self.prompt and self.prompts:
            raise ValueError("give prompts either with --prompt or in a --prompts file, not both")
        if not (self.prompt or self.prompts or preset.prompts):
            raise ValueError(f"the preset {self.preset!r} ships no prompts; give --prompt")

    def prompt_list(self) -> list[str]:
        """The prompts to run: --prompt's, else the first --limit of the file."""
        if self.prompt:
            return self.prompt
        limit = self.limit or (None if self.prompts else DEFAULT_PROMPTS)
        return read_prompts(self.prompts or get_preset(self.preset).prompts)[:limit]


def emergence_batch(config: BatchConfig) -> BatchResult:
    """Run the batch `config` asks for, write its files and print its summary."""
    cache = ModelCache({config.preset: config.saes} if config.saes else None, device=config.device)

    def report(done: int, total: int, run: RunScores) -> None:
        print(f"run {done}/{total}: seed {run.seed}, {run.prompt!r} ({', '.join(run.words)})")

    result = run_batch(
        cache.get(config.preset),
        config.prompt_list(),
        config.seeds,
        config.steps,
        config.block,
        config.branch,
        config.words,
        on_run=report,
    )
    write_batch(result, Path(config.out))
    print(summary_line(result))
    print(f"wrote batch.csv, batch.png and runs.json to {config.out}")
    return result


main = command(BatchConfig, emergence_batch, "python -m core.views.emergence_batch", __doc__)


if __name__ == "__main__":
    sys.exit(main())
