"""The `zoom` tool: crop a region of one of the episode's images and show it enlarged.

The agent loop passes the episode's images in a `ToolContext` (the prompt's, then earlier tool
results', in order); the model names one by index and gives a box in that image's pixel
coordinates (or, with coords="norm1000", in 0..1000 relative coordinates as Qwen3-VL emits them).
Mistakes (no image, bad index, a box outside the image) come back as error results that state
what is valid, so the model can retry.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from mmopd.envs.images import ImageError, clip_bbox, crop, open_image, to_rgb

from .base import ToolContext, ToolResult, register_tool

COORDS = ("pixel", "norm1000")
# 224 px = 8 x 8 Qwen2/2.5-VL visual tokens (28 px each; 7 x 7 for Qwen3-VL's 32 px): enough to
# read a detail, cheap enough to call several times in one episode.
DEFAULT_SIZE = 224


class ZoomTool:
    """Crop `bbox` of image `image` from the episode and return it enlarged to `size` px."""

    name = "zoom"
    needs_context = True  # call_tool passes the episode's images as run(args, context)

    def __init__(self, size: int | None = DEFAULT_SIZE, coords: str = "pixel",
                 margin: float = 0.0) -> None:
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"zoom: size must be a positive int (pixels) or None (the crop's "
                             f"own resolution), got {size!r}")
        if coords not in COORDS:
            raise ValueError(f"zoom: coords must be one of {COORDS}, got {coords!r}")
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not (
                0 <= margin <= 1):
            raise ValueError(f"zoom: margin must be a number in [0, 1], got {margin!r}")
        self.size, self.coords, self.margin = size, coords, float(margin)
        units = ("pixel coordinates of the image (origin top-left)" if coords == "pixel"
                 else "coordinates from 0 to 1000 relative to the image's width and height")
        self.description = ("Zoom into a region of an image: returns the region enlarged so "
                            "small details become visible. Give the box as [x0, y0, x1, y1] "
                            f"(left, top, right, bottom) in {units}.")
        self.parameters: dict[str, Any] = {
            "type": "object",
            "properties": {
                "bbox": {"type": "array", "items": {"type": "number"}, "minItems": 4,
                         "maxItems": 4,
                         "description": f"[x0, y0, x1, y1] of the region, in {units}"},
                "image": {"type": "integer",
                          "description": "index of the image in the conversation (0 = first)",
                          "default": 0},
            },
            "required": ["bbox"],
        }

    def run(self, args: dict[str, Any], context: ToolContext | None = None) -> ToolResult:
        images = context.images if context is not None else []
        if not images:
            return ToolResult("Error: there is no image in this conversation to zoom into.",
                              error=True)
        index = args.get("image", 0)
        if isinstance(index, bool) or not isinstance(index, int) or not (
                0 <= index < len(images)):
            return ToolResult(f"Error: image {index!r} does not exist; this conversation has "
                              f"{len(images)} image(s), valid indices 0..{len(images) - 1}.",
                              error=True)
        img = images[index]
        if not isinstance(img, Image.Image):  # a local path: messages may name image files
            try:
                img = open_image(img)
            except (ImageError, TypeError) as e:
                return ToolResult(f"Error: image {index} cannot be read ({e}).", error=True)
        w, h = img.size
        bbox = args.get("bbox")
        pixel = self.coords == "pixel"
        limits = (w, h) if pixel else (1000, 1000)
        try:
            # validates: bbox is 4 finite numbers from here on
            box = clip_bbox(bbox, limits, units="px" if pixel else "relative units")
            if not pixel:  # to pixels, covering the region
                box = clip_bbox((box[0] * w / 1000, box[1] * h / 1000, box[2] * w / 1000,
                                 box[3] * h / 1000), (w, h))
            out = to_rgb(crop(img, box, margin=self.margin, size=self.size))
        except ValueError as e:
            lw, lh = limits
            units = "pixels" if pixel else "0..1000 relative coordinates"
            return ToolResult(f"Error: {e}. Image {index} is {w}x{h} px; give bbox as "
                              f"[x0, y0, x1, y1] in {units} with 0 <= x0 < x1 <= {lw} and "
                              f"0 <= y0 < y1 <= {lh}.", error=True)
        x0, y0, x1, y1 = (float(v) for v in bbox)
        clipped = x0 < 0 or y0 < 0 or x1 > limits[0] or y1 > limits[1]
        where = f"{list(box)}" + (" (clipped to the image)" if clipped else "")
        if not pixel:
            where = f"{[_num(v) for v in bbox]} (0..1000) = pixels {where}"
        return ToolResult(f"Zoomed into {where} of image {index} ({w}x{h} px), shown at "
                          f"{out.width}x{out.height} px.", images=[out])


def _num(v: float) -> int | float:
    return int(v) if float(v).is_integer() else float(v)


register_tool("zoom", ZoomTool)
