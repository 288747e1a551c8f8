"""The labeller's wiring, end to end, with tiny random models loaded from local folders.

Every model is built from a small config, saved with `save_pretrained` (model and
processor) and loaded back through the annotators' own `from_pretrained` path. Random
weights make the outputs meaningless: the tests check structure and the deterministic
parts (thresholds, de-duplication, tag parsing, centre of mass), not quality.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    BertConfig,
    BertTokenizer,
    CLIPSegForImageSegmentation,
    CLIPSegProcessor,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    GroundingDinoImageProcessorPil,
    GroundingDinoProcessor,
    SamConfig,
    SamImageProcessorPil,
    SamMaskDecoderConfig,
    SamModel,
    SamProcessor,
    SamPromptEncoderConfig,
    SamVisionConfig,
    SwinConfig,
)

from core.annotate.annotation import Annotator, ObjectAnnotation
from core.annotate.clipseg import ClipSegAnnotator, ClipSegSegmenter, centre_of_mass
from core.annotate.grounded_sam import (
    Detection,
    GroundedSamAnnotator,
    GroundingDinoDetector,
    SamBoxSegmenter,
    box_iou,
    deduplicate,
    grounding_query,
)
from core.annotate.labellers import AnnotatorConfig
from core.annotate.tags import (
    OBJECT_VOCABULARY,
    ClipTagger,
    PromptNounTagger,
    UnionTagger,
    load_vocabulary,
    make_tagger,
    select_tags,
    singular_forms,
)
from core.quadrants import QUADRANTS, quadrant_of
from core.runtime import ModelNotAvailableError
from tests.helpers import VOCABULARY, WORDS, save_clip, save_clipseg

IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8))
WIDTH, HEIGHT = IMAGE.size


def bert_vocabulary() -> dict[str, int]:
    """A BERT vocabulary with BERT's ids for the tokens Grounding DINO treats as special.

    The model hard-codes [CLS] = 101, [SEP] = 102, "." = 1012 and "?" = 1029.
    """
    special = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}
    special |= {1012: ".", 1029: "?"}
    tokens = [special.get(i, f"[unused{i}]") for i in range(1030)] + WORDS
    return {token: i for i, token in enumerate(tokens)}


def save_grounding_dino(folder: Path) -> Path:
    vocab = bert_vocabulary()
    tokenizer = BertTokenizer(vocab=vocab)
    image_processor = GroundingDinoImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 96})
    GroundingDinoProcessor(image_processor, tokenizer).save_pretrained(folder)
    swin = SwinConfig(
        image_size=64,
        patch_size=2,
        embed_dim=8,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=2,
        out_indices=[2, 3, 4],
    )
    bert = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    config = GroundingDinoConfig(
        backbone_config=swin,
        text_config=bert,
        d_model=32,  # GroupNorm(32, d_model) in the input projections
        encoder_layers=1,
        decoder_layers=2,  # the box heads of decoder layers 1.. are tied to layer 0's
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_n_points=1,
        decoder_n_points=1,
        num_queries=12,
        max_text_len=12,  # small, so that the name list is split into several queries
    )
    GroundingDinoForObjectDetection(config).save_pretrained(folder)
    return folder


def save_sam(folder: Path) -> Path:
    image_processor = SamImageProcessorPil(
        size={"longest_edge": 32},
        pad_size={"height": 32, "width": 32},
        mask_size={"longest_edge": 8},
        mask_pad_size={"height": 8, "width": 8},
    )
    SamProcessor(image_processor).save_pretrained(folder)
    config = SamConfig(
        vision_config=SamVisionConfig(
            hidden_size=16,
            output_channels=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=4,
            window_size=4,
            global_attn_indexes=[1],
            num_pos_feats=8,
            mlp_dim=32,
        ),
        prompt_encoder_config=SamPromptEncoderConfig(
            hidden_size=16, image_size=32, patch_size=4, mask_input_channels=4
        ),
        mask_decoder_config=SamMaskDecoderConfig(
            hidden_size=16,
            mlp_dim=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            iou_head_hidden_dim=16,
        ),
    )
    SamModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("annotate-models")
    return {
        "dino": save_grounding_dino(root / "dino"),
        "sam": save_sam(root / "sam"),
        "clip": save_clip(root / "clip"),
        "clipseg": save_clipseg(root / "clipseg"),
    }


@pytest.fixture(scope="module")
def detector(folders) -> GroundingDinoDetector:
    return GroundingDinoDetector(folders["dino"], box_threshold=0.0, text_threshold=0.0)


@pytest.fixture(scope="module")
def segmenter(folders) -> SamBoxSegmenter:
    return SamBoxSegmenter(str(folders["sam"]))


# Tagging


def test_singular_forms_include_the_word_and_its_singulars():
    assert singular_forms("cat") == ["cat"]
    assert "person" in singular_forms("people")
    assert "berry" in singular_forms("berries")
    assert "knife" in singular_forms("knives")
    assert "box" in singular_forms("boxes")
    assert singular_forms("glass") == ["glass"]


def test_prompt_noun_tagger_finds_vocabulary_names_in_order():
    tagger = PromptNounTagger(VOCABULARY)
    prompt = "Two CATS next to some people, a Traffic-Lights pole and another cat"
    assert tagger.tag(IMAGE, prompt) == ["cat", "person", "traffic light"]
    assert tagger.tag(IMAGE, "a light on a tree") == ["tree"]  # "light" alone is no name
    assert tagger.tag(IMAGE, None) == []


def test_default_prompt_vocabulary_has_coco_and_scene_names():
    tags = PromptNounTagger().tag(None, "a teddy bear and two hot dogs on a dining table, blue sky")
    assert tags == ["teddy bear", "hot dog", "dining table", "sky"]


def test_select_tags_applies_threshold_then_top_k():
    names, probs = ["a", "b", "c", "d"], [0.1, 0.4, 0.05, 0.45]
    assert select_tags(names, probs, threshold=0.08, top_k=None) == ["d", "b", "a"]
    assert select_tags(names, probs, threshold=0.08, top_k=2) == ["d", "b"]
    assert select_tags(names, probs, threshold=None, top_k=3) == ["d", "b", "a"]
    assert select_tags(names, probs, threshold=0.9, top_k=3) == []


def test_clip_tagger_tags_from_its_vocabulary(folders):
    tagger = ClipTagger(folders["clip"], vocabulary=VOCABULARY, threshold=None, top_k=3)
    probs = tagger.probabilities(IMAGE)
    assert list(probs) == list(VOCABULARY)
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
    tags = tagger.tag(IMAGE)
    assert len(tags) == 3 and set(tags) <= set(VOCABULARY)
    assert tags == sorted(tags, key=probs.get, reverse=True)


def test_clip_tagger_reads_no_prompt_words(folders):
    tagger = ClipTagger(folders["clip"], vocabulary=VOCABULARY, threshold=None, top_k=None)
    assert "giraffe" not in VOCABULARY
    tags = tagger.tag(IMAGE, "a giraffe and a zebra next to a dog")
    assert sorted(tags) == sorted(VOCABULARY)  # every name, none from the prompt
    assert tagger.tag(IMAGE) == tags == tagger.tag(IMAGE, "a car")


def test_clip_tagger_keeps_names_above_its_threshold_by_falling_probability(folders):
    ranked = ClipTagger(folders["clip"], vocabulary=VOCABULARY, threshold=None, top_k=None)
    probs = ranked.probabilities(IMAGE)
    threshold = sorted(probs.values())[2]  # the third least likely name is the last one kept
    tagger = ClipTagger(ranked.model, ranked.processor, vocabulary=VOCABULARY, threshold=threshold)
    expected = sorted((n for n in VOCABULARY if probs[n] >= threshold), key=probs.get)[::-1]
    assert tagger.tag(IMAGE, "a dog") == expected and len(expected) == len(VOCABULARY) - 2


def test_make_tagger_builds_each_kind_by_name(folders):
    assert isinstance(make_tagger("vision", folders["clip"], VOCABULARY), ClipTagger)
    prompt_only = make_tagger("prompt", "nobody/no-such-model", VOCABULARY)  # CLIP not loaded
    assert prompt_only.tag(IMAGE, "two dogs") == ["dog"]
    both = make_tagger("prompt+vision", folders["clip"], VOCABULARY)
    assert both.tag(IMAGE, "two dogs")[0] == "dog" and isinstance(both, UnionTagger)
    with pytest.raises(ValueError, match="unknown tags 'words'; choose one of vision, prompt"):
        make_tagger("words")


def test_shipped_vocabulary_is_coco_and_common_things(tmp_path):
    assert len(OBJECT_VOCABULARY) == 153
    assert {"person", "traffic light", "hair drier", "sky", "grass", "robot"} <= set(
        OBJECT_VOCABULARY
    )
    (tmp_path / "names.txt").write_text("# comment\nCat\n\n  traffic_light \ncat\n")
    assert load_vocabulary(tmp_path / "names.txt") == ("cat", "traffic light")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="has no names"):
        load_vocabulary(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="is not a file"):
        load_vocabulary(tmp_path / "missing.txt")


def test_union_tagger_keeps_first_occurrence():
    class Fixed:
        def __init__(self, tags):
            self.tags = tags

        def tag(self, image, prompt=None):
            return self.tags

    assert UnionTagger(Fixed(["cat", "dog"]), Fixed(["tree", "cat"])).tag(IMAGE) == [
        "cat",
        "dog",
        "tree",
    ]


# Detection


def test_grounding_query_is_lower_case_with_dots():
    assert grounding_query(["Cat", "traffic light"]) == "cat. traffic light."


def test_deduplicate_suppresses_overlaps_within_a_label_only():
    detections = [
        Detection("cat", 0.6, (0, 0, 10, 10)),
        Detection("cat", 0.9, (1, 1, 11, 11)),  # IoU with the first ~0.68
        Detection("cat", 0.5, (20, 20, 30, 30)),  # far away: another cat
        Detection("dog", 0.4, (0, 0, 10, 10)),  # same place, other label
    ]
    kept = deduplicate(detections, iou_threshold=0.5)
    assert [(d.label, d.score) for d in kept] == [("cat", 0.9), ("cat", 0.5), ("dog", 0.4)]
    assert len(deduplicate(detections, iou_threshold=0.7)) == 4


def test_box_iou():
    assert box_iou((0, 0, 2, 2), (0, 0, 2, 2)) == 1.0
    assert box_iou((0, 0, 2, 2), (1, 0, 3, 2)) == pytest.approx(1 / 3)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0


def test_long_name_lists_are_split_into_queries_that_fit(detector):
    chunks = detector._chunks(VOCABULARY)
    assert [name for chunk in chunks for name in chunk] == list(VOCABULARY)
    assert len(chunks) > 1
    for chunk in chunks:
        ids = detector.processor.tokenizer(grounding_query(chunk)).input_ids
        assert len(ids) <= detector.model.config.max_text_len
        assert len(detector._spans(ids, len(chunk))) == len(chunk)


def test_detector_returns_vocabulary_labels_and_boxes_inside_the_image(detector):
    detections = detector.detect(IMAGE, VOCABULARY)
    assert detections
    for det in detections:
        assert det.label in VOCABULARY
        assert 0.0 <= det.score <= 1.0
        x0, y0, x1, y1 = det.box
        assert 0 <= x0 <= x1 <= WIDTH and 0 <= y0 <= y1 <= HEIGHT


def test_detector_thresholds_filter_boxes(folders, detector):
    strict = GroundingDinoDetector(
        model=detector.model, processor=detector.processor, box_threshold=1.0
    )
    assert strict.detect(IMAGE, VOCABULARY) == []
    some = detector.detect(IMAGE, ["cat"])
    cutoff = sorted(d.score for d in some)[len(some) // 2]
    detector.box_threshold = cutoff
    try:
        assert all(d.score > cutoff for d in detector.detect(IMAGE, ["cat"]))
    finally:
        detector.box_threshold = 0.0


# Segmentation


def test_sam_returns_one_bool_mask_per_box_at_image_size(segmenter):
    masks = segmenter.segment_boxes(IMAGE, [(0, 0, 40, 24), (10, 5, 79, 47)])
    assert masks.shape == (2, HEIGHT, WIDTH) and masks.dtype == bool
    assert segmenter.segment_boxes(IMAGE, []).shape == (0, HEIGHT, WIDTH)


def test_grounded_sam_annotates_end_to_end(folders, detector, segmenter):
    tagger = UnionTagger(
        PromptNounTagger(VOCABULARY),
        ClipTagger(folders["clip"], vocabulary=VOCABULARY, threshold=None, top_k=2),
    )
    annotator = GroundedSamAnnotator(tagger, detector=folders["dino"], segmenter=segmenter)
    annotator.detector.box_threshold = annotator.detector.text_threshold = 0.0
    assert isinstance(annotator, Annotator)
    annotations = annotator.annotate(IMAGE, "a dog and two cats")
    assert annotations
    tags = tagger.tag(IMAGE, "a dog and two cats")
    assert {"dog", "cat"} <= set(tags)
    for ann in annotations:
        assert isinstance(ann, ObjectAnnotation)
        assert ann.label in tags
        assert ann.mask.shape == (HEIGHT, WIDTH) and ann.mask.dtype == bool and ann.mask.any()
        assert isinstance(ann.score, float) and len(ann.box) == 4
    for i, a in enumerate(annotations):
        for b in annotations[i + 1 :]:
            assert a.label != b.label or box_iou(a.box, b.box) <= annotator.nms_iou


def test_commands_label_with_the_vision_tagger_by_default(folders, tmp_path):
    (tmp_path / "names.txt").write_text("\n".join(VOCABULARY) + "\n")
    models = {f"{name}_model": str(folders[name]) for name in ("clip", "dino", "sam")}
    paper = {"annotator": "grounded-sam", **models}
    config = AnnotatorConfig(vocabulary=str(tmp_path / "names.txt"), **paper)
    annotator = config.load_annotator("cpu")
    assert isinstance(annotator.tagger, ClipTagger)
    assert annotator.tagger.vocabulary == VOCABULARY
    assert config.record()["tags"] == "vision"
    prompted = AnnotatorConfig(tags="prompt", **paper).load_annotator("cpu")
    assert prompted.tagger.tag(IMAGE, "a hot dog") == ["hot dog"]  # the shipped vocabulary
    with pytest.raises(ValueError, match="unknown tags"):
        AnnotatorConfig(tags="nouns")


def test_half_precision_runs_end_to_end(folders):
    """The CUDA default is fp16: inputs must be cast to the models' dtype."""
    half = torch.float16
    detector = GroundingDinoDetector(folders["dino"], box_threshold=0.0, dtype=half)
    tagger = ClipTagger(folders["clip"], vocabulary=VOCABULARY, dtype=half)
    annotator = GroundedSamAnnotator(tagger, detector, SamBoxSegmenter(folders["sam"], dtype=half))
    assert all(ann.mask.shape == (HEIGHT, WIDTH) for ann in annotator.annotate(IMAGE))
    maps = ClipSegSegmenter(folders["clipseg"], dtype=half).segment(IMAGE, ["cat"])
    assert maps["cat"].dtype == np.float32


def test_annotator_with_no_tags_returns_nothing(detector, segmenter):
    annotator = GroundedSamAnnotator(PromptNounTagger(VOCABULARY), detector, segmenter)
    assert annotator.annotate(IMAGE, "an empty room") == []


# CLIPSeg evaluation


def test_clipseg_maps_are_probabilities_at_image_size(folders):
    segmenter = ClipSegSegmenter(folders["clipseg"])
    maps = segmenter.segment(IMAGE, ["cat", "traffic light", "cat"])
    assert list(maps) == ["cat", "traffic light"]
    for prob in maps.values():
        assert prob.shape == (HEIGHT, WIDTH) and prob.dtype == np.float32
        assert prob.min() >= 0.0 and prob.max() <= 1.0
    assert segmenter.segment(IMAGE, []) == {}


def test_clipseg_annotator_keeps_each_tag_where_its_map_reaches_the_threshold(folders):
    segmenter = ClipSegSegmenter(folders["clipseg"])
    maps = segmenter.segment(IMAGE, ["dog", "cat"])
    low, high = sorted(maps, key=lambda word: maps[word].max())
    threshold = float(maps[low].max() + maps[high].max()) / 2  # one tag above, one below
    annotator = ClipSegAnnotator(PromptNounTagger(VOCABULARY), segmenter, threshold)
    assert isinstance(annotator, Annotator)
    (found,) = annotator.annotate(IMAGE, "a dog and two cats")
    assert found.label == high and found.score == pytest.approx(float(maps[high].max()))
    np.testing.assert_array_equal(found.mask, maps[high] >= threshold)


def test_clipseg_accepts_built_model_and_processor(folders):
    model = CLIPSegForImageSegmentation.from_pretrained(folders["clipseg"])
    processor = CLIPSegProcessor.from_pretrained(folders["clipseg"])
    segmenter = ClipSegSegmenter(model, processor, device="cpu")
    assert segmenter.segment(IMAGE, ["dog"])["dog"].shape == (HEIGHT, WIDTH)
    with pytest.raises(ValueError, match="processor"):
        ClipSegSegmenter(model)


def test_centre_of_mass_of_hand_made_maps():
    prob = np.zeros((10, 20), dtype=np.float32)
    prob[2:4, 14:18] = 0.9  # a blob in the top right
    prob[8, 0] = 0.2  # below the threshold, ignored
    assert centre_of_mass(prob, threshold=0.5) == pytest.approx((15.5, 2.5))
    weighted = np.zeros((5, 5), dtype=np.float32)
    weighted[0, 0], weighted[0, 4] = 1.0, 0.6
    assert centre_of_mass(weighted, threshold=0.5) == pytest.approx((1.5, 0.0))
    assert centre_of_mass(np.zeros((4, 4)), threshold=0.5) is None


def test_quadrant_of_points():
    size = (20, 10)  # width, height
    assert quadrant_of((2, 1), size) == "top_left"
    assert quadrant_of((15.5, 2.5), size) == "top_right"
    assert quadrant_of((3, 8), size) == "bottom_left"
    assert quadrant_of((19, 9), size) == "bottom_right"
    assert quadrant_of((9.5, 4.5), size) == "bottom_right"  # the exact middle
    assert set(QUADRANTS) == {quadrant_of(p, size) for p in [(0, 0), (19, 0), (0, 9), (19, 9)]}


def test_spatial_edit_success_from_a_map():
    prob = np.zeros((HEIGHT, WIDTH), dtype=np.float32)
    prob[30:46, 5:30] = 0.8
    assert quadrant_of(centre_of_mass(prob), IMAGE.size) == "bottom_left"


# Loading


@pytest.mark.parametrize(
    "build, what",
    [
        (GroundingDinoDetector, "Grounding DINO"),
        (SamBoxSegmenter, "SAM"),
        (ClipSegSegmenter, "CLIPSeg"),
        (lambda model: ClipTagger(model, vocabulary=VOCABULARY), "CLIP tagger"),
    ],
)
def test_missing_model_offline_gives_a_clear_error(build, what):
    with pytest.raises(ModelNotAvailableError) as error:
        build("nobody/no-such-model")
    message = str(error.value)
    assert what in message and "nobody/no-such-model" in message
    assert "internet" in message and "local folder" in message
