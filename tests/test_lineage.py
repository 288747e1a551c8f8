"""Concept lineage across t: matching the SAEs of one block by decoder and by co-activation."""

import csv
import json
import math

import numpy as np
import pytest
import torch
from gensim.models import KeyedVectors

from core.emergence.concept_lineage import LineageConfig, main
from core.emergence.concepts import ConceptDictionary
from core.emergence.lineage import (
    chain_through,
    coactivation_iou,
    firing,
    lineage,
    random_direction_null,
    top_indices,
)
from core.emergence.words import WordVectors
from core.files import ASSETS
from core.sae.bank import SAEBank, SAEKey
from core.sae.model import TopKSAE
from core.training.trainer import SAETrainer, TrainConfig
from core.views.inspection import concept_card
from core.views.model_cache import ModelCache
from tests.helpers import MID, assert_defaults_stated_once, command_help, random_sae

D, N, K = 32, 64, 4
UP = "up_blocks.1.attentions.0"
TINY_SAES = ASSETS / "tiny" / "saes"


def permuted_bank(permutation: torch.Tensor) -> SAEBank:
    """t = 1.0: a random SAE; t = 0.5: the same latents in `permutation` order; t = 0.0:
    another random SAE."""
    first = random_sae(D, N, K, t=1.0, seed=0)
    second = random_sae(D, N, K, t=0.5, seed=1)
    with torch.no_grad():
        second.W_dec.copy_(first.W_dec[permutation])
        second.encoder.weight.copy_(first.encoder.weight[permutation])
    return SAEBank([first, second, random_sae(D, N, K, t=0.0, seed=2)])


def test_decoder_lineage_recovers_a_permuted_copy_and_nothing_of_a_random_sae():
    permutation = torch.randperm(N, generator=torch.Generator().manual_seed(3))
    result = lineage(permuted_bank(permutation), MID, method="decoder")
    first, second = result.matchings
    assert first.threshold == pytest.approx(random_direction_null(N, N, D))
    assert 0 < first.threshold < 1
    expected = {int(permutation[j]): j for j in range(N)}
    assert {cid: target for cid, (target, _) in first.pairs.items()} == expected
    assert all(math.isclose(s, 1.0, abs_tol=1e-5) for _, s in first.pairs.values())
    summary = result.summary()
    assert summary[0]["persist"] == 1.0 and summary[0]["appear"] == 0.0
    assert summary[1]["persist"] < 0.2  # a random SAE: at most chance matches
    assert len(result.chains) == N + sum(1 for j in range(N) if j not in second.targets_matched)
    chain = chain_through(result, 0.5, 7)
    assert [(key.t, cid) for key, cid, _ in chain][:2] == [(1.0, int(permutation[7])), (0.5, 7)]
    assert chain[0][2] is None and chain[1][2] == pytest.approx(1.0, abs=1e-5)


def sparse_rows(count: int, seed: int = 0) -> torch.Tensor:
    """Rows made of 2 of 48 fixed directions each, with positive weights, plus a little noise:
    data with concepts an SAE can find."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(48, D, generator=generator)
    chosen = torch.stack([torch.randperm(48, generator=generator)[:2] for _ in range(count)])
    weights = torch.rand(count, 2, generator=generator) + 0.5
    noise = 0.05 * torch.randn(count, D, generator=generator)
    return (weights[..., None] * directions[chosen]).sum(1) + noise


def trained_sae(rows: torch.Tensor, t: float, seed: int) -> TopKSAE:
    trainer = SAETrainer(
        D, TrainConfig(num_latents=N, k=K, batch_size=256, lr=1e-3, seed=seed), block=MID, t=t
    )
    generator = torch.Generator().manual_seed(seed)
    for _ in range(400):
        trainer.step(rows[torch.randint(len(rows), (256,), generator=generator)])
    return trainer.export()


def test_coactivation_matches_a_permuted_copy_and_a_random_sae_at_chance(one_thread):
    """The null is an independently trained SAE of the same rows: a permuted copy of the SAE
    matches latent for latent, a random SAE reading the same rows only by chance (against
    shuffled positions, the earlier null, 6% of a random SAE's latents matched)."""
    rows = sparse_rows(2000)
    first = trained_sae(rows, 1.0, seed=0)
    permutation = torch.randperm(N, generator=torch.Generator().manual_seed(3))
    copy = random_sae(D, N, K, t=0.5)
    with torch.no_grad():
        copy.load_state_dict(first.state_dict())
        copy.W_dec.copy_(first.W_dec[permutation])
        copy.encoder.weight.copy_(first.encoder.weight[permutation])
        copy.encoder.bias.copy_(first.encoder.bias[permutation])
    bank = SAEBank([first, copy, random_sae(D, N, K, t=0.0, seed=2)])
    keys = [SAEKey(MID, t, "cond") for t in (1.0, 0.5, 0.0)]
    result = lineage(bank, MID, method="coactivation", rows=dict.fromkeys(keys, rows))
    to_copy, to_random = result.matchings
    assert 0 < to_copy.threshold < 1
    fired = set(top_indices(first, rows).unique().tolist())
    inverse = torch.argsort(permutation)
    assert {c: t for c, (t, _) in to_copy.pairs.items()} == {c: int(inverse[c]) for c in fired}
    assert len(fired) >= 0.9 * N
    assert len(to_random.pairs) <= 0.03 * N


def test_iou_of_firing_positions():
    a = firing(torch.tensor([[0, 1], [0, 2], [3, 1]]), 4)
    b = firing(torch.tensor([[0, 3], [1, 2], [0, 2]]), 4)
    iou = coactivation_iou(a, b)
    assert iou[0, 0] == pytest.approx(1 / 3)  # latent 0 fires on rows {0,1} and {0,2}
    assert iou[2, 2] == pytest.approx(1 / 2)  # {1} and {1,2}
    assert iou.shape == (4, 4) and np.all((iou >= 0) & (iou <= 1))


def test_labels_follow_the_chain():
    keyed = KeyedVectors(vector_size=2)
    keyed.add_vectors(["cat", "dog"], np.eye(2, dtype=np.float32))
    words = WordVectors(keyed, "test")
    labels = {
        SAEKey(MID, t, "cond"): ConceptDictionary.from_labels(
            SAEKey(MID, t, "cond"), N, {5: [name]}, words
        )
        for t, name in ((1.0, "cat"), (0.5, "cat"), (0.0, "dog"))
    }
    result = lineage(permuted_bank(torch.arange(N)), MID, method="decoder", labels=labels)
    row = next(r for r in result.chains if r["chain"] == "1:5")
    assert row["label_t1"] == row["label_t0.5"] == "cat" and row["similarity_t1"] > 0.99
    assert result.summary()[0]["label_kept"] == 1.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ts": (1.0, 0.25)}, "no SAE for mid_block.attentions.0"),
        ({"method": "names"}, "unknown lineage method 'names'"),
        ({"method": "coactivation"}, "needs the rows every SAE it compares reads"),
    ],
)
def test_bad_requests_are_one_sentence(change, message):
    with pytest.raises(ValueError, match=message):
        lineage(permuted_bank(torch.arange(N)), MID, **change)


def test_saes_of_another_width_are_refused():
    bank = SAEBank([random_sae(D, N, K, t=1.0), random_sae(D, 2 * N, K, t=0.5)])
    with pytest.raises(ValueError, match="SAEs of one width"):
        lineage(bank, MID, ts=(1.0, 0.5))


def test_command_writes_chains_and_summary_for_both_methods(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle and a blue star\na cat on a table\n")
    argv = ["--saes", str(TINY_SAES), "--block", UP, "--out", str(tmp_path / "out")]
    argv += ["--method", "decoder", "coactivation", "--prompts", str(prompts), "--steps", "4"]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [len(summary[m]) for m in ("decoder", "coactivation")] == [2, 2]
    with open(tmp_path / "out" / "lineage_decoder.csv") as f:
        header = next(csv.reader(f))
    assert header[:3] == ["chain", "cid_t1", "label_t1"]


def test_command_refuses_coactivation_without_prompts(tmp_path, capsys):
    argv = ["--saes", str(TINY_SAES), "--block", UP, "--out", str(tmp_path)]
    assert main([*argv, "--method", "coactivation"]) == 2
    assert "needs --prompts" in capsys.readouterr().err


def test_help_states_each_default_once():
    assert_defaults_stated_once(command_help("core.emergence.concept_lineage"), LineageConfig)


def test_the_inspect_view_shows_the_concepts_chain_across_t():
    with ModelCache().using("tiny") as loaded:
        result = lineage(loaded.bank, UP, "cond", (1.0, 0.5, 0.0), labels=loaded.dictionaries)
        first, second = result.matchings
        source, (target, similarity) = next(iter(first.pairs.items()))
        line = concept_card(loaded, UP, 0.5, "cond", target).stats["lineage across t"]
        alone = next(
            c for c in range(256) if c not in first.targets_matched and c not in second.pairs
        )
        unmatched = concept_card(loaded, UP, 0.5, "cond", alone).stats["lineage across t"]
    # the tiny bank's SAEs start from their own seeds: few of their latents match
    assert 0 < len(first.pairs) <= 0.05 * 256
    assert line.startswith(f"t=1 CID {source} (") and f" -> t=0.5 CID {target} (" in line
    assert f"cos {similarity:.2f}" in line and line.endswith("(matches above the null cosine 0.46)")
    assert unmatched.startswith(f"t=0.5 CID {alone} (")
    assert unmatched.endswith(": no concept at t = 1, 0 matches it above the null cosine 0.46")
