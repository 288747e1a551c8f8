"""Refusals that stay: the line under a button keeps why its last request was refused until
the next press, and an input Gradio itself cannot read is one line in the server log.

Gradio tells a failed event's `.failure` listeners nothing about the error, so the page's
Blocks keep each refusal's message per session and event (in the server's main process,
where every request passes, ZeroGPU or not) until the listener reads it.
"""

import re
import sys
from collections import OrderedDict
from collections.abc import Callable

import gradio as gr
from gradio.events import Dependency

from page.serving import PAGE
from page.texts import REFUSAL_CLASS

KEPT = 1024
"""Refusals kept at most: a page that never reads its own (an API client's) ages out."""
CLEARED = "() => ''"
"""A press empties its line in the browser at once, with no request."""
FAILED = "The request failed; the server's log has the details."
"""The message of an error that is not a refusal (a bug): its traceback goes to the log."""


class Refusals:
    """The last refusal of each (session, event) until the page reads it."""

    def __init__(self, size: int = KEPT):
        self.size = size
        self.messages: OrderedDict[tuple[str | None, int], str] = OrderedDict()

    def keep(self, session: str | None, event: int, message: str) -> None:
        self.messages[session, event] = message
        self.messages.move_to_end((session, event))
        while len(self.messages) > self.size:
            self.messages.popitem(last=False)

    def take(self, session: str | None, event: int) -> str:
        return self.messages.pop((session, event), "")


REFUSALS = Refusals()


def unreadable_input(block_fn, error: Exception) -> str:
    """One sentence for an input that Gradio refused before the handler ran: its own
    message where it gives one (a value outside a slider, not among the choices), else
    which input could not be read and why."""
    if isinstance(error, gr.Error):
        return str(error.message)
    cause = error.__cause__ or error
    index = re.search(r"at index (\d+)", str(error))
    if index and int(index[1]) < len(block_fn.inputs):
        block = block_fn.inputs[int(index[1])]
        name = f"'{block.label}'" if getattr(block, "label", None) else "an input"
        return f"The input {name} could not be read ({type(cause).__name__}: {cause})."
    first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"The request's inputs could not be read ({first_line})."


class Page(gr.Blocks):
    """The page's Blocks: they keep every refusal for the line that shows it, and refuse an
    input Gradio cannot read in one log line and one sentence to the caller (Gradio's own
    error prints a traceback and, to an API client, hides its cause).

    These override two methods of `gr.Blocks` (`process_api`, `preprocess_data`);
    tests/test_page_refusals.py fails if a Gradio release changes them."""

    async def preprocess_data(self, block_fn, inputs, state, explicit_call=False):
        try:
            return await super().preprocess_data(block_fn, inputs, state, explicit_call)
        except Exception as error:
            message = unreadable_input(block_fn, error)
            print(f"refused {block_fn.name}: {message}", file=sys.stderr, flush=True)
            raise gr.Error(message, print_exception=False) from None

    async def process_api(self, block_fn, inputs, *args, session_hash=None, **kwargs):
        try:
            return await super().process_api(
                block_fn, inputs, *args, session_hash=session_hash, **kwargs
            )
        except Exception as error:
            event = block_fn if isinstance(block_fn, int) else block_fn._id
            message = error.message if isinstance(error, gr.Error) else FAILED
            REFUSALS.keep(session_hash, event, str(message))
            raise


def message_line(elem_id: str, render: bool = True) -> gr.Markdown:
    """The line under a button: its request's progress while it runs, then why it was
    refused, until the next press. Tall enough for Gradio's progress bar. `render=False`
    makes it before its place in the layout (`.render()` puts it there), for the events of
    controls above it."""
    return gr.Markdown(
        "", min_height=96, elem_id=elem_id, elem_classes=[REFUSAL_CLASS], render=render
    )


def tells_refusal(event: Dependency, line: gr.Markdown, api_name: str) -> Dependency:
    """After `event` is refused, `line` says why (a page-only event named `api_name`).
    Returns `event`, for the events that follow it."""
    event_id = event["id"]

    def on_refused(request: gr.Request) -> str:
        return REFUSALS.take(request.session_hash, event_id)

    event.failure(on_refused, None, line, api_name=api_name, **PAGE)
    return event


def clears(line: gr.Markdown, presses: dict[str, Callable]) -> None:
    """Each of `presses` (a page-only event name and the listener of a press, such as
    `button.click`) empties `line` in the browser."""
    for api_name, press in presses.items():
        press(None, None, line, js=CLEARED, queue=False, api_name=api_name, **PAGE)
