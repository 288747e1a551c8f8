"""The README's Python examples, run as written: the core's offline on the shipped preset,
the app's through gradio_client against `python app.py` (`scripts/app_server.py`)."""

import ast
import re

import torch
from gradio_client import Client

from core.files import REPO_ROOT
from scripts.app_server import app_url

README_URL = "http://127.0.0.1:7860/"
"""Where the README's client connects; the app under test listens on a free port instead."""


def python_blocks() -> list[str]:
    """The README's ```python blocks, in order."""
    text = (REPO_ROOT / "README.md").read_text()
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)


def run(code: str, namespace: dict) -> None:
    exec(compile(code, "README.md", "exec"), namespace)  # the README's own code, as written


def app_block() -> str:
    (block,) = [block for block in python_blocks() if "gradio_client" in block]
    return block


def bound_names(node: ast.AST) -> set[str]:
    """Names a block assigns, defines or takes as parameters."""
    if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
        return {node.id}
    if isinstance(node, ast.FunctionDef | ast.ClassDef):
        return {node.name}
    if isinstance(node, ast.arg):
        return {node.arg}
    return set()


def test_no_example_shadows_an_imported_name():
    imported, bound = set(), set()
    for block in python_blocks():
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.Import | ast.ImportFrom):
                imported |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
            bound |= bound_names(node)
    assert imported and not imported & bound, imported & bound


def test_the_core_examples_run_offline_on_the_shipped_preset(capsys):
    torch.set_num_threads(1)  # on a small shared CPU, more threads spin against each other
    namespace: dict = {}
    for block in python_blocks():
        if block != app_block():
            run(block, namespace)  # one namespace: a block continues the one before it
    printed = capsys.readouterr().out
    assert printed.count("predicted on") == 3  # the steps nearest t = 1.0, 0.5 and 0.0
    assert printed.splitlines()[-1].startswith("edited steps ")
    assert namespace["latents"].top_indices.shape[-1] == namespace["sae"].cfg.k


def test_the_app_examples_call_every_endpoint_and_run():
    url = app_url()
    block = app_block()
    assert README_URL in block
    endpoints = Client(url, verbose=False).view_api(print_info=False, return_format="dict")
    assert set(re.findall(r'api_name="(/\w+)"', block)) == set(endpoints["named_endpoints"])
    namespace: dict = {}
    run(block.replace(README_URL, url), namespace)
    assert "Preset `tiny`" in namespace["status"]
    assert len(namespace["first_step"]) == len(namespace["panels"])
    assert namespace["first_step"][0]["caption"] != namespace["panels"][0]["caption"]
    assert namespace["opened"][3:] == (namespace["summary"], namespace["run_id"])
    assert set(namespace["ious"]) == set(namespace["run"]["words"]) == {"circle", "star"}
    assert namespace["changes"]["concept"] == "'star'"
    assert namespace["changes"]["cids"]["t=1.0"] == namespace["found"][0]["value"].split(":")[2]
    assert namespace["matches"][0]["cid"] == namespace["cid"]
    assert namespace["latent"] and namespace["purity"]["data"] and namespace["pca_maps"]
