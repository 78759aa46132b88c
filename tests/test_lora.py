"""LoRA students (peft): only the adapters train, the trainer's whole path works with them
(sampling, scoring, losses, gradient checkpointing, self / EMA teachers), checkpoints are plain
merged models that load by path and match the adapted student, and resume continues the same
adapters exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmopd.config import ConfigError, LoraSettings, ModelConfig, TrainConfig, load_config
from mmopd.models import ModelLoadError, is_lora, load_model, load_tokenizer
from mmopd.training.loop import train

ADAPTED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA = "model.lora={r: 4, alpha: 8}"


def _rows(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def _train(overrides: list[str], *extra: str) -> Path:
    return Path(train(load_config(TrainConfig, None, [*overrides, LORA, *extra]))["run_dir"])


def test_only_adapter_weights_require_grad(student_dir):
    cfg = ModelConfig(path=str(student_dir), lora=LoraSettings(r=4))
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok, trainable=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    # adapters on every attention and MLP projection of the (one-layer) student, nothing else
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == set(ADAPTED)
    assert not is_lora(load_model(cfg, tok))  # for inference: the plain base model
    bad = ModelConfig(path=str(student_dir), lora=LoraSettings(target_modules=["qproj"]))
    with pytest.raises(ModelLoadError, match=r"\['qproj'\] are not module names"):
        load_model(bad, tok, trainable=True)


def test_frozen_base_loads_in_bf16_on_a_gpu_and_adapters_in_fp32(student_dir, monkeypatch):
    """"auto" on a GPU with bf16: the frozen base of a LoRA student in bf16 (nothing updates it)
    with float32 adapters; a fully trained student keeps float32 master weights."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cfg = ModelConfig(path=str(student_dir), lora=LoraSettings(r=4))
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok, trainable=True)
    dtypes = {("lora_" in n): {p.dtype} for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        dtypes[("lora_" in n)].add(p.dtype)
    assert dtypes == {True: {torch.float32}, False: {torch.bfloat16}}
    full = load_model(ModelConfig(path=str(student_dir)), tok, trainable=True)
    assert {p.dtype for p in full.parameters()} == {torch.float32}


def test_vllm_weight_sync_streams_merged_weights_one_at_a_time(student_dir):
    """A LoRA student's merged weights go to the engine as they are computed: at no point are
    two merged copies alive (a list of them all was the whole model again, in float32)."""
    import weakref

    from mmopd.models import merged_state_dict
    from mmopd.rollout.vllm import state_dict_for_inference

    cfg = ModelConfig(path=str(student_dir), lora=LoraSettings(r=4))
    model = load_model(cfg, load_tokenizer(cfg), trainable=True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    own = {p.data_ptr() for p in model.parameters()}
    merged, names, peak = [], [], 0
    for name, w in state_dict_for_inference(model):
        names.append(name)
        if w.data_ptr() not in own:  # a merged copy
            merged.append(weakref.ref(w))
        del w
        peak = max(peak, sum(r() is not None for r in merged))
    assert len(merged) == len(ADAPTED) and peak <= 1
    want = merged_state_dict(model)
    assert set(names) == set(want) | {"lm_head.weight"} and len(names) == len(set(names))


@pytest.mark.parametrize("overrides, match", [
    (["model.lora.r=0"], r"model.lora.r: 0 must be positive"),
    (["model.lora.target_modules=[]"], r"model.lora.target_modules: needs at least one"),
    (["model.lora.alpah=8"], r"model.lora.alpah: unknown field \(did you mean 'alpha'\?\)"),
    (["teacher.model.lora={}"], r"teacher.model.lora: LoRA adapters train the student"),
])
def test_lora_settings_are_validated(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TrainConfig, None, ["model.path=a", "teacher.model.path=b", *overrides])


def test_reopold_with_lora_changes_only_adapted_layers(tiny_overrides, student_dir):
    """A few REOPOLD steps: the merged checkpoint differs from the initial student exactly in
    the adapted projections (embeddings, norms and the output layer are untouched), it loads as
    a plain model by path, and its logits are the LoRA student's."""
    from transformers import AutoModelForCausalLM

    from mmopd.training.checkpoint import load_student

    run = _train(tiny_overrides, "trainer.steps=4")
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["grad_norm"] > 0 for r in rows)
    ckpt = run / "checkpoints" / "step-4"
    assert (ckpt / "adapter" / "adapter_model.safetensors").is_file()
    before = load_file(student_dir / "model.safetensors")
    after = load_file(ckpt / "model.safetensors")
    assert set(after) == set(before)  # a plain checkpoint: no lora_ or base_layer names
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if k.endswith(".weight")
                       and k.rsplit(".", 2)[-2] in ADAPTED}, changed  # biases stay too

    plain = AutoModelForCausalLM.from_pretrained(ckpt)
    cfg = load_config(TrainConfig, None, [*tiny_overrides, LORA])
    tok = load_tokenizer(cfg.model)
    student = load_student(cfg.model, tok, ckpt)
    assert is_lora(student)
    ids = torch.tensor([tok.encode("12+34=46")])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, student(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)


def test_resume_continues_the_same_adapters(tiny_overrides, tmp_path):
    """Stopped after step 2 and resumed: the same losses as an uninterrupted LoRA run (the
    adapters, not fresh ones on the merged weights, carry on with their optimiser state)."""
    import shutil

    common = ["trainer.steps=4", "trainer.save_every=2", "trainer.keep_last=5"]
    full = _train(tiny_overrides, *common, f"trainer.output_dir={tmp_path / 'a'}")
    part = _train(tiny_overrides, *common, f"trainer.output_dir={tmp_path / 'b'}")
    shutil.rmtree(part / "checkpoints" / "step-4")
    resumed = _train(tiny_overrides, *common, f"trainer.output_dir={part}",
                     "trainer.resume=auto")
    a, b = _rows(full), _rows(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in ("loss", "env_reward", "kl_estimate", "kept_frac", "grad_norm"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7), (ra["step"], key)


@pytest.mark.parametrize("extra", [
    # EMA teacher: a plain copy of the merged student, tracking the merged weights
    ["objective.name=opd", "teacher.kind=ema", "teacher.view=privileged"],
    ["objective.name=opd", "trainer.gradient_checkpointing=true"],
])
def test_teachers_and_checkpointing_with_lora(extra, tiny_overrides):
    run = _train(tiny_overrides, *extra)
    assert all(r["grad_norm"] > 0 for r in _rows(run))
    state = torch.load(run / "checkpoints" / "step-2" / "trainer_state.pt", weights_only=False)
    if "teacher.kind=ema" in extra:
        ema = state["ema_teacher"]
        assert ema and not any("lora_" in k or "base_layer" in k for k in ema)
        merged = load_file(run / "checkpoints" / "step-2" / "model.safetensors")
        key = "model.layers.0.self_attn.q_proj.weight"
        assert not torch.equal(ema[key], merged[key])  # an average, lagging the student
    # the optimiser holds the adapters only: 2 matrices on each of 7 projections
    assert len(state["optimizer"]["param_groups"][0]["params"]) == 2 * len(ADAPTED)


def test_sampler_uses_the_models_own_distribution_under_peft(student_dir):
    """The sampler swaps in a neutral generation config while generating; under peft it must
    do so on the base model, or a checkpoint's repetition penalty would leak into on-policy
    samples (and their recorded log-probs would not be the student's)."""
    from mmopd.episode import Episode
    from mmopd.rollout.render import ChatRenderer
    from mmopd.rollout.sampler import HFSampler, SamplingParams
    from mmopd.teachers.scorer import HFScorer

    cfg = ModelConfig(path=str(student_dir), lora=LoraSettings(r=4))
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok, trainable=True)
    model.get_base_model().generation_config.repetition_penalty = 5.0
    r = ChatRenderer(tok)
    prompts = [r.prompt([{"role": "user", "content": q}]) for q in ["1+1=", "23+45="]]
    torch.manual_seed(0)
    out = HFSampler(model, tok).generate(prompts, SamplingParams(n=2, max_new_tokens=12))
    assert model.get_base_model().generation_config.repetition_penalty == 5.0  # restored
    eps = [Episode(p + s.token_ids, [0] * len(p) + [1] * len(s.token_ids),
                   [-1] * len(p) + [0] * len(s.token_ids), [0.0] * len(p) + s.logprobs, len(p))
           for p, samples in zip(prompts, out) for s in samples]
    scores = HFScorer(model, tok.pad_token_id).score(eps)
    sampled = torch.tensor([lp for s in [s for o in out for s in o] for lp in s.logprobs])
    torch.testing.assert_close(sampled, scores.logp_N, atol=1e-4, rtol=1e-4)


def test_lora_vlm_student_keeps_its_image_inputs_and_saves_merged(tmp_path):
    """peft's forward signature hides the base VLM's `mm_token_type_ids` (3-D rope positions of
    image tokens); the extra inputs are chosen by the base model. The merged checkpoint of a LoRA
    VLM loads as a plain VLM with the adapted student's logits."""
    from types import SimpleNamespace

    from transformers import AutoModelForImageTextToText

    from mmopd.config import TinyModelConfig
    from mmopd.models import load_vision, save_merged
    from mmopd.tokenizer import build_char_tokenizer
    from mmopd.vision import forward_kwargs

    build_char_tokenizer(tmp_path / "tok", vision=True)
    cfg = ModelConfig(tiny=TinyModelConfig(arch="qwen2_5_vl", hidden_size=32, num_heads=2,
                                           num_kv_heads=1, intermediate_size=64),
                      tokenizer=str(tmp_path / "tok"), lora=LoraSettings(r=4))
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok, trainable=True, vision=load_vision(cfg, tok))
    images = SimpleNamespace(pixel_values=torch.zeros(4, 8), image_grid_thw=torch.ones(1, 3))
    assert "mm_token_type_ids" in forward_kwargs(model, torch.zeros(1, 5, dtype=torch.long),
                                                 images)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # fresh adapters are the identity: make the merge matter
    save_merged(model, tmp_path / "merged")
    plain = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    ids = torch.tensor([tok.encode("3+4=7")])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)
