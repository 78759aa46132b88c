"""The VisionQA env, the image utilities and the zoom tool: synthetic scenes show their answer,
splits hold, views and expert replies are right, and bad images and rows fail clearly."""

from __future__ import annotations

import json
import random
import struct
import subprocess
import sys
import warnings
import zlib
from collections import Counter

import numpy as np
import pytest
from conftest import check_env_quietly
from PIL import Image

from mmopd.envs import images as images_mod
from mmopd.envs import make_env
from mmopd.envs.images import ImageError, clip_bbox, crop, open_image, probe_image, to_rgb
from mmopd.envs.vision_qa import VisionDatasetError, VisionQAEnv, grade_answer
from mmopd.envs.vision_synth import (
    COLORS,
    SynthConfig,
    _digit_mask,
    _test_keys,
    answer_of,
    generate_scene,
)
from mmopd.rollout.toolcalls import HermesParser
from mmopd.tools import ToolContext, call_tool, list_tools, make_tool

VQA = "mmopd/VisionQA-v0"


def _image(info: dict, key: str = "messages", k: int = 0) -> Image.Image:
    """The k-th image of the last (user) message of a view."""
    items = [c["image"] for c in info[key][-1]["content"] if c["type"] == "image"]
    return items[k]


def _components(mask: np.ndarray) -> int:
    """Number of 4-connected components of True pixels."""
    seen, count = np.zeros_like(mask), 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        count += 1
        stack = [(y, x)]
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if (0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx]
                        and not seen[ny, nx]):
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return count


# ----------------------------------------------------------------------------- env checks


@pytest.mark.parametrize("kwargs", [
    {}, {"zoom": True}, {"task": "count", "split": "test", "test_size": 20,
                         "teacher_view": "crop+full"},
    {"task": "digit", "teacher_view": "full", "system_prompt": None},
])
def test_check_env_synthetic(kwargs):
    env = make_env(VQA, **kwargs)
    check_env_quietly(env)
    check_env_quietly(env.unwrapped)


def test_views_and_info_fields():
    env = VisionQAEnv(teacher_view="crop+full", zoom=True)
    obs, info = env.reset(seed=11)
    assert obs == "What color is the square inside the black frame?"
    user = info["messages"][-1]["content"]
    assert [c["type"] for c in user] == ["image", "text"] and "112x112 px" in user[1]["text"]
    assert info["messages"][0]["role"] == "system" and "zoom" in info["messages"][0]["content"]
    assert info["tools"] == [{"name": "zoom", "size": 56}]
    assert info["solution"] == f"Answer: {info['answer']}"
    teacher = info["teacher_messages"][-1]["content"]
    assert [c["type"] for c in teacher] == ["image", "image", "text"]
    full, crop_view = _image(info, "teacher_messages", 0), _image(info, "teacher_messages", 1)
    assert full.size == (112, 112) and crop_view.size == (56, 56)
    assert str(info["bbox"]) in teacher[2]["text"]
    neg = _image(info, "negative_messages", 1)
    assert neg.size == (56, 56) and neg.tobytes() != crop_view.tobytes()
    for key in ("messages", "teacher_messages", "negative_messages"):
        for c in info[key][-1]["content"]:
            assert c["type"] == "text" or c["image"].mode == "RGB"
    # the crop view replaces the image; the negative shows a region disjoint from the bbox
    _, info = VisionQAEnv().reset(seed=11)
    assert [c["type"] for c in info["teacher_messages"][-1]["content"]] == ["image", "text"]
    assert "tools" not in info and "zoom" not in info["messages"][0]["content"]


def test_determinism_and_fixed_held_out_set():
    a, b = VisionQAEnv(task="count"), VisionQAEnv(task="count")
    _, i1 = a.reset(seed=7)
    _, i2 = b.reset(seed=7)
    assert _image(i1).tobytes() == _image(i2).tobytes() and i1["bbox"] == i2["bbox"]
    assert i1["answer"] == i2["answer"] and i1["problem_id"] == i2["problem_id"]
    assert _image(a.reset(seed=8)[1]).tobytes() != _image(i1).tobytes()
    test = VisionQAEnv(split="test", test_size=50)
    assert test.num_problems == 50 and VisionQAEnv().num_problems is None
    first = test.reset(options={"index": 0})[1]
    again = VisionQAEnv(split="test", test_size=50).reset(options={"index": 0})[1]
    assert _image(first).tobytes() == _image(again).tobytes()
    # pinned: the held-out set must not change silently (it would break comparisons over time);
    # the colour task draws only rectangles, which render identically in every Pillow version
    assert (first["bbox"], first["answer"]) == ([6, 27, 34, 55], "orange")
    assert zlib.crc32(_image(first).tobytes()) == 3115139894
    assert len({tuple(test.reset(options={"index": i})[1]["bbox"]) for i in range(50)}) > 40
    with pytest.raises(IndexError, match="0..49"):
        test.reset(options={"index": 50})
    with pytest.raises(ValueError, match="finite set"):
        VisionQAEnv().reset(options={"index": 0})


def test_train_never_shows_a_held_out_problem():
    # A small canvas makes collisions likely: 17 x 17 frame positions x 4 answers = 1156 keys,
    # 200 of them held out, so ~17% of raw train draws would be test problems.
    kw = {"task": "count", "image_size": 32, "box_size": 16, "num_distractors": 0}
    cfg = SynthConfig(**kw)
    held = _test_keys(cfg, 200)
    assert len(held) == 200
    raw = {generate_scene(random.Random(i), cfg).key for i in range(300)}
    assert raw & held  # the check below is not vacuous
    env = VisionQAEnv(**kw)
    shown = set()
    for seed in range(300):
        info = env.reset(seed=seed)[1]
        x0, y0 = info["bbox"][:2]
        shown.add((x0, y0, info["answer"]))
    assert not shown & held
    test, test_keys = VisionQAEnv(split="test", **kw), set()
    for i in range(200):
        info = test.reset(options={"index": i})[1]
        test_keys.add((*info["bbox"][:2], info["answer"]))
    assert test_keys == held



def test_grid_layout_puts_each_object_in_its_own_cell_and_keeps_the_split():
    kw = {"image_size": 84, "num_distractors": 1, "layout": "grid"}
    cfg = SynthConfig("color", 84, 28, 1, "grid")
    cells = set()
    for seed in range(60):
        scene = generate_scene(random.Random(seed), cfg)
        spots = [scene.frame[:2], *(d[:2] for d in scene.distractors)]
        assert all(x % 28 == 0 == y % 28 and x <= 56 and y <= 56 for x, y in spots)
        assert len(set(spots)) == 2
        cells.add(scene.frame[:2])
    assert len(cells) == 9  # every cell of the 3 x 3 grid holds the frame sometimes
    # nine cells x six colours would leave 27 held-out problems; where the distractor is and
    # what it shows count too, so the full 200 are held out and train still never shows one
    held = _test_keys(cfg, 200)
    assert len(held) == 200
    env, test = VisionQAEnv(**kw), VisionQAEnv(split="test", **kw)
    assert test.num_problems == 200
    raw = {generate_scene(random.Random(seed), cfg).key for seed in range(300)}
    assert raw & held  # the check below is not vacuous
    shown = {env.problem(seed).scene.key for seed in range(300)}
    assert not shown & held
    info = env.reset(seed=0)[1]
    assert info["bbox"][0] % 28 == 0 == info["bbox"][1] % 28
    with pytest.raises(ValueError, match="layout"):
        VisionQAEnv(layout="diagonal")
    with pytest.raises(ValueError, match="grid layout"):  # 3 x 3 cells hold 8 distractors
        VisionQAEnv(image_size=84, num_distractors=9, layout="grid")
    VisionQAEnv(image_size=84, num_distractors=8, layout="grid").reset(seed=0)

@pytest.mark.parametrize("task", ["color", "count", "digit"])
def test_answer_is_visible_in_the_frame_only(task):
    env = VisionQAEnv(task=task)
    palette = {v: k for k, v in COLORS.items()}
    for seed in range(25):
        info = env.reset(seed=seed)[1]
        img = np.asarray(_image(info))
        x0, y0, x1, y1 = info["bbox"]
        assert 0 <= x0 < x1 <= 112 and 0 <= y0 < y1 <= 112 and x1 - x0 == 28 == y1 - y0
        frame = img[y0:y1, x0:x1]
        assert (frame[0] == 0).all() and (frame[:, -1] == 0).all()  # the black outline
        inside = frame[2:-2, 2:-2]
        scene = generate_scene(random.Random(seed), SynthConfig(task))
        assert all(d[2] != scene.frame[2] for d in scene.distractors)
        if task == "color":
            colours = Counter(palette.get(tuple(p)) for p in inside.reshape(-1, 3))
            colours.pop(None, None)
            assert list(colours) == [info["answer"]] and colours[info["answer"]] == 14 * 14
            outside = img.copy()
            outside[y0:y1, x0:x1] = 255
            assert not (outside == COLORS[info["answer"]]).all(-1).any()
            others = {palette.get(tuple(p)) for p in outside.reshape(-1, 3)} - {None}
            assert len(others) == 3  # three distractors, each another colour
            # the teacher's crop view shows the same colour as its dominant non-grey colour
            view = np.asarray(_image(info, "teacher_messages")).reshape(-1, 3).astype(int)
            vivid = view[view.max(1) - view.min(1) > 100]
            best = Counter(palette.get(tuple(p)) for p in vivid).most_common(1)[0][0]
            assert best == info["answer"]
        elif task == "count":
            coloured = inside.max(-1).astype(int) - inside.min(-1) > 60
            assert _components(coloured) == int(info["answer"])
        else:
            ink = inside.max(-1) < 60
            ys, xs = np.nonzero(ink)
            glyph = ink[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
            assert glyph.shape[0] >= 12  # scaled up from the 7 px bitmap glyph: legible
            masks = {d: np.asarray(_digit_mask(d, 18)) > 0 for d in range(10)}
            matches = [d for d, m in masks.items() if m.shape == glyph.shape and (m == glyph).all()]
            assert matches == [int(info["answer"])]


def test_generation_is_fast_and_kwargs_are_validated():
    import time

    env = VisionQAEnv(task="digit")
    start = time.perf_counter()
    for seed in range(100):
        env.reset(seed=seed)
    assert (time.perf_counter() - start) / 100 < 0.01  # whole reset incl. views; render < 2 ms
    for kwargs, name in [({"task": "shape"}, "task"), ({"split": "val"}, "split"),
                         ({"teacher_view": "bbox"}, "teacher_view"), ({"zoom": 1}, "zoom"),
                         ({"box_size": 8}, "box_size"), ({"crop_size": 0}, "crop_size"),
                         ({"num_distractors": 40}, "num_distractors"),
                         ({"image_size": 20}, "image_size"), ({"test_size": 0}, "test_size")]:
        with pytest.raises(ValueError, match=name):
            VisionQAEnv(**kwargs)


# ----------------------------------------------------------------------------- grading, experts


@pytest.mark.parametrize("reply,gold,ok", [
    ("It is red.\nAnswer: Red.", "red", True), ("**Answer:** orange", "orange", True),
    ("Answer: the blue one", "blue", False), ("Answer: blue", "red", False),
    ("Answer: three", "3", True), ("Answer: 3 dots", "3", True), ("Answer: 3 or 4", "3", False),
    ("Answer: 4\nwait, Answer: 7", "7", True), ("Answer: 7", "1", False),
    ("Answer: (B)", "B", True), ("Answer: b) a cat", "B", True), ("Answer: C", "B", False),
    ("I think it is 7", "7", False), ("\\boxed{5}", "5", True), ("Answer: 0.5", "1/2", True),
])
def test_grade_answer(reply, gold, ok):
    assert grade_answer(reply, gold)[0] is ok


def test_expert_replies_solve_and_wrong_answers_fail():
    env = VisionQAEnv(task="count")
    for seed in range(5):
        _, info = env.reset(seed=seed)
        assert env.expert_reply(info["messages"]) == info["solution"]
        assert env.step(env.expert_reply(info["messages"]))[1] == 1.0
        env.reset(seed=seed)
        wrong = str(int(info["answer"]) % 4 + 1)
        _, reward, done, _, step_info = env.step(f"Answer: {wrong}")
        assert reward == 0.0 and done and step_info == {"correct": False, "pred": wrong}
    with pytest.raises(RuntimeError, match="before reset"):
        env.step("Answer: 1")
    env.reset(seed=0)
    with pytest.raises(TypeError, match="str"):
        env.step(3)


@pytest.mark.parametrize("task", ["color", "count", "digit"])
def test_careless_demonstrations_describe_the_first_distractor(task):
    env = VisionQAEnv(task=task, image_size=84, num_distractors=1, careless=0.7)
    exact = VisionQAEnv(task=task, image_size=84, num_distractors=1)
    wrong = 0
    for seed in range(200):
        _, info = env.reset(seed=seed)
        _, ref = exact.reset(seed=seed)
        assert info["answer"] == ref["answer"] and info["solution"] == env.expert_reply(
            info["messages"])
        if info["solution"] != f"Answer: {info['answer']}":
            wrong += 1
            scene = env.unwrapped.problem(seed).scene
            x, y, spec = scene.distractors[0]
            assert info["solution"] == f"Answer: {answer_of(spec, env.config)}"
            assert env.step(info["solution"])[1] == 0.0  # graded against the framed object
    assert 0.6 < wrong / 200 < 0.8
    for seed in range(20):  # on the teacher's crop view there is no distractor to name
        _, info = env.reset(seed=seed)
        assert env.expert_reply(info["teacher_messages"]) == f"Answer: {info['answer']}"
    with pytest.raises(ValueError, match="careless needs synthetic scenes with distractors"):
        VisionQAEnv(num_distractors=0, careless=0.5)
    with pytest.raises(ValueError, match="careless must be a probability"):
        VisionQAEnv(careless=2)


def test_zoom_expert_through_the_tool_matches_the_teacher_crop():
    env = VisionQAEnv(zoom=True, task="digit")
    _, info = env.reset(seed=4)
    messages = list(info["messages"])
    call = HermesParser().parse(env.expert_reply(messages)).calls[0]
    assert call.name == "zoom" and call.arguments == {"bbox": info["bbox"]}
    spec = info["tools"][0]
    tool = make_tool(spec["name"], **{k: v for k, v in spec.items() if k != "name"})
    res = call_tool(tool, call.arguments, context=ToolContext(images=[_image(info)]))
    assert not res.error
    # what the student sees after zooming is exactly the teacher's privileged crop
    assert res.images[0].tobytes() == _image(info, "teacher_messages").tobytes()
    failed = messages + [{"role": "tool", "name": "zoom", "content": "Error: bbox ..."}]
    assert env.expert_reply(failed).startswith("<tool_call>")
    done = messages + [{"role": "tool", "name": "zoom",
                        "content": [{"type": "image", "image": res.images[0]},
                                    {"type": "text", "text": res.text}]}]
    assert env.expert_reply(done) == info["solution"]
    assert env.step(env.expert_reply(done))[1] == 1.0


# ----------------------------------------------------------------------------- zoom tool


def test_zoom_tool_crops_the_right_pixels(tmp_path):
    assert "zoom" in list_tools()
    rng = np.random.default_rng(0)
    a = Image.fromarray(rng.integers(0, 256, (60, 100, 3), dtype=np.uint8))
    b = Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    ctx = ToolContext(images=[a, b])
    native = make_tool("zoom", size=None)
    res = call_tool(native, {"bbox": [10, 5, 40, 25]}, context=ctx)
    assert res.images[0].tobytes() == a.crop((10, 5, 40, 25)).tobytes()
    assert res.text == "Zoomed into [10, 5, 40, 25] of image 0 (100x60 px), shown at 30x20 px."
    res = call_tool(native, {"bbox": [2.5, 3, 20, 30.2], "image": 1}, context=ctx)
    assert res.images[0].tobytes() == b.crop((2, 3, 20, 31)).tobytes()
    res = call_tool(make_tool("zoom"), {"bbox": [10, 5, 40, 25]}, context=ctx)
    assert res.images[0].size == (224, 149)
    expected = a.crop((10, 5, 40, 25)).resize((224, 149), Image.Resampling.BICUBIC)
    assert res.images[0].tobytes() == expected.tobytes()
    res = call_tool(native, {"bbox": [-20, 50, 30, 90]}, context=ctx)
    assert "clipped" in res.text and res.images[0].tobytes() == a.crop((0, 50, 30, 60)).tobytes()
    norm = make_tool("zoom", coords="norm1000", size=None)
    res = call_tool(norm, {"bbox": [100, 250, 400, 500]}, context=ctx)
    assert res.images[0].tobytes() == a.crop((10, 15, 40, 30)).tobytes()
    assert "pixels [10, 15, 40, 30]" in res.text
    a.save(tmp_path / "a.png")  # images given as local paths are opened
    by_path = ToolContext(images=[str(tmp_path / "a.png")])
    res = call_tool(native, {"bbox": [10, 5, 40, 25]}, context=by_path)
    assert res.images[0].tobytes() == a.crop((10, 5, 40, 25)).tobytes()


_SIZED = ("outside the image", "x0 < x1", "4 numbers")  # errors that must state the image size


@pytest.mark.parametrize("args,images,msg", [
    ({"bbox": [1, 2, 3, 4]}, 0, "no image"),
    ({"bbox": [1, 2, 3, 4], "image": 2}, 2, "valid indices 0..1"),
    ({"bbox": [1, 2, 3, 4], "image": -1}, 2, "valid indices 0..1"),
    ({"bbox": [200, 10, 300, 20]}, 1, "outside the image"),
    ({"bbox": [10, 10, 10, 20]}, 1, "x0 < x1"),
    ({"bbox": [10, 10, 30]}, 1, "4 numbers"),
    ({"bbox": ["a", 1, 2, 3]}, 1, "type number"),
    ({"bbox": [0, 0, 1, 60], "image": 0}, 1, None),  # thin but legal: 1x60 px
    ({"box": [1, 2, 3, 4]}, 1, "missing required"),
])
def test_zoom_tool_errors_are_results(args, images, msg):
    img = Image.new("RGB", (100, 60))
    res = call_tool(make_tool("zoom"), args, context=ToolContext(images=[img] * images))
    if msg is None:
        assert not res.error
        return
    assert res.error and res.text.startswith("Error") and msg in res.text, res.text
    if msg in _SIZED:
        assert "100x60 px" in res.text  # tells the model the valid range


def test_zoom_tool_direct_run_and_bad_construction():
    img = Image.new("RGB", (100, 60))
    res = make_tool("zoom").run({"bbox": [float("nan"), 0, 1, 1]}, ToolContext(images=[img]))
    assert res.error and "non-finite" in res.text
    assert make_tool("zoom").run({"bbox": [0, 0, 5, 5]}).error  # no context at all
    with pytest.raises(ValueError, match="coords"):
        make_tool("zoom", coords="relative")
    with pytest.raises(ValueError, match="size"):
        make_tool("zoom", size=0)


# ----------------------------------------------------------------------------- image utilities


def test_modes_convert_to_rgb(tmp_path):
    p = Image.new("P", (4, 2), 1)
    p.putpalette([0, 0, 0, 0, 0, 255])
    cases = {
        "l.png": (Image.new("L", (4, 2), 77), (77, 77, 77)),
        "la.png": (Image.new("LA", (4, 2), (0, 0)), (255, 255, 255)),
        "one.png": (Image.new("1", (4, 2), 1), (255, 255, 255)),
        "i16.png": (Image.fromarray(np.full((2, 4), 257 * 40, np.uint16)), (40, 40, 40)),
        "cmyk.jpg": (Image.new("CMYK", (4, 2), (0, 0, 0, 0)), (255, 255, 255)),
        "cmyk.tif": (Image.new("CMYK", (4, 2), (0, 255, 255, 0)), (255, 0, 0)),
        "rgba.png": (Image.new("RGBA", (4, 2), (255, 0, 0, 128)), (255, 127, 127)),
        "p.png": (p, (0, 0, 255)),
    }
    for name, (img, rgb) in cases.items():
        img.save(tmp_path / name)
        out = open_image(tmp_path / name)
        assert out.mode == "RGB" and out.size == (4, 2), name
        got = out.getpixel((0, 0))
        assert np.abs(np.subtract(got, rgb)).max() <= 1, (name, got)
    p.save(tmp_path / "pt.png", transparency=1)  # the palette's blue is the transparent entry
    assert open_image(tmp_path / "pt.png").getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("RGBA", (1, 1), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    Image.new("L", (1, 1), 9).save(tmp_path / "tiny.png")  # legal: processors upsize it
    assert open_image(tmp_path / "tiny.png").size == (1, 1)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: shown 20 wide, 40 high
    Image.new("RGB", (40, 20)).save(tmp_path / "rot.jpg", exif=exif)
    assert probe_image(tmp_path / "rot.jpg")[0] == (20, 40)
    assert open_image(tmp_path / "rot.jpg").size == (20, 40)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG file whose header claims width x height (PIL cannot write empty images)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))


def test_bad_image_files_raise_image_error_naming_the_file(tmp_path):
    (tmp_path / "garbage.png").write_bytes(b"not an image at all" * 10)
    (tmp_path / "zero.png").write_bytes(_png_header_only(0, 5))
    Image.effect_noise((64, 64), 40).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    Image.new("L", (402, 2)).save(tmp_path / "thin.png")
    (tmp_path / "dir.png").mkdir()
    for name, msg in [("missing.png", "no such image"), ("dir.png", "not a file"),
                      ("garbage.png", "not a readable image"), ("zero.png", "zero.png"),
                      ("cut.png", "cannot decode"), ("thin.png", "aspect ratio")]:
        with pytest.raises(ImageError, match=msg) as e:
            open_image(tmp_path / name)
        assert name in str(e.value) and isinstance(e.value, ValueError)
    assert probe_image(tmp_path / "cut.png") == ((64, 64), "L")  # header fine, pixels not


@pytest.fixture(scope="module")
def big_png(tmp_path_factory):
    """10000 x 10000 single-colour PNG: 100 M pixels, ~120 kB on disk."""
    path = tmp_path_factory.mktemp("big") / "big.png"
    Image.new("L", (10_000, 10_000), 200).save(path)
    return path


def test_huge_image_is_downscaled_with_bounded_memory(big_png, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning for a merely large file
        out = open_image(big_png, max_pixels=1_000_000)
    assert out.size == (1000, 1000) and out.getpixel((500, 500)) == (200, 200, 200)
    assert probe_image(big_png) == ((10_000, 10_000), "L")
    # VmHWM (peak RSS of this address space) rather than ru_maxrss, which Linux carries over
    # from the parent through fork + exec and so would report the test runner's own peak
    code = ("import re; from mmopd.envs.images import open_image; "
            f"im = open_image({str(big_png)!r}); "
            "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1); "
            "print(im.width * im.height, hwm)")
    pixels, peak_kb = map(int, subprocess.run([sys.executable, "-c", code], check=True,
                                              capture_output=True, text=True).stdout.split())
    assert pixels <= images_mod.DEFAULT_MAX_PIXELS
    # 100 M pixels decoded as 8-bit grey, then shrunk; a full-size RGB copy alone would be 400 MB
    assert peak_kb < 320_000, peak_kb
    monkeypatch.setattr(images_mod, "PIXEL_LIMIT", 50_000_000)
    with pytest.raises(ImageError, match="10000x10000"):
        open_image(big_png)


def test_clip_bbox_and_crop():
    assert clip_bbox([10, 5, 40, 25], (100, 60)) == (10, 5, 40, 25)
    assert clip_bbox((-5.5, 2.2, 120, 59.1), (100, 60)) == (0, 2, 100, 60)
    assert clip_bbox([99.5, 0, 100.5, 1], (100, 60)) == (99, 0, 100, 1)
    for bad, msg in [([1, 2, 3], "4 numbers"), ("1234", "4 numbers"), ([1, 2, True, 4], "4 num"),
                     ([1, 2, float("inf"), 4], "non-finite"), ([5, 0, 5, 4], "x0 < x1"),
                     ([0, 9, 4, 2], "y0 < y1"), ([100, 0, 120, 10], "outside"),
                     ([-10, -10, 0, 5], "outside")]:
        with pytest.raises(ValueError, match=msg):
            clip_bbox(bad, (100, 60))
    img = Image.fromarray(np.arange(60 * 100 * 3, dtype=np.uint8).reshape(60, 100, 3))
    assert crop(img, [10, 10, 20, 30]).size == (10, 20)
    assert crop(img, [10, 10, 20, 30], margin=0.5).tobytes() == img.crop((5, 0, 25, 40)).tobytes()
    assert crop(img, [10, 10, 20, 30], size=64).size == (32, 64)
    with pytest.raises(ValueError, match="aspect ratio"):
        crop(Image.new("RGB", (300, 2)), [0, 0, 300, 1])


# ----------------------------------------------------------------------------- JSONL files


def _write_rows(path, rows: list) -> None:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


def test_jsonl_loader_skips_bad_rows_with_line_numbers(tmp_path):
    Image.new("RGB", (64, 48), (10, 20, 30)).save(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    Image.new("RGBA", (32, 32), (255, 0, 0, 0)).save(tmp_path / "sub" / "b.png")
    Image.new("L", (1, 1), 5).save(tmp_path / "tiny.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x00garbage" * 50)
    q = "What is shown?"
    _write_rows(tmp_path / "vqa.jsonl", [
        {"image": "a.png", "question": q, "answer": "red", "bbox": [8, 8, 24, 32], "id": "r1"},
        {"images": ["a.png", "sub/b.png"], "question": "Left <image> or right <image>?",
         "answer": 2},
        {"image": "a.png", "question": q, "answer": "x", "bbox": [50, 40, 90, 90]},  # clipped
        {"image": "a.png", "question": q, "answer": "x", "bbox": [70, 0, 90, 10]},  # outside
        {"image": "missing.png", "question": q, "answer": "x"},
        {"image": "corrupt.png", "question": q, "answer": "x"},
        {"images": ["a.png", "a.png"], "question": "Only <image> one marker", "answer": "x"},
        "{not json",
        {"image": "a.png", "question": q},
        {"image": str(tmp_path / "tiny.png"), "question": q, "answer": 3.0},
        "",
        {"image": "a.png", "question": q, "answer": "x", "bbox": [1, 2, 3]},
    ])
    with pytest.warns(UserWarning, match=r"skipped 7 bad row\(s\) of 11") as caught:
        env = make_env(VQA, source=str(tmp_path / "vqa.jsonl"), teacher_view="crop+full")
    assert len([w for w in caught if "skipped" in str(w.message)]) == 1  # one summary
    errors = env.unwrapped.row_errors
    assert [e.split(":")[1] for e in errors] == ["4", "5", "6", "7", "8", "9", "12"]
    for line, msg in [(4, "outside the image"), (5, "no such image"), (6, "not a readable"),
                      (7, "1 <image> marker(s) but the row has 2"), (8, "invalid JSON"),
                      (9, "'answer'"), (12, "4 numbers")]:
        assert any(e.startswith(f"vqa.jsonl:{line}: ") and msg in e for e in errors), (line, errors)
    assert env.unwrapped.num_problems == 4
    # gymnasium's checker re-makes the env from its spec (and would warn again): check a clean copy
    lines = (tmp_path / "vqa.jsonl").read_text().splitlines()
    (tmp_path / "clean.jsonl").write_text("\n".join(lines[i - 1] for i in (1, 2, 3, 10)))
    check_env_quietly(make_env(VQA, source=str(tmp_path / "clean.jsonl"), zoom=True))

    _, info = env.reset(options={"index": 0})
    assert info["problem_id"] == "r1" and info["bbox"] == [8, 8, 24, 32]
    assert _image(info).size == (64, 48) and _image(info, "teacher_messages", 1).size == (37, 56)
    neg = _image(info, "negative_messages", 1)
    assert neg.size == (37, 56)
    obs, info = env.reset(options={"index": 1})
    assert obs == "Left <image> or right <image>?" and info["bbox"] is None
    content = info["messages"][-1]["content"]
    assert [c.get("text", "img") for c in content] == ["Left ", "img", " or right ", "img", "?"]
    assert content[3]["image"].getpixel((0, 0)) == (255, 255, 255)  # RGBA on white
    assert info["teacher_view"] == "full" and info["teacher_messages"] == info["messages"]
    assert env.step("Answer: two")[1] == 1.0
    assert env.reset(options={"index": 2})[1]["bbox"] == [50, 40, 64, 48]
    _, info = env.reset(options={"index": 3})
    assert _image(info).size == (1, 1) and info["answer"] == "3"


def test_jsonl_bbox_follows_downscaling_and_decode_errors_name_the_row(tmp_path):
    Image.new("RGB", (64, 48)).save(tmp_path / "a.png")
    Image.effect_noise((64, 64), 40).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    _write_rows(tmp_path / "v.jsonl", [
        {"image": "a.png", "question": "q?", "answer": "a", "bbox": [8, 8, 24, 32]},
        {"image": "cut.png", "question": "q?", "answer": "a"},
    ])
    env = VisionQAEnv(source=str(tmp_path / "v.jsonl"), max_pixels=32 * 24)
    _, info = env.reset(options={"index": 0})
    assert _image(info).size == (32, 24) and info["bbox"] == [4, 4, 12, 16]
    with pytest.raises(ImageError, match=r"v\.jsonl:2: .*cut\.png"):
        env.reset(options={"index": 1})


def test_jsonl_all_bad_or_missing_raises(tmp_path):
    _write_rows(tmp_path / "bad.jsonl", ["{oops", {"question": "q", "answer": 1}])
    with pytest.raises(VisionDatasetError, match=r"no valid row(.|\n)*bad\.jsonl:1: invalid JSON"):
        VisionQAEnv(source=str(tmp_path / "bad.jsonl"))
    with pytest.raises(ValueError, match="no such file"):
        VisionQAEnv(source=str(tmp_path / "none.jsonl"))
