"""Config loading: every file in configs/ validates; bad input gives one clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmopd.config import ConfigError, SFTConfig, TrainConfig, load_config

# configs/accelerate/ holds `accelerate launch` files, checked in tests/test_distributed.py
CONFIGS = sorted(p for p in (Path(__file__).parent.parent / "configs").rglob("*.yaml")
                 if p.parent.name != "accelerate")


def _kind(path: Path) -> type:
    return SFTConfig if "sft" in path.name else TrainConfig


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(_kind(path), path)
    assert cfg is not None


def test_configs_exist():
    assert len(CONFIGS) >= 3


BASE = ["model.path=some/dir", "teacher.model.path=other/dir"]


def test_overrides_and_yaml_number_quirk():
    cfg = load_config(TrainConfig, None, BASE + ["objective.lam=0.2", "optim.lr=1e-5",
                                                 'rollout.stop=["\\n\\n"]'])
    assert cfg.objective.lam == 0.2 and cfg.optim.lr == 1e-5
    assert cfg.rollout.stop == ["\n\n"]


@pytest.mark.parametrize("overrides, match", [
    (["objective.lamda=0.2"], r"objective.lamda: unknown field \(did you mean 'lam'\?\)"),
    (["objective.name=reopld"], r"unknown objective 'reopld'.*did you mean 'reopold'"),
    (["trainer.steps=ten"], r"trainer.steps: expected an integer, got 'ten'"),
    (["objective.lam=1.5"], r"objective.lam: 1.5 is outside \[0, 1\)"),
    (["trainer.steps=3"], r"trainer.steps: 3 is not a multiple of rollout.minibatches=2"),
    (["rollout.temperature=0"], r"rollout.temperature"),
    (["teacher.kind=self"], r"view=privileged"),
    (["trainer.bf16=maybe"], r"trainer.bf16: expected true/false"),
    (["objective.topk_source=both"], r"objective.topk_source: 'both' is not one of"),
    (["nonsense"], r"expected dotted.key=value"),
    (["objective.ratio_clip=[1.28, 0.8]"], r"objective.ratio_clip: low 1.28 must be below high"),
    (["objective.ratio_clip=[0.8, 0.8]"], r"objective.ratio_clip: low 0.8 must be below high"),
    (["objective.ratio_clip=[-0.2, 1.28]"], r"objective.ratio_clip: .* negative bound"),
    (["objective.ratio_clip=[1.1, 1.3]"], r"objective.ratio_clip: \[1.1, 1.3\] must contain 1"),
    (["objective.ratio_clip=[0.8]"], r"objective.ratio_clip"),
    (["eval.top_p=0"], r"eval.top_p: must be in \(0, 1\]"),
    (["eval.max_turns=0"], r"eval.max_turns: must be positive"),
    (["objective.name=rkl", "objective.ratio_clip=[0.8, 1.28]"], r"ratio_clip: .*divergence"),
])
def test_bad_values_name_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TrainConfig, None, BASE + overrides)


def test_missing_required_and_model_exclusive():
    with pytest.raises(ConfigError, match="model: required field is missing"):
        load_config(TrainConfig, None, [])
    with pytest.raises(ConfigError, match="exactly one of"):
        load_config(TrainConfig, None, ["model.path=a", "model.tiny={}", "model.tokenizer=t"])


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TrainConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(TrainConfig, bad)


@pytest.mark.parametrize("world, folder, out, distill_file", [
    ("math", "tiny", "runs/demo", "reopold.yaml"),
    ("agent", "agent", "runs/agent-demo", "reopold_sod.yaml"),
    ("vision", "vision", "runs/vision-demo", "reopold.yaml"),
])
def test_demo_configs_are_the_files(world, folder, out, distill_file):
    """configs/tiny/, agent/ and vision/ are the demo worlds' three runs; they must not drift."""
    from mmopd.config import to_dict
    from mmopd.demo import demo_configs

    root = Path(__file__).parent.parent / "configs" / folder
    teacher, student, distill = demo_configs(Path(out), world=world)
    assert to_dict(load_config(SFTConfig, root / "teacher_sft.yaml")) == to_dict(teacher)
    assert to_dict(load_config(SFTConfig, root / "student_sft.yaml")) == to_dict(student)
    assert to_dict(load_config(TrainConfig, root / distill_file)) == to_dict(distill)


@pytest.mark.parametrize("world", ["math", "agent", "vision"])
def test_every_demo_model_can_be_served_by_vllm_on_cpu(world):
    """vLLM's CPU attention runs head sizes 32, 64, ...: every model a demo writes (teacher,
    student, and so the distilled student its export serves) has one."""
    from types import SimpleNamespace

    from mmopd.demo import WORLDS
    from mmopd.rollout.vllm import check_cpu_head_size

    w = WORLDS[world]
    for tiny in (w.teacher_model, w.student_model):
        check_cpu_head_size(SimpleNamespace(hidden_size=tiny["hidden_size"],
                                            num_attention_heads=tiny["num_heads"]))


def test_teacher_required_only_when_the_objective_uses_one():
    with pytest.raises(ConfigError, match="teacher.model: objective 'reopold' needs a teacher"):
        load_config(TrainConfig, None, ["model.path=a"])
    cfg = load_config(TrainConfig, None, ["model.path=a", "objective.name=grpo"])
    assert cfg.teacher.model is None


def test_partial_section_keeps_the_parents_defaults():
    cfg = load_config(SFTConfig, None, ["model.path=a", "optim.lr=1e-3"])
    assert cfg.optim.lr == 1e-3
    assert cfg.optim.schedule == "cosine" and cfg.optim.warmup_steps == 20  # SFT's defaults


@pytest.mark.parametrize("extra, match", [
    (["objective.name=rkl"], "served teacher returns log-probs and top-k only"),
    (["objective.name=reopold", "objective.episode_gating=vzero", "teacher.view=privileged"],
     "served teacher"),
    (["objective.name=reopold", "objective.drift_stop=true"], "drift_stop"),
])
def test_served_teacher_refuses_what_needs_full_logits(extra, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TrainConfig, None, ["model.path=m", "teacher.kind=served",
                                        "teacher.served.url=http://127.0.0.1:8000", *extra])


def test_served_teacher_config():
    cfg = load_config(TrainConfig, None, ["model.path=m", "teacher.kind=served",
                                          "teacher.served.url=http://127.0.0.1:8000",
                                          "objective.name=rkl", "objective.topk=16",
                                          "objective.topk_source=teacher"])
    assert cfg.teacher.served.topk == 20  # top-k over the teacher's ids works from a server
    with pytest.raises(ConfigError, match="teacher.served.url"):
        load_config(TrainConfig, None, ["model.path=m", "teacher.kind=served"])
    with pytest.raises(ConfigError, match="not an http"):
        load_config(TrainConfig, None, ["model.path=m", "teacher.kind=served",
                                        "teacher.served.url=localhost:8000"])


def test_vllm_rollout_config():
    cfg = load_config(TrainConfig, None, ["model.path=m", "teacher.model.path=t",
                                          "rollout.backend=vllm",
                                          "rollout.vllm.gpu_memory_utilization=0.5"])
    assert cfg.rollout.vllm.max_logprob_gap == 0.1
    with pytest.raises(ConfigError, match="drift_stop"):
        load_config(TrainConfig, None, ["model.path=m", "teacher.model.path=t",
                                        "rollout.backend=vllm", "objective.drift_stop=true"])
    with pytest.raises(ConfigError, match="gpu_memory_utilization"):
        load_config(TrainConfig, None, ["model.path=m", "rollout.vllm.gpu_memory_utilization=2"])
