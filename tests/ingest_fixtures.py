"""A small image-caption source with good and deliberately bad items, and its expected counts."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def _image(mode: str, value: int, size: int = 40) -> Image.Image:
    rng = np.random.default_rng(value)
    rgb = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), "RGB")
    if mode == "RGB":
        return rgb
    if mode == "I;16":
        return Image.fromarray((rng.integers(0, 65535, (size, size))).astype(np.uint16))
    if mode == "P":
        return rgb.quantize(16)
    return rgb.convert(mode)


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


# Good items: key -> captions. CMYK/RGBA/16-bit/palette images are converted, and kept.
GOOD = {
    "cat": ["a cat on a mat"],
    "dog": ["a dog in the park"],
    "bird": ["a bird on a wire"],
    "fish": ["a fish in a bowl"],
    "cmyk": ["a print in four inks"],
    "rgba": ["a sticker with a transparent background"],
    "deep": ["a sixteen bit scan"],
    "palette": ["a gif like drawing"],
    "dup": ["two files share this name"],
    "sub_multi": ["the first of two captions", "the second of two captions"],
}
CONVERTED = {"converted_16bit": 1, "converted_alpha": 1, "converted_cmyk": 1, "converted_palette": 1}
SKIPPED = {
    "corrupt_image": 1,  # truncated JPEG
    "not_an_image": 1,  # a text file named .jpg
    "empty_caption": 1,
    "invalid_utf8": 1,
    "duplicate_key": 1,  # dup.jpg and dup.png
    "missing_image": 1,  # a caption file without its image
    "missing_caption": 1,  # an image without its caption file
}


def write_dirty_folder(root: Path) -> Path:
    """Images with same-named .txt captions; see GOOD, CONVERTED and SKIPPED for what to expect."""
    root.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {}
    for index, key in enumerate(("cat", "dog", "bird")):
        files[f"{key}.jpg"] = _encode(_image("RGB", index), "JPEG")
    files["fish.png"] = _encode(_image("RGB", 3), "PNG")
    files["cmyk.jpg"] = _encode(_image("CMYK", 4), "JPEG")
    files["rgba.png"] = _encode(_image("RGBA", 5), "PNG")
    files["deep.png"] = _encode(_image("I;16", 6), "PNG")
    files["palette.png"] = _encode(_image("P", 7), "PNG")
    files["dup.jpg"] = _encode(_image("RGB", 8), "JPEG")
    files["dup.png"] = _encode(_image("RGB", 9), "PNG")  # same key as dup.jpg: counted, left out
    (root / "sub").mkdir(exist_ok=True)
    files["sub/multi.jpg"] = _encode(_image("RGB", 10), "JPEG")
    jpeg = _encode(_image("RGB", 11, size=96), "JPEG")
    files["truncated.jpg"] = jpeg[: len(jpeg) // 2]
    files["notes.jpg"] = b"this is a text file with the wrong name\n"
    files["blank.jpg"] = _encode(_image("RGB", 12), "JPEG")
    files["latin1.jpg"] = _encode(_image("RGB", 13), "JPEG")
    files["uncaptioned.jpg"] = _encode(_image("RGB", 14), "JPEG")
    for key, captions in GOOD.items():
        files[f"{key.replace('sub_', 'sub/')}.txt"] = ("\n".join(captions) + "\n").encode()
    files["truncated.txt"] = b"half a picture\n"
    files["notes.txt"] = b"not a picture\n"
    files["blank.txt"] = b"  \n\t\n"
    files["latin1.txt"] = "un caf\u00e9 cr\u00e8me".encode("latin-1")
    files["orphan.txt"] = b"a caption whose image is gone\n"
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


TABLE_SKIPPED = {
    "corrupt_image": 1,
    "duplicate_caption": 1,
    "empty_caption": 1,
    "invalid_utf8": 1,
    "missing_image": 1,  # a CSV row naming a file that does not exist
    "missing_split": 1,
}


def write_dirty_table(root: Path) -> Path:
    """Images and a captions.csv (columns image, text, split); expect train: cat (2 captions),
    cmyk; val: dog; skipped: TABLE_SKIPPED."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "img").mkdir(exist_ok=True)
    for index, name in enumerate(("cat.jpg", "dog.jpg", "bird.jpg", "fish.jpg")):
        (root / "img" / name).write_bytes(_encode(_image("RGB", index), "JPEG"))
    (root / "img" / "cmyk.jpg").write_bytes(_encode(_image("CMYK", 5), "JPEG"))
    jpeg = _encode(_image("RGB", 6, size=96), "JPEG")
    (root / "img" / "trunc.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    rows = [
        b"image,text,split",
        b"img/cat.jpg,a cat on a mat,train",
        b'img/cat.jpg,"a cat, asleep",train',
        b"img/cat.jpg,a cat on a mat,train",  # the same caption again
        b"img/dog.jpg,a dog in the park,validation",
        b"img/dog.jpg,   ,validation",  # blank caption
        b"img/bird.jpg,caf\xe9 au lait,train",  # Latin-1, not UTF-8
        b"img/gone.jpg,an image that is not there,train",
        b"img/fish.jpg,a fish without a split,",
        b"img/cmyk.jpg,a print in four inks,restval",
        b"img/trunc.jpg,a third of a picture,train",
    ]
    (root / "captions.csv").write_bytes(b"\n".join(rows) + b"\n")
    return root
