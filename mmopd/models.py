"""Loading students and teachers: by hub name or directory (real checkpoints), or built from a tiny
config (tests, demos). Both paths end in the same `PreTrainedModel` + tokenizer pair."""

from __future__ import annotations

import os

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from mmopd.config import ModelConfig


class ModelLoadError(ValueError):
    """A model or tokenizer could not be loaded; the message names the config field."""


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, trainable: bool = False) -> torch.dtype:
    """"auto" = float32 for a model that trains (bf16 master weights would round small updates
    away; trainer.bf16 gives bf16 compute), else bf16 where the GPU supports it, and float32 on
    CPU (bf16 matmuls are slow there)."""
    if name != "auto":
        return _DTYPES[name]
    if not trainable and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _check_local(path: str, field: str) -> str:
    """Paths that look local must exist; anything else is tried as a hub name."""
    looks_local = path.startswith((".", "/", "~")) or os.path.exists(path) or path.count("/") > 1
    if looks_local and not os.path.isdir(os.path.expanduser(path)):
        raise ModelLoadError(f"{field}: {path!r} is not a directory (expected a "
                             "save_pretrained checkpoint or a hub name like 'Qwen/Qwen2.5-1.5B')")
    return os.path.expanduser(path)


def load_tokenizer(cfg: ModelConfig, field: str = "model") -> PreTrainedTokenizerBase:
    where = f"{field}.tokenizer" if cfg.tokenizer else f"{field}.path"
    source = _check_local(cfg.tokenizer or cfg.path, where)
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{where}: cannot load a tokenizer from {source!r}: "
                             f"{str(e).splitlines()[0]}") from None
    if tok.chat_template is None:
        raise ModelLoadError(f"{field}: tokenizer {source!r} has no chat template; mmopd renders "
                             "every prompt through it (use an instruct/chat checkpoint)")
    if tok.pad_token_id is None:  # many base checkpoints ship without one; EOS is safe as pad
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, field: str = "model",
               trainable: bool = False) -> PreTrainedModel:
    """Build or load a causal LM in `cfg.dtype` on the CPU (accelerate moves it)."""
    dtype = resolve_dtype(cfg.dtype, trainable)
    if cfg.tiny is not None:
        t = cfg.tiny
        config = Qwen2Config(
            vocab_size=len(tokenizer), hidden_size=t.hidden_size, num_hidden_layers=t.num_layers,
            num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
            intermediate_size=t.intermediate_size,
            max_position_embeddings=t.max_position_embeddings,
            tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(t.seed)
            model = Qwen2ForCausalLM(config)
        return model.to(dtype)
    path = _check_local(cfg.path, f"{field}.path")
    kwargs = {"dtype": dtype}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{field}.path: cannot load {cfg.path!r}: "
                             f"{str(e).splitlines()[0]}") from None
    return model


def check_same_vocab(student_tok: PreTrainedTokenizerBase, teacher_tok: PreTrainedTokenizerBase,
                     teacher_model: PreTrainedModel, student_model: PreTrainedModel) -> None:
    """Token-level distillation compares log-probs of the same token ids: vocabularies must agree.

    Checked before training starts, so a mismatch is an error rather than silent garbage rewards.
    """
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        s, t = student_tok.get_vocab(), teacher_tok.get_vocab()
        diff = sorted(set(s.items()) ^ set(t.items()))[:3]
        raise ModelLoadError(
            f"teacher.model: the teacher's tokenizer differs from the student's ({len(t)} vs "
            f"{len(s)} tokens; first differences {diff}). Token-level distillation needs a shared "
            "vocabulary: pick a teacher from the same model family.")
    vs = student_model.get_output_embeddings().weight.shape[0]
    vt = teacher_model.get_output_embeddings().weight.shape[0]
    if min(vs, vt) < len(student_tok):
        raise ModelLoadError(f"teacher.model: output layer rows (student {vs}, teacher {vt}) are "
                             f"fewer than the tokenizer's {len(student_tok)} tokens")
