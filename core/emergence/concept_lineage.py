"""Write the lineage of one block's concepts across t: `python -m core.emergence.concept_lineage`.

    python -m core.emergence.concept_lineage --saes assets/tiny/saes --preset tiny \
        --block up_blocks.1.attentions.0 --out runs/lineage
    python -m core.emergence.concept_lineage ... --method coactivation --prompts prompts.txt

For each method it writes `lineage_<method>.csv` (one row per chain of CIDs, with the
similarity of each match and each SAE's top label) and `summary.json` (per transition
t -> t': the null threshold and the shares of concepts that persist, vanish, appear or
split, and how often a match keeps its label), and prints the summary. See
`core.emergence.lineage` for the matching and its null thresholds.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

from simple_parsing import field

from core.diffusion.pipelines import load_pipeline
from core.diffusion.presets import PRESETS, get_preset
from core.emergence.concepts import load_dictionaries
from core.emergence.lineage import METHODS, Lineage, coactivation_rows, lineage, ordered_keys
from core.files import write_csv, write_json
from core.runtime import command
from core.sae.bank import SAEBank
from core.training.activations import read_prompts


@dataclass(kw_only=True)
class LineageConfig:
    """Settings of `python -m core.emergence.concept_lineage`."""

    saes: str
    """SAE bank (local folder or Hub repo) with SAEs of the block at each t."""
    block: str
    """The block whose SAEs are matched, e.g. mid_block.attentions.0."""
    out: str
    """Output folder."""
    branch: str = "cond"
    """Classifier-free-guidance branch of the SAEs."""
    t: tuple[float, ...] = (1.0, 0.5, 0.0)
    """SAE times, matched in order from the first denoising step."""
    method: tuple[str, ...] = field(default=("decoder",), choices=METHODS, nargs="*")
    """decoder: cosine of decoder rows; coactivation: IoU of where latents fire."""
    prompts: str | None = None
    """Prompt file for co-activation (one prompt per line)."""
    preset: str = field(default="tiny", choices=sorted(PRESETS))
    """Preset whose pipeline generates for co-activation."""
    steps: int | None = None
    """Denoising steps for co-activation (default: the preset's)."""
    gen_batch: int = 4
    """Prompts generated at once."""
    seed: int = 0
    """Prompt i uses seed + i; also seeds the null thresholds."""
    device: str | None = None
    """Device (default: cuda if available, else cpu)."""

    def __post_init__(self) -> None:
        if "coactivation" in self.method and not self.prompts:
            raise ValueError("--method coactivation needs --prompts, a file of prompts")


def run_lineage(config: LineageConfig) -> dict[str, Lineage]:
    """Match the block's SAEs by each method; write and return the lineages."""
    bank = SAEBank.from_pretrained(config.saes, [config.block], [config.branch], device="cpu")
    keys = ordered_keys(bank, config.block, config.branch, config.t)
    labels = load_dictionaries(config.saes, [config.block], [config.branch])
    out = Path(config.out)
    results, summary = {}, {}
    for method in config.method:
        rows = _rows(config, bank, keys) if method == "coactivation" else None
        result = lineage(
            bank, config.block, config.branch, config.t, method, rows, labels, config.seed
        )
        write_csv(out / f"lineage_{method}.csv", result.chains)
        results[method], summary[method] = result, result.summary()
    write_json(out / "summary.json", summary)
    for method, rows in summary.items():
        for row in rows:
            kept = "n/a" if row["label_kept"] is None else f"{row['label_kept']:.2f}"
            print(
                f"{method:12s} t={row['from_t']:g} -> {row['to_t']:g}: persist {row['persist']:.2f}"
                f", vanish {row['vanish']:.2f}, appear {row['appear']:.2f}, split "
                f"{row['split']:.2f}, label kept {kept} of "
                f"{row['labelled_matches']} (null threshold {row['threshold']:.3f})"
            )
    return results


def _rows(config: LineageConfig, bank: SAEBank, keys):
    preset = get_preset(config.preset)
    pipe = load_pipeline(preset, device=config.device)
    return coactivation_rows(
        pipe,
        bank,
        keys,
        read_prompts(config.prompts),
        steps=config.steps or preset.steps,
        guidance_scale=preset.guidance_scale,
        batch_size=config.gen_batch,
        seed=config.seed,
        resolution=preset.resolution,
    )


main = command(LineageConfig, run_lineage, "python -m core.emergence.concept_lineage", __doc__)

if __name__ == "__main__":
    sys.exit(main())
