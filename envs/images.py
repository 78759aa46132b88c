"""Image utilities shared by the vision envs and the zoom tool: open files robustly as RGB,
validate and clip bounding boxes, crop.

Conventions: a bbox is [x0, y0, x1, y1] in pixel coordinates of the image as returned here
(origin top-left, x1/y1 exclusive, like PIL's crop box). Every failure on an image file raises
`ImageError` naming the file, so a bad dataset row is reported, not a cryptic PIL traceback.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import threading
from collections.abc import Sequence
from numbers import Real
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "EncodedImage",
    "MAX_ASPECT_RATIO",
    "PIXEL_LIMIT",
    "ImageError",
    "clip_bbox",
    "crop",
    "open_image",
    "probe_image",
    "to_rgb",
]

# Images above this are downscaled on load: 4096 x 4096 is far beyond what VLM processors keep
# (Qwen2.5-VL's default max_pixels is 12.8 M, Qwen3-VL's ~16.7 M), and bounds an RGB copy to 48 MB.
DEFAULT_MAX_PIXELS = 4096 * 4096
# Files above this are refused outright: decoding them takes more memory than a rollout worker
# should spend on one image (PIL holds ~1-4 bytes per pixel before we can shrink a PNG).
PIXEL_LIMIT = 200_000_000
# qwen-vl-utils refuses images whose longer side is over 200 times the shorter one.
MAX_ASPECT_RATIO = 200

_WHITE = (255, 255, 255)
# Modes PIL resizes natively with a proper filter (RGBA/LA are premultiplied internally); other
# modes ("1", "P", 16/32-bit, float) are converted to RGB before any resizing.
_RESIZABLE = {"L", "LA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"}
_OPEN_LOCK = threading.Lock()  # guards the temporary change of PIL's global bomb limit


class ImageError(ValueError):
    """An image file that cannot be used; the message names the file and the fix."""


@dataclasses.dataclass(frozen=True, repr=False)
class EncodedImage:
    """An image file's bytes held in memory (a datasets Image cell); `name` stands for it in
    messages wherever a path would."""

    data: bytes
    name: str

    def __str__(self) -> str:
        return self.name

    __repr__ = __str__


ImageSource = str | os.PathLike | EncodedImage


# ----------------------------------------------------------------------------- conversion


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit integer and float grayscale to 8-bit, scaled (PIL's convert clips at 255, which
    turns a 16-bit scan into a white page)."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        out = arr.astype(np.float64) / 257.0  # 0..65535 -> 0..255
    elif img.mode == "F":
        peak = float(np.nanmax(arr)) if arr.size else 0.0
        out = arr * 255.0 if peak <= 1.0 else arr  # [0, 1] floats are the common convention
    else:  # "I": 32-bit ints, in practice 16-bit PNGs or 8-bit data widened
        peak = int(arr.max()) if arr.size else 0
        out = arr / 257.0 if 255 < peak <= 65535 else arr * (255.0 / max(peak, 255))
    return Image.fromarray(np.nan_to_num(np.clip(out, 0, 255)).round().astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """An RGB version of an in-memory image; images with transparency are composited on white.

    Same rule as qwen-vl-utils' `to_rgb` for RGBA, extended to every mode with alpha (LA, PA,
    La, RGBa) and to palette / grayscale images carrying a transparency colour; 16-bit and float
    grayscale are scaled to 8 bits rather than clipped. An RGB image is returned as is.
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        img = _high_depth_to_l(img)
    has_alpha = img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info
    if not has_alpha:
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    out = Image.new("RGB", rgba.size, _WHITE)
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


# ----------------------------------------------------------------------------- files


def _source(path: ImageSource) -> Path | EncodedImage:
    return path if isinstance(path, EncodedImage) else Path(path)


def _open_lazy(path: Path | EncodedImage) -> Image.Image:
    """Image.open (header only) with clear errors; large images up to PIXEL_LIMIT are allowed."""
    if isinstance(path, Path) and not path.exists():
        raise ImageError(f"{path}: no such image file")
    if isinstance(path, Path) and not path.is_file():
        raise ImageError(f"{path}: not a file (an image path must name a file)")
    # PIL's decompression-bomb guard warns above 89 M pixels and fails above 179 M; our own
    # limit (PIXEL_LIMIT, checked by the callers before any pixel is decoded) replaces it for
    # the duration of the open, which reads the header only.
    with _OPEN_LOCK:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(io.BytesIO(path.data) if isinstance(path, EncodedImage) else path)
        except UnidentifiedImageError as e:
            raise ImageError(f"{path}: not a readable image (unknown format or corrupt data)") \
                from e
        except OSError as e:
            raise ImageError(f"{path}: cannot read image ({e})") from e
        finally:
            Image.MAX_IMAGE_PIXELS = saved


_TRANSPOSE = {  # EXIF orientation -> the transform that shows the image upright
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90,
}


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright), read from the header."""
    try:
        value = img.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block is not worth refusing the image for
        return 1
    return value if value in _TRANSPOSE else 1


def _displayed_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    w, h = size
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)  # 5-8 rotate by 90 degrees


def _check_size(path: Path | EncodedImage, size: tuple[int, int]) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError(f"{path}: image has zero size ({w}x{h} px)")
    if w * h > PIXEL_LIMIT:
        raise ImageError(f"{path}: image is {w}x{h} px ({w * h:,} pixels), over the limit of "
                         f"{PIXEL_LIMIT:,}; downscale the file")
    if max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
        raise ImageError(f"{path}: image is {w}x{h} px, an aspect ratio over "
                         f"{MAX_ASPECT_RATIO}:1 that VLM processors refuse; crop or pad it")


def probe_image(path: ImageSource) -> tuple[tuple[int, int], str]:
    """((width, height), mode) of an image file from its header, without decoding the pixels.

    The size is as displayed (EXIF rotation applied), i.e. what `open_image` returns before any
    downscaling. Raises ImageError for missing, unreadable, empty, huge or too-elongated images.
    """
    path = _source(path)
    with _open_lazy(path) as img:
        size, mode = _displayed_size(img.size, _orientation(img)), img.mode
    _check_size(path, size)
    return size, mode


def open_image(path: ImageSource, *,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A local image file as a fully loaded RGB image, at most `max_pixels` pixels.

    EXIF rotation is applied (as image viewers and transformers' `load_image` do, so boxes drawn
    on the displayed image line up). Larger images are downscaled keeping the aspect ratio: JPEGs
    are decoded at a reduced scale (`Image.draft`), so memory stays near the output size; other
    formats are decoded in full (at most PIXEL_LIMIT pixels) and then shrunk with `thumbnail`.
    Raises ImageError (naming the file) for anything unusable.
    """
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
    path = _source(path)
    src = _open_lazy(path)
    try:
        orientation = _orientation(src)
        _check_size(path, _displayed_size(src.size, orientation))
        w, h = src.size
        scale = math.sqrt(max_pixels / (w * h))
        target = (max(1, math.floor(w * scale)), max(1, math.floor(h * scale)))
        if scale < 1:
            src.draft(None, target)  # JPEG only (a no-op elsewhere): decode at 1/2..1/8 scale
        src.load()
        img = src
        if scale < 1:
            if img.mode not in _RESIZABLE:  # bilevel stays 1 byte a pixel until shrunk
                img = img.convert("L") if img.mode == "1" else to_rgb(img)
            img.thumbnail(target, Image.Resampling.BICUBIC)
        img = to_rgb(img)
        if orientation != 1:
            img = img.transpose(_TRANSPOSE[orientation])
        if img is src:
            img = src.copy()  # src.close() below frees src's pixels, not the copy's
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # truncated or corrupt pixel data
        raise ImageError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e
    finally:
        src.close()
    return img


# ----------------------------------------------------------------------------- boxes


def _is_number(x: object) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def clip_bbox(bbox: Sequence[float], size: tuple[int, int], *,
              units: str = "px") -> tuple[int, int, int, int]:
    """A bbox [x0, y0, x1, y1] (pixels, ints or floats) clipped to an image of `size` (w, h).

    The result is integer pixels covering the box (x0, y0 rounded down, x1, y1 up). Raises
    ValueError for a malformed box (not 4 finite numbers, x0 >= x1 or y0 >= y1) and for a box
    entirely outside the image; a box partly outside is clipped to it. `units` names the
    coordinate unit in messages (e.g. "relative units" for 0..1000 boxes).
    """
    w, h = size
    if (isinstance(bbox, (str, bytes)) or not isinstance(bbox, Sequence) or len(bbox) != 4
            or not all(_is_number(v) for v in bbox)):
        raise ValueError(f"bbox must be 4 numbers [x0, y0, x1, y1], got {bbox!r}")
    x0, y0, x1, y1 = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ValueError(f"bbox {list(bbox)} has non-finite coordinates")
    if not (x0 < x1 and y0 < y1):
        raise ValueError(f"bbox {list(bbox)} is empty or reversed: need x0 < x1 and y0 < y1 "
                         "([left, top, right, bottom])")
    cx0, cy0 = max(0, math.floor(x0)), max(0, math.floor(y0))
    cx1, cy1 = min(w, math.ceil(x1)), min(h, math.ceil(y1))
    if cx0 >= cx1 or cy0 >= cy1:
        raise ValueError(f"bbox {list(bbox)} lies outside the image ({w}x{h} {units}): x must "
                         f"be within 0..{w} and y within 0..{h}")
    return cx0, cy0, cx1, cy1


def crop(img: Image.Image, bbox: Sequence[float], *, margin: float = 0.0,
         size: int | None = None,
         resample: Image.Resampling = Image.Resampling.BICUBIC) -> Image.Image:
    """The region `bbox` of `img` (clipped to it), enlarged by `margin` x the box's width/height
    on each side, resized so its longer side is `size` pixels when given (aspect ratio kept).

    BICUBIC by default: it is what Qwen-VL processors resize with, so a crop looks as it would
    had the model enlarged it itself, and flat regions (the synthetic scenes' colours) keep their
    exact values. Pass NEAREST to keep hard pixel edges instead. Raises ValueError for a bad box
    or one whose aspect ratio is over MAX_ASPECT_RATIO (VLM processors refuse such images).
    """
    if not _is_number(margin) or not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"size must be a positive int or None, got {size!r}")
    x0, y0, x1, y1 = clip_bbox(bbox, img.size)
    if margin:
        dx, dy = (x1 - x0) * margin, (y1 - y0) * margin
        x0, y0, x1, y1 = clip_bbox((x0 - dx, y0 - dy, x1 + dx, y1 + dy), img.size)
    w, h = x1 - x0, y1 - y0
    if max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
        raise ValueError(f"bbox [{x0}, {y0}, {x1}, {y1}] is {w}x{h} px, an aspect ratio over "
                         f"{MAX_ASPECT_RATIO}:1 that VLM processors refuse; make it less thin")
    out = img.crop((x0, y0, x1, y1))
    if size is not None and max(w, h) != size:
        scale = size / max(w, h)
        out = out.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample)
    return out
