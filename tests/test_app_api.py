"""Every endpoint of `python app.py`, through gradio_client, on the default offline preset."""

import threading
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from core.views.batch import TABLE_HEADERS
from core.views.render import BAR_WIDTH
from scripts.app_server import LOGS, app_url

PRESET = "tiny"
UP = "up_blocks.1.attentions.0"
PROMPT = "a red circle and a blue star"
PUBLIC = (
    "status",
    "emergence",
    "emergence_step",
    "emergence_batch",
    "build_dictionaries",
    "export_run",
    "import_run",
    "default_strength",
    "steer",
    "steer_concepts",
    "search_concepts",
    "inspect_concept",
    "top_examples",
    "activation_map",
    "feature_icon",
    "timeline",
    "revelio_load",
    "revelio_inspect",
    "revelio_pca",
)
"""The endpoints a client sees; the page's own updates (a slider's range, a dropdown's
choices, the preset switch) are private events."""


@pytest.fixture(scope="module")
def client() -> Client:
    return Client(app_url(), verbose=False)


def pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def emergence(client: Client, seed: int = 0, **changes) -> tuple:
    args = {
        "preset": PRESET,
        "prompt": PROMPT,
        "seed": seed,
        "steps": 10,
        "block": UP,
        "branch": "cond",
        "words": "",
        **changes,
    }
    return client.predict(*args.values(), api_name="/emergence")


def steer(client: Client, seed: int = 0, **changes) -> tuple:
    args = {
        "preset": PRESET,
        "prompt": PROMPT,
        "seed": seed,
        "block": UP,
        "branch": "cond",
        "concept_by": "word",
        "word": "star",
        "concepts": [],
        "cid": 0,
        "cid_t": 1.0,
        "kind": "spatial",
        "stage": "early",
        "t_min": 0.6,
        "t_max": 1.0,
        "strength": 4000,
        "sae_choice": "stage",
        "region_by": "quadrant",
        "quadrant": "top_left",
        "canvas": None,
        **changes,
    }
    return client.predict(*args.values(), api_name="/steer")


def canvas(tmp_path: Path, painted: tuple[slice, slice] | None) -> dict:
    """An image-editor value: a white background and one layer painted where asked."""
    background = tmp_path / "background.png"
    Image.new("RGB", (64, 64), "white").save(background)
    layer = np.zeros((64, 64, 4), dtype=np.uint8)
    if painted is not None:
        layer[painted] = (224, 32, 32, 255)
    Image.fromarray(layer, "RGBA").save(tmp_path / "layer.png")
    files = [handle_file(str(tmp_path / name)) for name in ("background.png", "layer.png")]
    return {"background": files[0], "layers": [files[1]], "composite": files[0]}


def test_the_api_names_every_output_and_leaves_page_updates_out(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(endpoints) == {f"/{name}" for name in PUBLIC}
    for name, endpoint in endpoints.items():
        labels = [output["label"] for output in endpoint["returns"]]
        assert all(labels) and not any(label.startswith("value_") for label in labels), name


def test_status(client):
    assert "Preset `tiny`" in client.predict(PRESET, api_name="/status")


def test_a_preset_whose_saes_have_dictionaries_builds_none(client):
    built = client.predict(PRESET, api_name="/build_dictionaries")
    assert built.startswith("The preset's SAEs have their ") and "nothing was built" in built


def test_emergence_and_its_steps_from_any_client(client):
    image, plot, panels, summary, run_id = emergence(client)
    assert pixels(image).shape == (256, 256, 3)  # the 32 px image, enlarged for the page
    assert Path(plot).suffix == ".png" and pixels(plot).shape == (440, 600, 3)
    assert len(panels) == 8 and panels[0]["caption"].startswith("circle: predicted mask at t=0.00")
    assert pixels(panels[2]["image"]).shape == (256, 256 + BAR_WIDTH, 3)  # with a colour bar
    assert "target words: circle, star" in summary
    read = "(t=1: steps 0-1; t=0.5: steps 2-6; t=0: steps 7-9)"  # DDIM's 10 steps, t 0.9 to 0
    assert f"The SAE trained nearest each step's t read it {read}." in summary
    other = Client(app_url(), verbose=False)
    earlier = other.predict(run_id, 2, api_name="/emergence_step")
    assert len(earlier) == 8 and earlier[4]["caption"].startswith("star: predicted mask at t=0.70")
    assert emergence(other)[4] == run_id  # the same request, the same run
    with pytest.raises(AppError, match=r"^No emergence run has the id 'abc': run .*\.$"):
        client.predict("abc", 2, api_name="/emergence_step")
    with pytest.raises(AppError, match="The step must be a whole number from 0 to 9 for this"):
        client.predict(run_id, 10, api_name="/emergence_step")


def test_emergence_batch_pools_every_prompt_and_seed(client):
    batch = {"preset": PRESET, "prompt": PROMPT, "prompts": "a blue star", "steps": 3}
    batch |= {"block": UP, "branch": "cond", "words": ""}
    plot, table, summary = client.predict(**batch, seeds="0-1", api_name="/emergence_batch")
    assert pixels(plot).shape == (440, 600, 3)  # a PNG of the figure, to download
    assert table["headers"] == TABLE_HEADERS and len(table["data"]) == 3
    assert summary.startswith("4 runs (2 prompts × 2 seeds, 3 steps")
    too_many = r"^2 prompts × 9 seeds make 18 runs, .* `python -m core.views.emergence_batch`\.$"
    with pytest.raises(AppError, match=too_many):
        client.predict(**batch, seeds="0-8", api_name="/emergence_batch")
    with pytest.raises(AppError, match=r"^The seeds must be whole numbers or ranges such as"):
        client.predict(**batch, seeds="first four", api_name="/emergence_batch")


def test_a_run_exported_and_imported_elsewhere_shows_the_same(client, tmp_path):
    image, plot, panels, summary, run_id = emergence(client, words="circle, star, square")
    run_file = client.predict(run_id, api_name="/export_run")
    assert Path(run_file).name == f"emergence-{run_id}.safetensors"
    other = Client(app_url(), verbose=False)
    opened = other.predict(handle_file(run_file), api_name="/import_run")
    assert opened[3:] == (summary, run_id)
    for again, first in ((opened[0], image), (opened[1], plot)):
        assert np.array_equal(pixels(again), pixels(first))
    assert [p["caption"] for p in opened[2]] == [p["caption"] for p in panels]
    assert all(
        np.array_equal(pixels(a["image"]), pixels(b["image"]))
        for a, b in zip(opened[2], panels, strict=True)
    )
    assert len(other.predict(run_id, 0, api_name="/emergence_step")) == 12
    with pytest.raises(AppError, match=r"^No emergence run has the id 'abc': run .*\.$"):
        client.predict("abc", api_name="/export_run")
    text = tmp_path / "notes.safetensors"
    text.write_text("not a run")
    with pytest.raises(AppError, match=r"^The file notes\.safetensors is not a run file \(not a"):
        client.predict(handle_file(str(text)), api_name="/import_run")


def test_steer_by_word_in_a_quadrant_and_by_cid_in_a_drawn_region(client, tmp_path):
    (before, after), difference, edits, changes = steer(client)
    record, change, placement = edits.splitlines()
    assert record.startswith(f"edited steps 0–3 with {UP} (t=1, cond), CIDs ")
    assert record.endswith("; skipped none") and change.startswith("The image changed by ")
    assert placement.startswith("Centre of mass of the star (the shapes world's pixels) ")
    assert changes["placement"]["object"] == "star"
    assert pixels(before).shape == pixels(after).shape == (256, 256, 3)
    assert not np.array_equal(pixels(before), pixels(after))
    assert pixels(difference).shape[:2] == (256, 256 + BAR_WIDTH)
    assert changes["concept"] == "'star'" and changes["mean_abs_pixel_difference"] > 0
    drawn = canvas(tmp_path, (slice(0, 32), slice(32, 64)))
    (before2, _), _, edits, changes = steer(
        client, concept_by="CID", cid=5, cid_t=0.5, region_by="drawn", canvas=drawn
    )
    assert edits.startswith("edited no step; skipped steps 0–3: ")
    assert changes["cids"] == {"t=0.5": "5"} and changes["region"] == "drawn, 25% of the image"
    assert np.array_equal(pixels(before), pixels(before2))


def test_a_steer_by_word_narrowed_to_the_concepts_listed(client):
    found = client.predict(PRESET, UP, "cond", "star", api_name="/steer_concepts")
    assert found[0] == {
        "label": "t=1.0 cond: CID 0 (checkered x2, cross x1, star x1)",
        "value": "cond:1.0:0",
    }
    _, _, edits, changes = steer(client, concepts=[found[1]["value"]])
    assert edits.startswith(f"edited steps 0–3 with {UP} (t=1, cond), CIDs 24; skipped none")
    assert changes["cids"]["t=1.0"] == "24"
    with pytest.raises(AppError, match="^Type a word to list the concepts labelled with it.$"):
        client.predict(PRESET, UP, "cond", "", api_name="/steer_concepts")


def test_default_strength_follows_preset_type_and_stage(client):
    def default(*args) -> float:
        return client.predict(*args, api_name="/default_strength")

    assert default(PRESET, "global", "middle", 0.6, 1.0) == 10.0
    assert default(PRESET, "spatial", "custom", 0.7, 0.9) is None  # each step its stage's
    # SDLens SAEs: a multiple of the concept's mean activation, 10 as in their demo.
    assert default("sdxl-turbo", "spatial", "early", 0.6, 1.0) == 10.0
    assert default("sdxl-turbo", "ablate", "early", 0.6, 1.0) == 1.0
    (before, after), *_ = steer(client, kind="global", stage="middle", strength=10.0)
    assert not np.array_equal(pixels(before), pixels(after))


def test_inspect_endpoints(client):
    found, cid, note = client.predict(PRESET, UP, 0.5, "cond", "star", api_name="/search_concepts")
    assert "labelled 'star'" in note and found[0]["cid"] == cid
    assert all("star" in match["labels"] for match in found)
    entry, stats, nearest, _ = client.predict(
        PRESET, UP, 0.5, "cond", cid, api_name="/inspect_concept"
    )
    assert "star" in [row[0] for row in entry["data"]]
    assert stats["sae"] == f"{UP}, t=0.5, cond"
    assert len(nearest["data"]) == 10
    examples, note = client.predict(PRESET, UP, 0.5, "cond", cid, api_name="/top_examples")
    assert examples and "shipped index" in note
    overlay, heat, caption = client.predict(
        PRESET, UP, 0.5, "cond", cid, PROMPT, 0, api_name="/activation_map"
    )
    assert pixels(overlay).shape == (256, 256, 3)
    assert pixels(heat).shape == (256, 256 + BAR_WIDTH, 3)
    assert f"CID {cid}" in caption
    icon = client.predict(PRESET, UP, 0.5, "cond", cid, 10.0, 0, api_name="/feature_icon")
    assert pixels(icon).shape == (256, 256, 3)
    by_cid, by_word = (
        client.predict(PRESET, UP, 0.5, "cond", cid, word, PROMPT, 0, api_name="/timeline")
        for word in ("", "star")
    )
    strip, plot, note = by_cid
    assert pixels(strip).shape[1] > 10 * 96 and pixels(plot).shape[2] == 3
    assert note.startswith(f"CID {cid} of the SAE at t=0.5: steps 0–9 ")
    assert by_word[2].startswith("'star': steps 0–1 (t 0.90 to 0.80) read with the SAE at t=1")
    with pytest.raises(AppError, match="Choose a concept: type a word, or give a CID."):
        client.predict(PRESET, UP, 0.5, "cond", None, "", PROMPT, 0, api_name="/timeline")


BAD_INPUTS = [
    ("/emergence", {"prompt": ""}, "The prompt is empty"),
    ("/emergence", {"prompt": "a cat " * 1700}, "characters long"),
    ("/emergence", {"steps": 0}, "The number of steps must be a whole number from 1 to 150"),
    ("/emergence", {"steps": 10_000}, "from 1 to 150, got 10000"),
    ("/emergence", {"steps": "many"}, "The number of steps must be a number, got 'many'"),
    ("/emergence", {"seed": "abc"}, "The seed must be a number, got 'abc'"),
    ("/emergence", {"words": "qzxv"}, "No word vector for 'qzxv'"),
    ("/emergence", {"block": "up_blocks.0.attentions.1"}, "is not a hook point of the preset"),
    ("/emergence", {"preset": "sdxl-turbo", "block": "mid_block.attentions.0"}, "Could not load"),
    ("/steer", {"word": "qzxv"}, "is labelled 'qzxv' at any t"),
    ("/steer", {"strength": "nan"}, "The strength must be a finite number"),
    ("/steer", {"strength": 1e300}, "between 0 and 100000"),
    ("/steer", {"seed": "seven"}, "The seed must be a number"),
    ("/steer", {"region_by": "drawn", "canvas": "blank"}, "The mask is empty"),
    ("/steer", {"region_by": "drawn", "canvas": "full"}, "covers the whole image"),
    ("/steer", {"region_by": "drawn", "canvas": None}, "Draw the region on the canvas first"),
]


@pytest.mark.parametrize(("endpoint", "changes", "message"), BAD_INPUTS)
def test_bad_input_is_one_readable_error_and_the_server_keeps_serving(
    client, tmp_path, endpoint, changes, message
):
    if isinstance(changes.get("canvas"), str):
        full = (slice(None), slice(None))
        changes["canvas"] = canvas(tmp_path, full if changes["canvas"] == "full" else None)
    call = emergence if endpoint == "/emergence" else steer
    with pytest.raises(AppError) as error:
        call(client, **changes)
    assert message in str(error.value)
    assert "Traceback" not in str(error.value)
    assert "Preset `tiny`" in client.predict(PRESET, api_name="/status")


def test_each_refused_request_is_one_line_in_the_server_log(client):
    log = LOGS[app_url()]
    start = len(log.read_text())
    for changes in ({"prompt": ""}, {"steps": 0}):
        with pytest.raises(AppError):
            emergence(client, **changes)
    with pytest.raises(AppError):
        steer(client, word="qzxv")
    with pytest.raises(AppError, match="is not in the list of choices"):  # refused by Gradio
        steer(client, branch="sideways")
    with pytest.raises(AppError, match="The input 'step.*' could not be read"):
        client.predict("abc", "two", api_name="/emergence_step")
    first, second, third, fourth, fifth, *rest = log.read_text()[start:].splitlines()
    assert first.startswith("refused emergence_result: The prompt is empty; ")
    assert second.startswith("refused emergence_result: The number of steps must be a whole")
    assert third.startswith("refused on_steer: ") and "is labelled 'qzxv' at any t" in third
    assert fourth.startswith("refused on_steer: Value: 'sideways'")
    assert fifth.startswith("refused on_emergence_step: The input 'step")
    assert rest == []  # no traceback, chained or not


def test_presets_that_cannot_load_offline_are_a_message_not_a_crash():
    client = Client(app_url(), verbose=False)
    with pytest.raises(AppError, match="Could not load the pipeline 'stabilityai/sdxl-turbo'"):
        emergence(client, preset="sdxl-turbo", block="up_blocks.0.attentions.1", steps=1)
    with pytest.raises(AppError, match="no SAEs configured"):
        emergence(client, preset="sd14", block="mid_block.attentions.0")
    assert emergence(client, steps=2)[2]


def test_two_clients_at_once_get_what_each_gets_alone():
    url = app_url()
    alone_a = emergence(Client(url, verbose=False), seed=11)
    alone_b = steer(Client(url, verbose=False), seed=12)
    results: dict[str, object] = {}

    def run(name: str, call) -> None:
        try:
            results[name] = call(Client(url, verbose=False))
        except Exception as error:  # collected and asserted below
            results[name] = error

    calls = {
        "a": lambda c: emergence(c, seed=11),
        "b": lambda c: steer(c, seed=12),
        "other preset": lambda c: emergence(c, preset="sdxl-turbo"),
    }
    threads = [threading.Thread(target=run, args=item) for item in calls.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    together_a, together_b = results["a"], results["b"]
    assert np.array_equal(pixels(together_a[0]), pixels(alone_a[0]))
    assert [pixels(p["image"]).tolist() for p in together_a[2]] == [
        pixels(p["image"]).tolist() for p in alone_a[2]
    ]
    assert together_a[3:] == alone_a[3:]
    for together, alone in zip(together_b[0], alone_b[0], strict=True):
        assert np.array_equal(pixels(together), pixels(alone))
    assert together_b[2:] == alone_b[2:]
    assert isinstance(results["other preset"], AppError)
