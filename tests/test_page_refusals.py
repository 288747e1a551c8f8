"""The page's Blocks keep each refusal for the line under its button, and refuse an input
Gradio cannot read in one sentence and one log line (on a small page of their own)."""

from collections.abc import Iterator

import gradio as gr
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from page.refusals import REFUSALS, Page, Refusals, clears, message_line, tells_refusal


def on_double(number: float, choice: str) -> str:
    if number < 0:
        raise gr.Error("The number must not be negative.", print_exception=False)
    if number == 13:
        raise KeyError("a bug")
    return f"{2 * number} {choice}"


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Client, int]]:
    with Page() as demo:
        number = gr.Slider(-100, 100, 1, label="number")
        choice = gr.Radio(["a", "b"], value="a", label="choice")
        button = gr.Button("double")
        message = message_line("message")
        result = gr.Textbox(label="result")
        event = button.click(on_double, [number, choice], result, api_name="double")
        tells_refusal(event, message, "double_refused")
        clears(message, {"double_clears": button.click})
    demo.launch(prevent_thread_lock=True, quiet=True)
    try:
        yield Client(demo.local_url, verbose=False), event["id"]
    finally:
        demo.close()


def test_a_refusal_is_kept_for_its_session_and_event_until_read(served):
    client, event = served
    with pytest.raises(AppError, match="must not be negative"):
        client.predict(-1, "a", api_name="/double")
    assert REFUSALS.take(client.session_hash, event + 1) == ""  # another event's
    assert REFUSALS.take(client.session_hash, event) == "The number must not be negative."
    assert REFUSALS.take(client.session_hash, event) == ""  # read once
    assert client.predict(2, "b", api_name="/double") == "4 b"


def test_a_bug_is_kept_as_a_failure_that_points_to_the_log(served):
    client, event = served
    with pytest.raises(AppError):
        client.predict(13, "a", api_name="/double")
    assert REFUSALS.take(client.session_hash, event).startswith("The request failed;")


BAD_INPUTS = [
    ((1000, "a"), "Value 1000 is greater than maximum value 100."),
    ((1, "c"), "Value: 'c' (type: <class 'str'>) is not in the list of choices: ['a', 'b']"),
    (("many", "a"), "The input 'number' could not be read (TypeError: "),
]


@pytest.mark.parametrize(("inputs", "message"), BAD_INPUTS)
def test_an_input_gradio_refuses_is_one_sentence_and_one_log_line(served, capfd, inputs, message):
    client, event = served
    capfd.readouterr()
    with pytest.raises(AppError) as error:
        client.predict(*inputs, api_name="/double")
    assert message in str(error.value)  # Gradio alone hides a type error's cause from a client
    logged = capfd.readouterr().err.strip().splitlines()
    assert len(logged) == 1 and logged[0].startswith(f"refused on_double: {message}")
    assert REFUSALS.take(client.session_hash, event).startswith(message)


def test_the_oldest_refusals_go_first():
    refusals = Refusals(size=2)
    for event in range(3):
        refusals.keep("session", event, f"refused {event}")
    assert refusals.take("session", 0) == ""
    assert [refusals.take("session", event) for event in (1, 2)] == ["refused 1", "refused 2"]
    refusals.keep("session", 0, "first")
    refusals.keep("other", 0, "other session")
    refusals.keep("session", 0, "again")  # replaced and counted once
    assert refusals.take("other", 0) == "other session"
    assert refusals.take("session", 0) == "again"
