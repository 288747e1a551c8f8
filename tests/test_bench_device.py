"""The device benchmark's CPU form: `scripts/device_bench.sh` at tiny scale in float16 (the GPU
run's dtype), and the variants it times beside the project's own code."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.diffusion.hooks import edit
from core.diffusion.presets import SD14_BLOCKS
from core.files import REPO_ROOT
from core.training.activations import to_rows
from core.training.trainer import SAETrainer, TrainConfig
from scripts.bench_core import (
    DenseBackwardSAE,
    naive_edits,
    paper_bank,
    plain_generation,
    step_with_dead,
)
from tests.helpers import hook_count

MEASUREMENTS = ("sae_n256", "sae_n1024", "generation", "steering", "emergence", "features")
CHECKS = (
    "(a) recording",
    "(b) collection",
    "(d) spatial intervention, early stage",
    "(d) spatial intervention, every step",
    "(d') naive edit hook",
    "(e) emergence analysis",
    "Revelio extraction",
    *(
        f"(c) SAETrainer, {backward} backward, n = {n}: {ratio}"
        for n in (256, 1024)
        for backward in ("sparse", "dense")
        for ratio in ("speed-up over naive", "fraction of the bound")
    ),
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    """OUT of a tiny-scale run of the GPU script, from a folder without wheels to install."""
    root = tmp_path_factory.mktemp("bench")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO_ROOT),
        "OMP_NUM_THREADS": "1",  # on a small shared CPU, more threads spin against each other
    }
    script = REPO_ROOT / "scripts" / "device_bench.sh"
    command = ["bash", script, root / "out", "tiny", "--dtype", "float16"]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout[-4000:]
    return root / "out"


def numbers(value: object) -> list[float]:
    if isinstance(value, dict):
        return [n for item in value.values() for n in numbers(item)]
    return [value] if isinstance(value, int | float) else []


def test_json_holds_every_measurement_with_positive_numbers_and_verdicts(out):
    report = json.loads((out / "bench.json").read_text())
    assert report["errors"] == {}
    assert set(MEASUREMENTS) <= report["results"].keys()
    found = numbers(report["results"])
    assert found and all(math.isfinite(n) and n > 0 for n in found)
    environment = report["environment"]
    assert {"device", "torch", "CUDA", "command", "generation"} <= environment.keys()
    assert "--scale tiny" in environment["command"] and "float16" in environment["generation"]
    checks = report["checks"]
    for name in CHECKS:
        (check,) = [c for c in checks if c["measurement"].startswith(name)]
        assert math.isfinite(check["value"]) and check["value"] > 0, check
        expected = {"reference"} if check["target"] is None else {"met", "missed"}
        assert check["verdict"] in expected, check
    targets = {c["target"] for c in checks}
    assert targets == {"<= 1.03x", ">= 0.95x", "<= 1.05x", "<= 1.10x", ">= 4x", ">= 50%", None}


def test_markdown_tables_every_ratio_with_its_target_and_verdict(out):
    markdown = (out / "bench.md").read_text()
    report = json.loads((out / "bench.json").read_text())
    for check in report["checks"]:
        row = f"| {check['measurement']} | "
        assert row in markdown, row
        line = next(line for line in markdown.splitlines() if line.startswith(row))
        assert line.endswith(f"| {check['verdict']} |"), line
    for n in (256, 1024):
        assert f"| 64 | {n} | SAETrainer, dense backward |" in markdown
        assert f"- n = {n}: the " in markdown
    assert "## Failed" not in markdown
    log = (out / "log.txt").read_text()
    assert "# Core engine benchmark" in log and "exit 0 after" in log


def test_naive_hook_replaces_the_update_with_its_reconstruction_and_goes(tiny_pipe):
    bank = paper_bank(tiny_pipe)
    hooks = naive_edits(bank, SD14_BLOCKS)
    block = SD14_BLOCKS[1]
    sae = bank.get(block, 0.5)
    delta = torch.randn(2, sae.cfg.d_in, 4, 4)
    with torch.no_grad():
        expected = sae.decode(*sae.encode(to_rows(delta))[:2])
    assert torch.allclose(to_rows(hooks[block](delta, 0.5, "cond")), expected, atol=1e-5)
    assert hooks[block](delta, 0.5, "uncond") is None

    generate = plain_generation(tiny_pipe, 1, 2)
    before = hook_count(tiny_pipe)
    plain = generate().images
    with edit(tiny_pipe, hooks):
        edited = generate().images
    assert hook_count(tiny_pipe) == before
    assert not torch.allclose(plain, edited)
    assert torch.equal(generate().images, plain)


def test_dense_backward_sae_takes_the_trainers_step_with_auxk_on():
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    config = TrainConfig(num_latents=64, k=4, k_aux=8)
    trainers = [SAETrainer(16, config) for _ in range(2)]
    trainers[1].sae.__class__ = DenseBackwardSAE
    dead = torch.arange(64) < 20
    metrics = [step_with_dead(trainer, x, dead) for trainer in trainers]
    assert metrics[0]["auxk"] > 0
    assert metrics[0] == pytest.approx(metrics[1], rel=1e-4)
    sparse, dense = (dict(trainer.sae.named_parameters()) for trainer in trainers)
    for name, value in sparse.items():
        assert torch.allclose(value, dense[name], atol=1e-6), name
