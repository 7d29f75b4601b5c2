"""Everything about images, in one place: which vision tower class a checkpoint loads as, how many tokens an
image becomes, how an image file is read (upright, as its EXIF orientation says: the one orientation policy of every
path) and prepared (LLaVA's pad, or crop), the blank image and pixel_values.

Nothing else computes an image's token count: data, packing, stats, plan, merge and inference ask
`tokens_per_image`. The count is read off the tower itself: its forward pass is run on the meta device (no
memory, no weights) at the image processor's output size, so the CLS token of CLIP and DINOv2, DINOv2's
registers and SigLIP's lack of any prefix are all counted as the tower really produces them.
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers import MODEL_MAPPING, AutoConfig, AutoImageProcessor, CLIPImageProcessor

# Weights a vision tower may leave unused when loaded from a dual-encoder checkpoint (CLIP, SigLIP): the text
# tower and the contrastive heads. Any other unused or missing weight is an error.
OTHER_HALF = ("text_model.", "text_projection", "visual_projection", "logit_scale", "logit_bias")


class VisionError(ValueError):
    """A vision tower or image setting that cannot work, naming the checkpoint or the recipe key."""


def tower_config(name_or_config):
    """The vision tower's config: a checkpoint's own, or the vision half of a dual-encoder / LLaVA config."""
    config = AutoConfig.from_pretrained(name_or_config) if isinstance(name_or_config, str) else name_or_config
    return getattr(config, "vision_config", None) or config


def tower_class(config):
    """The transformers class of a vision config (CLIPVisionModel, SiglipVisionModel, Dinov2Model, ...), as
    transformers' LLaVA builds its tower from the same mapping."""
    try:
        return MODEL_MAPPING[type(config)]
    except KeyError:
        raise VisionError(f"no vision model class for model_type {config.model_type!r}") from None


def load_tower(name: str, **kwargs):
    """The vision tower of a checkpoint, as the class its model_type names. A weight the checkpoint lacks (it
    would be random) or has but the tower does not use is an error naming the checkpoint."""
    config = tower_config(name)
    tower, info = tower_class(config).from_pretrained(name, config=config, output_loading_info=True, **kwargs)
    unused = [k for k in info["unexpected_keys"] if not k.startswith(OTHER_HALF)]
    problems = [
        f"{len(keys)} {what} (e.g. {sorted(keys)[0]})"
        for what, keys in (
            ("weights missing, which would be random", info["missing_keys"]),
            ("weights of another shape", info["mismatched_keys"]),
            ("weights the tower does not use", unused),
        )
        if keys
    ]
    if problems:
        raise VisionError(
            f"vision tower {name} ({config.model_type}) does not load as a "
            f"{type(tower).__name__}: {'; '.join(problems)}"
        )
    return tower


def load_image_processor(
    vision_tower: str,
    image_processor: str = "",
    image_size: int = 0,
    image_mean: list[float] = (),
    image_std: list[float] = (),
    processor=None,
):
    """The image processor of the tower (or of `image_processor`, or the one given), with the recipe's size /
    mean / std put over it; a tower that ships none gets a resize + centre-crop + normalize one from those
    settings."""
    source = image_processor or vision_tower
    try:
        processor = processor or AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError):
        if not (image_size and image_mean and image_std):
            raise VisionError(
                f"{source} ships no image processor (preprocessor_config.json): set "
                "model.image_processor, or model.image_size, model.image_mean and model.image_std"
            ) from None
        processor = CLIPImageProcessor()
    if image_size:
        processor.size = (
            {"shortest_edge": image_size}
            if "shortest_edge" in _as_dict(processor.size)
            else {"height": image_size, "width": image_size}
        )
        if getattr(processor, "crop_size", None):
            processor.crop_size = {"height": image_size, "width": image_size}
    if image_mean:
        processor.image_mean = list(image_mean)
    if image_std:
        processor.image_std = list(image_std)
    return processor


def output_size(image_processor) -> tuple[int, int]:
    """(height, width) of the pixel_values the processor makes: its crop when it crops, else its size."""
    crop = _as_dict(getattr(image_processor, "crop_size", None))
    if getattr(image_processor, "do_center_crop", False) and crop.get("height"):
        return crop["height"], crop["width"]
    size = _as_dict(image_processor.size)
    if size.get("height"):
        return size["height"], size["width"]
    edge = size.get("shortest_edge")
    if edge:  # resized to a square below: LLaVA pads (or crops) images to a square first
        return edge, edge
    raise VisionError(f"cannot tell the image size of {type(image_processor).__name__} (size {size})")


def tower_tokens(config, height: int, width: int, feature_layer: int = -2) -> int:
    """Features the tower puts out for one image of (height, width) at `feature_layer`, prefix tokens
    (CLS, registers) included: its forward pass run on the meta device, with eager attention (the count does not
    depend on the kernel, and transformers' FlashAttention wrapper fails on the meta device)."""
    config = copy.deepcopy(config)
    config._attn_implementation = "eager"
    with torch.device("meta"):
        tower = tower_class(config)(config)
        out = tower(pixel_values=torch.empty(1, config.num_channels, height, width), output_hidden_states=True)
    return out.hidden_states[feature_layer].shape[1]


def prefix_tokens(config, height: int, width: int, feature_layer: int = -2) -> int:
    """Features that are not image patches: CLIP and DINOv2's CLS token, DINOv2's registers; none for SigLIP."""
    return tower_tokens(config, height, width, feature_layer) - (height // config.patch_size) * (
        width // config.patch_size
    )


def tokens_per_image(config, image_processor, select_strategy: str, feature_layer: int = -2) -> int:
    """Image tokens per image in input_ids: the tower's features at the processor's output size, minus the
    first one with the "default" strategy (transformers' LLaVA drops exactly that one: the CLS token)."""
    height, width = output_size(image_processor)
    tokens = tower_tokens(config, height, width, feature_layer)
    if select_strategy == "default":
        if prefix_tokens(config, height, width, feature_layer) == 0:
            raise VisionError(
                f'model.vision_feature_select_strategy: "default" drops the first feature as the '
                f"CLS token, but a {config.model_type} tower has none (it would drop an image "
                'patch): set "full"'
            )
        tokens -= 1
    return tokens


@dataclass(frozen=True)
class ImageGeometry:
    """How many tokens an image becomes. LLaVA-1.5 resizes every image to the processor's one size, so the count
    is fixed; the per-image method is what data and inference call, so that a scheme whose count depends on
    the image's size (LLaVA-NeXT's anyres) changes this class only."""

    tokens: int
    varies = False
    """Whether an image's count depends on its size (then data reads each image's size from its header)."""

    def tokens_of(self, size: tuple[int, int] | None = None) -> int:
        """Tokens of an image of `size` (width, height); the largest an image can take when None."""
        return self.tokens

    def tiles_of(self, size: tuple[int, int] | None = None) -> int:
        """Images the tower sees for one image: one."""
        return 1


@dataclass(frozen=True)
class AnyresGeometry:
    """LLaVA-NeXT's "anyres": an image is resized into the grid of tiles (one of `grid_pinpoints`, (height,
    width) in pixels) that keeps most of its pixels and wastes least, and becomes the features of those tiles with
    the padding around the image dropped, one newline feature per row of features, and a downscaled base view
    (one tile's features) first. The count depends on the image's size."""

    tile: int
    """Pixels on a side of a tile (the tower's input size)."""
    patch: int
    grid_pinpoints: tuple[tuple[int, int], ...]
    base_tokens: int
    """Features of one tile as the model keeps them (CLS dropped with the "default" strategy)."""
    varies = True

    def tokens_of(self, size: tuple[int, int] | None = None) -> int:
        """Tokens of an image of `size` (width, height); the largest an image can take when None."""
        if size is None:
            return max(self.tokens_of((width, height)) for height, width in self.grid_pinpoints)
        width, height = size
        grid_height, grid_width = self.best_resolution(size)
        rows = grid_height // self.tile * (self.tile // self.patch)
        columns = grid_width // self.tile * (self.tile // self.patch)
        # The image sits centred in the grid: the feature rows (or columns) of the padding are dropped.
        if width / height > columns / rows:
            rows -= (rows - int(round(height * columns / width, 7))) // 2 * 2
        else:
            columns -= (columns - int(round(width * rows / height, 7))) // 2 * 2
        return rows * columns + rows + self.base_tokens

    def tiles_of(self, size: tuple[int, int] | None = None) -> int:
        """Tiles the tower sees for an image of `size` (width, height): the grid's, plus the base view (the most
        an image can take when None)."""
        if size is None:
            return max(self.tiles_of((width, height)) for height, width in self.grid_pinpoints)
        grid_height, grid_width = self.best_resolution(size)
        return (grid_height // self.tile) * (grid_width // self.tile) + 1

    def best_resolution(self, size: tuple[int, int]) -> tuple[int, int]:
        """The (height, width) of the grid an image of `size` (width, height) is resized into: the most of its
        pixels kept, then the fewest pixels wasted."""
        width, height = size

        def fit(pinpoint):
            grid_height, grid_width = pinpoint
            scale = min(grid_width / width, grid_height / height)
            kept = min(int(width * scale) * int(height * scale), width * height)
            return -kept, grid_width * grid_height - kept

        return min(self.grid_pinpoints, key=lambda p: fit(tuple(p)))


def image_geometry(config, image_processor) -> ImageGeometry | AnyresGeometry:
    """How many tokens an image becomes in a LLaVA (fixed) or LLaVA-NeXT (anyres, by size) model `config`."""
    layer, strategy = config.vision_feature_layer, config.vision_feature_select_strategy
    per_tile = tokens_per_image(config.vision_config, image_processor, strategy, layer)
    pinpoints = getattr(config, "image_grid_pinpoints", None)
    if not pinpoints:
        return ImageGeometry(per_tile)
    tile = output_size(image_processor)[0]
    return AnyresGeometry(tile, config.vision_config.patch_size, tuple(tuple(p) for p in pinpoints), per_tile)


# The one orientation policy: every image is used upright, as its EXIF orientation says a viewer shows it (a
# phone photo is stored sideways with an orientation tag). Training data (LLaVA JSON and Hugging Face datasets),
# eval, chat and serve all read images through open_image, and token counts are taken from the upright size.
# For each orientation (2-8), the transpose that turns the stored pixels upright; 1 or none: as stored.
ORIENTATION_TAG = 0x0112
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

TURNED_BY_PIL = ("TIFF",)
"""Formats whose PIL reader turns an image upright itself (its size at open, its pixels when decoded)."""

QUIET_BOMBS = ("ignore", None, Image.DecompressionBombWarning, None, 0)
"""The warnings filter that keeps PIL's DecompressionBombWarning (89 to 179 megapixels) off the screen: qllava says
what it does with large images itself (`data stats` counts them, serve refuses uploads over 50 megapixels, over
PIL's error size an image is a counted skip or an error naming the file)."""


def quiet_bomb_warnings() -> None:
    """Put QUIET_BOMBS in place when it is missing: at import, and again before each image this module opens (a
    catch_warnings block that was open when qllava was imported takes it away when it closes)."""
    if QUIET_BOMBS not in warnings.filters:
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


quiet_bomb_warnings()  # also for what opens images without this module's functions (serve's size check of an upload)


def orientation(image: Image.Image) -> int:
    """The EXIF orientation (2-8) an opened image declares in its header, or 1 (none, unknown or unreadable).
    Read before any pixel is decoded, so the header alone and the decoded image always agree: a PNG's eXIf chunk
    counts only before the image data (PNG's own getexif would decode the image to look after them)."""
    try:
        value = Image.Image.getexif(image).get(ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - a malformed EXIF block is no orientation, in every path alike
        return 1
    return value if value in UPRIGHT else 1


def turn_needed(image: Image.Image) -> int:
    """The orientation still to apply to an opened image (1: none): its own, except where PIL's reader applies it
    itself (and so does every program that opens it with PIL, official LLaVA included)."""
    return 1 if image.format in TURNED_BY_PIL else orientation(image)


def upright_size(size: tuple[int, int], turn: int) -> tuple[int, int]:
    """(width, height) of an image of `size` once turned by `turn`: swapped by the quarter turns (5-8)."""
    return (size[1], size[0]) if turn >= 5 else size


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header says, nothing decoded: why it cannot be used (or None), its upright size."""

    problem: str | None
    size: tuple[int, int] | None = None
    """(width, height) upright: what the model will get."""
    orientation: int = 1
    """EXIF orientation 2-8 when qllava turns (or mirrors) the pixels PIL decodes to be upright, else 1: where it
    is not 1, qllava's pixels differ from those of a program that ignores the tag (official LLaVA)."""

    @property
    def large(self) -> bool:
        """Over PIL's decompression-bomb warning size (Image.MAX_IMAGE_PIXELS, 89 megapixels): usable, but slow and
        hundreds of MB to decode in every batch that holds it."""
        limit = Image.MAX_IMAGE_PIXELS
        return bool(self.size and limit and self.size[0] * self.size[1] > limit)


NOT_FOUND = "image file not found"
BOMB = "image larger than PIL's decompression-bomb limit (2 x PIL.Image.MAX_IMAGE_PIXELS pixels)"
UNREADABLE = "image file cannot be read as an image"


def image_header(source) -> ImageHeader:
    """What an image file (a path or a binary file) is, read from its header only (fast: a file cut short later in
    its data is found when it is decoded)."""
    if isinstance(source, (str, os.PathLike)) and not os.path.isfile(source):
        return ImageHeader(NOT_FOUND)
    quiet_bomb_warnings()
    try:
        with Image.open(source) as image:
            turn = turn_needed(image)
            return ImageHeader(None, upright_size(image.size, turn), turn)
    except Image.DecompressionBombError:
        return ImageHeader(BOMB)
    except (OSError, ValueError):
        return ImageHeader(UNREADABLE)


def open_image(source, name=None) -> Image.Image:
    """An image file (a path or a binary file) as every path of qllava uses it: decoded, in RGB, upright (see
    UPRIGHT); or an error naming the file (`name`, or the path)."""
    name = name or source
    quiet_bomb_warnings()
    try:
        with Image.open(source) as image:
            turn = turn_needed(image)
            rgb = as_rgb(image)
    except FileNotFoundError:
        raise VisionError(f"image {name}: file not found") from None
    except Image.DecompressionBombError as e:
        raise VisionError(
            f"image {name}: too large to decode safely: {e} (PIL.Image.MAX_IMAGE_PIXELS); resize it: "
            "training shrinks every image to the processor's size anyway"
        ) from None
    except (OSError, ValueError) as e:
        raise VisionError(f"image {name}: cannot be read as an image ({e})") from None
    return rgb.transpose(UPRIGHT[turn]) if turn in UPRIGHT else rgb


# Modes of more than 8 bits per channel that PIL's convert("RGB") clips instead of scaling (a 16-bit grayscale PNG
# opens as "I;16" and came out pure white): they are scaled to 8 bits here. PIL scales 16-bit RGB(A) itself.
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def as_rgb(image: Image.Image) -> Image.Image:
    """An image in RGB, high bit depths scaled to 8 bits: 16-bit integers (0..65535; "I", 32-bit, as 16-bit, which
    is what PNG and TIFF files hold) and floats (0..1, or 0..255 when larger values occur)."""
    if image.mode in SIXTEEN_BIT or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255 / 65535 if image.mode != "F" else (255.0 if values.max(initial=0) <= 1 else 1.0)
        image = Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def pad_to_square(image: Image.Image, image_mean) -> Image.Image:
    """LLaVA's expand2square: centre on a square of the image-mean colour (truncated to ints, as LLaVA does)."""
    width, height = image.size
    if width == height:
        return image
    size = max(width, height)
    canvas = Image.new(image.mode, (size, size), tuple(int(x * 255) for x in image_mean))
    canvas.paste(image, ((size - width) // 2, (size - height) // 2))
    return canvas


def prepared(image: Image.Image, image_processor, aspect_ratio: str) -> Image.Image:
    """An image as training sees it before the processor: padded to a square ("pad", LLaVA-1.5), or as it
    is ("crop": the processor's resize and centre crop; "anyres": LLaVA-NeXT's tiling)."""
    return pad_to_square(image, image_processor.image_mean) if aspect_ratio == "pad" else image


def blank_image(image_processor) -> Image.Image:
    """The image-mean colour at the processor's output size: normalized, every pixel is ~0; it says nothing."""
    height, width = output_size(image_processor)
    return Image.new("RGB", (width, height), tuple(int(x * 255) for x in image_processor.image_mean))


def image_inputs(images: list[Image.Image], image_processor, aspect_ratio: str) -> dict:
    """The model inputs of RGB images, prepared as training prepares them, in the given order: pixel_values,
    and for LLaVA-NeXT image_sizes (every tile of an image in its row of pixel_values, rows padded to the most
    tiles; the model takes each image's tiles by its size)."""
    images = [prepared(image, image_processor, aspect_ratio) for image in images]
    out = image_processor(images=images, return_tensors="pt")
    return {key: out[key] for key in ("pixel_values", "image_sizes") if key in out}


def _as_dict(size) -> dict:
    if size is None:
        return {}
    if isinstance(size, dict):
        return size
    return {k: v for k, v in vars(size).items() if v is not None} if hasattr(size, "__dict__") else dict(size)
