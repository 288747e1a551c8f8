"""Dictionary building end to end on the tiny pipeline, with a fake annotator whose
masks are known: it outlines where one chosen latent fires, so that latent must get the
label, with IoU 1."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.annotate.annotation import Annotator, ObjectAnnotation
from core.annotate.labellers import LABELLERS, AnnotatorConfig, Labeller, register
from core.diffusion.hooks import record
from core.diffusion.presets import SD14_BLOCKS, get_preset
from core.emergence import build_dictionary
from core.emergence.composition import latent_grid
from core.emergence.concepts import load_dictionaries
from core.emergence.gathering import build_dictionaries, gather, load_spatial_means, select_keys
from core.emergence.parts import PartedBuild
from core.emergence.words import load_word_vectors
from core.sae.bank import SAEBank, SAEKey
from core.sae.config import SAEConfig
from core.sae.model import TopKSAE
from tests.helpers import command_help, dense_latents

PROMPTS = ["a red cat", "a dog on a table", "a green tree", "a blue car", "a bird in the sky"]
STEPS, SEED, SIZE = 4, 3, 32
UP = "up_blocks.1.attentions.0"
KEY = SAEKey(UP, 0.0, "cond")


def random_sae(block: str, t: float, seed: int, n: int = 32, k: int = 4) -> TopKSAE:
    torch.manual_seed(seed)
    sae = TopKSAE(SAEConfig(64, n, k, block=block, t=t))
    with torch.no_grad():
        sae.encoder.bias.uniform_(0.0, 0.5)  # every row keeps k positive latents
    return sae


def make_bank() -> SAEBank:
    keys = [(b, t) for b in SD14_BLOCKS for t in (1.0, 0.0)]
    return SAEBank(random_sae(b, t, i) for i, (b, t) in enumerate(keys))


def firing_maps(pipe, bank: SAEBank, key: SAEKey) -> torch.Tensor:
    """[prompts, H, W, n] activations of `key`'s SAE, recorded the way the builder does."""
    maps = []
    for i, prompt in enumerate(PROMPTS):
        with record(pipe, [key.block], at_t=[key.t]) as rec:
            generator = torch.Generator().manual_seed(SEED + i)
            pipe(prompt, num_inference_steps=STEPS, generator=generator, output_type="latent")
        grid = latent_grid(bank[key], rec.at(key.block, key.t, key.branch).delta)
        maps.append(dense_latents(grid, bank[key].cfg.num_latents)[0])
    return torch.stack(maps)


class OutlineAnnotator:
    """Labels "cat" where latent `cid` is on (activation / max > 0.1) and "tree" on the
    left half, for every prompt it was prepared for."""

    def __init__(self, maps: torch.Tensor, cid: int):
        self.masks = {}
        for prompt, image_map in zip(PROMPTS, maps, strict=True):
            acts = image_map[..., cid]
            on = (acts / acts.max().clamp_min(1e-12) > 0.1).float()[None, None]
            self.masks[prompt] = F.interpolate(on, (SIZE, SIZE))[0, 0].numpy() > 0.5
        self.calls = []

    def annotate(self, image, prompt=None) -> list[ObjectAnnotation]:
        self.calls.append(prompt)
        assert image.size == (SIZE, SIZE)
        left = np.zeros((SIZE, SIZE), dtype=bool)
        left[:, : SIZE // 2] = True
        objects = [ObjectAnnotation("tree", left, 1.0)]
        if self.masks[prompt].any():
            objects.append(ObjectAnnotation("Cat", self.masks[prompt], 1.0))
        return objects


@pytest.fixture(scope="module")
def setup(tiny_pipe):
    bank = make_bank()
    maps = firing_maps(tiny_pipe, bank, KEY)
    fired = maps > 0
    # a latent that fires on part of the grid in as many images as possible
    partial = (fired.any(dim=(1, 2)) & ~fired.all(dim=(1, 2))).sum(dim=0)
    cid = int(partial.argmax())
    assert partial[cid] >= 2
    return bank, maps, cid


def test_outlined_latent_gets_the_label_with_iou_one(tiny_pipe, setup):
    bank, maps, cid = setup
    annotator = OutlineAnnotator(maps, cid)
    assert isinstance(annotator, Annotator)
    dictionaries = build_dictionaries(
        tiny_pipe,
        bank,
        PROMPTS,
        annotator,
        load_word_vectors(),
        keys=[KEY],
        seed=SEED,
        gen_batch=2,
        steps=STEPS,
        guidance_scale=7.5,
    )
    assert annotator.calls == PROMPTS
    dictionary = dictionaries[KEY]
    assert dictionary.num_images == len(PROMPTS)
    evidence = dictionary.evidence[cid]["cat"]
    images_with_cat = sum(m.any() for m in annotator.masks.values())
    assert evidence.count == images_with_cat
    assert evidence.mean_iou == pytest.approx(1.0)
    assert cid in dictionary.cids_for("cat")
    assert dictionary.has_embedding[cid]
    # every CID labelled "tree" is on (mostly) the left half in the images it matched
    assert set(dictionary.vocabulary()) <= {"cat", "tree"}


def test_spatial_means_match_a_direct_recomputation(tiny_pipe, setup):
    bank, maps, _ = setup
    gathered = gather(
        tiny_pipe,
        bank,
        PROMPTS,
        OutlineAnnotator(maps, 0),
        keys=[KEY],
        seed=SEED,
        gen_batch=3,
        steps=STEPS,
        guidance_scale=7.5,
    )
    torch.testing.assert_close(gathered.means(KEY), maps.mean(dim=(1, 2)), atol=1e-4, rtol=1e-4)


def test_cli_saves_dictionaries_means_and_examples(tiny_pipe, setup, tmp_path, monkeypatch, capsys):
    bank, maps, cid = setup
    bank.save_pretrained(tmp_path / "saes")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    outlines = replace(
        LABELLERS["grounded-sam"], annotator=lambda c, d: OutlineAnnotator(maps, cid)
    )
    monkeypatch.setitem(LABELLERS, "grounded-sam", outlines)
    out = tmp_path / "dicts"
    code = build_dictionary.main(
        [
            "--preset",
            "tiny",
            "--saes",
            str(tmp_path / "saes"),
            "--prompts",
            str(prompts),
            "--out",
            str(out),
            "--blocks",
            UP,
            "--t",
            "0.0",
            "--steps",
            str(STEPS),
            "--seed",
            str(SEED),
            "--gen-batch",
            "2",
            "--annotator",
            "grounded-sam",
            "--device",
            "cpu",
        ]
    )
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "cohesion" in printed.out and "separab" in printed.out
    loaded = load_dictionaries(out)
    assert list(loaded) == [KEY]
    assert loaded[KEY].evidence[cid]["cat"].mean_iou == pytest.approx(1.0)
    means = load_spatial_means(out, KEY)
    torch.testing.assert_close(means, maps.mean(dim=(1, 2)), atol=1e-4, rtol=1e-4)
    examples = json.loads((out / "examples.json").read_text())
    assert examples["prompts"] == PROMPTS
    assert examples["seeds"] == [SEED + i for i in range(len(PROMPTS))]
    assert (examples["annotator"], examples["tags"]) == ("grounded-sam", "vision")
    assert examples["vocabulary"] == "core/annotate/vocabulary.txt"
    assert "(annotator grounded-sam, tags vision, vocabulary" in printed.out


def test_select_keys_refuses_missing_blocks_and_times():
    bank = make_bank()
    assert len(select_keys(bank, None, ["cond"], None)) == 6
    assert select_keys(bank, [UP], None, [0.0]) == [KEY]
    with pytest.raises(ValueError, match="no SAE for down_blocks.0"):
        select_keys(bank, ["down_blocks.0.attentions.0"], None, None)
    with pytest.raises(ValueError, match=r"no SAE for up_blocks.1.attentions.0 \(t=0.5"):
        select_keys(bank, [UP], None, [0.5])


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("empty", "has no prompts"),
        ("block", "down_blocks.0.attentions.0"),
        ("offline", "could not load the"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, case, expected):
    make_bank().save_pretrained(tmp_path / "saes")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("" if case == "empty" else "a cat\n")
    blocks = ["down_blocks.0.attentions.0"] if case == "block" else [UP]
    code = build_dictionary.main(
        [
            "--preset",
            "tiny",
            "--saes",
            str(tmp_path / "saes"),
            "--prompts",
            str(prompts),
            "--out",
            str(tmp_path / "out"),
            "--blocks",
            *blocks,
            "--annotator",
            "grounded-sam",
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and expected in err and "Traceback" not in err


def test_help_from_the_command_line_states_the_defaults():
    text = " ".join(command_help("core.emergence.build_dictionary").split())
    assert "--gen-batch" in text and "(default: 4)" in text
    assert "(default: the preset's, toy for tiny and toy, else grounded-sam)" in text
    assert "(default: None)" not in text
    assert "--tags {vision,prompt,prompt+vision}" in text and "(default: vision)" in text


def test_images_are_labelled_without_the_prompt_by_default():
    config = build_dictionary.DictionaryConfig(saes="saes", prompts="prompts.txt", out="out")
    annotation = config.annotation.for_preset(get_preset(config.preset))
    assert (annotation.annotator, annotation.tags) == ("grounded-sam", "vision")
    assert config.annotation.for_preset(get_preset("tiny")).annotator == "toy"


def test_a_time_shared_sae_pools_the_evidence_of_three_steps(tiny_pipe, setup):
    _, maps, _ = setup
    key = SAEKey(UP, None, "cond")
    bank = SAEBank([random_sae(UP, None, seed=7)])
    assert select_keys(bank) == [key]
    gathered = gather(
        tiny_pipe,
        bank,
        PROMPTS,
        OutlineAnnotator(maps, 0),
        keys=[key],
        seed=SEED,
        gen_batch=5,
        steps=STEPS,
        guidance_scale=7.5,
    )
    # the steps nearest t = 1.0, 0.5 and 0.0, each (image, step) counted as one image
    assert gathered.builders[key].num_images == 3 * len(PROMPTS)
    assert gathered.means(key).shape == (len(PROMPTS), 32)
    # with two steps, two of those t share a step: each step read counts once
    arguments = dict(keys=[key], seed=SEED, gen_batch=5, steps=2, guidance_scale=7.5)
    two = gather(tiny_pipe, bank, PROMPTS, OutlineAnnotator(maps, 0), **arguments)
    assert two.builders[key].num_images == 2 * len(PROMPTS)


@pytest.fixture
def outlines(setup):
    """A made-up labeller, in the registry only while a test runs."""
    _, maps, cid = setup
    toy = LABELLERS["toy"]
    labeller = Labeller(
        "outlines",
        annotator=lambda config, device: OutlineAnnotator(maps, cid),
        reference=lambda config, device: OutlineAnnotator(maps, cid),
        segmenter=toy.segmenter,
        evaluator="the outlines of one latent",
        scorer=toy.scorer,
        world=toy.world,
    )
    yield register(labeller)
    del LABELLERS[labeller.name]


def outlines_config(tmp_path, out: str, **changes) -> build_dictionary.DictionaryConfig:
    """The outlines labeller's build of PROMPTS with the SAEs in tmp_path/saes, into
    tmp_path/out."""
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    settings = dict(
        saes=str(tmp_path / "saes"),
        prompts=str(tmp_path / "prompts.txt"),
        out=str(tmp_path / out),
        preset="tiny",
        blocks=(UP,),
        t=(0.0,),
        steps=STEPS,
        seed=SEED,
        gen_batch=2,
        device="cpu",
        annotation=AnnotatorConfig(annotator="outlines"),
    )
    return build_dictionary.DictionaryConfig(**{**settings, **changes})


def parted(tmp_path, out: str, **changes) -> build_dictionary.DictionaryConfig:
    """`outlines_config` in parts of two prompts."""
    return outlines_config(tmp_path, out, **{"part_size": 2, **changes})


def test_a_labeller_added_to_the_registry_alone_builds_a_dictionary(tmp_path, setup, outlines):
    bank, _, cid = setup
    bank.save_pretrained(tmp_path / "saes")
    config = outlines_config(tmp_path, "dicts")
    built = build_dictionary.build(config)
    assert cid in built[KEY].cids_for("cat")
    assert json.loads((tmp_path / "dicts" / "examples.json").read_text())["annotator"] == "outlines"
    assert load_dictionaries(tmp_path / "dicts")[KEY].cids_for("cat") == built[KEY].cids_for("cat")


def test_an_interrupted_build_goes_on_from_its_parts(tmp_path, setup, outlines, monkeypatch):
    bank, _, cid = setup
    bank.save_pretrained(tmp_path / "saes")
    whole = build_dictionary.build(parted(tmp_path, "whole", part_size=len(PROMPTS)))
    built, build_part = [], PartedBuild.build

    def stops_after_one(self, index, *args, **kwargs):
        if built:
            raise KeyboardInterrupt  # as a stopped process or an expired GPU call
        built.append(index)
        build_part(self, index, *args, **kwargs)

    monkeypatch.setattr(PartedBuild, "build", stops_after_one)
    with pytest.raises(KeyboardInterrupt):
        build_dictionary.build(parted(tmp_path, "parted"))
    parts = tmp_path / "parted" / "parts"
    assert sorted(p.name for p in parts.iterdir()) == [
        "part-00000.json",
        "part-00000.safetensors",
        "plan.json",
    ]
    with pytest.raises(ValueError, match=r"other settings \(seed\); delete that folder"):
        build_dictionary.build(parted(tmp_path, "parted", seed=SEED + 1))
    assert (parts / "part-00000.json").is_file()  # refused, nothing lost

    def counted(self, index, *args, **kwargs):
        built.append(index)
        build_part(self, index, *args, **kwargs)

    monkeypatch.setattr(PartedBuild, "build", counted)
    resumed = build_dictionary.build(parted(tmp_path, "parted"))
    assert built == [0, 1, 2]  # parts 1 and 2 only, on the second run
    assert not parts.exists()
    assert resumed[KEY].num_images == whole[KEY].num_images == len(PROMPTS)
    assert resumed[KEY].evidence.keys() == whole[KEY].evidence.keys()
    for c, labels in whole[KEY].evidence.items():
        for label, evidence in labels.items():
            assert resumed[KEY].evidence[c][label].count == evidence.count
            assert resumed[KEY].evidence[c][label].mean_iou == pytest.approx(evidence.mean_iou)
    assert cid in resumed[KEY].cids_for("cat")
    torch.testing.assert_close(
        load_spatial_means(tmp_path / "parted", KEY), load_spatial_means(tmp_path / "whole", KEY)
    )


def test_a_build_writes_a_card_beside_its_dictionaries(tmp_path, setup, outlines):
    bank, _, _ = setup
    bank.save_pretrained(tmp_path / "saes")
    built = build_dictionary.build(parted(tmp_path, "dicts"))
    card = (tmp_path / "dicts" / "README.md").read_text()
    assert f"SAEs `{tmp_path / 'saes'}`" in card
    assert "Prompts: 5" in card and "Labeller: annotator: outlines" in card
    assert "Thresholds: activation 0.1, iou 0.5" in card
    labelled = int(built[KEY].has_embedding.sum())
    assert f"| {KEY.describe()} | {labelled} | {len(built[KEY].vocabulary())} |" in card
    (tmp_path / "saes" / "README.md").write_text("# My SAEs\n")  # a folder's own card stays
    build_dictionary.build(parted(tmp_path, "saes"))
    assert (tmp_path / "saes" / "README.md").read_text() == "# My SAEs\n"
    assert (tmp_path / "saes" / "DICTIONARIES.md").read_text().startswith("---\ntags:")


class FakeHub:
    """What `push_dictionaries` asks of the Hub, recorded; nothing leaves the machine."""

    def __init__(self, fail: bool = False):
        self.fail, self.repos, self.uploads = fail, [], []

    def __call__(self, *args, **kwargs):
        return self

    def create_repo(self, repo_id, exist_ok=False):
        if self.fail:
            raise OSError("403 Forbidden: you cannot write to this repo")
        self.repos.append(repo_id)

    def upload_folder(self, repo_id, folder_path, ignore_patterns, commit_message):
        files = sorted(p.relative_to(folder_path).as_posix() for p in folder_path.rglob("*.*"))
        self.uploads.append((repo_id, [f for f in files if not f.startswith("parts/")]))
        return type("Commit", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})()


def test_push_to_hub_uploads_the_dictionaries_and_their_card(
    tmp_path, setup, outlines, monkeypatch
):
    bank, _, _ = setup
    bank.save_pretrained(tmp_path / "saes")
    hub = FakeHub()
    monkeypatch.setattr(build_dictionary.huggingface_hub, "HfApi", hub)
    build_dictionary.build(parted(tmp_path, "dicts", push_to_hub="user/dicts"))
    ((repo, files),) = hub.uploads
    assert hub.repos == [repo] == ["user/dicts"]
    folder = f"{UP}/t0.00/cond"
    assert {"README.md", "examples.json", f"{folder}/concepts.json"} <= set(files)
    assert f"{folder}/spatial_means.safetensors" in files
    failing = FakeHub(fail=True)
    monkeypatch.setattr(build_dictionary.huggingface_hub, "HfApi", failing)
    with pytest.raises(ValueError, match="the dictionaries are kept in .*dicts: log in"):
        build_dictionary.build(parted(tmp_path, "dicts", push_to_hub="other/dicts"))
    assert (tmp_path / "dicts" / folder / "concepts.json").is_file()
