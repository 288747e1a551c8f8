"""The app as a Hugging Face Space and as the project's `make run`: settings, API names."""

import re
from pathlib import Path

import gradio as gr
import pytest
import yaml
from gradio.utils import get_function_description
from huggingface_hub.utils import filter_repo_objects

import app
from core.annotate.tags import OBJECT_VOCABULARY
from core.diffusion.presets import PRESETS, default_preset_name
from core.diffusion.tiny import build_tiny_sdxl_pipeline
from core.emergence.concepts import load_dictionaries
from core.files import REPO_ROOT
from core.sae.bank import hub_patterns
from core.sae.checkpoints import SDLENS_FILES, folder_block
from core.shapes.world import SHAPES
from core.views.model_cache import ModelCache
from page.status import on_select_preset


def front_matter(text: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert match, "README.md must start with YAML front matter (the Space's settings)"
    return yaml.safe_load(match.group(1))


def test_readme_front_matter_repeats_space_yaml():
    space = yaml.safe_load((REPO_ROOT / "space.yaml").read_text())
    assert front_matter((REPO_ROOT / "README.md").read_text()) == space
    assert space["sdk"] == "gradio" and (REPO_ROOT / space["app_file"]).is_file()
    required = re.search(
        r"^gradio(?:\[mcp\])?>=(\d+)", (REPO_ROOT / "requirements.txt").read_text(), re.M
    )
    assert required and space["sdk_version"].split(".")[0] == required.group(1)
    assert int(gr.__version__.split(".")[0]) >= int(required.group(1))
    assert any(item.startswith("surokpro2/sdxl-saes") for item in space["preload_from_hub"])


def test_preload_lists_the_files_the_app_loads(tmp_path):
    """Exactly what the page opens on in a ZeroGPU Space: the GPU preset's pipeline weights
    (as an SDXL-layout pipeline saves them) and its SAEs."""
    space = yaml.safe_load((REPO_ROOT / "space.yaml").read_text())
    files = dict(item.partition(" ")[::2] for item in space["preload_from_hub"])
    turbo = PRESETS[app.GPU_PRESET]
    assert set(files) == {turbo.model, turbo.sae_source}
    build_tiny_sdxl_pipeline().save_pretrained(tmp_path)
    saved = [path.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("*")]
    weights = {name for name in saved if name.endswith(".safetensors")}
    assert set(files[turbo.model].split(",")) == {"model_index.json", *weights}
    listed = files[turbo.sae_source].split(",")
    patterns = hub_patterns(turbo.hook_points, turbo.sae_variant)
    assert list(filter_repo_objects(listed, allow_patterns=patterns)) == listed
    every = {(block, name) for block in turbo.hook_points for name in SDLENS_FILES}
    assert {(folder_block(f), f.rsplit("/", 1)[1]) for f in listed} == every
    assert len(listed) == len(every) and all("/final/" in f for f in listed)


def test_readme_has_two_commands_and_make_run_starts_the_app():
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    first_block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["make run", "make test"]
    makefile = (REPO_ROOT / "Makefile").read_text()
    run_recipe = makefile.split("\nrun:", 1)[1].split("\n\n", 1)[0]
    assert "app.py" in run_recipe
    assert "/usr/bin/chromium" in makefile and "apt-get install" in makefile


def test_every_event_has_an_api_name():
    demo = app.build_demo(ModelCache(), "tiny")
    names = [fn.api_name for fn in demo.fns.values()]
    assert names and all(isinstance(name, str) and name for name in names)
    assert len(set(names)) == len(names)
    expected = {
        "emergence",
        "emergence_step",
        "emergence_batch",
        "steer",
        "default_strength",
        "search_concepts",
        "inspect_concept",
        "top_examples",
        "activation_map",
        "feature_icon",
        "timeline",
        "select_preset",
        "status",
    }
    assert expected <= set(names)


def test_model_events_share_one_queue_slot():
    demo = app.build_demo(ModelCache(), "tiny")
    model_events = {
        "emergence",
        "emergence_batch",
        "steer",
        "search_concepts",
        "inspect_concept",
        "top_examples",
        "activation_map",
        "feature_icon",
        "timeline",
    }
    for fn in demo.fns.values():
        if fn.api_name in model_events:
            assert fn.concurrency_id == "model" and fn.concurrency_limit == 1, fn.api_name


def test_the_app_opens_on_the_offline_default_unless_told_otherwise(monkeypatch):
    monkeypatch.delenv(app.PRESET_ENV, raising=False)
    assert app.parse_args([]).preset == default_preset_name()
    monkeypatch.setenv(app.PRESET_ENV, "sd14")
    assert app.parse_args([]).preset == "sd14"
    assert app.parse_args(["--preset", "tiny"]).preset == "tiny"


ZERO_GPU_SPACE = {app.SPACE_ENV: "user/space", app.ZERO_GPU_ENV: "true"}


@pytest.mark.parametrize(
    ("environ", "cuda", "opening"),
    [
        ({}, False, default_preset_name()),
        ({}, True, app.GPU_PRESET),
        (ZERO_GPU_SPACE, False, app.GPU_PRESET),  # ZeroGPU's main process sees no CUDA
        ({app.SPACE_ENV: "user/space"}, False, default_preset_name()),  # a CPU Space
        ({app.ZERO_GPU_ENV: "true"}, False, default_preset_name()),  # not in a Space
        ({"HF_HUB_OFFLINE": "1"}, True, default_preset_name()),
        ({**ZERO_GPU_SPACE, "HF_HUB_OFFLINE": "1"}, False, default_preset_name()),
    ],
)
def test_the_app_opens_on_the_real_model_where_a_gpu_is_present(environ, cuda, opening):
    assert app.opening_preset(environ, cuda) == opening


def test_a_named_preset_wins_over_the_gpu_default(monkeypatch):
    for name in (app.PRESET_ENV, "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in ZERO_GPU_SPACE.items():
        monkeypatch.setenv(name, value)
    assert app.parse_args([]).preset == app.GPU_PRESET
    assert app.parse_args(["--preset", "toy"]).preset == "toy"
    monkeypatch.setenv(app.PRESET_ENV, "tiny")
    assert app.parse_args([]).preset == "tiny"


@pytest.mark.parametrize("preset", ["tiny", "toy"])
def test_the_default_steering_word_labels_a_concept_of_the_default_block(preset):
    """Shipped SAEs change with their model; the page's default word must still work."""
    source = PRESETS[preset].sae_source
    if not Path(source).is_dir():
        pytest.skip(f"no SAEs shipped for {preset} at {source}")
    defaults = PRESETS[preset].app
    dictionaries = load_dictionaries(source, [defaults.steer_block])
    labels = {label for d in dictionaries.values() for label in d.vocabulary()}
    assert defaults.word in labels, (
        f"{preset}: {defaults.word!r} labels no concept of {defaults.steer_block}; set its "
        f"AppDefaults.word in core/diffusion/presets.py to one of {sorted(labels)}"
    )


def test_the_inspect_tab_opens_on_a_shape_concept_of_the_toy_model():
    """The toy's first inspect view shows a concept whose top label is one of the world's
    shapes, at the block and t (0.5) the tab opens on."""
    defaults = PRESETS["toy"].app
    dictionaries = load_dictionaries(PRESETS["toy"].sae_source, [defaults.block], ["cond"])
    (dictionary,) = [d for key, d in dictionaries.items() if key.t == 0.5]
    labels = dictionary.labels(defaults.cid)
    assert labels and labels.most_common(1)[0][0] in SHAPES, (
        f"CID {defaults.cid} of {defaults.block} at t=0.5 has labels {dict(labels)}; set the "
        "toy's AppDefaults.cid in core/diffusion/presets.py to a CID whose top label is a shape"
    )


def documented_endpoints() -> dict[str, tuple[list[str], list[str]]]:
    """docs/app.md's endpoint table: endpoint -> (its inputs, its outputs)."""
    text = (REPO_ROOT / "docs" / "app.md").read_text()
    rows = re.findall(r"^\| `(/\w+)` \| (.*?) \| (.*?) \|$", text, re.M)

    def items(cell: str) -> list[str]:  # commas inside brackets do not separate
        return [part.strip() for part in re.split(r",\s*(?![^()]*\))", cell)]

    return {name: (items(inputs), items(outputs)) for name, inputs, outputs in rows}


def test_the_documented_endpoints_are_the_apps():
    api = app.build_demo(ModelCache(), "tiny").get_api_info()["named_endpoints"]
    documented = documented_endpoints()
    assert set(documented) == set(api)
    for name, (inputs, outputs) in documented.items():
        assert inputs == [p["parameter_name"] for p in api[name]["parameters"]], name
        same_as = re.fullmatch(r"as `(/\w+)`", outputs[0])
        outputs = documented[same_as[1]][1] if same_as else outputs
        assert len(outputs) == len(api[name]["returns"]), name


def test_each_output_of_an_endpoint_is_described_in_one_clause():
    """MCP clients read a tool's outputs from its docstring's Returns section, one line an
    output, joined with commas: a line per output, no empty or comma-ended part."""
    demo = app.build_demo(ModelCache(), "tiny")
    public = [fn for fn in demo.fns.values() if f"/{fn.api_name}" in documented_endpoints()]
    assert public
    for fn in public:
        _, _, returns = get_function_description(fn.fn)
        assert len(returns) == len(fn.outputs), fn.api_name
        assert all(part and not part.endswith((",", ";", ".")) for part in returns), returns


def test_sdxl_turbo_opens_on_prompts_whose_objects_its_labeller_names():
    defaults = PRESETS["sdxl-turbo"].app
    for prompt in defaults.prompts:
        assert set(prompt.split()) & set(OBJECT_VOCABULARY), prompt
    assert defaults.word in OBJECT_VOCABULARY and defaults.word in defaults.prompts[0]
    *_, emergence, steer, inspect, examples = on_select_preset("sdxl-turbo")
    assert emergence.value == steer.value == inspect.value == defaults.prompts[0]
    assert examples.raw_samples == [[prompt] for prompt in defaults.prompts]
