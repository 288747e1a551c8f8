"""The core services behind the app, called directly on the shipped tiny preset."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from core.annotate.shapes import ToySegmenter
from core.diffusion.presets import get_preset
from core.emergence.attention_maps import token_positions, trace_cross_attention
from core.files import ASSETS
from core.sae.bank import SAEBank, SAEKey
from core.shapes.world import BackgroundSpec, ObjectSpec, SceneSpec, render
from core.views import inspection
from core.views.emergence import (
    EmergenceRuns,
    default_words,
    finished,
    iou_axes,
    iou_figure,
    run_emergence,
    step_panels,
)
from core.views.inputs import MAX_WORDS, check_prompt, check_seed, check_steps, parse_words
from core.views.model_cache import Loaded, ModelCache
from core.views.render import BAR_WIDTH, difference_map, heat_map, outline, overlay
from core.views.steer import (
    SteerRequest,
    canvas_mask,
    change_in_words,
    concept_choices,
    place,
    run_steer,
    strength_of,
    usable_controls,
)
from scripts.build_tiny_assets import build_file, pipeline_fingerprint
from tests.helpers import hook_count, random_sae

UP = "up_blocks.1.attentions.0"
MID = "mid_block.attentions.0"
PROMPT = "a red circle and a blue star"
NO_LPIPS = "LPIPS is unavailable ("


@pytest.fixture(scope="module")
def loaded():
    torch.set_num_threads(1)
    cache = ModelCache()
    states = []
    loaded = cache.get("tiny", on_load=lambda name: states.append(cache.state(name)))
    assert states == [("loading", None)] and cache.state("tiny") == ("loaded", None)
    return loaded


def processors(pipe) -> list[str]:
    return [type(p).__name__ for p in pipe.unet.attn_processors.values()]


def test_shipped_tiny_assets_match_the_tiny_pipeline(loaded):
    build = json.loads(build_file("tiny").read_text())
    assert build["pipeline"]["fingerprint"] == pipeline_fingerprint(loaded.pipe), (
        "the tiny pipeline changed since its SAEs were trained; run "
        "`python -m scripts.build_tiny_assets` and commit assets/tiny"
    )
    size = sum(p.stat().st_size for p in (ASSETS / "tiny").rglob("*") if p.is_file())
    assert size < 5e6


@pytest.mark.parametrize(
    ("check", "value", "fragment"),
    [
        (check_prompt, "", "empty"),
        (check_prompt, "x" * 10_000, "10,000 characters"),
        (check_seed, "abc", "must be a number"),
        (check_seed, 1.5, "whole number"),
        (check_seed, float("nan"), "finite"),
        (check_steps, 0, "from 1 to"),
        (check_steps, 10_000, "from 1 to"),
        (check_steps, None, "from 1 to 150, got nothing .an empty box, or a number too large"),
        (check_steps, float("inf"), r"finite number .a whole number from 1 to 150., got inf"),
    ],
)
def test_bad_settings_are_refused_with_one_sentence(check, value, fragment):
    with pytest.raises(ValueError, match=fragment) as info:
        check(value)
    message = str(info.value)
    assert message[0].isupper() and message.endswith(".") and message.count(". ") == 0


def test_good_settings_come_back_typed():
    assert check_seed("42") == 42 and check_seed(7.0) == 7
    assert check_steps(10.0) == 10
    assert parse_words(" Cat, teddy  bear ;cat") == ["cat", "teddy bear"]


def test_cross_attention_trace_leaves_generation_and_processors_unchanged(loaded):
    pipe = loaded.pipe
    before = processors(pipe)

    def generate():
        return loaded.generate([PROMPT], [3], 4)[0]

    plain = np.asarray(generate())
    with trace_cross_attention(pipe, PROMPT, ["circle", "star", "dog"]) as trace:
        traced = np.asarray(generate())
    assert np.array_equal(plain, traced)
    assert processors(pipe) == before
    assert trace.words == ["circle", "star"] and trace.missing == ["dog"]
    maps = trace.stacked("circle")
    assert maps.shape == (4, 1, 16, 16) and len(trace.steps) == 4
    assert trace.steps[0] > trace.steps[-1]
    assert torch.all(maps > 0)


def test_processors_are_restored_when_generation_fails(loaded):
    before = processors(loaded.pipe)
    with pytest.raises(RuntimeError), trace_cross_attention(loaded.pipe, PROMPT, ["circle"]):
        raise RuntimeError("boom")
    assert processors(loaded.pipe) == before
    assert hook_count(loaded.pipe) == 0


def test_token_positions_find_plurals_and_skip_unknown_words(loaded):
    tokenizer = loaded.pipe.tokenizer
    assert token_positions(tokenizer, "a red circle", "circle") == [3]
    # the tiny vocabulary spells words out: BOS, t, w, o</w>, then c, a, t, s</w>
    assert token_positions(tokenizer, "two cats", "cat") == [4, 5, 6, 7]
    assert token_positions(tokenizer, "a red circle", "square") == []


def test_emergence_predicts_every_step_and_scores_it(loaded):
    result = run_emergence(loaded, PROMPT, 0, 5, UP, "cond")
    assert result.words == ["circle", "star"]
    assert len(result.steps) == 5 and result.ts == sorted(result.ts, reverse=True)
    for word in result.words:
        ious = result.ious[word]
        assert len(ious) == 5 and all(0 <= v <= 1 or math.isnan(v) for v in ious)
        assert len(result.attention_ious[word]) == 5
        assert result.references[word][1] in ("annotation", "last step")
    panels = step_panels(result, 2)
    assert len(panels) == 4 * len(result.words)
    for (mask, caption), (reference, _), (similarity, _), (attention, _) in zip(
        *[iter(panels)] * 4, strict=True
    ):
        assert mask.size == reference.size == (256, 256) and "predicted mask at t=" in caption
        assert similarity.size == attention.size == (256 + BAR_WIDTH, 256)  # a colour bar
    assert len(iou_figure(result).legends) == 1
    assert hook_count(loaded.pipe) == 0


def test_a_word_absent_from_prediction_and_reference_has_no_iou_and_no_point(loaded):
    # "square" is neither predicted nor found at any step of this generation: two empty
    # masks, an undefined IoU ("circle" is not even in the prompt)
    prompt = "a red square and a blue star"
    result = run_emergence(loaded, prompt, 0, 5, UP, "cond", "square, star, circle")
    assert all(math.isnan(v) for v in result.ious["square"])
    lines = {line.get_label(): line for line in iou_figure(result).axes[0].get_lines()}
    absent = lines["square (vs last step): no IoU at any step"]
    assert np.isnan(absent.get_ydata()).all()  # a gap, not a line at 1.0
    captions = [caption for _, caption in step_panels(result, 0)]
    assert "square: predicted mask at t=0.80: empty" in captions
    assert "square: reference (last step): empty" in captions
    assert len(captions) == 12 and "circle: not in the prompt" in captions


def test_the_iou_legend_stays_readable_with_the_most_words_and_longest_labels():
    ax = iou_axes("IoU with the reference mask")
    ts = np.linspace(1, 0, 25)
    for i in range(MAX_WORDS):
        ax.plot(ts, ts, "o-", label=f"background{i} (vs last step): no IoU at 20 steps")
        ax.plot(ts, ts, "--", label=f"background{i}, cross-attention: no IoU at 20 steps")
    figure = finished(ax, "IoU of each word's predicted mask, per step\n(a second line)")
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    renderer = canvas.get_renderer()
    (legend,) = figure.legends
    entries = [text.get_window_extent(renderer) for text in legend.get_texts()]
    assert len(entries) == 2 * MAX_WORDS
    assert not any(a.overlaps(b) for i, a in enumerate(entries) for b in entries[i + 1 :])
    box = legend.get_window_extent(renderer)
    assert figure.bbox.x0 <= box.x0 and box.x1 <= figure.bbox.x1 and figure.bbox.y0 <= box.y0
    assert not box.overlaps(ax.xaxis.get_tightbbox(renderer))  # nor the t axis above it


def test_emergence_runs_keep_the_most_recently_used(loaded):
    result = run_emergence(loaded, PROMPT, 0, 2, UP, "cond")
    runs = EmergenceRuns(capacity=2)
    first, second = (runs.add("tiny", replace(result, seed=seed)) for seed in (1, 2))
    assert runs.add("tiny", replace(result, seed=1)) == first != second
    assert runs.get(f" {first} ").seed == 1  # now the most recently used
    third = runs.add("tiny", replace(result, seed=3))
    assert runs.get(first).seed == 1 and runs.get(third).seed == 3
    with pytest.raises(ValueError, match=f"^No emergence run has the id '{second}': run"):
        runs.get(second)
    with pytest.raises(ValueError, match="from 0 to 1 for this run, got 2"):
        step_panels(result, 2)


def test_emergence_target_words_fall_back_sensibly(loaded):
    words, how = default_words(loaded, "a photo of a red car in the sky", UP, "cond")
    assert words == ["car", "sky"] and "word vector" in how
    with pytest.raises(ValueError, match="No word vector for 'qzxv'"):
        run_emergence(loaded, PROMPT, 0, 2, UP, "cond", "qzxv")
    with pytest.raises(ValueError, match="not a hook point"):
        run_emergence(loaded, PROMPT, 0, 2, "up_blocks.0.attentions.0", "cond")


def test_steering_changes_the_image_only_when_it_edits(loaded):
    request = SteerRequest(PROMPT, 1, UP, word="star", stage="early")
    result = run_steer(loaded, request)
    assert result.before.size == result.after.size == (32, 32)
    assert result.metrics["mean_abs_pixel_difference"] > 0
    assert result.metrics["edited_steps"] == "4 of 10"
    assert result.summary().splitlines()[1].startswith("The image changed by ")
    assert "SAE per step: stage" in result.metrics["edit"]
    # the early stage (t = 0.901 .. 0.601: steps 0-3) edits with the t = 1 SAE only
    edits = result.record.summary()
    assert edits.startswith(f"edited steps 0–3 with {UP} (t=1, cond), CIDs 0, 24, 28,")
    assert edits.endswith("; skipped none")
    lpips = result.metrics["lpips"]  # a distance, or why there is none (lpips not installed)
    assert lpips > 0 if isinstance(lpips, float) else lpips.startswith(NO_LPIPS)
    zero = run_steer(loaded, SteerRequest(PROMPT, 1, UP, word="star", strength=0))
    assert zero.metrics["mean_abs_pixel_difference"] == 0
    lpips = zero.metrics["lpips"]
    assert lpips == 0 if isinstance(lpips, float) else lpips.startswith(NO_LPIPS)
    assert zero.record.summary() == "edited no step; skipped steps 0–3: the strength is 0"
    assert zero.summary().splitlines()[1] == "The image did not change."
    assert np.array_equal(np.asarray(zero.before), np.asarray(result.before))
    assert hook_count(loaded.pipe) == 0


def test_steering_takes_the_presets_steer_steps_and_refuses_a_stage_without_steps(loaded):
    preset = loaded.preset
    loaded.preset = replace(preset, app=replace(preset.app, steer_steps=4))
    try:  # 4 DDIM steps: t = 0.751, 0.501, 0.251, 0.001; the early stage holds the first
        result = run_steer(loaded, SteerRequest(PROMPT, 1, UP, word="star", stage="early"))
    finally:
        loaded.preset = preset
    assert result.metrics["edited_steps"] == "1 of 4"
    assert result.record.summary().startswith(f"edited step 0 with {UP} (t=1, cond)")
    # at the preset's 10 steps (t = 0.901 .. 0.001) nothing lies in [0.91, 0.99]
    request = SteerRequest(PROMPT, 1, UP, word="star", stage="custom", t_range=(0.91, 0.99))
    with pytest.raises(ValueError) as refused:
        run_steer(loaded, request)
    assert str(refused.value) == (
        "The custom stage (t in [0.91, 0.99]) holds none of the 10 steps (t = 0.90, 0.80, "
        "0.70, 0.60, 0.50, 0.40, 0.30, 0.20, 0.10, 0.00); choose another stage or a t range "
        "that includes one."
    )


def test_steering_by_cid_with_a_drawn_region_and_a_custom_stage(loaded):
    mask = np.zeros((100, 100))
    mask[:50, 50:] = 1
    request = SteerRequest(
        PROMPT, 2, UP, stage="custom", t_range=(0.3, 0.9), cid=5, cid_t=0.5, mask=mask
    )
    result = run_steer(loaded, request)
    assert result.metrics["cids"] == {"t=0.5": "5"}
    assert result.metrics["region"] == "drawn, 25% of the image"
    assert result.metrics["edit"].startswith(
        "spatial, custom stage (t in [0.3, 0.9]), the paper's strength of each step's stage "
        "(early 4000, middle 400), "
    )
    assert result.difference.size == (256 + BAR_WIDTH, 256)
    # t = 0.801 .. 0.301 (steps 1-6): steps 1-3 are early, edited by the t = 1 SAE, which is
    # not the CID's; steps 4-6 are middle, edited by the CID's t = 0.5 SAE at strength 400.
    # The SAE nearest each step's t is the CID's from t = 0.701.
    why = f"{UP} (t=1, cond) has no CIDs for CID 5 of the SAE at t=0.5"
    assert result.record.summary() == (
        f"edited steps 4–6 with {UP} (t=0.5, cond), CIDs 5; skipped steps 1–3: {why}"
    )
    assert {step.strength for step in result.record.edited()} == {400.0}
    assert result.metrics["edited_steps"] == "3 of 10"
    nearest = run_steer(loaded, replace(request, sae_choice="nearest"))
    assert nearest.record.summary() == (
        f"edited steps 2–3 with {UP} (t=0.5, cond), CIDs 5 at strength 4000; steps 4–6 with "
        f"{UP} (t=0.5, cond), CIDs 5 at strength 400; skipped step 1: {why}"
    )


def test_sdlens_strengths_are_multiples_of_each_concepts_mean_activation(loaded):
    turbo, tiny = get_preset("sdxl-turbo").app, loaded.preset.app
    assert strength_of(SteerRequest("", 0, UP, kind="spatial"), turbo) == 10  # SDLens's default
    assert strength_of(SteerRequest("", 0, UP, kind="ablate"), turbo) == 1
    assert strength_of(SteerRequest("", 0, UP, kind="spatial"), tiny) == 4000  # the paper's
    assert strength_of(SteerRequest("", 0, UP, kind="global", strength="3"), turbo) == 3

    sae = random_sae(64, 256, 8, block=UP)
    sae.mean_acts = torch.full((256,), 20.0)
    sdlens = Loaded(loaded.preset, loaded.pipe, SAEBank([sae]), {})
    request = SteerRequest(PROMPT, 1, UP, kind="global", cid=5, strength=2)
    edit = run_steer(sdlens, request).metrics["edit"]
    assert "strength 2 x each CID's mean activation (mean.pt), as in the SDLens demo" in edit
    assert ", strength 2, " in run_steer(loaded, request).metrics["edit"]


def test_a_words_concepts_are_listed_and_the_edit_narrowed_to_the_ticked(loaded):
    choices = concept_choices(loaded, UP, "cond", "star")
    labels, values = zip(*choices, strict=True)
    assert labels[0] == "t=1.0 cond: CID 0 (checkered x2, cross x1, star x1)"
    assert values[:3] == ("cond:1.0:0", "cond:1.0:24", "cond:1.0:28")
    assert {v.split(":")[1] for v in values} == {"1.0", "0.5", "0.0"}
    request = SteerRequest(PROMPT, 1, UP, word="star", keep=("cond:1.0:24", "cond:0.5:99"))
    result = run_steer(loaded, request)
    assert result.metrics["cids"]["t=1.0"] == "24"
    assert (
        result.record.summary() == f"edited steps 0–3 with {UP} (t=1, cond), CIDs 24; skipped none"
    )
    with pytest.raises(ValueError, match="None of the chosen concepts is labelled 'star'"):
        run_steer(loaded, replace(request, keep=("cond:1.0:999",)))
    with pytest.raises(ValueError, match="Type a word"):
        concept_choices(loaded, UP, "cond", " ")


def test_a_spatial_edit_says_where_the_object_is_before_and_after(loaded):
    result = run_steer(loaded, SteerRequest(PROMPT, 1, UP, word="star", quadrant="bottom_right"))
    placement = result.metrics["placement"]
    assert placement["object"] == "star"
    assert placement["found_by"] == "the shapes world's pixels"
    assert (
        result.summary()
        .splitlines()[-1]
        .startswith(
            "Centre of mass of the star (the shapes world's pixels) relative to the target region: "
        )
    )
    glob = run_steer(loaded, SteerRequest(PROMPT, 1, UP, word="star", kind="global"))
    assert "placement" not in glob.metrics and glob.placement is None


def test_the_centre_of_mass_check_finds_a_rendered_shape_in_its_quadrant():
    star = ObjectSpec("star", "red", x=0.25, y=0.75, radius=0.15)
    scene = render(SceneSpec((star,), BackgroundSpec("plain", "gray")), size=64)
    image = Image.fromarray(scene.image)
    bottom_left = np.zeros((64, 64), bool)
    bottom_left[32:, :32] = True
    point, inside = place(ToySegmenter(), image, "star", bottom_left)
    assert inside and abs(point[0] - 16) < 2 and abs(point[1] - 48) < 2
    assert place(ToySegmenter(), image, "star", ~bottom_left)[1] is False
    assert place(ToySegmenter(), image, "circle", bottom_left) == (None, False)


def test_the_page_offers_only_the_controls_a_preset_can_use(loaded):
    assert usable_controls(loaded.preset, loaded).branches == ("cond",)  # cond SAEs only
    before_loading = usable_controls(loaded.preset, None)
    assert before_loading.branches == ("cond", "uncond", "both") and before_loading.by_word
    assert usable_controls(loaded.preset, loaded).per_stage  # SAEs at t = 1, 0.5, 0
    unguided = replace(loaded.preset, guidance_scale=1.0)
    assert usable_controls(unguided, None).branches == ("cond",)
    single = Loaded(loaded.preset, loaded.pipe, SAEBank([random_sae(64, 256, 8, block=UP)]), {})
    controls = usable_controls(loaded.preset, single)
    assert not controls.by_word and not controls.per_stage


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"mask": np.zeros((8, 8))}, "mask is empty"),
        ({"mask": np.ones((8, 8))}, "whole image"),
        ({"strength": float("nan")}, "finite"),
        ({"strength": 1e12}, "between 0 and 100000"),
        ({"word": "qzxv"}, "no concept of"),
        ({"word": "", "cid": 9999}, "from 0 to 255"),
        ({"stage": "custom", "t_range": (0.9, 0.1)}, "t_min <= t_max"),
        ({"branch": "uncond"}, "no SAE for"),
        ({"sae_choice": "closest"}, "unknown sae_choice 'closest'; choose one of stage, nearest"),
    ],
)
def test_bad_steering_requests_say_what_is_wrong(loaded, changes, fragment):
    fields = {"prompt": PROMPT, "seed": 0, "block": UP, "word": "star", **changes}
    with pytest.raises(ValueError, match=fragment):
        run_steer(loaded, SteerRequest(**fields))
    assert hook_count(loaded.pipe) == 0


def test_concept_card_search_and_pictures(loaded):
    found, how = inspection.search(loaded, UP, 0.5, "cond", "star")
    assert found and how == "labelled 'star'"
    cid = found[0][0]
    card = inspection.concept_card(loaded, UP, 0.5, "cond", cid)
    assert [row[0] for row in card.entry].count("star") == 1
    assert card.stats["frequency rank"].endswith("of 256")
    assert {row[0] for row in card.nearest} == {"label embedding", "decoder direction"}
    panels, note = inspection.top_examples(loaded, UP, 0.5, "cond", cid, count=3)
    assert 1 <= len(panels) <= 3 and "shipped index" in note
    picture, heat, caption = inspection.activation_on(loaded, UP, 0.5, "cond", cid, PROMPT, 0)
    assert picture.size == (256, 256) and heat.size == (256 + BAR_WIDTH, 256)
    assert caption.startswith(f"CID {cid} at t=0.5: max activation ")
    assert "scale 0 to its largest in training (" in caption
    icon = inspection.feature_icon(loaded, UP, 0.5, "cond", cid, 10, 0)
    blank_prompt = loaded.generate([""], [0], loaded.preset.steps)[0]
    assert not np.array_equal(np.asarray(icon), np.asarray(blank_prompt))


def test_unlabelled_concepts_and_words_without_concepts(loaded):
    dictionary = loaded.dictionaries[SAEKey(MID, 0.5, "cond")]
    unlabelled = next(cid for cid in range(256) if cid not in dictionary.evidence)
    card = inspection.concept_card(loaded, MID, 0.5, "cond", unlabelled)
    assert card.entry == []
    images = dictionary.num_images
    assert card.notes == [f"CID {unlabelled} matched no annotated object in {images} images"]
    found, how = inspection.search(loaded, UP, 0.5, "cond", "car")
    assert "nearest by word vector" in how and len(found) == 5
    with pytest.raises(ValueError, match="from 0 to 255"):
        inspection.concept_card(loaded, UP, 0.5, "cond", 256)


def test_a_drawn_region_is_where_the_canvas_is_painted():
    white = np.full((8, 8, 3), 255, dtype=np.uint8)
    layer = np.zeros((8, 8, 4), dtype=np.uint8)
    layer[:4, 4:] = (224, 32, 32, 255)
    painted = canvas_mask({"background": white, "layers": [layer], "composite": white})
    assert painted.sum() == 16 and painted[:4, 4:].all()
    composite = white.copy()
    composite[6:, :2] = 0
    drawn = canvas_mask({"background": white, "layers": [], "composite": composite})
    assert drawn.sum() == 4 and drawn[6:, :2].all()
    assert canvas_mask(None) is None
    assert canvas_mask({"background": white, "layers": [], "composite": None}) is None


def test_renderings_have_the_display_size_and_heat_maps_a_colour_bar():
    image = Image.new("RGB", (32, 32), "blue")
    assert overlay(image, np.eye(4)).size == outline(image, np.eye(4)).size == (256, 256)
    heat = heat_map(np.array([[0.0, math.nan]]), 0, 1, "a label")
    assert heat.size == (256 + BAR_WIDTH, 128) and heat.getpixel((200, 0)) == (128, 128, 128)
    bar = np.asarray(heat)[64, 256:]
    assert (bar != 255).any(axis=-1).sum() > 10  # the bar, its ticks and its label


def test_a_mask_outline_is_its_border_only():
    image = Image.new("RGB", (32, 32), "black")
    mask = np.zeros((4, 4), dtype=bool)
    mask[1:3, 1:3] = True  # the cells covering pixels 64 to 191 at display size
    drawn = np.asarray(outline(image, mask, width=3)).any(axis=-1)
    assert drawn[64, 64] and drawn[66, 128] and drawn[191, 128] and drawn[128, 189]
    assert not drawn[128, 128] and not drawn[60, 128] and not drawn[128, 193]


def test_the_difference_map_has_one_scale_whatever_the_edit():
    pixels = np.full((32, 32, 3), 100, dtype=np.uint8)
    before = Image.fromarray(pixels)
    pixels[0, 0, 0] = 101  # a third of a grey level at one pixel
    speck = Image.fromarray(pixels)
    pixels[:16] = 255
    half = Image.fromarray(pixels)
    tiny, large = (np.asarray(difference_map(before, after)) for after in (speck, half))
    assert tiny[:, :256].max() < 10  # near black: not stretched to its own maximum
    assert large[0, 0].sum() > 300 and (large[:, 256:] == tiny[:, 256:]).all()  # one bar
    assert change_in_words(before, speck).startswith(
        "The image changed by less than one grey level per pixel on average (0.00"
    )
    assert change_in_words(before, half).startswith("The image changed by 77.")
    assert change_in_words(before, before) == "The image did not change."


def test_presets_that_cannot_load_say_why():
    cache = ModelCache()
    assert cache.state("sd14") == ("not loaded", None)
    with pytest.raises(ValueError, match="no SAEs configured"):
        cache.get("sd14")
    state, why = cache.state("sd14")
    assert state == "failed" and why.startswith("The preset 'sd14' has no SAEs configured")
    with pytest.raises(ValueError, match="unknown preset .sd15.; choose one of"):
        cache.get("sd15")
