"""The revelio tab: a feature cache's k-SAEs (label purity, a latent's top images) and PCA
maps of its features; model-free, so outside the model slot."""

import gradio as gr

from core.runtime import USER_ERRORS
from core.views import revelio
from page.components import results_line, shown_path
from page.refusals import clears, message_line, tells_refusal
from page.serving import LIGHT, PAGE, inputs_of, user_errors
from page.texts import REVELIO_ABOUT, REVELIO_RESULTS


def revelio_choices(found: revelio.Contents | None) -> list[tuple[list, object]]:
    """(choices, value) of the layer and timestep dropdowns: first of the pairs with a k-SAE,
    then of those with feature maps; up_ft1 when there, as the paper finds it best."""
    dropdowns: list[tuple[list, object]] = []
    for pairs in (found.ksae_pairs, found.map_pairs) if found else ([], []):
        layers = list(dict(pairs))
        layer = "up_blocks.1" if "up_blocks.1" in layers else next(iter(layers), None)
        times = sorted({t for _, t in pairs})
        dropdowns.append(([(revelio.layer_label(name), name) for name in layers], layer))
        dropdowns.append((times, times[0] if times else None))
    return dropdowns


def revelio_demo_contents() -> revelio.Contents | None:
    try:
        return revelio.contents(revelio.DEMO_CACHE, revelio.DEMO_SAES)
    except USER_ERRORS:
        return None


@user_errors
def on_revelio_load(cache: str, saes: str) -> tuple:
    """Open a Revelio feature cache and its k-SAEs and measure every k-SAE's label purity.

    Args:
        cache: folder of a feature cache (`python -m core.revelio.features`).
        saes: folder of its k-SAEs (`python -m core.revelio.ksae`); may be empty.

    Returns:
        a note on what was found
        the purity table, one row per layer and timestep
    """
    found = revelio.contents(cache, saes)
    meta = found.meta
    note = (
        f"{len(meta)} images of {len(meta.classes)} classes ({', '.join(meta.classes)}), "
        f"features of `{meta.model}`; k-SAEs for {len(found.ksae_pairs)} (layer, timestep) "
        f"pairs, feature maps for {len(found.map_pairs)}."
    )
    rows = revelio.purity_table(cache, saes) if found.saes else []
    return note, rows


@user_errors
def on_revelio_choices(cache: str, saes: str) -> list[gr.Dropdown]:
    """The layer and timestep dropdowns of both views, over what the folders hold (page
    only)."""
    return [
        gr.Dropdown(choices=c, value=v) for c, v in revelio_choices(revelio.contents(cache, saes))
    ]


@user_errors
def on_revelio_inspect(cache, saes, images, layer, timestep, by, number) -> tuple:
    """One k-SAE latent of a layer and timestep: its top images and their labels.

    Args:
        cache: folder of the feature cache.
        saes: folder of its k-SAEs.
        images: the image folder the cache was extracted from (for pictures); may be empty.
        layer: the U-Net layer, e.g. "up_blocks.1".
        timestep: the diffusion timestep the features were extracted at.
        by: "purest" (`number` is a rank among the purest latents, 0 the purest) or "id"
            (`number` is the latent's index).
        number: the rank or the latent's index.

    Returns:
        a note
        a grid of the latent's top images (none without the image folder)
        a table of their labels
    """
    view = revelio.inspect_latent(cache, saes, images, layer, timestep, by, number)
    return view.note, view.grid, view.rows


@user_errors
def on_revelio_pca(cache, images, layer, timestep, indices) -> list:
    """PCA maps of a layer's spatial features: the first three components as colours.

    Args:
        cache: folder of the feature cache (with feature maps).
        images: the image folder the cache was extracted from.
        layer: the U-Net layer, e.g. "up_blocks.1".
        timestep: the diffusion timestep the features were extracted at.
        indices: comma-separated image indices to show; empty picks some of each class.

    Returns:
        a gallery of (image, PCA map) panels
    """
    return revelio.pca_view(cache, images, layer, timestep, indices)


def revelio_tab() -> None:
    """A feature cache's k-SAEs and PCA maps (model-free, so outside the model slot)."""
    gr.Markdown(REVELIO_ABOUT)
    with gr.Row():
        cache = gr.Textbox(shown_path(revelio.DEMO_CACHE), label="feature cache")
        saes = gr.Textbox(shown_path(revelio.DEMO_SAES), label="k-SAE folder")
        images = gr.Textbox(shown_path(revelio.DEMO_IMAGES), label="image folder (optional)")
    load = gr.Button("load", variant="primary", elem_id="revelio-load")
    message = message_line("revelio-message")
    results_line(REVELIO_RESULTS, "revelio-line")
    note = gr.Markdown(label="note", elem_id="revelio-note")
    table = gr.Dataframe(
        headers=revelio.PURITY_HEADERS,
        label="label purity of the most activating latents (top 10 images each), and the same "
        "measures on random images",
        elem_id="revelio-table",
    )
    choices = revelio_choices(revelio_demo_contents())
    ksae = ksae_latent_panel(cache, saes, images, choices[:2])
    maps = pca_panel(cache, images, choices[2:])
    loaded = load.click(
        on_revelio_load,
        inputs_of(on_revelio_load, cache=cache, saes=saes),
        [note, table],
        api_name="revelio_load",
        show_progress_on=message,
        **LIGHT,
    )
    tells_refusal(loaded, message, "revelio_load_refused")
    clears(message, {"revelio_load_clears": load.click})
    loaded.success(
        on_revelio_choices,
        inputs_of(on_revelio_choices, cache=cache, saes=saes),
        [*ksae, *maps],
        api_name="revelio_choices",
        **PAGE,
    )


def pair_dropdowns(choices: list[tuple[list, object]], layer_label: str) -> list[gr.Dropdown]:
    """The layer and timestep dropdowns of a panel; `load` replaces their choices."""
    labels = (layer_label, "timestep")
    return [
        gr.Dropdown(options, value=value, label=label, allow_custom_value=True)
        for (options, value), label in zip(choices, labels, strict=True)
    ]


def ksae_latent_panel(
    cache: gr.Textbox, saes: gr.Textbox, images: gr.Textbox, choices: list
) -> list[gr.Dropdown]:
    """One k-SAE latent's top images; returns its layer and timestep dropdowns."""
    with gr.Row():
        with gr.Column(scale=1):
            gr.Markdown("### k-SAE latent")
            layer, timestep = pair_dropdowns(choices, "layer")
            by = gr.Radio(["purest", "id"], value="purest", label="latent by")
            number = gr.Number(0, precision=0, label="rank among the purest (0 = purest), or id")
            inspect = gr.Button("inspect", variant="primary", elem_id="revelio-inspect")
            message = message_line("revelio-inspect-message")
        with gr.Column(scale=2):
            note = gr.Markdown(label="note", elem_id="revelio-latent-note")
            grid = gr.Image(label="top-activating images", format="png", elem_id="revelio-grid")
            top = gr.Dataframe(headers=revelio.TOP_IMAGE_HEADERS, label="its top images")
    shown = inspect.click(
        on_revelio_inspect,
        inputs_of(
            on_revelio_inspect,
            cache=cache,
            saes=saes,
            images=images,
            layer=layer,
            timestep=timestep,
            by=by,
            number=number,
        ),
        [note, grid, top],
        api_name="revelio_inspect",
        show_progress_on=message,
        **LIGHT,
    )
    tells_refusal(shown, message, "revelio_inspect_refused")
    clears(message, {"revelio_inspect_clears": inspect.click})
    return [layer, timestep]


def pca_panel(cache: gr.Textbox, images: gr.Textbox, choices: list) -> list[gr.Dropdown]:
    """Images beside the PCA maps of their features; returns its layer and timestep
    dropdowns."""
    with gr.Row():
        with gr.Column(scale=1):
            gr.Markdown("### PCA maps of features")
            layer, timestep = pair_dropdowns(choices, "layer (with maps)")
            indices = gr.Textbox(
                "", label='images (indices like "0-7, 12"; empty: the first of each class)'
            )
            run = gr.Button("show PCA maps", variant="primary", elem_id="revelio-pca-run")
            message = message_line("revelio-pca-message")
        with gr.Column(scale=2):
            maps = gr.Gallery(
                label="image | its PCA map (one PCA over all shown: colours compare)",
                columns=4,
                height=640,
                format="png",
                elem_id="revelio-pca",
            )
    inputs = inputs_of(
        on_revelio_pca, cache=cache, images=images, layer=layer, timestep=timestep, indices=indices
    )
    shown = run.click(
        on_revelio_pca, inputs, maps, api_name="revelio_pca", show_progress_on=message, **LIGHT
    )
    tells_refusal(shown, message, "revelio_pca_refused")
    clears(message, {"revelio_pca_clears": run.click})
    return [layer, timestep]
