"""`python app.py --mcp-server`: the model events served as tools to MCP clients."""

import asyncio
import json
import urllib.request
from contextlib import AsyncExitStack

import pytest
from gradio_client import Client
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from scripts.app_server import app_url

PRESET = "tiny"
UP = "up_blocks.1.attentions.0"
MODEL_TOOLS = ("emergence", "steer", "search_concepts", "inspect_concept", "feature_icon")


@pytest.fixture(scope="module")
def url() -> str:
    return app_url("--mcp-server")


async def _session_calls(url: str, calls: list[tuple[str, dict]]) -> tuple[list, list]:
    async with AsyncExitStack() as stack:
        read, write, _ = await stack.enter_async_context(
            streamable_http_client(f"{url}gradio_api/mcp/")
        )
        session = await stack.enter_async_context(ClientSession(read, write))
        await session.initialize()
        tools = (await session.list_tools()).tools
        results = [await session.call_tool(name, args) for name, args in calls]
    return tools, results


def test_the_tool_list_describes_every_model_event(url):
    with urllib.request.urlopen(f"{url}gradio_api/mcp/schema", timeout=30) as response:
        schema = json.load(response)
    tools = {tool["name"]: tool for tool in schema}
    for event in MODEL_TOOLS:
        name = next((n for n in tools if n.endswith(event)), None)
        assert name, f"no tool for {event} in {sorted(tools)}"
        assert tools[name]["description"], name
        properties = tools[name]["inputSchema"]["properties"]
        assert properties["preset"]["description"], name


def test_a_tool_call_returns_what_gradio_client_returns(url):
    args = {"preset": PRESET, "block": UP, "t": 0.5, "branch": "cond", "cid": 3}
    tools, (result, bad) = asyncio.run(
        _session_calls(
            url,
            [("on_inspect_concept", args), ("on_inspect_concept", {**args, "block": "nowhere"})],
        )
    )
    assert "on_inspect_concept" in {tool.name for tool in tools}
    _, stats, _, note = Client(url, verbose=False).predict(
        *args.values(), api_name="/inspect_concept"
    )
    text = " ".join(part.text for part in result.content if part.type == "text")
    assert not result.isError and note in text and stats["sae"] in text
    assert bad.isError and "nowhere" in " ".join(part.text for part in bad.content)
    assert (
        Client(url, verbose=False).predict(*args.values(), api_name="/inspect_concept")[3] == note
    )
