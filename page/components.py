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
    """A line above a tab's results saying what they show; the tab's events report progress
    and errors on it (`show_progress_on`), so that a refused request shows its message and
    leaves the results of the last one in place instead of covering each with an error."""
    return gr.Markdown(text, elem_id=elem_id)


def block_dropdown(preset: Preset, block: str) -> gr.Dropdown:
    """The preset's hook points. Other values pass, so that an API client can name another
    preset's blocks; the core checks a block against the preset named with it."""
    return gr.Dropdown(
        list(preset.hook_points), value=block, label="block", allow_custom_value=True
    )
