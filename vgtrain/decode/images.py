"""Image inputs: paths, folders and list files -> images, with per-file errors instead of crashes."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


class ImageError(ValueError):
    """An image that cannot be read; the message starts with the file it is about."""


def expand_image_arguments(arguments: list[str]) -> list[str]:
    """Folders become their image files (sorted, not recursive); a ``.txt`` file is a list of image
    paths, one a line (blank lines and ``#`` comments skipped; relative paths are relative to the
    list file's folder). Anything else is taken as an image path, and checked when it is read."""
    images: list[str] = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            images.extend(str(p) for p in sorted(path.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.suffix.lower() == ".txt" and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    images.append(line if Path(line).is_absolute() else str(path.parent / line))
        else:
            images.append(argument)
    return images


def image_name(image: Image.Image | str | Path, index: int) -> str:
    if isinstance(image, (str, Path)):
        return str(image)
    return getattr(image, "filename", "") or f"<image {index}>"


def open_image(image: Image.Image | str | Path) -> Image.Image:
    """An RGB image; raises :class:`ImageError` naming the file when it is missing or corrupt."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as handle:
            handle.load()  # decode now: a truncated file fails here, not inside a batch
            return handle.convert("RGB")
    except FileNotFoundError as error:
        raise ImageError(f"{image}: no such file") from error
    except IsADirectoryError as error:
        raise ImageError(f"{image}: is a folder, not an image") from error
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise ImageError(f"{image}: cannot read the image ({error})") from error
