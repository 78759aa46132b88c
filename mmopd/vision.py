"""Images for vision-language students: qwen-vl-utils' image path, the model's image processor,
and the tensors a Qwen-VL forward needs.

A chat message carries images as content items (`{"type": "image", "image": PIL image or local
path}`). `VisionProcessor` loads and resizes them with qwen-vl-utils (`fetch_image`: RGB, sides
multiples of patch x merge, pixel count within [min_pixels, max_pixels]), turns them into
`pixel_values` / `image_grid_thw` with the checkpoint's image processor (no second resize), and
expands each `<|image_pad|>` the chat template writes into one token per merged patch group, as
the Qwen2-VL, Qwen2.5-VL and Qwen3-VL processors do. It needs no video processor, so it works
where transformers' `ProcessorMixin` cannot be built (no torchvision).

qwen-vl-utils imports torchvision at module level, for videos only. On CPU-only installs (PyPI
has no CPU torchvision for every torch) `qwen_vl_utils()` imports it with a stand-in torchvision
that exists only inside qwen_vl_utils and raises a clear error if a video path is ever used.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import types
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
VISION_TOKENS = (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)


class VisionError(ValueError):
    """Images that cannot be used with this model (bad item, count mismatch, video, ...)."""


# ----------------------------------------------------------------------------- qwen-vl-utils


class _NoTorchvision:
    """Stands in for torchvision objects inside qwen_vl_utils: any use is a clear error."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> _NoTorchvision:
        return _NoTorchvision(f"{self._name}.{attr}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ImportError(f"{self._name} needs torchvision, which is not importable here; mmopd "
                          "uses qwen-vl-utils for images only (install a torchvision matching "
                          "your torch for videos)")


def _stand_in_torchvision() -> dict[str, types.ModuleType]:
    mods = {}
    for name in ("torchvision", "torchvision.io", "torchvision.transforms"):
        mod = types.ModuleType(name)
        mod.__getattr__ = lambda attr, _n=name: _NoTorchvision(f"{_n}.{attr}")  # type: ignore
        mod.__version__ = "0.0.0+unavailable"  # type: ignore[attr-defined]
        mods[name] = mod
    mods["torchvision"].io = mods["torchvision.io"]  # type: ignore[attr-defined]
    mods["torchvision"].transforms = mods["torchvision.transforms"]  # type: ignore[attr-defined]
    return mods


@cache
def qwen_vl_utils() -> types.ModuleType:
    """The `qwen_vl_utils` module, importable with or without a working torchvision.

    With torchvision importable this is a plain import. Without it (not installed, or a CUDA
    build next to CPU torch, which fails on import), qwen_vl_utils is imported with stand-in
    torchvision modules that are removed from `sys.modules` right after, so no other library
    ever sees them; its image functions (`fetch_image`, `smart_resize`, `process_vision_info` on
    images) never touch torchvision.
    """
    try:
        return importlib.import_module("qwen_vl_utils")
    except ModuleNotFoundError as e:
        if e.name != "torchvision":
            raise ImportError("qwen-vl-utils is not installed: pip install qwen-vl-utils") from e
    except (ImportError, OSError, RuntimeError, AttributeError):
        pass  # torchvision is installed but broken (e.g. compiled for another torch)
    for name in [m for m in sys.modules if m == "qwen_vl_utils" or m.startswith("qwen_vl_utils.")
                 or m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # drop half-imported modules of the failed attempt
    stand_in = _stand_in_torchvision()
    sys.modules.update(stand_in)
    try:
        return importlib.import_module("qwen_vl_utils")
    finally:
        for name in stand_in:
            sys.modules.pop(name, None)


# ----------------------------------------------------------------------------- tensors


@dataclass
class VisionInputs:
    """The image processor's output for the images of one token sequence, in order."""

    pixel_values: torch.Tensor
    """[patches, channels x temporal_patch x patch x patch]: every image's patches, in order."""
    image_grid_thw: torch.Tensor
    """[images, 3] long: each image's grid in patches (time, height, width)."""
    images: tuple[Any, ...] | None = field(default=None, compare=False, repr=False)
    """The resized RGB images the pixel values came from, in order (an engine that runs its own
    image processor, vLLM, takes these); None where only the tensors are known."""

    def __post_init__(self) -> None:
        n = int(self.image_grid_thw.prod(-1).sum()) if len(self.image_grid_thw) else 0
        if n != self.pixel_values.shape[0]:
            raise VisionError(f"pixel_values has {self.pixel_values.shape[0]} patches but "
                              f"image_grid_thw describes {n}")

    @property
    def num_images(self) -> int:
        return int(self.image_grid_thw.shape[0])

    def select(self, start: int, stop: int | None = None) -> VisionInputs | None:
        """Images start..stop-1 (None when that is no image)."""
        grid = self.image_grid_thw[start:stop]
        if not len(grid):
            return None
        sizes = self.image_grid_thw.prod(-1)
        begin = int(sizes[:start].sum())
        return VisionInputs(self.pixel_values[begin: begin + int(grid.prod(-1).sum())], grid,
                            self.images[start:stop] if self.images is not None else None)

    @staticmethod
    def cat(parts: Iterable[VisionInputs | None]) -> VisionInputs | None:
        """Concatenate in order, skipping None (None when there is no image at all)."""
        present = [p for p in parts if p is not None and p.num_images]
        if not present:
            return None
        if len(present) == 1:
            return present[0]
        images = (tuple(im for p in present for im in p.images)  # type: ignore[union-attr]
                  if all(p.images is not None for p in present) else None)
        return VisionInputs(torch.cat([p.pixel_values for p in present]),
                            torch.cat([p.image_grid_thw for p in present]), images)


def forward_kwargs(model: PreTrainedModel, input_ids_BT: torch.Tensor,
                   vision: VisionInputs | None) -> dict[str, torch.Tensor]:
    """Extra forward/generate inputs for the images of a batch (rows' images concatenated in
    row order). `mm_token_type_ids` marks image tokens: recent transformers need it to compute
    the 3-D multimodal rope positions and silently fall back to 1-D positions without it."""
    if vision is None:
        return {}
    device = input_ids_BT.device
    out = {"pixel_values": vision.pixel_values.to(device),
           "image_grid_thw": vision.image_grid_thw.to(device)}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # LoRA
    if _takes_mm_token_type_ids(type(base)):
        out["mm_token_type_ids"] = (input_ids_BT == model.config.image_token_id).int()
    return out


@cache
def _takes_mm_token_type_ids(cls: type) -> bool:
    return "mm_token_type_ids" in inspect.signature(cls.forward).parameters


def is_vision_model(model_or_config: Any) -> bool:
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "vision_config", None) is not None


# ----------------------------------------------------------------------------- processing


def image_items(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The image content items of some messages, in order of appearance."""
    items = []
    for m in messages:
        content = m.get("content")
        if not isinstance(content, list):
            continue
        for item in content:
            if not isinstance(item, dict):
                raise VisionError(f"message content items must be dicts, got {type(item).__name__}")
            kind = item.get("type")
            if kind == "video" or "video" in item:
                raise VisionError("video content is not supported (images only)")
            if kind in ("image", "image_url") or "image" in item or "image_url" in item:
                items.append(item)
    return items


class VisionProcessor:
    """Images of chat messages -> resized RGB images -> `VisionInputs`, and the image-token
    expansion of rendered token ids. One per model family (students and teachers that share
    an episode must share its patch geometry)."""

    def __init__(self, image_processor: Any, tokenizer: PreTrainedTokenizerBase, *,
                 min_pixels: int | None = None, max_pixels: int | None = None) -> None:
        self.image_processor = image_processor
        self.patch_size = int(image_processor.patch_size)
        self.merge_size = int(image_processor.merge_size)
        self.temporal_patch_size = int(getattr(image_processor, "temporal_patch_size", 2))
        size = dict(getattr(image_processor, "size", None) or {})
        self.min_pixels = int(min_pixels or size.get("shortest_edge")
                              or getattr(image_processor, "min_pixels", 0) or 4 * self.factor ** 2)
        self.max_pixels = int(max_pixels or size.get("longest_edge")
                              or getattr(image_processor, "max_pixels", 0)
                              or 16384 * self.factor ** 2)
        if self.min_pixels > self.max_pixels:
            raise VisionError(f"min_pixels {self.min_pixels} > max_pixels {self.max_pixels}")
        vocab = tokenizer.get_vocab()
        missing = [t for t in (VISION_START, VISION_END, IMAGE_PAD) if t not in vocab]
        if missing:
            raise VisionError(f"the tokenizer has no {missing} token(s); a Qwen-VL tokenizer is "
                              "needed for images")
        self.image_token_id = vocab[IMAGE_PAD]
        self.special_ids = {vocab[t] for t in VISION_TOKENS if t in vocab}

    @property
    def factor(self) -> int:
        """Image sides are multiples of this many pixels (patch x merge)."""
        return self.patch_size * self.merge_size

    def fetch(self, item: dict[str, Any]) -> Any:
        """One content item -> an RGB PIL image resized by qwen-vl-utils' rules (the item's own
        min_pixels / max_pixels / resized_height / resized_width win over the defaults)."""
        ele = {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels, **item}
        src = ele.get("image", ele.get("image_url"))
        if isinstance(src, str) and src.startswith(("http://", "https://")):
            raise VisionError(f"image URLs are not fetched during rollouts ({src[:80]}); "
                              "download the images and use local paths")
        if isinstance(src, (str, Path)) and not str(src).startswith("data:"):
            path = Path(str(src).removeprefix("file://")).expanduser()
            if not path.is_file():
                raise VisionError(f"image file not found: {path}")
            ele["image"] = str(path)
        try:
            return qwen_vl_utils().fetch_image(ele, image_patch_size=self.patch_size)
        except VisionError:
            raise
        except Exception as e:  # PIL / qwen-vl-utils errors: name the image
            where = src if isinstance(src, (str, Path)) else type(src).__name__
            raise VisionError(f"cannot use image {str(where)[:120]}: "
                              f"{type(e).__name__}: {e}") from e

    def encode(self, images: Sequence[Any]) -> VisionInputs | None:
        """Resized RGB images -> pixel values and patch grids (no second resize)."""
        if not images:
            return None
        out = self.image_processor(images=list(images), do_resize=False, return_tensors="pt")
        return VisionInputs(out["pixel_values"], out["image_grid_thw"].long(), tuple(images))

    def process(self, messages: Sequence[dict[str, Any]]) -> VisionInputs | None:
        """Every image of these messages, in order, as model inputs."""
        return self.encode([self.fetch(it) for it in image_items(messages)])

    def tokens_per_image(self, vision: VisionInputs | None) -> list[int]:
        if vision is None:
            return []
        return [int(n) // self.merge_size ** 2 for n in vision.image_grid_thw.prod(-1)]

    def expand(self, ids: list[int], vision: VisionInputs | None) -> list[int]:
        """Repeat each image placeholder once per merged patch group of its image."""
        counts = self.tokens_per_image(vision)
        pads = sum(1 for t in ids if t == self.image_token_id)
        if pads != len(counts):
            raise VisionError(f"the chat template wrote {pads} image placeholder(s) for "
                              f"{len(counts)} image(s); every image needs exactly one")
        out: list[int] = []
        k = 0
        for t in ids:
            if t == self.image_token_id:
                out += [t] * counts[k]
                k += 1
            else:
                out.append(t)
        return out

    def collapse(self, ids: list[int], vision: VisionInputs | None) -> list[int]:
        """The inverse of `expand`: one placeholder per image, for an engine that expands them
        itself from the images (vLLM). Each run of placeholders must be exactly its image's."""
        counts = self.tokens_per_image(vision)
        out: list[int] = []
        runs: list[int] = []
        for t in ids:
            if t == self.image_token_id and out and out[-1] == t:
                runs[-1] += 1
                continue
            if t == self.image_token_id:
                runs.append(1)
            out.append(t)
        if runs != counts:
            raise VisionError(f"the prompt holds {len(runs)} image placeholder run(s) of "
                              f"{runs} token(s) for {len(counts)} image(s) needing {counts}: "
                              "every image needs exactly one run of its own size")
        return out

    def engine_prompt(self, ids: list[int], vision: VisionInputs) -> tuple[list[int], list[Any]]:
        """(ids with one placeholder per image, the resized images): what an engine that runs
        its own image processor (vLLM, in process or served) is given for a rendered prompt."""
        if vision.images is None:
            raise VisionError("the episode's images were kept as tensors only; an engine that "
                              "processes images itself needs the resized images "
                              "(VisionProcessor.encode keeps them)")
        return self.collapse(list(ids), vision), list(vision.images)

    def save_pretrained(self, out_dir: str | Path) -> None:
        self.image_processor.save_pretrained(str(out_dir))
