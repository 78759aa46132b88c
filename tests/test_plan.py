"""`mmopd plan`: exact parameter counts from configs (meta device), the memory arithmetic per
strategy, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmopd.cli import main
from mmopd.config import TrainConfig, load_config
from mmopd.plan import GIB, known_config, shape

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("name, params", [  # the published parameter counts
    ("Qwen/Qwen2.5-0.5B-Instruct", 494_032_768), ("Qwen/Qwen2.5-1.5B-Instruct", 1_543_714_304),
    ("Qwen/Qwen2.5-7B-Instruct", 7_615_616_512), ("Qwen/Qwen2.5-32B-Instruct", 32_763_876_352),
    ("Qwen/Qwen2.5-VL-7B-Instruct", 8_292_166_656),
])
def test_parameter_counts_of_known_models(name, params):
    assert shape(known_config(name)).params == params


def test_strategies_add_up():
    from mmopd.plan import estimate

    cfg = load_config(TrainConfig, ROOT / "configs" / "qwen2.5-7b-from-32b-served.yaml")
    rows, info = estimate(cfg, 8, 80.0)
    p = info["student_params"]
    assert rows["DDP"]["weights + grads + optimizer"] == pytest.approx(16 * p / GIB)
    assert rows["FSDP2"]["weights + grads + optimizer"] < 16 * p / 8 / GIB + 2  # + 2 layers
    assert rows["LoRA"]["weights + grads + optimizer"] == pytest.approx(
        (4 * p + 16 * info["lora_params"]) / GIB)  # float32 frozen base + adapters' state
    assert rows["DDP"]["teacher"] == 0  # served: nothing on the trainer's GPUs
    # the vLLM engine sleeps while the trainer works: the peak is the larger phase
    ddp = rows["DDP"]
    train = sum(v for k, v in ddp.items() if k not in ("vLLM engine", "context", "total"))
    assert ddp["total"] == pytest.approx(max(train, ddp["vLLM engine"]) + ddp["context"])
    assert ddp["total"] > 80 and rows["FSDP2"]["total"] < 80 and rows["LoRA"]["total"] < 80
    # the fused loss's float32 output-layer gradient, plus its bf16 cast under DDP
    vh = 152064 * 3584
    assert ddp["output-layer gradient"] == pytest.approx(6 * vh / GIB)
    assert rows["FSDP2"]["output-layer gradient"] == pytest.approx(4 * vh / GIB)
    assert rows["LoRA"]["output-layer gradient"] == 0  # a frozen output layer
    assert ddp["diagnostics"] == pytest.approx(2048 * 2 * 3584 * 4 / GIB)
    # with HF generate, FSDP2 rolls out on the whole student, gathered in bf16, beside its
    # shards; DDP on a bf16 copy of the student
    hf_rows, _ = estimate(load_config(TrainConfig, ROOT / "configs" /
                                      "qwen2.5-7b-from-32b-served.yaml",
                                      ["rollout.backend=hf", "trainer.bf16=true"]), 8, 80.0)
    fsdp = hf_rows["FSDP2"]
    assert fsdp["vLLM engine"] == 0 and fsdp["gathered for rollout"] == pytest.approx(2 * p / GIB)
    assert fsdp["total"] >= fsdp["gathered for rollout"] + 12 * p / 8 / GIB + fsdp["context"]
    assert hf_rows["DDP"]["generation copy (bf16)"] == pytest.approx(2 * p / GIB)
    assert fsdp["generation copy (bf16)"] == 0
    from mmopd.plan import launch_command

    assert "fsdp.yaml" in launch_command("c.yaml", 8, 1, rows, 80.0, vllm=True)
    assert "rollout.backend" not in launch_command("c.yaml", 8, 1, rows, 80.0, vllm=True)
    assert "ddp.yaml" in launch_command("c.yaml", 8, 1, rows, 80.0, lora=True)


def test_cli_prints_the_table_and_a_launch_command(capsys):
    assert main(["plan", str(ROOT / "configs" / "reopold" / "math-1.5b.yaml"),
                 "trainer.gradient_checkpointing=false", "--gpus", "4", "--nodes", "2"]) == 0
    out = capsys.readouterr().out
    assert "student 1.78 B parameters, in-process teacher 7.62 B; 8 GPU(s)" in out
    assert "| fits |" in out and "--num_machines 2 --num_processes 8" in out


def test_cli_errors_are_clear(tmp_path, capsys):
    cfg = ROOT / "configs" / "tiny" / "reopold.yaml"
    assert main(["plan", str(cfg), "model.path=null",
                 "model.tiny={hidden_size: 8}", "model.tokenizer=x"]) == 2
    assert "plan estimates real checkpoints" in capsys.readouterr().err
    assert main(["plan", str(cfg), f"model.path={tmp_path}"]) == 2
    assert "cannot read the config" in capsys.readouterr().err
    assert main(["plan", str(cfg), "--gpus", "0"]) == 2
