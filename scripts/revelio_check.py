"""Revelio's measurements on the shapes world: `python -m scripts.revelio_check --help`.

One-object scenes labelled by shape (or colour, or background style) are written as an
image folder (a train and a test split, balanced per class), their features cached with
`core.revelio.features` at several timesteps and layers, k-SAEs trained with
`core.revelio.ksae`, label purity measured with `core.revelio.purity` and Diff-C trained and
tested with `core.revelio.diffc`. The result is one table, per layer and timestep, of
sigma_label (with its chance value), majority fraction and Diff-C top-1, written as
`report.md` beside the CSV files.

The paper's findings to compare with: up_ft1 is best for fine-grained classes at small t,
and the bottleneck is competitive for coarse classes.
"""

import argparse
import csv
import sys
from collections.abc import Sequence
from pathlib import Path

from core.revelio import diffc, features, ksae, purity
from core.runtime import one_line_errors
from core.shapes.world import LABELS, write_image_folder

LAYERS = ("bottleneck", "up_ft0", "up_ft1", "up_ft2")
FINDING = (
    "Paper (SD 1.5/2.1, real images): up_ft1 is best for fine-grained classes at small t "
    "(t = 25); the bottleneck is competitive for coarse classes."
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scripts.revelio_check", description=__doc__)
    p.add_argument("--out", required=True, help="folder for images, caches, SAEs and report")
    p.add_argument("--preset", default="tiny", help="preset (default: tiny)")
    p.add_argument("--model", help="pipeline folder (overrides the preset's)")
    p.add_argument("--label", default="shape", choices=sorted(LABELS))
    p.add_argument("--train-per-class", type=int, default=100)
    p.add_argument("--test-per-class", type=int, default=30)
    p.add_argument("--resolution", type=int, default=64, help="scene side in pixels")
    p.add_argument("--timesteps", nargs="+", type=int, default=[25, 100, 250, 500])
    p.add_argument("--ksae-epochs", type=float, default=50, help="passes over the train images")
    p.add_argument("--min-fires", type=int, default=10, help="purity: the paper's 10")
    p.add_argument("--diffc-epochs", type=int, default=30, help="the paper's 30 by default")
    p.add_argument("--diffc-width", type=int, default=1024, help="Table 10's 1024 by default")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    model = ["--preset", args.preset] + (["--model", args.model] if args.model else [])
    for split, per_class, seed in (
        ("train", args.train_per_class, 1),
        ("test", args.test_per_class, 2),
    ):
        images = out / "images" / split
        if not images.is_dir():
            write_image_folder(images, per_class, seed, args.resolution, args.label)
        _ok(
            features.main(
                [
                    "--images",
                    str(images),
                    "--out",
                    str(out / "cache" / split),
                    *model,
                    "--maps",
                    "--layers",
                    *LAYERS,
                    "--timesteps",
                    *map(str, args.timesteps),
                    "--resolution",
                    str(args.resolution),
                    "--device",
                    args.device,
                ]
            )
        )
    train, test = str(out / "cache" / "train"), str(out / "cache" / "test")
    _ok(
        ksae.main(
            [
                "--cache",
                train,
                "--out",
                str(out / "ksae"),
                "--epochs",
                str(args.ksae_epochs),
                "--device",
                args.device,
                "--overwrite",
            ]
        )
    )
    _ok(
        purity.main(
            [
                "--cache",
                train,
                "--saes",
                str(out / "ksae"),
                "--csv",
                str(out / "purity.csv"),
                "--min-fires",
                str(args.min_fires),
                "--device",
                args.device,
            ]
        )
    )
    _ok(
        diffc.main(
            [
                "--cache",
                train,
                "--test-cache",
                test,
                "--out",
                str(out / "diffc"),
                "--epochs",
                str(args.diffc_epochs),
                "--width",
                str(args.diffc_width),
                "--device",
                args.device,
            ]
        )
    )
    report = out / "report.md"
    report.write_text(table(out / "purity.csv", out / "diffc" / "accuracy.csv", args) + "\n")
    print(report.read_text())
    return report


def _ok(code: int) -> None:
    if code != 0:
        raise ValueError(f"a step of the check failed with exit code {code}; see its message")


def _rows(path: Path) -> dict[tuple[str, int], dict]:
    with open(path, newline="") as f:
        return {(r["layer"], int(r["timestep"])): r for r in csv.DictReader(f)}


def table(purity_csv: Path, accuracy_csv: Path, args: argparse.Namespace) -> str:
    """One markdown row per (layer, timestep): purity with chance, and Diff-C top-1."""
    purities, accuracies = _rows(purity_csv), _rows(accuracy_csv)
    lines = [
        f"Label: {args.label}; model: {args.model or args.preset}; "
        f"{args.train_per_class}/{args.test_per_class} train/test images per class; "
        f"Diff-C width {args.diffc_width}, {args.diffc_epochs} epochs.",
        "",
        "| layer | t | sigma_label (chance) | majority fraction (chance) | Diff-C top-1 |",
        "|---|---|---|---|---|",
    ]
    for key in sorted(set(purities) | set(accuracies), key=lambda k: (k[1], k[0])):
        p, a = purities.get(key), accuracies.get(key)
        sigma = _with_chance(p, "sigma_label")
        major = _with_chance(p, "majority_fraction")
        top1 = f"{float(a['top1']):.3f}" if a else "-"
        lines.append(f"| `{key[0]}` | {key[1]} | {sigma} | {major} | {top1} |")
    return "\n".join([*lines, "", FINDING])


def _with_chance(row: dict | None, measure: str) -> str:
    return f"{float(row[measure]):.3f} ({float(row['chance_' + measure]):.3f})" if row else "-"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return one_line_errors(lambda: run(args) and 0)


if __name__ == "__main__":
    sys.exit(main())
