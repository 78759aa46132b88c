"""Vision-language students: qwen-vl-utils on CPU, rendering with images, batching of images across
episodes, multimodal rope, tool images across turns, teacher views, sampling and training."""

from __future__ import annotations

import json
import sys
import warnings

import gymnasium
import numpy as np
import pytest
import torch
from PIL import Image

from mmopd.config import ModelConfig, TinyModelConfig
from mmopd.episode import STOP_EOS, STOP_ERROR, Episode, pad_right
from mmopd.logprobs import final_hidden, lm_head_fn
from mmopd.models import ModelLoadError, check_same_vision, load_model, load_tokenizer, load_vision
from mmopd.rollout.agent_loop import AgentLoop, collect_episodes
from mmopd.rollout.render import ChatRenderer, RenderError
from mmopd.rollout.sampler import HFSampler, SamplingParams
from mmopd.rollout.toolcalls import format_call
from mmopd.teachers.scorer import HFScorer
from mmopd.tools import ToolContext, ToolResult
from mmopd.vision import VisionError, VisionInputs, forward_kwargs, qwen_vl_utils

ARCHS = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), np.uint8))


def _user(*items) -> dict:
    content = [{"type": "image", "image": x} if isinstance(x, Image.Image)
               else {"type": "text", "text": x} for x in items]
    return {"role": "user", "content": content}


@pytest.fixture(scope="module")
def vtok_dir(tmp_path_factory):
    from mmopd.tokenizer import build_char_tokenizer

    d = tmp_path_factory.mktemp("vtok")
    build_char_tokenizer(d, vision=True)
    return d


@pytest.fixture(scope="module")
def vtok(vtok_dir):
    return load_tokenizer(ModelConfig(tiny=TinyModelConfig(arch="qwen2_vl"),
                                      tokenizer=str(vtok_dir)))


def _vision_for(arch: str, tok):
    """The processor of the arch's family: Qwen3-VL patches are 16 px, Qwen2/2.5-VL 14 px."""
    from transformers import Qwen2VLImageProcessorPil

    from mmopd.vision import VisionProcessor

    patch = 16 if arch == "qwen3_vl" else 14
    f = 2 * patch
    return VisionProcessor(Qwen2VLImageProcessorPil(min_pixels=4 * f * f, max_pixels=16 * f * f,
                                                    patch_size=patch, merge_size=2), tok)


@pytest.fixture(scope="module", params=ARCHS)
def vlm(request, vtok_dir, vtok):
    arch = request.param
    vision = _vision_for(arch, vtok)
    cfg = ModelConfig(tiny=TinyModelConfig(arch=arch, hidden_size=64, num_heads=4, seed=3),
                      tokenizer=str(vtok_dir))
    return load_model(cfg, vtok, vision=vision).eval(), vision


# ----------------------------------------------------------------------------- qwen-vl-utils


def test_qwen_vl_utils_image_path_works_without_torchvision():
    qvu = qwen_vl_utils()
    assert "torchvision" not in sys.modules or not hasattr(sys.modules["torchvision"],
                                                           "_NoTorchvision")
    img = qvu.fetch_image({"image": _image(100, 70), "min_pixels": 28 * 28 * 4,
                           "max_pixels": 112 * 112})
    assert img.size == (112, 56) and img.mode == "RGB"  # smart_resize: multiples of 28
    assert qvu.smart_resize(1000, 1000, 28, max_pixels=112 * 112) == (112, 112)
    try:
        import torchvision  # noqa: F401
    except Exception:  # CPU-only: the video path says what it needs instead of crashing oddly
        with pytest.raises(ImportError, match="torchvision"):
            qvu.fetch_video({"video": "x.mp4"})


# ----------------------------------------------------------------------------- rendering


def test_vision_inputs_select_and_cat():
    v = VisionInputs(torch.arange(8.0)[:, None].repeat(1, 3),
                     torch.tensor([[1, 2, 2], [1, 2, 1], [1, 1, 2]]))
    assert v.num_images == 3
    mid = v.select(1, 2)
    assert mid.image_grid_thw.tolist() == [[1, 2, 1]] and mid.pixel_values[:, 0].tolist() == [4, 5]
    assert v.select(3) is None
    back = VisionInputs.cat([v.select(0, 1), None, v.select(1)])
    assert torch.equal(back.pixel_values, v.pixel_values)
    with pytest.raises(VisionError, match="patches"):
        VisionInputs(torch.zeros(3, 3), torch.tensor([[1, 2, 2]]))


def test_render_expands_one_placeholder_per_merged_patch_group(vtok, vtok_dir):
    vision = load_vision(ModelConfig(tiny=TinyModelConfig(arch="qwen2_5_vl"),
                                     tokenizer=str(vtok_dir)), vtok)
    r = ChatRenderer(vtok, vision)
    out = r.render([_user(_image(100, 70), "what is here?", _image(30, 30, 1))])
    # 100x70 -> 112x56 (grid t,h,w = 1,4,8 patches of 14 -> 8 tokens after the 2x2 merge);
    # 30x30 -> 56x56 (raised to min_pixels: 4 tokens)
    assert out.vision.image_grid_thw.tolist() == [[1, 4, 8], [1, 4, 4]]
    pad = vtok.convert_tokens_to_ids("<|image_pad|>")
    assert out.ids.count(pad) == 8 + 4
    text = vtok.decode(out.ids)
    assert text.count("<|vision_start|>") == 2 and "what is here?" in text
    assert out.vision.pixel_values.shape[0] == 32 + 16
    # text-only messages render exactly as without vision
    msgs = [{"role": "user", "content": "1+1="}]
    assert r.prompt(msgs) == ChatRenderer(vtok).prompt(msgs)
    with pytest.raises(RenderError, match="text-only"):
        ChatRenderer(vtok).render([_user(_image(28, 28))])
    with pytest.raises(RenderError, match="not found"):
        r.render([{"role": "user", "content": [{"type": "image", "image": "/no/such.png"}]}])
    with pytest.raises(RenderError, match="video"):
        r.render([{"role": "user", "content": [{"type": "video", "video": "x.mp4"}]}])


def test_engine_prompts_collapse_placeholders_and_keep_the_images(vtok, vtok_dir):
    """What a vLLM engine gets for a VLM prompt: one placeholder per image (it expands them
    itself) and the resized images the trainer's pixel values came from, kept through
    select / cat as episodes grow; a run that does not fit its image is an error."""
    vision = load_vision(ModelConfig(tiny=TinyModelConfig(arch="qwen2_5_vl"),
                                     tokenizer=str(vtok_dir)), vtok)
    out = ChatRenderer(vtok, vision).render([_user(_image(100, 70), "what?", _image(30, 30, 1))])
    pad = vtok.convert_tokens_to_ids("<|image_pad|>")
    short = vision.collapse(out.ids, out.vision)
    assert short.count(pad) == 2 and len(short) == len(out.ids) - (8 + 4) + 2
    assert vision.expand(short, out.vision) == out.ids
    assert [im.size for im in out.vision.images] == [(112, 56), (56, 56)]  # as resized
    again = VisionInputs.cat([out.vision.select(0, 1), out.vision.select(1)])
    assert [im.size for im in again.images] == [(112, 56), (56, 56)]
    with pytest.raises(VisionError, match=r"2 image placeholder run\(s\) of \[8, 4\].*\[8\]"):
        vision.collapse(out.ids, out.vision.select(0, 1))
    with pytest.raises(VisionError, match=r"of \[7, 4\]"):
        vision.collapse(out.ids[:out.ids.index(pad)] + out.ids[out.ids.index(pad) + 1:],
                        out.vision)


def test_placeholder_count_must_match_images(vtok, vtok_dir):
    vision = load_vision(ModelConfig(tiny=TinyModelConfig(arch="qwen2_vl"),
                                     tokenizer=str(vtok_dir)), vtok)
    ids = vtok.encode("<|image_pad|> and <|image_pad|>")
    one = vision.encode([_image(56, 56)])
    with pytest.raises(VisionError, match="2 image placeholder"):
        vision.expand(ids, one)


# ----------------------------------------------------------------------------- batching + rope


def _episodes(vision, tok) -> list[tuple[list[int], VisionInputs | None]]:
    r = ChatRenderer(tok, vision)
    rows = [
        [_user(_image(56, 56, 1), "look", _image(84, 112, 2), "two images: abc")],
        [_user(_image(112, 56, 3), "one wide image, longer question text here")],
        [{"role": "user", "content": "no image at all: 123"}],
    ]
    return [(rend.ids, rend.vision) for rend in (r.render(m) for m in rows)]


def _logp(model, batch, pad_id: int = 0) -> list[torch.Tensor]:
    padded = pad_right([ids for ids, _ in batch], [[1] * len(ids) for ids, _ in batch], pad_id)
    vision = VisionInputs.cat(v for _, v in batch)
    h = final_hidden(model, padded.input_ids, padded.attention_mask,
                     **forward_kwargs(model, padded.input_ids, vision))
    lp = torch.log_softmax(lm_head_fn(model)(h), -1)
    return [lp[i, : len(ids) - 1].gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
            for i, (ids, _) in enumerate(batch)]


def test_batching_images_of_different_counts_and_sizes_matches_single_rows(vlm, vtok):
    model, vision = vlm
    eps = _episodes(vision, vtok)
    single = [_logp(model, [e])[0] for e in eps]
    for order in (eps, eps[::-1]):
        batched = _logp(model, order)
        ref = single if order is eps else single[::-1]
        for a, b in zip(ref, batched):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_image_tokens_get_3d_rope_positions(vlm, vtok):
    """The forward must use multimodal rope: the same inputs with 1-D positions differ."""
    model, vision = vlm
    ids, v = _episodes(vision, vtok)[0]
    x = torch.tensor([ids])
    kw = forward_kwargs(model, x, v)
    with torch.no_grad():
        mm = model(input_ids=x, attention_mask=torch.ones_like(x), **kw).logits
        flat_pos = torch.arange(len(ids))[None, None].expand(3, 1, -1)
        flat = model(input_ids=x, attention_mask=torch.ones_like(x), position_ids=flat_pos,
                     **kw).logits
    # after the first image the positions differ, so do the logits
    first_img = ids.index(model.config.image_token_id)
    assert torch.allclose(mm[0, :first_img], flat[0, :first_img], atol=1e-5)
    assert not torch.allclose(mm[0, first_img + 8:], flat[0, first_img + 8:], atol=1e-3)


def test_sampler_batches_images_and_never_samples_placeholders(vlm, vtok):
    model, vision = vlm
    eps = _episodes(vision, vtok)
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=6)
    sampler = HFSampler(model, vtok, batch_size=8, suppress_token_ids=vision.special_ids)
    batched = sampler.generate([e[0] for e in eps], greedy, vision=[e[1] for e in eps])
    for e, (b,) in zip(eps, batched):
        (s,), = sampler.generate([e[0]], greedy, vision=[e[1]])
        assert s.token_ids == b.token_ids
    # A student that prefers image placeholders above all still never samples one.
    pad = model.config.image_token_id

    def favour_pad(module, inputs, logits):
        logits = logits.clone()
        logits[..., pad] += 100.0
        return logits

    hook = model.get_output_embeddings().register_forward_hook(favour_pad)
    try:
        torch.manual_seed(0)
        params = SamplingParams(n=4, max_new_tokens=8)
        free = HFSampler(model, vtok, batch_size=8).generate([eps[1][0]], params,
                                                             vision=[eps[1][1]])
        assert all(pad in s.token_ids for s in free[0])
        out = sampler.generate([eps[1][0]], params, vision=[eps[1][1]])
        assert all(not set(s.token_ids) & vision.special_ids for s in out[0])
    finally:
        hook.remove()


# ----------------------------------------------------------------------------- agent loop


class _CropTool:
    """Returns the right half of the episode's first image (a zoom without the geometry)."""

    name, description = "crop", "crop the right half"
    parameters = {"type": "object", "properties": {}}
    needs_context = True

    def run(self, args, context: ToolContext) -> ToolResult:
        img = context.images[0]
        return ToolResult("right half:", [img.crop((img.width // 2, 0, img.width, img.height))])


class _PictureEnv(gymnasium.Env):
    """One image, a crop view for the teacher, a crop tool; the answer is 'ok'."""

    def __init__(self, bad: bool = False) -> None:
        self.bad = bad

    def reset(self, *, seed=None, options=None):
        if self.bad:
            raise OSError("image file is truncated")
        img = _image(112, 56, seed or 0)
        return "q", {"messages": [_user(img, "what?")], "tools": [_CropTool()],
                     "teacher_messages": [_user(img.crop((0, 0, 56, 56)), "what?")],
                     "negative_messages": [_user(_image(56, 56, 9), "what?")]}

    def step(self, action):
        return "", float("ok" in action), True, False, {}


def test_tool_images_flow_into_the_next_turn_and_views_share_the_continuation(vtok, vtok_dir):
    vision = load_vision(ModelConfig(tiny=TinyModelConfig(arch="qwen2_5_vl"),
                                     tokenizer=str(vtok_dir)), vtok)
    r = ChatRenderer(vtok, vision)
    loop = AgentLoop(r, max_turns=4)
    slots = loop.start([_PictureEnv(), _PictureEnv(bad=True)], [{"seed": 1}, {"seed": 2}],
                       teacher_view=True, views=("negative",))
    script = iter([format_call("crop", {}), "ok"])
    enc = vtok.encode

    def generate(batch):
        text = next(script)
        return [(enc(text) + [vtok.eos_token_id], [-0.5] * (len(enc(text)) + 1), STOP_EOS)
                for _ in batch]

    ep, failed = loop.run(slots, generate)
    assert failed.stop_reason == STOP_ERROR and "truncated" in failed.metadata["error"]
    assert not failed.input_ids
    assert ep.reward == 1.0 and ep.vision.num_images == 2 and ep.prompt_images == 1
    assert ep.vision.image_grid_thw.tolist() == [[1, 4, 8], [1, 4, 4]]  # the crop is 56x56
    # image tokens are never loss tokens, and the episode equals a full re-render
    pad = vtok.convert_tokens_to_ids("<|image_pad|>")
    assert all(not m for t, m in zip(ep.input_ids, ep.loss_mask) if t == pad)
    full = r.render(slots[0].messages, generation_prompt=False)
    assert ep.input_ids == full.ids[: len(ep.input_ids)]
    assert torch.equal(ep.vision.pixel_values, full.vision.pixel_values)
    # every view: its own prompt images, then the same tool image and the same loss tokens
    for name in ("teacher", "negative"):
        ids, mask, v = ep.view(name)
        assert v.num_images == 2 and torch.equal(v.select(1).pixel_values,
                                                 ep.vision.select(1).pixel_values)
        assert [t for t, m in zip(ids, mask) if m] == [t for t, m in
                                                        zip(ep.input_ids, ep.loss_mask) if m]
        assert ids.count(pad) == sum(vision.tokens_per_image(v))


def test_scorer_reads_the_teacher_view_images(vlm, vtok):
    model, vision = vlm
    r = ChatRenderer(vtok, vision)
    img = _image(112, 56, 4)
    eps = collect_episodes([_PictureEnv(), _PictureEnv()], [{"seed": 4}], _FixedSampler(vtok),
                           r, SamplingParams(n=2, max_new_tokens=4), teacher_view=True)
    assert eps[0].teacher_prompt_vision.num_images == 1
    student = HFScorer(model, 0).score(eps)
    teacher = HFScorer(model, 0, view="teacher").score(eps)
    n = eps[0].num_generated
    assert student.logp_N.shape == teacher.logp_N.shape == (2 * n,)
    assert not torch.allclose(student.logp_N, teacher.logp_N)  # different images, same tokens
    # by hand: the teacher's sequence and images through the model
    ids, mask, v = eps[0].view("teacher")
    x = torch.tensor([ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=x, **forward_kwargs(model, x, v)).logits[0], -1)
    pos = [t for t, m in enumerate(mask) if m]
    manual = torch.stack([lp[t - 1, ids[t]] for t in pos])
    torch.testing.assert_close(teacher.logp_N[:n], manual, atol=1e-5, rtol=1e-5)
    del img


class _FixedSampler:
    """Always replies 'ok' (the scorer test needs episodes, not a policy)."""

    def __init__(self, tok) -> None:
        self.ids = tok.encode("ok") + [tok.eos_token_id]

    def generate(self, prompts, params, desc="", vision=None):
        from mmopd.rollout.sampler import Sample

        return [[Sample(list(self.ids), [-0.1] * len(self.ids), STOP_EOS)] * params.n
                for _ in prompts]

    def load_weights(self, model) -> None:
        pass


# ----------------------------------------------------------------------------- teachers


def test_vlm_teacher_must_match_the_student(vtok, vtok_dir):
    v14 = _vision_for("qwen2_vl", vtok)
    with pytest.raises(ModelLoadError, match="text-only"):
        check_same_vision(v14, None)
    with pytest.raises(ModelLoadError, match="geometry"):
        check_same_vision(v14, _vision_for("qwen3_vl", vtok))
    check_same_vision(None, None)
    with pytest.raises(ModelLoadError, match="image processor"):
        load_model(ModelConfig(tiny=TinyModelConfig(arch="qwen2_vl"), tokenizer=str(vtok_dir)),
                   vtok)


def test_ema_update_by_hand():
    from mmopd.teachers.ema import ema_update

    ema, student = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        ema.weight.fill_(1.0), student.weight.fill_(3.0)
    ema_update(ema, student, 0.95)
    torch.testing.assert_close(ema.weight, torch.full((1, 2), 0.95 * 1 + 0.05 * 3))


def test_episode_view_names():
    ep = Episode([1, 2], [0, 1], [-1, 0], [0.0, -0.1], prompt_len=1)
    assert ep.view("teacher")[0] == [1, 2]  # no teacher prompt: the student's sequence
    with pytest.raises(KeyError, match="no prompt view 'negative'"):
        ep.view("negative")


# ----------------------------------------------------------------------------- training


def _save_vlm(root, tok_dir, arch: str, seed: int, hidden: int = 64):
    cfg = ModelConfig(tiny=TinyModelConfig(arch=arch, hidden_size=hidden, num_layers=1,
                                           intermediate_size=2 * hidden, seed=seed),
                      tokenizer=str(tok_dir))
    tok = load_tokenizer(cfg)
    vision = load_vision(cfg, tok)
    load_model(cfg, tok, vision=vision).save_pretrained(root)
    tok.save_pretrained(root)
    vision.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def vl_dirs(tmp_path_factory, vtok_dir):
    return {name: _save_vlm(tmp_path_factory.mktemp(name), vtok_dir, arch, seed, hidden)
            for name, arch, seed, hidden in [("student", "qwen2_5_vl", 1, 32),
                                             ("teacher", "qwen2_5_vl", 2, 64),
                                             ("qwen2vl", "qwen2_vl", 3, 32)]}


def _vl_overrides(student, tmp_path, env_kwargs: str) -> list[str]:
    return [f"model.path={student}", "env.id=mmopd/VisionQA-v0",
            f"env.kwargs={{{env_kwargs}}}", "rollout.prompts_per_batch=3",
            "rollout.samples_per_prompt=2", "rollout.max_new_tokens=6", "rollout.minibatches=2",
            "trainer.steps=2", "trainer.micro_batch_size=4", f"trainer.output_dir={tmp_path}",
            "eval.num_problems=3", "eval.pass_k=0", "eval.at_start=false", "optim.lr=1e-3"]


@pytest.mark.parametrize("student, teacher, extra", [
    ("student", "teacher", ["objective.name=reopold"]),  # a separate VLM teacher
    ("qwen2vl", None, ["teacher.kind=ema", "teacher.view=privileged", "objective.name=jsd",
                       "objective.topk=100"]),  # Vision-OPD: EMA crop self-teacher
    ("student", "teacher", ["teacher.view=privileged", "objective.name=rkl"]),
])
def test_vlm_trains_a_few_steps(vl_dirs, tmp_path, student, teacher, extra):
    from mmopd.config import TrainConfig, load_config
    from mmopd.training.loop import train

    overrides = _vl_overrides(vl_dirs[student], tmp_path,
                              "task: color, image_size: 56, num_distractors: 1, box_size: 20, "
                              "system_prompt: null")
    if teacher:
        overrides.append(f"teacher.model.path={vl_dirs[teacher]}")
    params = {n: p.detach().clone() for n, p in
              load_model(ModelConfig(path=str(vl_dirs[student])), load_tokenizer(
                  ModelConfig(path=str(vl_dirs[student])))).named_parameters()}
    res = train(load_config(TrainConfig, None, overrides + extra))
    ckpt = tmp_path / "checkpoints" / "step-2"
    assert (ckpt / "preprocessor_config.json").is_file()
    cfg = ModelConfig(path=str(ckpt))
    tok = load_tokenizer(cfg)
    after = dict(load_model(cfg, tok, vision=load_vision(cfg, tok)).named_parameters())
    moved = {n for n, p in params.items() if not torch.equal(p, after[n].detach())}
    assert any("visual" in n for n in moved) and any("visual" not in n for n in moved)
    assert res["eval"]["num_problems"] == 3
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    if "teacher.kind=ema" in extra:
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        assert "ema_teacher" in state


def test_zoom_agent_trains_with_tool_images(vl_dirs, tmp_path):
    """Multi-turn: the student calls zoom, the crop comes back as an image in the next turn."""
    from mmopd.config import TrainConfig, load_config
    from mmopd.envs import make_env
    from mmopd.rollout.agent_loop import collect_demonstrations
    from mmopd.training.loop import train

    kwargs = dict(task="color", image_size=56, num_distractors=1, box_size=20, zoom=True)
    cfg = ModelConfig(path=str(vl_dirs["student"]))
    tok = load_tokenizer(cfg)
    r = ChatRenderer(tok, load_vision(cfg, tok))
    eps = collect_demonstrations([make_env("mmopd/VisionQA-v0", **kwargs) for _ in range(2)],
                                 [{"seed": 1}, {"seed": 2}], r, max_turns=3)
    for ep in eps:
        assert ep.reward == 1.0 and ep.vision.num_images == 2 and ep.prompt_images == 1
        assert ep.metadata["tool_calls"] == 1 and ep.metadata["tool_errors"] == 0
    overrides = _vl_overrides(vl_dirs["student"], tmp_path,
                              ", ".join(f"{k}: {str(v).lower()}" for k, v in kwargs.items()))
    res = train(load_config(TrainConfig, None, overrides + [
        f"teacher.model.path={vl_dirs['teacher']}", "rollout.max_turns=3",
        "objective.step_weighting=sod", "rollout.max_new_tokens=40"]))
    assert res["step"] == 2


def test_failed_rows_are_recorded_and_the_run_goes_on(vl_dirs, tmp_path):
    """Bad rows of a JSONL file: a missing image is skipped with a warning when the file is
    loaded; an image whose header reads but whose pixels are cut off fails when its episode
    starts: that episode is recorded as failed and the batch trains without it."""
    from mmopd.config import TrainConfig, load_config
    from mmopd.training.loop import train

    _image(60, 40).save(tmp_path / "good.png")
    _image(60, 40, 1).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"image": name, "question": "color?", "answer": "red"})
                              for name in ["good.png", "cut.png", "missing.png"]) + "\n")
    with pytest.warns(UserWarning, match="missing.png"):
        train(load_config(TrainConfig, None, _vl_overrides(
            vl_dirs["student"], tmp_path / "run", f"source: {rows}") + [
            f"teacher.model.path={vl_dirs['teacher']}", "env.eval_kwargs={}"]))
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["failed_episodes"] > 0 for m in metrics)
    assert all(m["response_tokens"] > 0 for m in metrics)


def test_vzero_weights_by_hand():
    from mmopd.objectives import vzero_weights

    pos = torch.tensor([-1.0, -2.0, -0.5, -1.0, -1.0])
    neg = torch.tensor([-2.0, -1.0, -0.5, -3.0, -1.0])
    ep = torch.tensor([0, 0, 0, 1, 1])
    # delta = [1, -1, 0 | 2, 0]; s = [1, -1, 0 | 2, 0]; S = [0, 1]; group-normalised [-1, 1]
    w, m = vzero_weights(pos, neg, ep, torch.tensor([0, 0]), gamma=1.0, alpha=0.5)
    torch.testing.assert_close(w, torch.tensor([0.5, 1.5]), atol=1e-5, rtol=0)
    assert m["vzero/score_mean"] == pytest.approx(0.5)
    # gamma weighs negative evidence: s = [1, -3, 0 | 2, 0], S = [-2/3, 1] -> still [-1, 1]
    w, _ = vzero_weights(pos, neg, ep, torch.tensor([0, 0]), gamma=3.0, alpha=2.0)
    torch.testing.assert_close(w, torch.tensor([0.0, 2.0]), atol=1e-5, rtol=0)  # clipped
    # one sample per prompt: nothing to compare against, weight 1
    w, _ = vzero_weights(pos, neg, ep, torch.tensor([0, 1]))
    torch.testing.assert_close(w, torch.ones(2))


def test_vzero_gating_trains_with_the_negative_view(vl_dirs, tmp_path):
    from mmopd.config import TrainConfig, load_config
    from mmopd.training.loop import train

    overrides = _vl_overrides(vl_dirs["student"], tmp_path,
                              "task: color, image_size: 56, num_distractors: 1, box_size: 20, "
                              "system_prompt: null")
    train(load_config(TrainConfig, None, overrides + [
        f"teacher.model.path={vl_dirs['teacher']}", "teacher.view=privileged",
        "objective.episode_gating=vzero"]))
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["vzero/w_min"] <= r["vzero/w_max"] <= 2.0 for r in rows)
    assert any(r["vzero/w_min"] < r["vzero/w_max"] for r in rows)  # episodes were told apart


def test_extreme_images_in_messages(vtok, vtok_dir):
    vision = load_vision(ModelConfig(tiny=TinyModelConfig(arch="qwen2_5_vl"),
                                     tokenizer=str(vtok_dir)), vtok)
    r = ChatRenderer(vtok, vision)
    tiny = r.render([_user(Image.new("RGB", (1, 1), (255, 0, 0)), "dot?")])
    assert tiny.vision.image_grid_thw.tolist() == [[1, 4, 4]]  # raised to min_pixels
    rgba = Image.new("RGBA", (56, 56), (0, 0, 255, 0))  # fully transparent -> white
    gray = r.render([_user(Image.new("L", (56, 56), 255), "x")]).vision.pixel_values
    assert torch.allclose(r.render([_user(rgba, "x")]).vision.pixel_values, gray)
    with pytest.raises(RenderError, match="aspect ratio"):
        r.render([_user(Image.new("RGB", (600, 2)), "a line")])


def test_processor_chat_template_is_used_when_the_tokenizer_has_none(vtok_dir, tmp_path):
    import shutil

    d = tmp_path / "ckpt"
    shutil.copytree(vtok_dir, d)
    template = (d / "chat_template.jinja").read_text()
    (d / "chat_template.jinja").unlink()
    (d / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    tok = load_tokenizer(ModelConfig(tiny=TinyModelConfig(arch="qwen2_vl"), tokenizer=str(d)))
    assert tok.chat_template == template


def test_vqa_preset_trains_from_a_datasets_image_column(vl_dirs, tmp_path):
    """A save_to_disk dataset with a datasets Image column, read through the vqa preset: the
    images travel as encoded bytes, the bbox gives the teacher its crop, an undecodable image
    is counted and skipped, and a tiny VLM trains two steps on it."""
    import datasets

    from mmopd.config import TrainConfig, load_config
    from mmopd.envs.vision_qa import VisionQAEnv
    from mmopd.training.loop import train

    good = [_image(60, 40, i) for i in range(3)]
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"),
                                  "bbox": datasets.List(datasets.Value("int32"))})
    rows = {"image": [*good, {"bytes": b"not an image", "path": None}],
            "question": ["color?"] * 4, "answer": ["red", "blue", "red", "red"],
            "bbox": [[0, 0, 30, 20]] * 4}
    folder = tmp_path / "vqa"
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(folder))
    with pytest.warns(UserWarning, match=r"skipped 1 row\(s\) with unusable images"):
        env = VisionQAEnv(source=str(folder), preset="vqa", teacher_view="crop")
    assert env.num_problems == 3
    assert env.row_errors == ["vqa[train]:3: image 0: not a readable image (unknown format or "
                              "corrupt data)"]
    _, info = env.reset(options={"index": 1})
    (image,) = [c["image"] for c in info["messages"][-1]["content"] if c["type"] == "image"]
    assert np.array_equal(np.asarray(image), np.asarray(good[1].convert("RGB")))
    assert info["teacher_view"] == "crop" and info["answer"] == "blue"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        res = train(load_config(TrainConfig, None, _vl_overrides(
            vl_dirs["student"], tmp_path / "run", f"source: {folder}, preset: vqa") + [
            f"teacher.model.path={vl_dirs['teacher']}", "teacher.view=privileged"]))
    assert res["step"] == 2 and res["eval"]["num_problems"] == 3
