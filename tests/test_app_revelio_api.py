"""The revelio tab's endpoints through gradio_client, on the shipped demo assets."""

import numpy as np
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image

from core.views.revelio import PURITY_HEADERS, TOP_IMAGE_HEADERS
from scripts.app_server import app_url

CACHE, SAES, IMAGES = (f"assets/revelio-demo/{name}" for name in ("cache", "ksaes", "images"))
SHAPES = {"circle", "cross", "diamond", "square", "star", "triangle"}


@pytest.fixture(scope="module")
def client() -> Client:
    return Client(app_url(), verbose=False)


def pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def inspect(client: Client, **changes) -> tuple:
    args = {
        "cache": CACHE,
        "saes": SAES,
        "images": IMAGES,
        "layer": "up_blocks.1",
        "timestep": 25,
        "by": "purest",
        "number": 0,
        **changes,
    }
    return client.predict(*args.values(), api_name="/revelio_inspect")


def pca(client: Client, **changes) -> list:
    args = {
        "cache": CACHE,
        "images": IMAGES,
        "layer": "up_blocks.1",
        "timestep": 250,
        "indices": "0-3",
        **changes,
    }
    return client.predict(*args.values(), api_name="/revelio_pca")


def test_load_lists_the_pairs_and_measures_purity(client):
    note, table = client.predict(CACHE, SAES, api_name="/revelio_load")
    assert note.startswith("120 images of 6 classes") and "feature maps for 6" in note
    assert table["headers"] == PURITY_HEADERS
    assert [row[:2] for row in table["data"][:2]] == [
        ["bottleneck (mid_block)", 25],
        ["bottleneck (mid_block)", 250],
    ]
    assert len(table["data"]) == 8 and all(row[2] > 10 for row in table["data"])


def test_inspect_shows_the_grid_or_only_the_labels(client):
    note, grid, top = inspect(client)
    assert pixels(grid).shape == (2 * (128 + 14), 5 * 128, 3)
    assert top["headers"] == TOP_IMAGE_HEADERS and len(top["data"]) == 10
    assert {row[3] for row in top["data"]} <= SHAPES
    activations = [row[4] for row in top["data"]]
    assert activations == sorted(activations, reverse=True) and activations[-1] > 0
    assert note.startswith("Latent ") and "up_ft1 (up_blocks.1), t=25" in note
    note, grid, top_again = inspect(client, images="", by="id", number=top["data"][0][1] % 64)
    assert grid is None and "No image folder given" in note
    assert top_again["data"]


def test_pca_puts_each_image_beside_its_map(client):
    panels = pca(client)
    assert [panel["caption"].split(":")[0] for panel in panels] == [
        "0",
        "0",
        "1",
        "1",
        "2",
        "2",
        "3",
        "3",
    ]
    assert panels[0]["caption"] == "0: circle" and panels[1]["caption"] == "0: PCA"
    assert all(pixels(panel["image"]).shape == (256, 256, 3) for panel in panels)
    assert len(pca(client, images="", indices="5")) == 1


BAD_INPUTS = [
    (pca, {"layer": "up_ft2"}, "The cache has no feature maps for up_blocks.2 t=250"),
    (inspect, {"by": "id", "number": 128}, "Latent 128 is out of range; the k-SAE has 128"),
    (inspect, {"timestep": 30}, "Timestep 30 is not in the cache; it holds 25, 250"),
    (pca, {"cache": "assets/no-such-cache"}, "The feature cache folder assets/no-such-cache"),
]


@pytest.mark.parametrize(("call", "changes", "message"), BAD_INPUTS)
def test_bad_input_is_one_sentence(client, call, changes, message):
    with pytest.raises(AppError) as error:
        call(client, **changes)
    assert message in str(error.value) and "Traceback" not in str(error.value)
