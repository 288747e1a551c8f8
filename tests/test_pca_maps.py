import math

import pytest
import torch

from core.revelio.feature_cache import save_features
from core.revelio.pca import cached_pca_images, pca_images, pca_rgb, principal_directions
from core.revelio.pca_maps import PcaConfig, main
from tests.helpers import assert_defaults_stated_once, command_help

SIZE = 8


def patterns() -> torch.Tensor:
    """Three zero-mean, mutually orthogonal [SIZE, SIZE] spatial patterns."""
    coords = (torch.arange(SIZE, dtype=torch.float64) + 0.5) / SIZE
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    return torch.stack(
        [
            torch.cos(2 * math.pi * cols),
            torch.cos(2 * math.pi * rows),
            torch.cos(2 * math.pi * (rows + cols) * 2),
        ]
    )


def minmax(x: torch.Tensor) -> torch.Tensor:
    return (x - x.min()) / (x.max() - x.min())


def known_maps(channels: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps sum_k s_k u_k p_k with orthonormal u_k (largest entry positive), s = 3, 2, 1."""
    generator = torch.Generator().manual_seed(0)
    directions, _ = torch.linalg.qr(
        torch.randn(channels, 3, generator=generator, dtype=torch.float64)
    )
    directions = directions.T
    largest = directions.abs().argmax(dim=1, keepdim=True)
    directions = directions * directions.gather(1, largest).sign()
    scales = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    maps = torch.einsum("k,kc,khw->chw", scales, directions, patterns())
    return maps + 5.0, directions  # a constant offset: PCA centres it away


def test_three_orthogonal_patterns_come_back_as_red_green_blue():
    maps, _ = known_maps()
    rgb = pca_rgb(maps.float())
    assert rgb.shape == (SIZE, SIZE, 3)
    for channel, pattern in enumerate(patterns()):
        torch.testing.assert_close(rgb[..., channel], minmax(pattern).float(), atol=1e-5, rtol=0)


def test_directions_follow_the_sign_convention():
    maps, directions = known_maps()
    rows = maps.permute(1, 2, 0).reshape(-1, maps.shape[0])
    torch.testing.assert_close(principal_directions(rows), directions)
    flipped = principal_directions(-rows)
    assert (flipped.gather(1, flipped.abs().argmax(dim=1, keepdim=True)) > 0).all()


def test_colours_are_deterministic_and_joint_pca_is_shared():
    maps = torch.randn(2, 16, 6, 6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(pca_rgb(maps), pca_rgb(maps.clone()))
    both = pca_rgb(torch.stack([maps[0], maps[0]]))
    assert torch.equal(both[0], both[1])
    torch.testing.assert_close(both[0], pca_rgb(maps[0]))
    joint = pca_rgb(maps)
    assert joint.min() == 0 and joint.max() == 1
    assert not torch.allclose(joint[0], pca_rgb(maps[0]))


def test_fewer_directions_of_variation_leave_channels_black():
    pattern = patterns()[0]
    maps = torch.einsum("c,hw->chw", torch.arange(1.0, 9.0, dtype=torch.float64), pattern)
    rgb = pca_rgb(maps)
    torch.testing.assert_close(rgb[..., 0], minmax(pattern).float())
    assert rgb[..., 1:].abs().max() == 0
    assert pca_rgb(torch.ones(4, 3, 3)).abs().max() == 0


def test_images_are_upsampled_with_nearest_neighbours():
    maps, _ = known_maps()
    (image,) = pca_images(maps, size=32)
    assert image.size == (32, 32) and image.mode == "RGB"
    rgb = pca_rgb(maps)
    expected = tuple(int(v) for v in (rgb[2, 5] * 255).round())
    assert image.getpixel((5 * 4, 2 * 4)) == expected == image.getpixel((5 * 4 + 3, 2 * 4 + 3))
    assert pca_images(maps)[0].size == (SIZE, SIZE)


def test_cached_maps_to_png_files(tmp_path, capsys):
    maps = torch.randn(3, 16, 4, 4, generator=torch.Generator().manual_seed(2))
    save_features(tmp_path / "cache", "up_blocks.1", 25, maps, "maps")
    images = cached_pca_images(tmp_path / "cache", "up_ft1", 25, [0, 2], size=8)
    assert [image.size for image in images] == [(8, 8), (8, 8)]
    with pytest.raises(ValueError, match=r"image indices \[3\] are outside 0..2"):
        cached_pca_images(tmp_path / "cache", "up_ft1", 25, [0, 3])
    args = ["--cache", tmp_path / "cache", "--layer", "up_ft1", "--timestep", 25, "--out", tmp_path]
    assert main([*map(str, args), "--indices", "1", "2"]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "pca_up_ft1_t0025_1.png",
        "pca_up_ft1_t0025_2.png",
    ]
    assert main([*map(str, args[:4]), "--timestep", "50", "--out", str(tmp_path)]) == 2
    assert "no maps features for up_blocks.1 at t=50" in capsys.readouterr().err


def test_help_states_each_default_once():
    assert_defaults_stated_once(command_help("core.revelio.pca_maps"), PcaConfig)
