"""Components more than one tab lays out alike."""

from pathlib import Path

import gradio as gr

from core.diffusion.presets import Preset
from core.files import REPO_ROOT


def shown_path(source: str | Path) -> str:
    """A folder of this repository relative to it (a Hub id or other path as is)."""
    path = Path(source)
    inside = path.is_absolute() and path.is_relative_to(REPO_ROOT)
    return str(path.relative_to(REPO_ROOT)) if inside else str(source)


def results_line(text: str, elem_id: str) -> gr.Markdown:
    """A line above a tab's results saying what they show. The tab's events report progress
    and refusals under their buttons (`page.refusals.message_line`) instead, so that
    nothing covers it and a refused request leaves the last one's results in place."""
    return gr.Markdown(text, elem_id=elem_id)


def block_dropdown(preset: Preset, block: str) -> gr.Dropdown:
    """The preset's hook points. Other values pass, so that an API client can name another
    preset's blocks; the core checks a block against the preset named with it."""
    return gr.Dropdown(
        list(preset.hook_points), value=block, label="block", allow_custom_value=True
    )
