"""The training CLI end to end on the tiny preset: `main(argv)` in this process, and in
subprocesses where a real process matters (a user's run, interruption, accelerate)."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.diffusion.hooks import record
from core.diffusion.sampling import generate_images
from core.emergence.lineage import lineage
from core.files import REPO_ROOT
from core.sae.bank import SAEBank, SAEKey
from core.training.activations import GenerationSource, to_rows
from core.training.train import Run, RunConfig, main
from core.training.trainer import derived_seed

MID = "mid_block.attentions.0"
DOWN = "down_blocks.2.attentions.1"
UP = "up_blocks.1.attentions.0"
SHARED = ["--shared-t", "0", "1"]
PROMPTS = [
    "a red cat",
    "a blue car",
    "a dog",
    "a green tree",
    "a boat",
    "a bird",
    "a white horse",
    "a cup",
]
SMALL = [
    "--steps",
    "4",
    "--t",
    "1.0",
    "0.0",
    "--gen-batch",
    "2",
    "--batch-size",
    "32",
    "--buffer-size",
    "64",
    "--num-latents",
    "128",
    "-k",
    "4",
    "--lr",
    "1e-3",
]


def cli(*args: str, wait: bool = True, launcher: tuple[str, ...] = ("-m", "core.training.train")):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, *launcher, *args]
    if not wait:
        return subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
    return subprocess.run(command, cwd=REPO_ROOT, env=env, text=True, capture_output=True)


pytestmark = pytest.mark.usefixtures("one_thread")


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """`main(args)` in this process: (exit code, stdout, stderr)."""
    code = main(list(args))
    printed = capsys.readouterr()
    return code, printed.out, printed.err


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory, prompt_file) -> Path:
    """An uninterrupted run as a user starts it, the reference for the others."""
    out = tmp_path_factory.mktemp("runs") / "full"
    done = cli("--prompts", str(prompt_file), "--out", str(out), *SMALL)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def weights(out: Path) -> dict[str, torch.Tensor]:
    return {
        f"{path.parent.relative_to(out)}/{name}": tensor
        for path in sorted(out.glob("saes/**/sae.safetensors"))
        for name, tensor in load_file(path).items()
    }


def test_cli_trains_one_sae_per_block_t_and_branch(finished):
    bank = SAEBank.from_pretrained(finished / "saes")
    assert len(bank) == 3 * 2
    sae = bank.get(MID, 0.9)
    assert (sae.cfg.block, sae.cfg.t, sae.cfg.branch) == (MID, 1.0, "cond")
    assert sae.cfg.model == "tiny" and sae.cfg.num_latents == 128 and sae.cfg.k == 4
    assert sae.cfg.metrics["num_steps"] > 0
    assert 0 < sae.cfg.metrics["explained_variance"] <= 1
    # 8 prompts x 2x2 positions of the mid block = 32 rows at each t, all trained on.
    assert sae.stats.num_samples == 32
    assert (finished / "metrics.json").is_file()


def test_help_describes_the_paper_defaults(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["--help"])
    assert raised.value.code == 0
    out = capsys.readouterr().out
    assert "--k-aux" in out and "default: 256" in out


def run_until_checkpoint(prompt_file: Path, out: Path, sig: int, *extra: str) -> subprocess.Popen:
    args = ["--prompts", str(prompt_file), "--out", str(out), *SMALL, *extra]
    process = cli(*args, "--save-every", "1", wait=False)
    deadline = time.monotonic() + 120
    while not (out / "checkpoints" / "latest").exists():
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.05)
    process.send_signal(sig)
    process.wait(timeout=120)
    return process


@pytest.fixture(scope="module")
def killed(tmp_path_factory, prompt_file) -> Path:
    """A run killed (SIGKILL) after its first checkpoint; tests take copies."""
    out = tmp_path_factory.mktemp("runs") / "killed"
    run_until_checkpoint(prompt_file, out, signal.SIGKILL)
    return out


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_resume_after_interruption_matches_an_uninterrupted_run(
    tmp_path, prompt_file, finished, killed, capsys, sig
):
    out = tmp_path / "run"
    if sig == signal.SIGKILL:
        shutil.copytree(killed, out)
    else:
        process = run_until_checkpoint(prompt_file, out, sig)
        assert process.returncode == 130
        assert "--resume" in process.stdout.read()
    assert not (out / "saes").exists()
    code, out_text, err = run_main(
        capsys, "--prompts", str(prompt_file), "--out", str(out), *SMALL, "--resume"
    )
    assert code == 0, out_text + err
    assert re.search(r"resuming after round [1-9]", err)
    expected, got = weights(finished), weights(out)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_resume_refuses_changed_settings(tmp_path, prompt_file, killed, capsys):
    out = tmp_path / "run"
    shutil.copytree(killed, out)
    changed = [a if a != "128" else "256" for a in SMALL]
    code, _, err = run_main(
        capsys, "--prompts", str(prompt_file), "--out", str(out), *changed, "--resume"
    )
    assert code != 0
    assert "--num-latents" in err and "cannot resume" in err


def test_resume_refuses_a_changed_shared_t(tmp_path, prompt_file, killed, capsys):
    out = tmp_path / "run"
    shutil.copytree(killed, out)
    code, _, err = run_main(
        capsys, "--prompts", str(prompt_file), "--out", str(out), *SMALL, *SHARED, "--resume"
    )
    assert code != 0
    assert "--shared-t" in err and "cannot resume" in err


def test_shared_t_trains_one_sae_per_block_and_branch_on_as_many_rows(
    tmp_path, prompt_file, capsys
):
    out = tmp_path / "shared"
    code, printed, err = run_main(
        capsys, "--prompts", str(prompt_file), "--out", str(out), *SMALL, *SHARED
    )
    assert code == 0, err
    bank = SAEBank.from_pretrained(out / "saes")
    assert sorted(bank.keys()) == sorted(SAEKey(b, None, "cond") for b in (DOWN, MID, UP))
    assert bank.get(MID, 0.3) is bank[SAEKey(MID, None, "cond")]
    # As many rows as the 3 per-time SAEs of a block together: 8 prompts x 3 x the mid
    # block's 2x2 positions, of the 4 x 2x2 that the 4 steps give.
    assert bank[SAEKey(MID, None, "cond")].stats.num_samples == 96
    assert f"{MID}|t=all|cond" in (out / "metrics.json").read_text()
    assert re.search(r"trained on \d+ rows in [\d.]+ s \(\d+ rows/s\)", printed)


def test_a_time_shared_run_resumes_exactly(tmp_path, prompt_file, capsys):
    full = tmp_path / "full"
    code, _, err = run_main(
        capsys, "--prompts", str(prompt_file), "--out", str(full), *SMALL, *SHARED
    )
    assert code == 0, err
    out = tmp_path / "run"
    run_until_checkpoint(prompt_file, out, signal.SIGKILL, *SHARED)
    code, printed, err = run_main(
        capsys, "--prompts", str(prompt_file), "--out", str(out), *SMALL, *SHARED, "--resume"
    )
    assert code == 0, printed + err
    assert re.search(r"resuming after round [1-9]", err)
    expected, got = weights(full), weights(out)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def matching_step(row: torch.Tensor, by_step: dict[int, torch.Tensor]) -> list[int]:
    """The steps one of whose rows equals `row` (up to float rounding)."""
    return [i for i, rows in by_step.items() if (rows - row).abs().amax(dim=1).min() < 1e-5]


def test_pooled_rows_come_from_every_step_in_the_range(tiny_pipe):
    """With 4 steps (t = 0.751, 0.501, 0.251, 0.001) the range [0.2, 0.8] pools the first
    three; each image gives as many rows as one step has positions, drawn from all three."""
    keys = [SAEKey(b, None, "cond") for b in (MID, DOWN)]
    settings = dict(steps=4, guidance_scale=7.5)
    source = GenerationSource(
        tiny_pipe, PROMPTS, keys, batch_size=3, shared_t=(0.2, 0.8), **settings
    )
    assert source.pooled == [0, 1, 2]
    two = GenerationSource(
        tiny_pipe, PROMPTS, keys, batch_size=3, shared_t=(0.2, 0.8), shared_steps=2, **settings
    )
    pooled = source.generate([0, 1, 2])
    for key, rows in two.generate([0, 1, 2]).items():
        assert len(rows) == 2 * len(pooled[key])
    alone = source.generate([1])
    with record(tiny_pipe, [MID, DOWN]) as recording:
        generate_images(tiny_pipe, PROMPTS[:3], [0, 1, 2], output_type="latent", **settings)
    for key in keys:
        by_step = {r.step.index: to_rows(r.delta) for r in recording.of(key.block)}
        positions = len(by_step[0]) // 3
        assert len(pooled[key]) == 3 * positions and len(alone[key]) == positions
        steps = [matching_step(row, by_step) for row in pooled[key]]
        assert all(len(found) == 1 for found in steps)
        assert {found[0] for found in steps} == {0, 1, 2}
        # an image's rows depend on its seed only, not on the batch it is generated in
        assert all(matching_step(row, {0: pooled[key]}) for row in alone[key])


def test_training_from_shards(tmp_path, prompt_file, finished, capsys):
    shards = tmp_path / "shards"
    code, _, err = run_main(
        capsys,
        "--prompts",
        str(prompt_file),
        "--out",
        str(tmp_path / "a"),
        *SMALL,
        "--write-shards",
        str(shards),
    )
    assert code == 0, err
    code, _, err = run_main(
        capsys, "--from-shards", str(shards), "--out", str(tmp_path / "b"), *SMALL
    )
    assert code == 0, err
    a = SAEBank.from_pretrained(tmp_path / "a" / "saes")
    b = SAEBank.from_pretrained(tmp_path / "b" / "saes")
    for key in a:
        assert a[key].stats.num_samples == b[key].stats.num_samples
        assert a[key].cfg.metrics["num_steps"] == b[key].cfg.metrics["num_steps"]


def test_two_processes_under_accelerate(tmp_path, prompt_file, finished):
    launcher = (
        "-m",
        "accelerate.commands.launch",
        "--cpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "core.training.train",
    )
    done = cli(
        "--prompts", str(prompt_file), "--out", str(tmp_path / "ddp"), *SMALL, launcher=launcher
    )
    assert done.returncode == 0, done.stdout + done.stderr
    parallel = SAEBank.from_pretrained(tmp_path / "ddp" / "saes")
    alone = SAEBank.from_pretrained(finished / "saes")
    assert parallel.keys() == alone.keys()
    for key in alone:
        # Each process generated half the prompts; together they saw every row once.
        assert parallel[key].stats.num_samples == alone[key].stats.num_samples


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--blocks", "mid_block.attention.0"], "valid ones are: down_blocks.0.attentions.0"),
        (["--prompts", "EMPTY"], "has no prompts; write one prompt per line"),
        (["--prompts", "MISSING"], "does not exist"),
        (["--shared-t", "0.3", "0.35"], "no step of the 4-step schedule has t in [0.3, 0.35]"),
        (["--shared-t", "0.8", "0.2"], "--shared-t takes LOW HIGH with 0 <= LOW <= HIGH <= 1"),
    ],
)
def test_bad_input_gets_one_clear_message(tmp_path, prompt_file, capsys, args, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    args = [{"EMPTY": str(empty), "MISSING": str(tmp_path / "nope.txt")}.get(a, a) for a in args]
    if "--prompts" not in args:
        args = ["--prompts", str(prompt_file), *args]
    code, _, err = run_main(capsys, *args, "--out", str(tmp_path / "out"), *SMALL)
    assert code != 0
    assert message in err
    assert "Traceback" not in err


def test_an_earlier_run_is_never_overwritten_silently(tmp_path, prompt_file, finished, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = weights(out)
    code, _, err = run_main(capsys, "--prompts", str(prompt_file), "--out", str(out), *SMALL)
    assert code != 0 and "--resume" in err and "--overwrite" in err
    assert weights(out).keys() == before.keys()


@pytest.mark.parametrize("damaged", ["trainer.safetensors", "buffer.safetensors"])
def test_a_corrupt_checkpoint_is_reported_and_kept(tmp_path, prompt_file, killed, capsys, damaged):
    out = tmp_path / "run"
    shutil.copytree(killed, out)
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    target = next(latest.rglob(damaged))
    target.write_bytes(target.read_bytes()[:100])
    code, _, err = run_main(
        capsys, "--prompts", str(prompt_file), "--out", str(out), *SMALL, "--resume"
    )
    assert code != 0
    assert "corrupt or truncated" in err and "Traceback" not in err
    assert target.exists() and (out / "checkpoints" / "latest").exists()


def test_push_to_hub_uploads_the_bank(tmp_path, prompt_file, monkeypatch):
    import huggingface_hub

    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls["created"] = (repo_id, exist_ok)

        def upload_folder(self, repo_id, folder_path, path_in_repo=None, commit_message=""):
            calls["files"] = sorted(
                p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*.json")
            )
            calls["path_in_repo"] = path_in_repo

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    args = ["--prompts", str(prompt_file), "--out", str(tmp_path / "run"), *SMALL]
    args += ["--blocks", MID, "--push-to-hub", "someone/tiny-saes"]
    assert main(args) == 0
    assert calls["created"] == ("someone/tiny-saes", True)
    assert calls["path_in_repo"] is None
    assert calls["files"] == [f"{MID}/t0.00/cond/cfg.json", f"{MID}/t1.00/cond/cfg.json"]


def train_on_rows(rows: dict[SAEKey, torch.Tensor], seed: int = 0) -> SAEBank:
    """The run's SAEs after training on `rows` (one tensor per key) in batches of 64."""
    config = RunConfig(
        out="unused",
        prompts="unused",
        num_latents=128,
        k=4,
        batch_size=64,
        buffer_size=64,
        lr=1e-3,
        seed=seed,
    )
    run = Run(config, list(rows), model_name="synthetic")
    for start in range(0, 64 * 200, 64):
        run.add({key: x[start : start + 64] for key, x in rows.items()})
        run.train_ready()
    return run.bank()


def test_each_sae_of_a_run_starts_from_its_own_seed(one_thread):
    """Two SAEs of one run on unrelated data match at chance; before each SAE had its own
    seed, their decoders stayed near the shared start and every latent 'persisted'."""
    generator = torch.Generator().manual_seed(0)
    keys = [SAEKey(MID, 1.0, "cond"), SAEKey(MID, 0.5, "cond")]
    rows = {key: torch.randn(64 * 200, 32, generator=generator) for key in keys}
    bank = train_on_rows(rows)
    seeds = {bank[key].cfg.seed for key in keys}
    assert seeds == {derived_seed(0, *key) for key in keys} and len(seeds) == 2
    summary = lineage(bank, MID, ts=(1.0, 0.5), method="decoder").summary()[0]
    assert summary["persist"] <= 0.05
    again = train_on_rows(rows)
    for key in keys:
        assert torch.equal(bank[key].W_dec, again[key].W_dec)
