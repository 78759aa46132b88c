"""Loading students and teachers: by hub name or directory (real checkpoints), or built from a tiny
config (tests, demos). Both paths end in the same `PreTrainedModel` + tokenizer pair, plus a
`VisionProcessor` for vision-language models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL)."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from mmopd.config import LoraSettings, ModelConfig, TinyModelConfig
from mmopd.vision import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START, VisionProcessor


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
    if tok.chat_template is None:  # VLM checkpoints may keep it with the processor only
        tok.chat_template = _processor_chat_template(source)
    if tok.chat_template is None:
        raise ModelLoadError(f"{field}: tokenizer {source!r} has no chat template; mmopd renders "
                             "every prompt through it (use an instruct/chat checkpoint)")
    if tok.pad_token_id is None:  # many base checkpoints ship without one; EOS is safe as pad
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def _processor_chat_template(source: str) -> str | None:
    """The chat template a processor keeps beside the tokenizer (chat_template.jinja or .json)."""
    from transformers.utils import cached_file

    for name in ("chat_template.jinja", "chat_template.json"):
        try:
            f = cached_file(source, name, _raise_exceptions_for_missing_entries=False)
        except OSError:
            f = None
        if f:
            text = open(f, encoding="utf-8").read()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return None


def is_vlm(cfg: ModelConfig, field: str = "model") -> bool:
    """Whether the model of `cfg` is a vision-language model (its config alone is read)."""
    if cfg.tiny is not None:
        return cfg.tiny.arch != "qwen2"
    path = _check_local(cfg.path, f"{field}.path")
    try:
        return getattr(AutoConfig.from_pretrained(path), "vision_config", None) is not None
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{field}.path: cannot read the config of {cfg.path!r}: "
                             f"{str(e).splitlines()[0]}") from None


def load_vision(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase,
                field: str = "model") -> VisionProcessor | None:
    """The image pipeline of a vision-language model (None for text-only models): its image
    processor (from the tokenizer directory, or the checkpoint), with `cfg.min_pixels` /
    `cfg.max_pixels` as the resize bounds."""
    if not is_vlm(cfg, field):
        return None
    where = f"{field}.tokenizer" if cfg.tokenizer else f"{field}.path"
    source = os.path.expanduser(cfg.tokenizer or cfg.path or "")
    try:
        from transformers.utils import is_torchvision_available

        kwargs = {} if is_torchvision_available() else {"backend": "pil"}
        try:
            image_processor = AutoImageProcessor.from_pretrained(source, **kwargs)
        except TypeError:  # transformers without the `backend` argument
            image_processor = AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{where}: {source!r} is a vision-language model but has no image "
                             f"processor (preprocessor_config.json): {str(e).splitlines()[0]}"
                             ) from None
    try:
        return VisionProcessor(image_processor, tokenizer, min_pixels=cfg.min_pixels,
                               max_pixels=cfg.max_pixels)
    except (ValueError, AttributeError) as e:
        raise ModelLoadError(f"{where}: unsupported image processor "
                             f"{type(image_processor).__name__}: {e}") from None


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim / 2 rotary frequencies into (time, height, width) like Qwen's [16, 24, 24]."""
    half = head_dim // 2
    hw = half * 3 // 8
    return [half - 2 * hw, hw, hw]


def _tiny_config(t: TinyModelConfig, tokenizer: PreTrainedTokenizerBase,
                 vision: VisionProcessor | None) -> PretrainedConfig:
    text: dict[str, Any] = dict(
        vocab_size=len(tokenizer), hidden_size=t.hidden_size, num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
        intermediate_size=t.intermediate_size, max_position_embeddings=t.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None)
    if t.arch == "qwen2":
        return Qwen2Config(**text, tie_word_embeddings=True)
    if vision is None:
        raise ModelLoadError(f"model.tiny.arch={t.arch} needs an image processor in the tokenizer "
                             "directory (`mmopd tokenizer OUT --vision` builds one)")
    vocab = tokenizer.get_vocab()
    ids = dict(image_token_id=vocab[IMAGE_PAD], video_token_id=vocab.get(VIDEO_PAD, 0),
               vision_start_token_id=vocab[VISION_START], vision_end_token_id=vocab[VISION_END])
    head_dim = t.hidden_size // t.num_heads
    rope = {"rope_type": "default", "rope_theta": 10000.0,
            "mrope_section": _mrope_section(head_dim)}
    geometry = dict(patch_size=vision.patch_size, spatial_merge_size=vision.merge_size,
                    temporal_patch_size=vision.temporal_patch_size)
    vh, depth, heads = t.vision_hidden_size, t.vision_depth, t.vision_heads
    if t.arch == "qwen2_vl":
        from transformers import Qwen2VLConfig

        vis = dict(depth=depth, embed_dim=vh, hidden_size=t.hidden_size, mlp_ratio=2,
                   num_heads=heads, **geometry)
        return Qwen2VLConfig(text_config={**text, "rope_parameters": rope}, vision_config=vis,
                             tie_word_embeddings=True, **ids)
    if t.arch == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        vis = dict(depth=depth, hidden_size=vh, intermediate_size=2 * vh, num_heads=heads,
                   out_hidden_size=t.hidden_size, fullatt_block_indexes=[depth - 1],
                   window_size=vision.factor * 4, **geometry)
        return Qwen2_5_VLConfig(text_config={**text, "rope_parameters": rope}, vision_config=vis,
                                tie_word_embeddings=True, **ids)
    from transformers import Qwen3VLConfig

    rope["mrope_interleaved"] = True
    vis = dict(depth=depth, hidden_size=vh, intermediate_size=2 * vh, num_heads=heads,
               out_hidden_size=t.hidden_size, num_position_embeddings=64,
               deepstack_visual_indexes=[], **geometry)
    return Qwen3VLConfig(text_config={**text, "head_dim": head_dim, "rope_parameters": rope},
                         vision_config=vis, tie_word_embeddings=True, **ids)


def load_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, field: str = "model",
               trainable: bool = False, vision: VisionProcessor | None = None,
               meta: bool = False) -> PreTrainedModel:
    """Build or load a causal LM (or a VLM with its LM head) in `cfg.dtype` on the CPU
    (accelerate moves it). Tiny VL models take their patch geometry from `vision`. A trainable
    model with `cfg.lora` comes back wrapped in peft LoRA adapters, the base frozen; loaded for
    inference the same config is the plain base model (fresh adapters change nothing). A LoRA
    student's frozen base loads as a frozen model does ("auto": bf16 on a GPU that has it; no
    update can round away in it), its adapters in float32 (peft upcasts them). `meta`: the
    model's structure on the meta device, no weights read (a rank that receives its shard of
    a sharded teacher from rank 0)."""
    lora = trainable and cfg.lora is not None
    model = _load_base(cfg, tokenizer, field, trainable and not lora, vision, meta)
    if lora:
        return add_lora(model, cfg.lora)
    return model


def _load_base(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, field: str,
               trainable: bool, vision: VisionProcessor | None,
               meta: bool = False) -> PreTrainedModel:
    """The plain transformers model of `cfg` (no adapters)."""
    dtype = resolve_dtype(cfg.dtype, trainable)
    if cfg.tiny is not None:
        config = _tiny_config(cfg.tiny, tokenizer, vision)
        with torch.random.fork_rng(devices=[]), torch.device("meta" if meta else "cpu"):
            torch.manual_seed(cfg.tiny.seed)
            if cfg.tiny.arch == "qwen2":
                model = Qwen2ForCausalLM(config)
            else:
                model = AutoModelForImageTextToText.from_config(config)
        return model.to(dtype)
    path = _check_local(cfg.path, f"{field}.path")
    kwargs = {"dtype": dtype}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    auto = AutoModelForImageTextToText if is_vlm(cfg, field) else AutoModelForCausalLM
    if meta:
        with torch.device("meta"):
            return auto.from_config(AutoConfig.from_pretrained(path), **kwargs)
    try:
        model = auto.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{field}.path: cannot load {cfg.path!r}: "
                             f"{str(e).splitlines()[0]}") from None
    return model


# --------------------------------------------------------------------------- LoRA students


def add_lora(model: PreTrainedModel, lora: LoraSettings) -> PreTrainedModel:
    """Wrap `model` in trainable LoRA adapters (peft); every base weight is frozen."""
    from peft import LoraConfig, get_peft_model

    names = [name for name, _ in model.named_modules()]
    missing = [t for t in lora.target_modules  # peft matches a name or a dotted suffix
               if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ModelLoadError(f"model.lora.target_modules: {missing} are not module names of "
                             f"{type(model).__name__} (e.g. {leaves[:12]})")
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def is_lora(model: torch.nn.Module) -> bool:
    """A peft-wrapped model (LoRA student)."""
    return hasattr(model, "get_base_model")


def merged_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the weights of the plain model a LoRA student stands for (W + scale *
    B A per adapted layer), under the base model's own names, one at a time: an adapted layer's
    merged weight is computed when its turn comes, so a consumer that streams them (the vLLM
    weight sync) never holds more than one. Out of place: merging into the live model and back
    would leave rounding error in the frozen base weights. A plain model's own weights
    otherwise (no copies)."""
    if not is_lora(model):
        yield from model.state_dict().items()
        return
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    adapted = {f"{name}.weight": m for name, m in base.named_modules()
               if isinstance(m, LoraLayer)}
    for key, w in base.state_dict().items():
        if "lora_" in key:
            continue
        name = key.replace(".base_layer", "")
        module = adapted.get(name)
        if module is not None:
            with torch.no_grad():
                for adapter in module.active_adapters:
                    w = w + module.get_delta_weight(adapter).to(w.dtype)
        yield name, w


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`merged_weights` as one dict (every merged weight at once: for saving)."""
    return dict(merged_weights(model))


def plain_copy(model: torch.nn.Module) -> PreTrainedModel:
    """A deep copy as a plain transformers model: a LoRA student's adapters are merged in, so
    frozen teachers copied from it (self, EMA, G-OPD's reference) are ordinary models."""
    if not is_lora(model):
        return copy.deepcopy(model)
    return copy.deepcopy(model).merge_and_unload()


def save_merged(model: torch.nn.Module, out_dir: str | os.PathLike,
                state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """save_pretrained of the plain model; for a LoRA student the merged weights (loadable by
    path anywhere) and the adapter alone in `out_dir/adapter` (to resume training it).
    `state_dict`: the weights to write instead of the model's own (a sharded model's, gathered)."""
    if not is_lora(model):
        model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
        return
    if state_dict is not None:
        raise NotImplementedError("saving a sharded LoRA student")
    model.get_base_model().save_pretrained(out_dir, state_dict=merged_state_dict(model),
                                           safe_serialization=True)
    model.save_pretrained(os.path.join(out_dir, "adapter"), safe_serialization=True)


def load_adapter(model: torch.nn.Module, adapter_dir: str | os.PathLike) -> None:
    """Put the adapter weights saved by `save_merged` into a LoRA student built from the same
    base and settings."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    f = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not is_lora(model) or not os.path.isfile(f):
        raise ModelLoadError(f"trainer.resume: {adapter_dir} holds no LoRA adapter for this "
                             "student (model.lora must match the run that saved it)")
    res = set_peft_model_state_dict(model, load_file(f))
    if res.unexpected_keys or any("lora_" in k for k in res.missing_keys):
        raise ModelLoadError(f"trainer.resume: the adapter in {adapter_dir} does not fit "
                             f"model.lora (first mismatches: {res.unexpected_keys[:3]} "
                             f"{[k for k in res.missing_keys if 'lora_' in k][:3]})")


def check_same_vision(student: VisionProcessor | None, teacher: VisionProcessor | None) -> None:
    """A teacher scores the student's episodes as rendered for the student: image tokens and
    pixel patches must mean the same to both (same patch geometry), and a VLM student needs a
    VLM teacher."""
    if student is None:
        return
    if teacher is None:
        raise ModelLoadError("teacher.model: the student is a vision-language model but the "
                             "teacher is text-only; it cannot see the episodes' images")
    geo = ("patch_size", "merge_size", "temporal_patch_size")
    s, t = ([getattr(v, g) for g in geo] for v in (student, teacher))
    if s != t:
        raise ModelLoadError(f"teacher.model: image patch geometry (patch, merge, temporal) "
                             f"{t} differs from the student's {s}; pick a teacher of the same "
                             "VL family")


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
            "vocabulary: pick a teacher from the same model family, or set "
            "teacher.cross_tokenizer=true to distil across tokenizers by aligned text spans "
            "(sampled-token objectives: opd, reopold, gopd, exopd).")
    vs = student_model.get_output_embeddings().weight.shape[0]
    vt = teacher_model.get_output_embeddings().weight.shape[0]
    if min(vs, vt) < len(student_tok):
        raise ModelLoadError(f"teacher.model: output layer rows (student {vs}, teacher {vt}) are "
                             f"fewer than the tokenizer's {len(student_tok)} tokens")


def check_same_rendering(student_tok: PreTrainedTokenizerBase,
                         teacher_tok: PreTrainedTokenizerBase,
                         messages: list[dict[str, Any]]) -> None:
    """The teacher scores episodes rendered with the student's chat template; if the teacher's own
    template renders the same conversation differently, every teacher log-prob is taken out of the
    context the teacher was trained on — a silent failure. Checked on a probe conversation (the
    env's first prompt, a reply and a follow-up) before training starts."""
    probe = list(messages) + [{"role": "assistant", "content": "42"},
                              {"role": "user", "content": "and then?"}]
    try:
        s = student_tok.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
        t = teacher_tok.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # a template that cannot render the probe at all
        raise ModelLoadError(f"teacher.model: cannot render a probe conversation with both chat "
                             f"templates: {e}") from None
    if s != t:
        at = next((i for i, (a, b) in enumerate(zip(s, t)) if a != b), min(len(s), len(t)))
        raise ModelLoadError(
            "teacher.model: the teacher's chat template renders the same conversation differently "
            f"from the student's (first difference at character {at}: student "
            f"{s[max(0, at - 20): at + 30]!r} vs teacher {t[max(0, at - 20): at + 30]!r}). The "
            "teacher would score the student's tokens out of its own format. Use a teacher with "
            "the student's template, or set teacher.check_template=false if this is intended.")
