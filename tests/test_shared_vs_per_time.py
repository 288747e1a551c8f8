"""A time-shared SAE against per-time SAEs, on cases whose answer is known: data drawn from one
distribution at every t, an SAE that reconstructs exactly, and a shared bank holding the
per-time t = 0.5 SAEs, which must score what they score at t = 0.5."""

import copy
import csv
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from core.diffusion.presets import ASSETS
from core.emergence import compare_shared
from core.emergence.concepts import load_dictionaries, save_dictionaries
from core.emergence.shared_vs_per_time import (
    Reconstruction,
    check_banks,
    reconstruction_rows,
)
from core.files import write_csv
from core.sae.bank import SAEBank, SAEKey
from core.sae.config import SAEConfig
from core.sae.model import TopKSAE
from core.training.trainer import SAETrainer, TrainConfig
from scripts import plot_beyond
from tests.helpers import MID, assert_defaults_stated_once, command_help, random_sae

TS = (1.0, 0.5, 0.0)
UP = "up_blocks.1.attentions.0"
TINY_SAES = ASSETS / "tiny" / "saes"
D, ATOMS, ACTIVE, ROWS, BATCH = 16, 32, 3, 16384, 128


pytestmark = pytest.mark.usefixtures("one_thread")


def sparse_rows(atoms: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n rows, each a sum of ACTIVE distinct atoms with coefficients in [0.5, 1.5)."""
    chosen = torch.rand(n, len(atoms), generator=generator).argsort(dim=1)[:, :ACTIVE]
    coefficients = torch.rand(n, ACTIVE, generator=generator) + 0.5
    return (coefficients[..., None] * atoms[chosen]).sum(dim=1)


def trained_sae(rows: torch.Tensor) -> TopKSAE:
    config = TrainConfig(num_latents=ATOMS, k=ACTIVE, lr=1e-2, batch_size=BATCH, dead_after=4096)
    trainer = SAETrainer(D, config, block=MID)
    for batch in rows.split(BATCH):
        trainer.step(batch)
    return trainer.export()


def explained_variance(sae: TopKSAE, rows: torch.Tensor) -> float:
    score = Reconstruction(sae.cfg.num_latents)
    score.add(sae, rows)
    return score.explained_variance()


@pytest.mark.parametrize("same_at_every_t", [True, False])
def test_one_distribution_at_every_t_needs_no_per_time_saes(same_at_every_t):
    """Per-time SAEs each see ROWS rows of their t; the shared SAE sees ROWS rows pooled over
    the three t, as `--shared-t` subsamples them. Where every t draws from the same atoms the
    shared SAE explains as much at each t; where each t has atoms of its own, it has three
    times as many to cover with the same latents, and explains clearly less."""
    generator = torch.Generator().manual_seed(0)

    def atoms() -> torch.Tensor:
        return F.normalize(torch.randn(ATOMS, D, generator=generator), dim=1)

    common = atoms()
    atoms_at = {t: common if same_at_every_t else atoms() for t in TS}
    training = {t: sparse_rows(atoms_at[t], ROWS, generator) for t in TS}
    held_out = {t: sparse_rows(atoms_at[t], 2048, generator) for t in TS}
    pooled = torch.cat([training[t][: ROWS // len(TS) + 1] for t in TS])[:ROWS]
    shared = trained_sae(pooled[torch.randperm(ROWS, generator=generator)])
    for t in TS:
        per_time = explained_variance(trained_sae(training[t]), held_out[t])
        assert per_time > 0.7
        gap = explained_variance(shared, held_out[t]) - per_time
        if same_at_every_t:
            assert abs(gap) < 0.05, (t, gap)
        else:
            assert gap < -0.08, (t, gap)


def identity_sae(d: int, t: float) -> TopKSAE:
    """2d latents, ReLU(x) and ReLU(-x), k = d: reconstructs every row exactly."""
    sae = TopKSAE(SAEConfig(d, 2 * d, d, block=MID, t=t))
    signs = torch.cat([torch.eye(d), -torch.eye(d)])
    with torch.no_grad():
        sae.encoder.weight.copy_(signs)
        sae.encoder.bias.zero_()
        sae.W_dec.copy_(signs)
        sae.b_dec.zero_()
    return sae


def shared_copy(sae: TopKSAE) -> TopKSAE:
    shared = copy.deepcopy(sae)
    shared.cfg.t = None
    return shared


def test_reconstruction_rows_on_known_saes(tiny_pipe):
    d = 64
    middle = random_sae(d, 2 * d, d, t=0.5, seed=1)
    per_time = SAEBank([identity_sae(d, 1.0), middle, random_sae(d, 2 * d, d, t=0.0, seed=2)])
    banks = {"per_time": per_time, "shared": SAEBank([shared_copy(middle)])}
    rows = reconstruction_rows(
        tiny_pipe, banks, ["a red cat", "a dog", "a tree"], blocks=[MID], ts=TS, steps=4
    )
    found = {(r["kind"], r["t"]): r for r in rows}
    assert len(found) == 6
    assert found["per_time", 1.0]["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert (found["per_time", 1.0]["sae_t"], found["shared", 1.0]["sae_t"]) == (1.0, "all")
    for measure in ("explained_variance", "dead_fraction", "rows"):
        assert found["shared", 0.5][measure] == found["per_time", 0.5][measure]
    # 3 images x the mid block's 2x2 grid at the step nearest each t
    assert {r["rows"] for r in rows} == {12}
    assert found["shared", 1.0]["explained_variance"] < 0.99


@pytest.mark.parametrize(
    ("shared", "message"),
    [
        ({"n": 128, "t": 0.5}, "has no time-shared SAE of mid_block.attentions.0"),
        ({"n": 64}, "have 64 and 128 latents"),
        ({"n": 128, "site": "output"}, "read the residual update"),
    ],
)
def test_banks_that_cannot_be_compared_get_one_sentence(shared, message):
    per_time = SAEBank([random_sae(64, 128, 4, t=0.5)])
    banks = {"per_time": per_time, "shared": SAEBank([random_sae(64, k=4, **shared)])}
    with pytest.raises(ValueError, match=message) as raised:
        check_banks(banks, [MID], "cond")
    assert "\n" not in str(raised.value)


@pytest.fixture(scope="module")
def shared_tiny(tmp_path_factory):
    """The tiny preset's t = 0.5 SAEs and dictionaries, saved again as time-shared ones."""
    out = tmp_path_factory.mktemp("shared")
    bank = SAEBank.from_pretrained(TINY_SAES)
    SAEBank(shared_copy(sae) for key, sae in bank.items() if key.t == 0.5).save_pretrained(out)
    dictionaries = load_dictionaries(TINY_SAES)
    save_dictionaries(
        [
            dataclasses.replace(d, key=SAEKey(key.block, None, key.branch))
            for key, d in dictionaries.items()
            if key.t == 0.5
        ],
        out,
    )
    return out


def read_rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_command_compares_both_kinds_on_every_measure(tmp_path, shared_tiny, capsys):
    prompts = tmp_path / "held-out.txt"
    prompts.write_text("a red star\na blue circle\n")
    out = tmp_path / "compare"
    args = ["--preset", "tiny", "--per-time", str(TINY_SAES), "--shared", str(shared_tiny)]
    args += ["--prompts", str(prompts), "--out", str(out), "--steps", "4", "--annotator", "toy"]
    args += ["--blocks", MID, UP, "--targets", "labels", "--edit-block", UP, "--objects", "star"]
    args += ["--quadrants", "top_left", "--stages", "middle", "--device", "cpu"]
    code = compare_shared.main(args)
    printed = capsys.readouterr()
    assert code == 0, printed.err
    rows = read_rows(out / "comparison.csv")
    measures = {r["measure"] for r in rows}
    assert measures == {
        "explained_variance",
        "dead_fraction",
        "composition_iou",
        "spatial_success",
    }
    for row in rows:
        if row["at"] in ("t=0.5", "middle"):  # the same SAE, dictionary and CIDs in both banks
            assert row["per_time"] == row["shared"], row
            assert float(row["shared_minus_per_time"]) == 0
    assert (out / "summary.txt").read_text() in printed.out
    assert "preclude direct cross-timestep concept comparison" in printed.out
    assert {r["kind"] for r in read_rows(out / "spatial.csv")} == {"per_time", "shared"}


def test_command_without_shared_dictionaries_says_so(tmp_path, capsys):
    shared = tmp_path / "shared"
    bank = SAEBank.from_pretrained(TINY_SAES, [MID])
    SAEBank([shared_copy(bank.get(MID, 0.5))]).save_pretrained(shared)
    prompts = tmp_path / "held-out.txt"
    prompts.write_text("a red star\n")
    out = tmp_path / "compare"
    args = ["--preset", "tiny", "--per-time", str(TINY_SAES), "--shared", str(shared)]
    args += ["--prompts", str(prompts), "--out", str(out), "--steps", "2", "--blocks", MID]
    code = compare_shared.main([*args, "--tasks", "reconstruction", "composition"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "composition and spatial edits skipped: no concept dictionaries" in printed.out
    assert {r["measure"] for r in read_rows(out / "comparison.csv")} == {
        "explained_variance",
        "dead_fraction",
    }


def test_help_states_each_default_once():
    assert_defaults_stated_once(
        command_help("core.emergence.compare_shared"), compare_shared.CompareConfig
    )


def test_the_report_figure_is_drawn_from_the_commands_csvs(tmp_path, capsys):
    compare, embeddings = tmp_path / "compare", tmp_path / "embeddings"
    compare.mkdir()
    embeddings.mkdir()
    rows = [
        {"measure": "explained_variance", "block": MID, "at": at, "per_time": 0.5, "shared": 0.4}
        for at in ("t=1", "t=0.5", "t=0")
    ]
    write_csv(compare / "comparison.csv", rows)
    ious = [{"source": "glove", "t": t, "iou": iou} for t, iou in ((0.9, 0.2), (0.9, "nan"))]
    write_csv(embeddings / "composition.csv", ious)
    assert plot_beyond.composition_by_step(str(embeddings)) == {
        "glove": [(0.9, 0.2)]
    }  # NaN left out
    assert plot_beyond.explained_variance(str(compare))[MID]["shared"] == [
        (1.0, 0.4),
        (0.5, 0.4),
        (0.0, 0.4),
    ]
    out = tmp_path / "figure.png"
    args = ["--compare", str(compare), "--labels", "shared", "--embeddings", str(embeddings)]
    assert plot_beyond.main([*args, "--out", str(out)]) == 0
    assert Image.open(out).size == (1100, 420)
    assert (
        plot_beyond.main([*args, "--embeddings", str(tmp_path / "none"), "--out", str(out)]) == 2
    )  # a user error
    assert "composition.csv does not exist; run the command that writes it first" in (
        capsys.readouterr().err
    )
