"""The page in a real headless Chromium: open it, run each tab, keep screenshots.

Debian's `chromium` is driven by Playwright (`playwright install` cannot download browsers
offline; `make test` installs the Debian package). Screenshots go to runs/screenshots/.
"""

import io
import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from diffusers import DDIMScheduler
from PIL import Image
from playwright.sync_api import Locator, Page, sync_playwright

from core.diffusion.presets import PRESETS, STAGES, default_preset_name
from core.diffusion.tiny import SD14_SCHEDULER
from core.files import REPO_ROOT
from page.texts import DEEP_LINK
from scripts.app_server import app_url

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = REPO_ROOT / "runs" / "screenshots"
WAIT_MS = 120_000
ALL_LOADED = "(selector) => [...document.querySelectorAll(selector)].every(i => i.naturalWidth)"
"""True once every image the selector finds has loaded (the page loads images lazily)."""
SLIDER = "#emergence-step input[type=range]"


@pytest.fixture(scope="module")
def page() -> Iterator[Page]:
    assert CHROMIUM.is_file(), (
        f"the browser tests need Debian's chromium at {CHROMIUM}: run `make test` (it installs "
        "it) or `apt-get install chromium`"
    )
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(WAIT_MS)
        page.goto(app_url())
        yield page
        browser.close()


def schedule_ts(steps: int) -> list[float]:
    """t of each step of the presets' DDIM schedule (SD v1.4's) with `steps` steps."""
    scheduler = DDIMScheduler(**SD14_SCHEDULER)
    scheduler.set_timesteps(steps)
    return [int(timestep) / 1000 for timestep in scheduler.timesteps]


def grey(element: Locator) -> np.ndarray:
    """An element's pixels as it is shown, in grey levels."""
    return np.asarray(Image.open(io.BytesIO(element.screenshot())).convert("L"), dtype=float)


def shot(page: Page, name: str) -> Path:
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    return path


def test_the_page_opens_and_says_what_is_loaded(page):
    page.locator("#status").get_by_text("(loaded)").wait_for()
    assert f"Preset {default_preset_name()}" in page.locator("#status").inner_text()
    assert page.get_by_role("tab").all_inner_texts()[:3] == ["emergence", "steer", "inspect"]
    shot(page, "0-opened")


def test_emergence_tab_with_three_words(page):
    page.get_by_role("tab", name="emergence").click()
    assert page.locator(SLIDER).is_disabled()  # no run yet: no steps to move over
    page.get_by_label("target words").fill("triangle, circle, square")
    page.click("#emergence-run")
    gallery = page.locator("#emergence-gallery")
    gallery.get_by_text("square: predicted mask at t=0.00").wait_for()
    page.locator("#emergence-plot img").wait_for()
    slider = page.locator(SLIDER)
    page.wait_for_function("(s) => !document.querySelector(s).disabled", arg=SLIDER)
    last = str(PRESETS[default_preset_name()].steps - 1)  # the run's steps set its range
    page.wait_for_function(
        "([s, last]) => document.querySelector(s).max === last", arg=[SLIDER, last]
    )
    assert re.fullmatch(r"[0-9a-f]{10}", page.locator("#emergence-run-id textarea").input_value())
    page.locator("#emergence-step input[type=number]").fill("0")
    page.locator("#emergence-step input[type=number]").press("Enter")
    slider.dispatch_event("pointerup")
    gallery.get_by_text(re.compile(r"square: predicted mask at t=0\.9\d")).wait_for()
    images = gallery.locator("img")
    assert images.count() == 12  # four panels per word
    page.wait_for_function(ALL_LOADED, arg="#emergence-gallery img")
    box, last = gallery.bounding_box(), images.last.bounding_box()
    assert last["y"] + last["height"] <= box["y"] + box["height"]  # no row cut off
    shot(page, "1-emergence")


def test_a_deep_link_reopens_the_page_with_its_settings_and_results(page):
    with page.expect_response(lambda response: "gradio_api/deep_link" in response.url) as answer:
        page.get_by_role("button", name=DEEP_LINK).click()
    link = answer.value.text().strip('"')
    assert link, "the server saved no state for this session"
    reopened = page.context.browser.new_page(viewport=page.viewport_size)  # another person
    reopened.goto(f"{app_url()}?deep_link={link}")
    run_id = page.locator("#emergence-run-id textarea").input_value()
    reopened.locator("#emergence-gallery").get_by_text(
        re.compile(r"square: predicted mask at t=0\.9\d")  # the step the slider had picked
    ).wait_for()
    assert reopened.locator("#emergence-run-id textarea").input_value() == run_id
    assert reopened.get_by_label("target words").input_value() == "triangle, circle, square"
    assert reopened.locator(SLIDER).get_attribute("max") == page.locator(SLIDER).get_attribute(
        "max"
    )
    reopened.wait_for_function(ALL_LOADED, arg="#emergence-image img, #emergence-plot img")
    shot(reopened, "1-deep-link")
    reopened.close()


def test_the_batch_leaves_out_words_scored_against_their_own_last_step(page):
    """ "square" is in neither the caption nor the image: each run scores it against its own
    last step (1.0 there by construction), which the batch must not average in."""
    page.get_by_text("batch: several prompts and seeds").click()
    page.click("#emergence-batch-run")  # seeds 0-3
    summary = page.locator("#emergence-batch-summary")
    summary.get_by_text("4 runs (1 prompt × 4 seeds").wait_for()
    assert "mean IoU against the annotation" in summary.inner_text()
    assert re.search(r"Left out: \d+ words the annotator did not find", summary.inner_text())
    page.get_by_text("batch: several prompts and seeds").click()  # closed again


def test_a_run_exported_and_opened_again_shows_its_last_step(page, tmp_path):
    page.click("#emergence-export")
    link = page.locator("#emergence-run-file a").first
    with page.expect_download() as download:
        link.click()
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    assert saved.suffix == ".safetensors"
    with page.expect_file_chooser() as chooser:
        page.click("#emergence-open")
    chooser.value.set_files(saved)
    page.locator("#emergence-gallery").get_by_text("square: predicted mask at t=0.00").wait_for()
    last = str(PRESETS[default_preset_name()].steps - 1)
    # The slider follows in a second event (step_range_after_import), after the gallery.
    page.wait_for_function(
        "([selector, value]) => document.querySelector(selector).value === value",
        arg=[SLIDER, last],
        timeout=WAIT_MS,
    )


def test_steer_tab_with_a_drawn_region(page):
    page.get_by_role("tab", name="steer").click()
    t_from = page.get_by_text("t from", exact=True)
    assert not t_from.is_visible()
    page.get_by_label("custom").check()
    t_from.wait_for()  # the t range shows for a custom stage only
    page.get_by_label("early").check()
    t_from.wait_for(state="hidden")
    branches = page.locator("#steer-branch input[type=radio]")
    page.locator("#steer-branch input[value=both]").wait_for(state="detached")  # once loaded
    assert [branches.nth(i).input_value() for i in range(branches.count())] == ["cond"]
    page.click("#steer-list")
    concepts = page.locator("#steer-concepts input[type=checkbox]")
    concepts.first.wait_for()
    assert concepts.count() > 1 and all(
        concepts.nth(i).is_checked() for i in range(concepts.count())
    )
    first = page.locator("#steer-concepts label").first.inner_text()
    assert first.startswith("t=1.0 cond: CID ")
    for i in range(1, concepts.count()):
        concepts.nth(i).uncheck()  # keep the first concept only
    page.get_by_label("drawn").check()
    editor = page.locator("#steer-canvas")
    editor.scroll_into_view_if_needed()
    blank = grey(editor)
    page.click("#steer-show")
    deadline = time.monotonic() + WAIT_MS / 1000
    while np.abs(grey(editor) - blank).mean() < 5:  # until the image to edit is on the canvas
        assert time.monotonic() < deadline, "the image to edit never reached the canvas"
        page.wait_for_timeout(250)
    editor.get_by_role("button", name="Brush", exact=True).click()
    box = editor.locator("canvas").first.bounding_box()
    # Fill most of the top-right quarter: a coarse block (2x2 on the toy's mid block) edits
    # only positions the region covers at least half of.
    for row in np.arange(0.04, 0.46, 0.03):
        y = box["y"] + box["height"] * row
        page.mouse.move(box["x"] + box["width"] * 0.54, y)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.96, y, steps=8)
        page.mouse.up()
    page.click("#steer-run")
    metrics = page.locator("#steer-metrics")
    metrics.get_by_text("mean_abs_pixel_difference").wait_for()
    assert "drawn," in metrics.inner_text()
    edits = page.locator("#steer-edits textarea").input_value()
    cid = first.split("CID ")[1].split(" ")[0]
    preset = PRESETS[default_preset_name()]
    early = [i for i, t in enumerate(schedule_ts(preset.steps)) if t >= STAGES["early"][0]]
    assert edits.startswith(
        f"edited steps 0–{early[-1]} with {preset.app.steer_block} (t=1, cond), CIDs {cid};"
    )
    assert "The image changed by " in edits
    assert f"Centre of mass of the {preset.app.word}" in edits
    assert page.locator("#steer-pair img").count() == 2
    shot(page, "2-steer")


def test_an_empty_word_is_refused_and_the_last_edit_stays(page):
    page.get_by_role("tab", name="steer").click()
    word = page.get_by_role("textbox", name="word", exact=True)
    word.fill("")
    page.click("#steer-run")
    refusal = "Type the word to steer with, or choose the concept by CID."
    page.locator("#steer-message").get_by_text(refusal).wait_for()
    assert page.locator("#steer-pair img").count() == 2
    word.fill(PRESETS[default_preset_name()].app.word)


def test_inspect_tab_from_a_word(page):
    page.get_by_role("tab", name="inspect").click()
    page.get_by_label("search by word").fill(PRESETS[default_preset_name()].app.word)
    page.click("#inspect-search")
    page.locator("#inspect-icon img").wait_for()
    assert page.locator("#inspect-examples img").count() >= 1
    assert page.get_by_label("concepts found").input_value().startswith("CID ")
    page.click("#inspect-timeline")  # the word searched for, at every step
    page.locator("#inspect-timeline-strip img").wait_for()
    page.locator("#inspect-timeline-strength img").wait_for()
    page.wait_for_function(ALL_LOADED, arg="#inspect-timeline-strip img")
    word = PRESETS[default_preset_name()].app.word
    assert page.get_by_text(f"'{word}': steps 0–").is_visible()
    shot(page, "3-inspect")
    page.get_by_label("search by word").fill("star")  # another concept: the timeline follows
    page.click("#inspect-search")
    page.get_by_text("'star': steps 0–").wait_for()
    assert page.get_by_label("concepts found").input_value().startswith("CID ")


def test_a_bad_input_shows_a_sentence_that_stays_and_keeps_the_earlier_results(page):
    page.get_by_role("tab", name="emergence").click()
    page.get_by_label("prompt").first.fill("")
    page.click("#emergence-run")
    message = page.locator("#emergence-message")
    message.get_by_text("The prompt is empty").wait_for()
    page.wait_for_timeout(800)  # the toast fades in
    shot(page, "4-error")
    for results in ("#emergence-image", "#emergence-plot", "#emergence-gallery"):
        assert page.locator(f"{results} img").first.is_visible()
        assert page.locator(results).get_by_text("Error", exact=True).count() == 0
    assert page.locator("#emergence-gallery img").count() == 12
    assert page.locator("#emergence-line").get_by_text("Error", exact=True).count() == 0
    colour = "e => getComputedStyle(e).color"  # a refusal does not read as a result
    assert message.locator("p").evaluate(colour) != page.locator("#emergence-line p").evaluate(
        colour
    )
    page.locator(".toast-body").first.wait_for(state="detached")  # the toast has gone ...
    assert message.inner_text().startswith("The prompt is empty")  # ... the line has not
    page.get_by_label("prompt").first.fill("a red circle and a blue star")
    page.get_by_label("seed").first.fill("7")
    page.click("#emergence-run")  # the next press empties it
    page.get_by_text("(cond), seed 7,").wait_for()
    assert message.inner_text().strip() == ""


def test_revelio_tab_loads_and_shows_a_latents_grid(page):
    page.get_by_role("tab", name="revelio").click()
    page.click("#revelio-load")
    page.locator("#revelio-note").get_by_text("120 images of 6 classes").wait_for()
    assert "up_ft1 (up_blocks.1)" in page.locator("#revelio-table").inner_text()
    page.click("#revelio-inspect")
    page.locator("#revelio-grid img").wait_for()
    assert "fires on" in page.locator("#revelio-latent-note").inner_text()
    page.click("#revelio-pca-run")
    page.locator("#revelio-pca").get_by_text("99: PCA").wait_for()
    assert page.locator("#revelio-pca img").count() == 12
    page.locator("#revelio-pca").scroll_into_view_if_needed()
    page.wait_for_function(ALL_LOADED, arg="#revelio-pca img")
    shot(page, "5-revelio")


def test_another_preset_opens_the_tabs_on_its_own_prompts(page):
    page.get_by_role("tab", name="emergence").click()
    turbo = PRESETS["sdxl-turbo"].app.prompts
    page.get_by_label("preset").first.click()
    page.get_by_role("option", name="sdxl-turbo").click()
    page.get_by_text(turbo[2]).first.wait_for()  # an example prompt of its own
    assert page.get_by_label("prompt").first.input_value() == turbo[0]
    page.get_by_label("preset").first.click()
    page.get_by_role("option", name=default_preset_name()).click()
    opening = PRESETS[default_preset_name()].app.prompts
    page.get_by_text(opening[2]).first.wait_for()  # a short one: long ones are cut short
    assert page.get_by_label("prompt").first.input_value() == opening[0]
