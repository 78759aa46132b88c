"""Synthetic scenes for mmopd/VisionQA-v0: a black frame holds the target (a coloured square,
1-4 dots or a digit) among distractors of the same kind outside it, so the answer depends on a
small region of a larger image and a crop of the frame genuinely helps.

Scenes are seeded and drawn without numpy randomness (the held-out set is byte-identical on every
machine); a scene is generated first (positions and answers, `generate_scene`) and rendered when
needed (`render_scene`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TASKS = ("color", "count", "digit")
LAYOUTS = ("random", "grid")
COLORS = {  # pure and far apart, so no colour can be mistaken for another (or the background)
    "red": (255, 0, 0), "green": (0, 160, 0), "blue": (0, 0, 255),
    "yellow": (255, 255, 0), "purple": (128, 0, 128), "orange": (255, 128, 0),
}
_COLOR_NAMES = tuple(COLORS)
QUESTIONS = {
    "color": "What color is the square inside the black frame?",
    "count": "How many dots are inside the black frame?",
    "digit": "Which digit is inside the black frame?",
}
_TEST_SEED = 20_260_311  # fixed: the held-out set is identical on every machine
_GAP = 2  # px between objects, so a distractor never touches the frame and looks inside it

@dataclasses.dataclass(frozen=True)
class Scene:
    """A synthetic problem before rendering: where each object is and what it shows.

    An object is (x, y, spec) with (x, y) its box's top-left corner; spec is (colour,) for
    "color", (colour, dx, dy, ...) dot corners for "count", (digit,) for "digit".
    """

    frame: tuple[int, int, tuple[int, ...]]
    distractors: tuple[tuple[int, int, tuple[int, ...]], ...]
    answer: str
    background: int  # grey level of the background
    noise_seed: int
    grid: bool = False  # drawn on the grid layout (few frame positions)

    @property
    def key(self) -> tuple[Any, ...]:
        """What makes two problems "the same" (train/test split): frame position and answer;
        on the grid, whose nine cells leave few of those, also where the distractors are and
        what they show."""
        if not self.grid:
            return self.frame[0], self.frame[1], self.answer
        return (self.frame[0], self.frame[1], self.answer, *self.distractors)


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """The generator's settings (validated by VisionQAEnv)."""

    task: str = "color"
    image_size: int = 112
    box_size: int = 28
    num_distractors: int = 3
    # "random": anywhere, 2 px apart; "grid": each object fills one box_size cell of a grid, so
    # with box_size 28 every object is exactly one merged token of a Qwen2-VL-style processor
    # (14 px patches merged 2 x 2)
    layout: str = "random"

    @property
    def side(self) -> int:  # grid cells per side: the layout's, or random placement's fallback
        if self.layout == "grid":
            return self.image_size // self.box_size
        return (self.image_size + _GAP) // (self.box_size + _GAP)

    @property
    def line(self) -> int:  # frame outline width
        return max(1, round(self.box_size / 14))

    @property
    def capacity(self) -> int:  # distinct problem keys (at least): frame positions x answers
        answers = {"color": len(COLORS), "count": 4, "digit": 10}[self.task]
        if self.layout == "grid":
            cells = self.side ** 2
            return cells * answers * math.comb(cells - 1, self.num_distractors)
        return (self.image_size - self.box_size + 1) ** 2 * answers


def _place(rng: random.Random, cfg: SynthConfig, n: int) -> list[tuple[int, int]]:
    """n non-overlapping box positions: random cells of the grid layout; else random, or a
    random grid when random tries fail."""
    if cfg.layout == "grid":
        k = cfg.side  # the env checks k * k >= n
        return [(c % k * cfg.box_size, c // k * cfg.box_size) for c in rng.sample(range(k * k), n)]
    span, step = cfg.image_size - cfg.box_size, cfg.box_size + _GAP
    for _ in range(20):
        placed: list[tuple[int, int]] = []
        for _ in range(n):
            for _ in range(50):
                x, y = rng.randint(0, span), rng.randint(0, span)
                if all(abs(x - px) >= step or abs(y - py) >= step for px, py in placed):
                    placed.append((x, y))
                    break
            else:
                break
        if len(placed) == n:
            return placed
    k = cfg.side  # the env checks k * k >= n
    return [(c % k * step, c // k * step) for c in rng.sample(range(k * k), n)]


def _dots(rng: random.Random, cfg: SynthConfig, count: int) -> tuple[int, ...]:
    """Top-left corners of `count` dots, one per quadrant of the box's inside (never touching)."""
    inner = cfg.box_size - 2 * cfg.line
    cell = inner // 2
    d = max(2, cell // 2)
    out: list[int] = []
    for c in sorted(rng.sample(range(4), count)):
        out += [cfg.line + c % 2 * cell + rng.randint(1, max(1, cell - d - 1)),
                cfg.line + c // 2 * cell + rng.randint(1, max(1, cell - d - 1))]
    return tuple(out)


def generate_scene(rng: random.Random, cfg: SynthConfig) -> Scene:
    """A random scene: the target frame and `num_distractors` objects with other answers."""
    positions = _place(rng, cfg, 1 + cfg.num_distractors)
    if cfg.task == "color":
        answer = rng.randrange(len(COLORS))
        target: tuple[int, ...] = (answer,)
        others = [(c,) for c in range(len(COLORS)) if c != answer]
        label = _COLOR_NAMES[answer]
    elif cfg.task == "count":
        answer = rng.randint(1, 4)
        target = (rng.randrange(len(COLORS)), *_dots(rng, cfg, answer))
        others = [(rng.randrange(len(COLORS)), *_dots(rng, cfg, c))
                  for c in range(1, 5) if c != answer]
        label = str(answer)
    else:
        answer = rng.randrange(10)
        target = (answer,)
        others = [(d,) for d in range(10) if d != answer]
        label = str(answer)
    rng.shuffle(others)
    distractors = tuple((x, y, others[i % len(others)]) for i, (x, y) in enumerate(positions[1:]))
    # A mid-grey background sits near zero after the processors' mean/std normalisation, so
    # patch embeddings carry the objects, not the background. (On a light background a tiny
    # vision tower trained from scratch learned to ignore the image: colour accuracy stayed at
    # chance after 300 steps, against 0.65 after 150 steps on mid-grey.)
    return Scene((*positions[0], target), distractors, label, rng.randint(110, 140),
                 rng.getrandbits(32), cfg.layout == "grid")


def answer_of(spec: tuple[int, ...], cfg: SynthConfig) -> str:
    """The answer an object's spec shows (a distractor's, say): its colour name, dot count or
    digit."""
    if cfg.task == "color":
        return _COLOR_NAMES[spec[0]]
    if cfg.task == "count":
        return str(len(spec[1:]) // 2)
    return str(spec[0])


@functools.cache
def _digit_mask(digit: int, height: int) -> Image.Image:
    """The digit in PIL's built-in bitmap font (fixed glyphs: identical on every machine),
    scaled by an integer factor to at most `height` px so strokes stay crisp."""
    font = ImageFont.load_default_imagefont()
    glyph = Image.new("L", (12, 16))
    ImageDraw.Draw(glyph).text((0, 0), str(digit), fill=255, font=font)
    glyph = glyph.crop(glyph.getbbox())
    k = max(1, height // glyph.height)
    return glyph.resize((glyph.width * k, glyph.height * k), Image.Resampling.NEAREST)


def _draw_object(img: Image.Image, draw: ImageDraw.ImageDraw, cfg: SynthConfig, x: int, y: int,
                 spec: tuple[int, ...]) -> None:
    b = cfg.box_size
    if cfg.task == "color":
        side = b // 2
        o = (b - side) // 2
        draw.rectangle([x + o, y + o, x + o + side - 1, y + o + side - 1],
                       fill=COLORS[_COLOR_NAMES[spec[0]]])
    elif cfg.task == "count":
        d = max(2, (b - 2 * cfg.line) // 4)
        for dx, dy in zip(spec[1::2], spec[2::2]):
            draw.ellipse([x + dx, y + dy, x + dx + d - 1, y + dy + d - 1],
                         fill=COLORS[_COLOR_NAMES[spec[0]]])
    else:
        mask = _digit_mask(spec[0], (b - 2 * cfg.line) * 3 // 4)
        img.paste((0, 0, 0), (x + (b - mask.width) // 2, y + (b - mask.height) // 2), mask)


def render_scene(scene: Scene, cfg: SynthConfig) -> Image.Image:
    """The scene as an RGB image: grey noisy background, the framed target, the distractors."""
    s = cfg.image_size
    # Noise from random.Random (not numpy): its stream is fixed across Python versions and
    # machines, so the held-out images are identical everywhere.
    noise = np.frombuffer(random.Random(scene.noise_seed).randbytes(s * s), np.uint8)
    grey = (scene.background - 8 + noise % 17).astype(np.uint8).reshape(s, s)
    img = Image.fromarray(grey, "L").convert("RGB")
    draw = ImageDraw.Draw(img)
    fx, fy, target = scene.frame
    draw.rectangle([fx, fy, fx + cfg.box_size - 1, fy + cfg.box_size - 1], outline=(0, 0, 0),
                   width=cfg.line)
    for x, y, spec in ((fx, fy, target), *scene.distractors):
        _draw_object(img, draw, cfg, x, y, spec)
    return img


@functools.lru_cache(maxsize=16)
def _test_scenes(cfg: SynthConfig, size: int) -> tuple[Scene, ...]:
    # At most half the distinct problems are held out, so training always has problems left.
    size = min(size, cfg.capacity // 2)
    rng, seen, out = random.Random(_TEST_SEED), set(), []
    while len(out) < size:
        scene = generate_scene(rng, cfg)
        if scene.key not in seen:
            seen.add(scene.key)
            out.append(scene)
    return tuple(out)


@functools.lru_cache(maxsize=16)
def _test_keys(cfg: SynthConfig, size: int) -> frozenset[tuple[int, int, str]]:
    return frozenset(s.key for s in _test_scenes(cfg, size))
