"""A dictionary build in resumable parts: each part gathers the evidence of a few prompts and
is saved on its own, so that a build interrupted (or cut into calls that each fit a GPU
time limit, as on ZeroGPU) goes on from the parts it has.

    out/parts/plan.json          what the build is of: the same plan resumes, another refuses
    out/parts/part-00003.json    each SAE's evidence of part 3 (written last: the part is done)
    out/parts/part-00003.safetensors  each SAE's per-image spatial means of part 3

Once every part is done, `finish` writes what `merged` gathered: the dictionaries in the
bank's layout, the example index and a card (README.md, or DICTIONARIES.md beside another
README) to `out/`, and removes `out/parts/`.
"""

import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors.torch import save_file

from core.annotate.annotation import Annotator
from core.emergence.concepts import ConceptDictionary, save_dictionaries
from core.emergence.dictionary_builder import DictionaryBuilder
from core.emergence.gathering import Gathered, gather, save_examples
from core.emergence.words import WordVectors
from core.files import atomic_write, read_safetensors, write_json
from core.runtime import CorruptFileError, counted
from core.sae.bank import SAEBank, SAEKey

PARTS_DIR = "parts"
PLAN_FILE = "plan.json"
CARD_FILE = "README.md"
"""The card, as a Hub repo shows it; where another README is there (a folder that also holds
the SAEs), `OTHER_CARD_FILE` instead."""
OTHER_CARD_FILE = "DICTIONARIES.md"
CARD_TITLE = "# Concept dictionaries for the SAEs"


@dataclass(frozen=True)
class Plan:
    """What a build is of. Prompt i of the whole list is generated from seed + i."""

    model: str
    saes: str
    keys: tuple[str, ...]
    """The SAEs given dictionaries, as `SAEKey.describe` names them."""
    prompts: tuple[str, ...]
    seed: int
    steps: int
    guidance_scale: float
    resolution: int | None
    iou_threshold: float
    labeller: dict
    """What labels the images (`AnnotatorConfig.record`)."""
    part_size: int

    def record(self) -> dict:
        """The plan as its JSON file holds it."""
        return json.loads(json.dumps(asdict(self)))

    @property
    def num_parts(self) -> int:
        return -(-len(self.prompts) // self.part_size)

    def part(self, index: int) -> tuple[list[str], int]:
        """The prompts of part `index` and the seed of its first."""
        start = index * self.part_size
        return list(self.prompts[start : start + self.part_size]), self.seed + start


class PartedBuild:
    """The parts of one plan's build below `out/parts/`, for the SAEs of `keys` in `bank`."""

    def __init__(self, out: Path, plan: Plan, bank: SAEBank, keys: Sequence[SAEKey]) -> None:
        self.out, self.plan, self.bank, self.keys = Path(out), plan, bank, list(keys)
        self.folder = self.out / PARTS_DIR
        written = self.folder / PLAN_FILE
        if written.is_file():
            earlier, now = _read_json(written), plan.record()
            if earlier != now:
                changed = sorted(k for k in now if earlier.get(k) != now[k])
                raise ValueError(
                    f"{self.folder} holds the parts of a build with other settings "
                    f"({', '.join(changed)}); delete that folder to start again, or build "
                    "into another output folder"
                )

    def path(self, index: int, suffix: str) -> Path:
        return self.folder / f"part-{index:05d}{suffix}"

    def done(self) -> list[int]:
        return [i for i in range(self.plan.num_parts) if self.path(i, ".json").is_file()]

    def remaining(self) -> list[int]:
        done = set(self.done())
        return [i for i in range(self.plan.num_parts) if i not in done]

    def build(
        self, index: int, pipe, annotator: Annotator, *, labelled_by: str, gen_batch: int = 4
    ) -> None:
        """Generate (`gen_batch` prompts at once), record, annotate and keep part `index`;
        `labelled_by` names the labeller of `annotator`."""
        prompts, seed = self.plan.part(index)
        started = time.perf_counter()
        gathered = gather(
            pipe,
            self.bank,
            prompts,
            annotator,
            keys=self.keys,
            seed=seed,
            gen_batch=gen_batch,
            steps=self.plan.steps,
            guidance_scale=self.plan.guidance_scale,
            resolution=self.plan.resolution,
            iou_threshold=self.plan.iou_threshold,
        )
        self._save(index, gathered, time.perf_counter() - started, labelled_by)

    def _save(self, index: int, gathered: Gathered, seconds: float, labelled_by: str) -> None:
        """Keep part `index`: its spatial means, then its evidence and how long it took (the
        mark of a done part)."""
        if not (self.folder / PLAN_FILE).is_file():  # the first part: nothing is written before
            self.folder.mkdir(parents=True, exist_ok=True)
            write_json(self.folder / PLAN_FILE, self.plan.record())
        names = {key: key.describe() for key in gathered.builders}
        means = {names[key]: gathered.means(key).contiguous() for key in gathered.builders}
        atomic_write(self.path(index, ".safetensors"), lambda tmp: save_file(means, tmp))
        evidence = {names[key]: b.state() for key, b in gathered.builders.items()}
        done = {"num_objects": gathered.num_objects, "seconds": seconds, "labelled_by": labelled_by}
        write_json(self.path(index, ".json"), {**evidence, **done})

    def labellers(self) -> list[str]:
        """The labellers that labelled the parts done (a fallback may have labelled some)."""
        done = [_read_json(self.path(index, ".json"))["labelled_by"] for index in self.done()]
        return sorted(set(done))

    def seconds_per_part(self) -> float | None:
        """How long the parts done so far took each, on average; None before any."""
        done = [_read_json(self.path(index, ".json"))["seconds"] for index in self.done()]
        return sum(done) / len(done) if done else None

    def merged(self) -> Gathered:
        """The evidence of every part, in order, as one pass over all prompts gathers it."""
        if self.remaining():
            raise ValueError(f"parts {self.remaining()} of {self.folder} are not built yet")
        builders = {
            key: DictionaryBuilder(
                key, self.bank[key].cfg.num_latents, iou_threshold=self.plan.iou_threshold
            )
            for key in self.keys
        }
        gathered = Gathered(builders)
        for index in range(self.plan.num_parts):
            evidence = _read_json(self.path(index, ".json"))
            means = read_safetensors(self.path(index, ".safetensors"))
            gathered.num_objects += evidence["num_objects"]
            for key in self.keys:
                builders[key].add_state(evidence[key.describe()])
                gathered.spatial_means.setdefault(key, []).append(means[key.describe()])
        return gathered

    def finish(
        self, gathered: Gathered, word_vectors: WordVectors, info: dict
    ) -> dict[SAEKey, ConceptDictionary]:
        """Write the dictionaries of `gathered` (the parts `merged`), the example index (with
        `info`) and the card to `out/`, then remove the parts; returns the dictionaries."""
        dictionaries = {key: b.build(word_vectors) for key, b in gathered.builders.items()}
        save_dictionaries(dictionaries.values(), self.out)
        save_examples(self.out, gathered, self.plan.prompts, self.plan.seed, info)
        card = dictionary_card(self.plan, dictionaries, gathered.num_objects, self.labellers())
        atomic_write(card_path(self.out), lambda tmp: tmp.write_text(card))
        shutil.rmtree(self.folder)
        return dictionaries


def card_path(out: Path) -> Path:
    """Where the card goes: README.md, unless a README that is not a card is there."""
    readme = out / CARD_FILE
    if readme.is_file() and CARD_TITLE not in readme.read_text(errors="replace"):
        return out / OTHER_CARD_FILE
    return readme


def dictionary_card(
    plan: Plan,
    dictionaries: dict[SAEKey, ConceptDictionary],
    num_objects: int,
    labelled_by: list[str],
) -> str:
    """The README of a folder or Hub repo of dictionaries: what they were built from, with
    what, and what they hold."""
    labeller = ", ".join(f"{k}: {v}" for k, v in plan.labeller.items())
    rows = [
        f"| {key.describe()} | {int(d.has_embedding.sum())} | {len(d.vocabulary())} |"
        for key, d in dictionaries.items()
    ]
    thresholds = next(iter(dictionaries.values())).thresholds if dictionaries else {}
    return "\n".join(
        [
            "---",
            "tags: [sparse-autoencoder, concept-dictionary, diffusion, interpretability]",
            "---",
            "",
            f"{CARD_TITLE} `{plan.saes}`",
            "",
            "Each SAE latent (CID) gets the names of the objects whose masks its activation "
            "map overlaps (built with `python -m core.emergence.build_dictionary`).",
            "",
            f"- SAEs: `{plan.saes}`; pipeline: `{plan.model}`, {counted(plan.steps, 'step')}, "
            f"guidance {plan.guidance_scale:g}, seeds {plan.seed} to "
            f"{plan.seed + len(plan.prompts) - 1}",
            f"- Prompts: {len(plan.prompts)} (listed in `examples.json`)",
            f"- Labeller: {labeller}; the images were labelled by {', '.join(labelled_by)}",
            f"- Thresholds: {', '.join(f'{k} {v:g}' for k, v in thresholds.items())}",
            f"- Annotated objects: {num_objects}",
            "",
            "| SAE | labelled CIDs | labels |",
            "| --- | --- | --- |",
            *rows,
            "",
        ]
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CorruptFileError(
            f"{path} is unreadable ({error}); delete it to build that part again"
        ) from error
