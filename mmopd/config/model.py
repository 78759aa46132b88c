"""The `model:` section (and `teacher.model:`): a checkpoint by name or path, or a tiny model
built in memory, with optional LoRA."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .base import _check


@dataclass
class TinyModelConfig:
    """A small Qwen2 decoder, or Qwen-VL model, built from a config (random init), for CPU tests
    and demos. VL architectures take their patch geometry from the image processor saved in the
    tokenizer directory (`mmopd tokenizer OUT --vision`)."""

    arch: Literal["qwen2", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"] = "qwen2"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    max_position_embeddings: int = 512
    seed: int = 0
    # vision tower of the VL architectures
    vision_depth: int = 1
    vision_hidden_size: int = 32
    vision_heads: int = 2

    def __post_init__(self) -> None:
        w = "model.tiny"
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                     "vision_depth", "vision_hidden_size", "vision_heads"):
            _check(getattr(self, name) > 0, f"{w}.{name}", "must be positive")
        _check(self.hidden_size % self.num_heads == 0, f"{w}.hidden_size",
               f"{self.hidden_size} is not divisible by num_heads={self.num_heads}")
        _check(self.num_heads % self.num_kv_heads == 0, f"{w}.num_kv_heads",
               f"num_heads={self.num_heads} must be a multiple of num_kv_heads")
        if self.arch != "qwen2":
            _check(self.hidden_size // self.num_heads >= 8, f"{w}.num_heads",
                   "VL models need a head dimension of at least 8 (3-D rope sections)")
            _check(self.vision_hidden_size % self.vision_heads == 0, f"{w}.vision_hidden_size",
                   f"{self.vision_hidden_size} is not divisible by vision_heads")


@dataclass
class LoraSettings:
    """LoRA adapters on the student (peft): the base weights stay frozen and only the adapters
    train (and go to the optimiser). Checkpoints hold the merged full model, loadable by path
    (`mmopd eval`, a vLLM engine, a later run), plus the adapter alone in `adapter/`."""

    r: int = 16  # adapter rank
    alpha: int = 32  # scaling alpha / r
    # dropout > 0 makes the training forward differ from the (eval-mode) pi_old scoring, so the
    # ratio rho != 1 even on a rollout batch's first step
    dropout: float = 0.0
    # attention and MLP projections of Qwen / Llama-style decoders
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

    def __post_init__(self) -> None:
        w = "model.lora"
        _check(self.r > 0, f"{w}.r", f"{self.r} must be positive")
        _check(self.alpha > 0, f"{w}.alpha", f"{self.alpha} must be positive")
        _check(0 <= self.dropout < 1, f"{w}.dropout", f"{self.dropout} is outside [0, 1)")
        _check(bool(self.target_modules), f"{w}.target_modules",
               "needs at least one module name (e.g. [q_proj, v_proj])")


@dataclass
class ModelConfig:
    """Where a model comes from: a hub name or local directory, or a tiny config to build."""

    path: str | None = None
    tokenizer: str | None = None  # defaults to `path`; required with `tiny`
    tiny: TinyModelConfig | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Attention implementation passed to from_pretrained ("sdpa", "eager", "flash_attention_2").
    attn_implementation: str | None = None
    # VLMs: images are resized into [min_pixels, max_pixels] (None: the image processor's own)
    min_pixels: int | None = None
    max_pixels: int | None = None
    # train LoRA adapters instead of every weight (the student only; null: full fine-tuning)
    lora: LoraSettings | None = None

    def __post_init__(self) -> None:
        _check((self.path is None) != (self.tiny is None), "model",
               "set exactly one of `path` (hub name or directory) or `tiny` (build from config)")
        if self.tiny is not None:
            _check(self.tokenizer is not None, "model.tokenizer",
                   "a tiny model needs a tokenizer directory (`mmopd tokenizer OUT` builds one)")
        for name in ("min_pixels", "max_pixels"):
            v = getattr(self, name)
            _check(v is None or v > 0, f"model.{name}", "must be positive (or null)")
        if self.min_pixels and self.max_pixels:
            _check(self.min_pixels <= self.max_pixels, "model.min_pixels",
                   f"{self.min_pixels} exceeds max_pixels={self.max_pixels}")
