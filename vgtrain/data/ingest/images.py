"""Image checking and normalisation, run in the worker processes of ``vgtrain shards``.

Every image is decoded completely (a truncated file fails here, not in the middle of training) and
brought to 8-bit RGB: CMYK, 16-bit, palette, grey and alpha images are converted (alpha is
composited onto white) and counted by what was converted. An RGB JPEG/PNG/WebP that needs no
resizing keeps its original bytes; any other image is re-encoded as JPEG at ``quality``.
Pure PIL and numpy: the workers import neither torch nor webdataset.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vgtrain.data.ingest.records import ImageRef, Record

KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
_ORIENTATION = 0x0112  # the EXIF tag


@dataclass(frozen=True)
class ImageOptions:
    max_side: int | None = None  # longer side above this is resized down (aspect kept)
    jpeg_quality: int = 95
    reencode: bool = False  # re-encode every image as JPEG, even ones that could be kept


@dataclass
class PreparedImage:
    """An image ready for a shard (``ext`` + ``data``), or the reason it cannot be used."""

    ext: str | None = None
    data: bytes | None = None
    converted: list[str] = field(default_factory=list)
    problem: str | None = None
    detail: str = ""
    size: tuple[int, int] = (0, 0)


def _to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """8-bit RGB, and what was converted (None for an image that already was)."""
    mode = image.mode
    if mode == "RGB":
        return image, None
    if mode == "CMYK":
        return image.convert("RGB"), "converted_cmyk"
    if mode in _SIXTEEN_BIT:
        # PIL's own I;16 -> RGB clips at 255 (an all-white image); scale the 16-bit range instead.
        values = np.asarray(image, dtype=np.float64)
        scale = 257.0 if values.max(initial=0) > 255 or mode != "I" else 1.0
        grey = np.clip(np.rint(values / scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB"), "converted_16bit"
    if mode == "P":
        if "transparency" in image.info:
            return _flatten(image.convert("RGBA")), "converted_palette"
        return image.convert("RGB"), "converted_palette"
    if mode in _ALPHA:
        return _flatten(image.convert("RGBA")), "converted_alpha"
    if mode in ("L", "1"):
        return image.convert("RGB"), "converted_grayscale"
    return image.convert("RGB"), f"converted_{mode.lower().replace(';', '_')}"


def _flatten(rgba: Image.Image) -> Image.Image:
    """Alpha composited onto white: transparent pixels hold arbitrary colours underneath."""
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def prepare_image(ref: ImageRef, options: ImageOptions) -> PreparedImage:
    try:
        raw = ref.read()
    except OSError as error:
        return PreparedImage(problem="missing_image", detail=f"{ref.describe()}: {error}")
    try:
        image = Image.open(io.BytesIO(raw))
    except UnidentifiedImageError:
        return PreparedImage(problem="not_an_image", detail=f"{ref.describe()}: not an image PIL can read")
    except Exception as error:  # DecompressionBombError and friends
        return PreparedImage(problem="corrupt_image", detail=f"{ref.describe()}: {error}")
    try:
        image.load()  # decodes every byte: truncated files fail here
        source_format = image.format
        converted: list[str] = []
        if image.getexif().get(_ORIENTATION, 1) != 1:  # phone photos: pixels stored sideways
            image = ImageOps.exif_transpose(image)
            converted.append("converted_exif_rotation")
        image, conversion = _to_rgb(image)
        if conversion:
            converted.append(conversion)
        resized = False
        if options.max_side and max(image.size) > options.max_side:
            image.thumbnail((options.max_side, options.max_side), Image.Resampling.BICUBIC)
            resized = True
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for broken data
        return PreparedImage(problem="corrupt_image", detail=f"{ref.describe()}: {error}")
    if not converted and not resized and not options.reencode and source_format in KEPT_FORMATS:
        return PreparedImage(ext=KEPT_FORMATS[source_format], data=raw, size=image.size)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=options.jpeg_quality)
    return PreparedImage(ext="jpg", data=buffer.getvalue(), converted=converted, size=image.size)


def prepare_job(job: tuple[Record, ImageOptions]) -> tuple[Record, PreparedImage]:
    """A worker's unit of work (module level, so the spawned workers import this module only)."""
    record, options = job
    return record, prepare_image(record.image, options)
