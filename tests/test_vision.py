"""The vision seam: towers load as their own model_type (never a silently random CLIP), an image's token count
is what transformers' LLaVA really consumes for CLIP, SigLIP, DINOv2 (with and without registers), and
image settings fail with the recipe key to set."""

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    BitImageProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    Dinov2Config,
    Dinov2WithRegistersConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    MistralConfig,
    SiglipImageProcessor,
    SiglipVisionConfig,
)

from qllava import tiny, vision

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
TOWERS = {  # config, its image processor, the strategy LLaVA uses with it, tokens per image
    "clip": (
        CLIPVisionConfig(**SIZES, image_size=64, patch_size=16),
        CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}),
        "default",
        16,
    ),
    # SigLIP has no CLS token: LLaVA-OneVision keeps every feature ("full")
    "siglip": (
        SiglipVisionConfig(**SIZES, image_size=48, patch_size=16),
        SiglipImageProcessor(size={"height": 48, "width": 48}),
        "full",
        9,
    ),
    # DINOv2's config says 518 px, its processor feeds 224 (here 56): the processor decides
    "dinov2": (
        Dinov2Config(**SIZES, image_size=518, patch_size=14),
        BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56}),
        "default",
        16,
    ),
    # registers stay after the CLS token is dropped
    "dinov2_registers": (
        Dinov2WithRegistersConfig(**SIZES, image_size=518, patch_size=14, num_register_tokens=4),
        BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56}),
        "default",
        20,
    ),
}


def save_tower(folder, config, processor):
    torch.manual_seed(0)
    vision.tower_class(config)(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("name", TOWERS)
def test_an_images_tokens_are_what_llava_consumes(name, tmp_path):
    config, processor, strategy, expected = TOWERS[name]
    folder = save_tower(tmp_path / name, config, processor)
    tower = vision.load_tower(folder)
    assert type(tower) is vision.tower_class(config) and tower.config.model_type == config.model_type
    image_processor = vision.load_image_processor(folder)
    tokens = vision.tokens_per_image(tower.config, image_processor, strategy)
    assert tokens == expected
    # transformers' own processor expands <image> to the same count, and LLaVA's forward accepts it
    tokenizer = tiny.build_tokenizer(["what is it"])
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    height, width = vision.output_size(image_processor)
    llava_processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=vision.prefix_tokens(config, height, width),
        image_token="<image>",
    )
    inputs = llava_processor(text="<image>\nwhat is it", images=[Image.new("RGB", (90, 70))], return_tensors="pt")
    assert int((inputs["input_ids"] == tokenizer.convert_tokens_to_ids("<image>")).sum()) == tokens
    llava = LlavaForConditionalGeneration(
        LlavaConfig(
            vision_config=config,
            text_config=MistralConfig(vocab_size=len(tokenizer), **SIZES, num_key_value_heads=2),
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            vision_feature_select_strategy=strategy,
        )
    )
    logits = llava(**inputs).logits
    assert logits.shape[1] == inputs["input_ids"].shape[1]


def test_a_checkpoint_of_another_tower_is_refused_not_randomly_initialised(tmp_path):
    dino, _, _, _ = TOWERS["dinov2"]
    folder = save_tower(tmp_path / "dino", dino, BitImageProcessor())
    # a DINOv2 checkpoint whose config was replaced by a CLIP one: every CLIP weight would be random
    clip_config, _, _, _ = TOWERS["clip"]
    clip_config.save_pretrained(folder)
    with pytest.raises(
        vision.VisionError,
        match=r"does not load as a CLIPVisionModel: \d+ weights missing, which "
        r"would be random \(e\.g\. ",
    ):
        vision.load_tower(folder)


def test_a_missing_weight_is_an_error_naming_the_checkpoint(tmp_path):
    config, processor, _, _ = TOWERS["clip"]
    folder = save_tower(tmp_path / "clip", config, processor)
    weights = load_file(f"{folder}/model.safetensors")
    del weights["embeddings.position_embedding.weight"]
    save_file(weights, f"{folder}/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        vision.VisionError,
        match=f"vision tower {folder} .*1 weights missing, which would be random "
        r"\(e\.g\. embeddings\.position_embedding\.weight\)",
    ):
        vision.load_tower(folder)


def test_the_default_strategy_on_a_tower_without_cls_is_an_error():
    config, processor, _, _ = TOWERS["siglip"]
    with pytest.raises(vision.VisionError, match='vision_feature_select_strategy: "default" drops the first feature'):
        vision.tokens_per_image(config, processor, "default")


def test_a_tower_without_an_image_processor_needs_the_recipes_settings(tmp_path):
    config, _, _, _ = TOWERS["dinov2"]
    folder = tmp_path / "bare"
    vision.tower_class(config)(config).save_pretrained(folder)
    with pytest.raises(
        vision.VisionError,
        match="ships no image processor .*set model.image_processor, or "
        "model.image_size, model.image_mean and model.image_std",
    ):
        vision.load_image_processor(str(folder))
    processor = vision.load_image_processor(str(folder), image_size=56, image_mean=[0.5] * 3, image_std=[0.25] * 3)
    assert vision.output_size(processor) == (56, 56) and processor.image_std == [0.25] * 3
    assert vision.tokens_per_image(config, processor, "default") == 16


def test_blank_image_and_padding_follow_the_processor():
    _, processor, _, _ = TOWERS["siglip"]
    blank = vision.blank_image(processor)
    assert blank.size == (48, 48) and blank.getpixel((0, 0)) == (127, 127, 127)
    padded = vision.prepared(Image.new("RGB", (40, 10), (255, 0, 0)), processor, "pad")
    assert padded.size == (40, 40) and padded.getpixel((0, 0)) == (127, 127, 127)
    assert padded.getpixel((20, 20)) == (255, 0, 0)
    assert vision.image_inputs([Image.new("RGB", (40, 10))], processor, "pad")["pixel_values"].shape == (1, 3, 48, 48)
