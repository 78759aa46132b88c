"""mmopd/VisionQA-v0: visual question answering where the answer sits in a small image region.

Each episode is one question about one or more images; the reply's last "Answer: X" is graded.
The teacher's privileged view shows the evidence region (the bbox) cropped and enlarged; a
negative view shows an irrelevant region of the same size (for V-Zero-style gating). With
zoom=True the student may call the `zoom` tool over several turns before answering.

source="synthetic" draws scenes (envs/vision_synth.py): a black frame holds the target (a coloured
square, 1-4 dots or a digit) among distractors of the same kind outside it, so the answer depends
on finding the frame. A JSONL file gives real data (see `load_rows`). Messages carry images as
content items::

    {"role": "user", "content": [{"type": "image", "image": <PIL RGB>},
                                 {"type": "text", "text": question}]}
"""

from __future__ import annotations

import operator
import os
import random
import warnings
import zlib
from pathlib import Path
from typing import Any

import gymnasium
from PIL import Image

from mmopd.rollout.toolcalls import format_call

from .images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    clip_bbox,
    crop,
    open_image,
)
from .registration import careless_rate, reset_index
from .sources import JSONL_SUFFIXES, SourceSpec, env_source_spec
from .spaces import text_space
from .vision_data import (  # VisionQA's data and grading, importable from here too
    IMAGE_MARKER,
    VisionDatasetError,
    VisionProblem,
    grade_answer,
    load_rows,
    load_source_rows,
)
from .vision_synth import (
    LAYOUTS,
    QUESTIONS,
    TASKS,
    Scene,
    SynthConfig,
    _test_keys,
    _test_scenes,
    answer_of,
    generate_scene,
    render_scene,
)

TEACHER_VIEWS = ("crop", "crop+full", "full")
DEFAULT_SYSTEM = ("Answer the question about the image. End your reply with "
                  "'Answer: <answer>'.")
ZOOM_SYSTEM = ("Answer the question about the image. You can call the zoom tool with a box "
               "[x0, y0, x1, y1] in the image's pixel coordinates to see that region enlarged. "
               "End your reply with 'Answer: <answer>'.")
_SHOWN_ERRORS = 5  # row errors quoted in the load warning; all are in env.row_errors

# ----------------------------------------------------------------------------- env


def _image_item(img: Image.Image) -> dict[str, Any]:
    return {"type": "image", "image": img}


def _content(text: str, images: list[Image.Image]) -> list[dict[str, Any]]:
    """Images where the `<image>` markers are, else first; then the text."""
    pieces = text.split(IMAGE_MARKER)
    if len(pieces) == 1:
        return [*map(_image_item, images), {"type": "text", "text": text}]
    out: list[dict[str, Any]] = []
    for i, piece in enumerate(pieces):
        if piece:
            out.append({"type": "text", "text": piece})
        if i < len(images):
            out.append(_image_item(images[i]))
    return out


def _negative_box(bbox: tuple[int, int, int, int], size: tuple[int, int],
                  rng: random.Random) -> tuple[int, int, int, int] | None:
    """A box of bbox's size inside the image that does not overlap bbox, or None if none fits."""
    (x0, y0, x1, y1), (w, h) = bbox, size
    bw, bh = x1 - x0, y1 - y0
    ranges = []  # (x range, y range) of the top-left corner, one per side of bbox
    if x0 >= bw:
        ranges.append(((0, x0 - bw), (0, h - bh)))
    if w - x1 >= bw:
        ranges.append(((x1, w - bw), (0, h - bh)))
    if y0 >= bh:
        ranges.append(((0, w - bw), (0, y0 - bh)))
    if h - y1 >= bh:
        ranges.append(((0, w - bw), (y1, h - bh)))
    if not ranges:
        return None
    (xa, xb), (ya, yb) = rng.choice(ranges)
    x, y = rng.randint(xa, xb), rng.randint(ya, yb)
    return x, y, x + bw, y + bh


def _degraded(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The image shrunk 8x (details gone) and brought back to `size`."""
    small = img.resize((max(1, img.width // 8), max(1, img.height // 8)), Image.Resampling.BOX)
    return small.resize(size, Image.Resampling.BICUBIC)


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


class VisionQAEnv(gymnasium.Env):
    """One visual question per episode; tool turns (zoom=True) are free, the first plain reply
    is graded.

    source: "synthetic", a JSONL path (`load_rows`) or a dataset (envs/sources.py, preset "vqa").
    split: synthetic "train" is endless (seed i names problem i, never a held-out one), "test"
        a fixed set of `test_size`. task, image_size, num_distractors, box_size: the scenes;
        layout "random" (anywhere) or "grid" (each object fills one box_size cell).
    crop_size: longer side of the teacher's crop, the negative crop and the zoom tool's output,
        so a student that zooms sees exactly the teacher's view. 56 = 2x the synthetic frame;
        for photos pass more (e.g. 448) or None (the crop's own resolution).
    teacher_view: "crop" (the crop replaces the first image), "crop+full" (the crop follows it)
        or "full". Rows without a bbox give the teacher the student's view (info["teacher_view"]
        says "full"), so privileged-view training over a mixed file does not stop.
    info["negative_messages"]: the teacher's layout with a same-size region disjoint from the
        bbox in place of the crop ("crop" layout when teacher_view="full"); when no such region
        fits, or the row has no bbox, the image shrunk 8x instead.
    max_pixels: file images above it are downscaled when loaded (their bbox with them).
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, source: str | os.PathLike[str] = "synthetic", split: str = "train",
                 task: str = "color", image_size: int = 112, num_distractors: int = 3,
                 box_size: int = 28, crop_size: int | None = 56,
                 system_prompt: str | None = DEFAULT_SYSTEM, zoom: bool = False,
                 teacher_view: str = "crop", test_size: int = 200,
                 max_pixels: int = DEFAULT_MAX_PIXELS, careless: float = 0.0,
                 layout: str = "random", subset: str | None = None,
                 source_split: str | None = None, preset: str | None = None,
                 fields: dict[str, str] | None = None) -> None:
        if not isinstance(source, (str, os.PathLike)) or not str(source):
            raise ValueError(f"source must be 'synthetic', a JSONL file or a dataset, got "
                             f"{source!r}")
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        _check_int("box_size", box_size, 16)
        _check_int("image_size", image_size, box_size)
        _check_int("num_distractors", num_distractors, 0)
        _check_int("test_size", test_size, 1)
        _check_int("max_pixels", max_pixels, 1)
        if crop_size is not None:
            _check_int("crop_size", crop_size, 1)
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise ValueError(f"system_prompt must be a string or None, got {system_prompt!r}")
        if not isinstance(zoom, bool):
            raise ValueError(f"zoom must be true or false, got {zoom!r}")
        if teacher_view not in TEACHER_VIEWS:
            raise ValueError(f"teacher_view must be one of {TEACHER_VIEWS}, got {teacher_view!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        config = SynthConfig(task, image_size, box_size, num_distractors, layout)
        k = config.side
        if k * k < num_distractors + 1:
            raise ValueError(f"num_distractors={num_distractors} do not fit: an image_size="
                             f"{image_size} canvas holds at most {k * k - 1} distractors of "
                             f"box_size={box_size} ({layout} layout); lower num_distractors or "
                             "raise image_size")
        careless = careless_rate(careless)
        if careless and (str(source) != "synthetic" or num_distractors < 1):
            raise ValueError("careless needs synthetic scenes with distractors (a careless "
                             "demonstration describes a distractor instead of the framed object)")
        self.careless = careless
        self.source, self.split, self.zoom, self.teacher_view = str(source), split, zoom, \
            teacher_view
        self.crop_size, self.test_size, self.max_pixels = crop_size, test_size, max_pixels
        if zoom and system_prompt == DEFAULT_SYSTEM:
            system_prompt = ZOOM_SYSTEM
        self.system_prompt = system_prompt
        self.config = config
        self.row_errors: list[str] = []  # every skipped row of a file, "file:LINE: problem"

        self._rows: tuple[VisionProblem, ...] | None = None
        self._scenes: tuple[Scene, ...] | None = None
        if self.source == "synthetic":
            if split == "test":
                self._scenes = _test_scenes(self.config, test_size)
            self.observation_space = text_space()
            self.num_problems: int | None = None if self._scenes is None else len(self._scenes)
        elif Path(source).suffix.lower() in JSONL_SUFFIXES and not (preset or fields):
            self._rows = self._load(Path(source))
        else:  # a dataset (hub id, save_to_disk folder, Parquet, CSV) or a mapped JSONL
            spec = env_source_spec(source, split, subset=subset, source_split=source_split,
                                   preset=preset, fields=fields)
            self._rows = self._load_dataset(spec)
        if self._rows is not None:
            questions = [p.question for p in self._rows]
            self.observation_space = text_space(
                max(8192, *map(len, questions)), extra_chars="".join(set("".join(questions))))
            self.num_problems = len(self._rows)
        self.action_space = text_space()
        self._current: VisionProblem | None = None
        self._bbox: tuple[int, int, int, int] | None = None  # of the current images
        self._seed: int | None = None  # of the current episode (careless demonstrations)
        self._evidence: Image.Image | None = None  # the current teacher view's crop

    def _load_dataset(self, spec: SourceSpec) -> tuple[VisionProblem, ...]:
        problems, self.row_errors, image_errors = load_source_rows(spec)
        if not problems:
            raise VisionDatasetError(f"{spec.source}: no valid row; first problems:\n  "
                                     + "\n  ".join(self.row_errors[:_SHOWN_ERRORS]))
        if image_errors:
            warnings.warn(f"{spec.source}: skipped {len(image_errors)} row(s) with unusable "
                          "images or boxes: " + "; ".join(image_errors[:_SHOWN_ERRORS]),
                          stacklevel=3)
        return tuple(problems)

    def _load(self, path: Path) -> tuple[VisionProblem, ...]:
        problems, self.row_errors = load_rows(path)
        if not problems:
            shown = "\n  ".join(self.row_errors[:_SHOWN_ERRORS]) or "the file has no rows"
            raise VisionDatasetError(f"{path}: no valid row; first problems:\n  {shown}")
        if self.row_errors:
            more = len(self.row_errors) - _SHOWN_ERRORS
            warnings.warn(f"{path}: skipped {len(self.row_errors)} bad row(s) of "
                          f"{len(problems) + len(self.row_errors)}: "
                          + "; ".join(self.row_errors[:_SHOWN_ERRORS])
                          + (f"; ... and {more} more" if more > 0 else "")
                          + " (all of them: env.unwrapped.row_errors)", stacklevel=3)
        return tuple(problems)

    def _scene_problem(self, scene: Scene, name: str) -> VisionProblem:
        x, y, _ = scene.frame
        b = self.config.box_size
        return VisionProblem(QUESTIONS[self.config.task], scene.answer,
                             f"visionqa-{self.config.task}-{name}", f"synthetic {name}",
                             bbox=(x, y, x + b, y + b), scene=scene)

    def problem(self, i: int) -> VisionProblem:
        """The i-th problem of a finite set; for the endless train split, the problem of seed i."""
        i = operator.index(i)
        if self.num_problems is not None and not 0 <= i < self.num_problems:
            raise IndexError(f"problem index {i} out of range: this set has {self.num_problems} "
                             f"problems (valid indices 0..{self.num_problems - 1})")
        if self._rows is not None:
            return self._rows[i]
        if self._scenes is not None:
            return self._scene_problem(self._scenes[i], f"test-{i}")
        if i < 0:
            raise IndexError(f"problem seed must be >= 0, got {i}")
        rng, held_out = random.Random(i), _test_keys(self.config, self.test_size)
        while True:  # train never shows a held-out problem
            scene = generate_scene(rng, self.config)
            if scene.key not in held_out:
                return self._scene_problem(scene, str(i))

    def _images(self, p: VisionProblem
                ) -> tuple[list[Image.Image], tuple[int, int, int, int] | None]:
        """The problem's RGB images and its bbox in their pixels (files may be downscaled)."""
        if p.scene is not None:
            return [render_scene(p.scene, self.config)], p.bbox
        images = []
        for f in p.images:
            try:
                images.append(open_image(f, max_pixels=self.max_pixels))
            except ImageError as e:
                raise ImageError(f"{p.where}: {e}") from e
        bbox = p.bbox
        if bbox is not None and images[0].size != p.sizes[0]:
            sx, sy = (n / o for n, o in zip(images[0].size, p.sizes[0]))
            bbox = clip_bbox((bbox[0] * sx, bbox[1] * sy, bbox[2] * sx, bbox[3] * sy),
                             images[0].size)
        return images, bbox

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        super().reset(seed=seed)
        index = reset_index(options)
        size = self.num_problems
        if index is not None:
            if size is None:
                raise ValueError("options['index'] needs a finite set (split='test' or a file)")
            p = self.problem(index)
        elif size is not None:
            p = self.problem(int(self.np_random.integers(size)))
        else:  # the seed itself names the problem, so the same seed always gives the same one
            p = self.problem(seed if seed is not None else int(self.np_random.integers(2**62)))
        images, bbox = self._images(p)
        self._current, self._bbox, self._seed, self._evidence = p, bbox, seed, None
        text = p.question
        if self.zoom:  # the model needs the sizes to give pixel coordinates
            sizes = [f"{im.width}x{im.height} px" for im in images]
            text += (f"\n(The image is {sizes[0]}.)" if len(images) == 1 else
                     "\n(Image sizes: " + ", ".join(f"image {i} is {s}"
                                                    for i, s in enumerate(sizes)) + ".)")
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        info: dict[str, Any] = {
            "messages": system + [{"role": "user", "content": _content(text, images)}],
            "answer": p.answer,
            "solution": f"Answer: {self._demonstrated_answer(p, seed)}",
            "problem_id": p.id,
            "bbox": list(bbox) if bbox is not None else None,
        }
        rng = random.Random(zlib.crc32(p.id.encode()))  # negative region: fixed per problem
        if bbox is None:  # no evidence region: the teacher sees what the student sees
            info["teacher_view"] = "full"
            info["teacher_messages"] = system + [{"role": "user",
                                                  "content": _content(text, images)}]
            neg = _degraded(images[0], images[0].size)
            info["negative_messages"] = system + [
                {"role": "user", "content": _content(text, [neg, *images[1:]])}]
        else:
            info["teacher_view"] = self.teacher_view
            evidence = crop(images[0], bbox, size=self.crop_size)
            self._evidence = evidence
            box = _negative_box(bbox, images[0].size, rng)
            neg = (crop(images[0], box, size=self.crop_size) if box is not None
                   else _degraded(images[0], evidence.size))
            view = self.teacher_view
            info["teacher_messages"] = system + [self._view(view, text, images, evidence, bbox)]
            info["negative_messages"] = system + [
                self._view("crop" if view == "full" else view, text, images, neg, bbox)]
        if self.zoom:
            info["tools"] = [{"name": "zoom", "size": self.crop_size}]
        return p.question, info

    def _demonstrated_answer(self, p: VisionProblem, seed: int | None) -> str:
        """The answer a demonstration of the full image gives: the right one, or with
        probability `careless` (seeded per problem) the answer of the first distractor."""
        if self.careless and p.scene is not None and p.scene.distractors:
            if random.Random(f"careless-{p.id}-{seed}").random() < self.careless:
                return answer_of(p.scene.distractors[0][2], self.config)
        return p.answer

    @staticmethod
    def _view(view: str, text: str, images: list[Image.Image], region: Image.Image,
              bbox: tuple[int, int, int, int]) -> dict[str, Any]:
        """The user message of a teacher view, with `region` as the enlarged evidence."""
        if view == "full":
            return {"role": "user", "content": _content(text, images)}
        where = f"[{bbox[0]}, {bbox[1]}, {bbox[2]}, {bbox[3]}]"
        if view == "crop":
            first = "The image" if len(images) == 1 else "The first image"
            note = f"({first} is shown zoomed in on its region {where}.)"
            return {"role": "user",
                    "content": _content(f"{text}\n{note}", [region, *images[1:]])}
        note = f"(Image 2 is the region {where} of image 1, zoomed in.)"
        content = _content(f"{text}\n{note}", images)
        first = next(i for i, item in enumerate(content) if item["type"] == "image")
        content.insert(first + 1, _image_item(region))
        return {"role": "user", "content": content}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        if self._current is None:
            raise RuntimeError("VisionQAEnv.step() called before reset(): every episode ends "
                               "with its graded reply, call reset() to get a new problem first")
        if not isinstance(action, str):
            raise TypeError(f"action must be the reply text (str), got {type(action).__name__}")
        correct, pred = grade_answer(action, self._current.answer)
        self._current = None
        return "", float(correct), True, False, {"correct": correct, "pred": pred}

    def expert_reply(self, messages: list[dict[str, Any]]) -> str:
        """Zoom into the evidence first (zoom=True, while no zoom has succeeded), then answer."""
        if self._current is None:
            raise RuntimeError("expert_reply() needs a running episode (call reset() first)")
        if self.zoom and self._bbox is not None and not any(map(_zoomed, messages)):
            return format_call("zoom", {"bbox": list(self._bbox)})
        shown = [item.get("image") for m in messages if isinstance(m.get("content"), list)
                 for item in m["content"] if isinstance(item, dict)]
        if self._evidence is not None and any(im is self._evidence for im in shown):
            return f"Answer: {self._current.answer}"  # the crop shows no distractor to name
        return f"Answer: {self._demonstrated_answer(self._current, self._seed)}"


def _zoomed(message: dict[str, Any]) -> bool:
    """A successful zoom result: a tool message whose text does not start with "Error"."""
    if message.get("role") != "tool" or message.get("name", "zoom") != "zoom":
        return False
    content = message.get("content", "")
    if isinstance(content, list):
        texts = [c.get("text", "") for c in content if isinstance(c, dict) and c.get("type")
                 == "text"]
        content = texts[0] if texts else ""
    return not str(content).lstrip().startswith("Error")
