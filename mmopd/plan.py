"""`mmopd plan CONFIG --gpus N [--gpu-memory 80]`: the per-GPU memory a run needs under data
parallelism (DDP), fully sharded data parallelism (FSDP2) and LoRA, and which fit.

Parameters are counted exactly, by building each model on the meta device from its config (a
local checkpoint's config.json, the config of a known hub model listed below, or the hub). Memory
per GPU, in GiB:

- student, full training: float32 weights, gradients and AdamW's two moments: 16 bytes per
  parameter (DDP: on every GPU; FSDP2: divided by the GPUs, plus two gathered decoder layers in
  flight); LoRA: the frozen base in its load dtype plus 16 bytes per adapter parameter;
- FSDP2 rollouts with HF generate: the student gathered whole on every GPU while it generates
  and is scored (2 bytes per parameter under bf16, else 4) beside its weight and optimizer
  shards, so its peak is the larger of that and training (with vLLM: the engine, as below);
- the fused loss's float32 [V x H] gradient buffer of a trained output layer, plus under bf16
  the output layer cast once per micro-batch (DDP; FSDP2 gathers it in bf16); under bf16 HF
  generate samples from a bf16 copy of the student (2 bytes per parameter; not FSDP2);
- the teacher-student diagnostics: the hidden states of trainer.diagnostics_tokens tokens of
  both models;
- activations of one micro-batch (micro_batch_size x the longest episode: `--prompt-tokens` +
  max_new_tokens x `--turns`, at most rollout.max_episode_tokens; under the per-query
  normaliser a micro-batch holds whole queries, at least samples_per_prompt episodes): about
  34 x hidden bytes per token and layer under bf16 autocast with a fused attention kernel
  (Korthikanti et al., 2022; twice that in float32); with gradient checkpointing 2 x hidden
  per token and layer plus one layer's full set; plus the loss's logit chunks;
- an in-process teacher (bf16 weights, on every GPU; an EMA teacher float32; under FSDP2 with
  teacher.shard its blocks divided by the GPUs plus two in flight and its root gathered), the
  reference model of G-OPD, the teacher's final hidden states of every loss token of the
  rollout batch for full-vocabulary objectives (kept through its updates); a served teacher:
  nothing;
- a colocated vLLM engine: rollout.vllm.gpu_memory_utilization of the card; with sleep mode it is
  released while the trainer works, so the peak is the larger of the two phases, not their sum;
  HF generate instead: its KV cache for rollout.batch_size episodes (2 x layers x KV heads x head
  dim per token), during rollouts, when there are no gradients;
- 2 GiB of CUDA context and allocator slack.

These are estimates for planning (activations especially); the measured peak is in metrics.
"""

from __future__ import annotations

import dataclasses
from typing import Any

GIB = 2**30


class PlanError(ValueError):
    """A config or model the plan cannot estimate."""

OVERHEAD_GIB = 2.0

# Known hub models (their published config.json, the fields that set the parameter count), so
# `plan` works offline for the recipes in configs/.
_QWEN25 = {  # hidden, layers, heads, kv heads, intermediate, vocab, tied embeddings
    "0.5B": (896, 24, 14, 2, 4864, 151936, True), "1.5B": (1536, 28, 12, 2, 8960, 151936, True),
    "3B": (2048, 36, 16, 2, 11008, 151936, True), "7B": (3584, 28, 28, 4, 18944, 152064, False),
    "14B": (5120, 48, 40, 8, 13824, 152064, False), "32B": (5120, 64, 40, 8, 27648, 152064, False),
    "72B": (8192, 80, 64, 8, 29568, 152064, False),
}


def _text(size: str, tied: bool | None = None) -> dict[str, Any]:
    h, n_layers, heads, kv, inter, vocab, own = _QWEN25[size]
    tied = own if tied is None else tied
    return {"hidden_size": h, "num_hidden_layers": n_layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "intermediate_size": inter, "vocab_size": vocab,
            "tie_word_embeddings": tied}


# Fine-tuned checkpoints of those architectures, as their config.json give them (the REOPOLD
# recipes' models): name -> (the Qwen2.5 / Qwen2.5-VL size they are, tied embeddings)
_ALIASES = {
    "DeepSeek-R1-Distill-Qwen-1.5B": ("Qwen2.5-1.5B", False),
    "DeepSeek-R1-Distill-Qwen-7B": ("Qwen2.5-7B", False),
    "DeepSeek-R1-Distill-Qwen-32B": ("Qwen2.5-32B", False),
    "Skywork-OR1-Math-7B": ("Qwen2.5-7B", False), "Skywork-OR1-7B": ("Qwen2.5-7B", False),
    "Skywork-OR1-32B-Preview": ("Qwen2.5-32B", False),
    "NoisyRollout-Geo3K-32B": ("Qwen2.5-VL-32B", False),
    "NoisyRollout-Geo3k-7B": ("Qwen2.5-VL-7B", False),
    "PixelReasoner-RL-v1": ("Qwen2.5-VL-7B", False),
}


def known_config(name: str) -> Any | None:
    """The config of a known Qwen2.5 / Qwen2.5-VL hub model (or a fine-tune of one listed in
    _ALIASES), or None."""
    from transformers import AutoConfig

    base = name.split("/")[-1].removesuffix("-Instruct")
    tied = None
    if base in _ALIASES:
        base, tied = _ALIASES[base]
    for size in _QWEN25:
        if base in (f"Qwen2.5-{size}", f"Qwen2.5-Math-{size}", f"Qwen2.5-Coder-{size}"):
            return AutoConfig.for_model("qwen2", **_text(size, tied))
        if base == f"Qwen2.5-VL-{size}":
            vision = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "out_hidden_size": _QWEN25[size][0], "patch_size": 14,
                      "spatial_merge_size": 2, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31]}
            return AutoConfig.for_model("qwen2_5_vl", text_config=_text(size, tied),
                                        vision_config=vision, **_text(size, tied))
    return None


def model_config(path: str) -> Any:
    """A model's config: a local directory, a known hub model, or the hub."""
    import os

    from transformers import AutoConfig

    if not os.path.isdir(os.path.expanduser(path)):
        known = known_config(path)
        if known is not None:
            return known
    try:
        return AutoConfig.from_pretrained(os.path.expanduser(path))
    except (OSError, ValueError) as e:
        raise PlanError(f"cannot read the config of {path!r} ({str(e).splitlines()[0]}); give a "
                         "local checkpoint directory, or a Qwen2.5 / Qwen2.5-VL hub name") from None


@dataclasses.dataclass
class Shape:
    """What the estimate needs of one model."""

    params: int
    hidden: int
    layers: int
    vocab: int
    layer_params: int  # the largest decoder layer
    lora_params: int  # adapters of the run's LoRA settings (0 without)
    kv_per_token: int = 0  # key and value entries one token adds to the cache, all layers


def shape(config: Any, lora: Any = None) -> Shape:
    """Parameter counts of a model built on the meta device from `config`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    text = getattr(config, "text_config", None) or config
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config)
        except ValueError:  # vision-language configs
            model = AutoModelForImageTextToText.from_config(config)
    layers = [m for n, m in model.named_modules() if n.endswith(f"layers.{0}")
              and "visual" not in n]
    layer_params = sum(p.numel() for p in layers[0].parameters()) if layers else 0
    adapters = 0
    if lora is not None:
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in lora.target_modules \
                    and "visual" not in name:
                adapters += lora.r * (mod.in_features + mod.out_features)
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv = 2 * text.num_hidden_layers * (getattr(text, "num_key_value_heads", None) or heads)
    return Shape(sum(p.numel() for p in model.parameters()), text.hidden_size,
                 text.num_hidden_layers, text.vocab_size, layer_params, adapters,
                 kv * head_dim)


def estimate(cfg: Any, gpus: int, gpu_gib: float, prompt_tokens: int = 512, turns: int = 1,
             ) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Per-GPU GiB of each component under DDP / FSDP2 / LoRA (rows: component -> strategy)."""
    from mmopd.objectives import OBJECTIVES, needed_scores, needs_teacher_hidden

    if cfg.model.path is None:
        raise PlanError("model.path: plan estimates real checkpoints (tiny models fit anywhere)")
    lora = cfg.model.lora or _default_lora()
    s = shape(model_config(cfg.model.path), lora)
    t, tr, r = cfg.teacher, cfg.trainer, cfg.rollout
    obj = OBJECTIVES[cfg.objective.name]
    w_bytes = 2 if cfg.model.dtype in ("bfloat16", "float16") else 4
    seq = prompt_tokens + r.max_new_tokens * min(turns, r.max_turns)
    if r.max_episode_tokens:
        seq = min(seq, r.max_episode_tokens)
    # micro-batches hold whole queries under the per-query normaliser
    g = r.samples_per_prompt
    per_micro = (max(1, tr.micro_batch_size // g) * g if cfg.objective.form.normaliser == "query"
                 else tr.micro_batch_size)
    tokens = per_micro * seq
    act_scale = 1 if tr.bf16 else 2
    full_act = 34 * s.hidden * tokens * act_scale
    act = (2 * s.hidden * tokens * act_scale * s.layers + full_act if tr.gradient_checkpointing
           else full_act * s.layers)
    logits = 3 * tr.chunk_size * s.vocab * 4
    teacher = 0.0
    t_shape = None
    if obj.needs_teacher and t.kind == "model" and t.model is not None and t.model.path:
        t_shape = shape(model_config(t.model.path))
        teacher = t_shape.params * (4 if t.model.dtype == "float32" else 2)
    elif obj.needs_teacher and t.kind in ("self", "ema"):
        teacher = s.params * (4 if t.kind == "ema" else 2)
    t_bytes = 4 if (t.model is not None and t.model.dtype == "float32") else 2
    # teacher.shard under FSDP2: its blocks divided over the GPUs (two gathered in flight), its
    # root (embeddings and output layer) gathered
    ts = t_shape or (s if t.kind == "self" else None)
    t_sharded = (teacher if not (t.shard and ts is not None) else
                 teacher / gpus + t_bytes * (2 * ts.layer_params + 2 * ts.vocab * ts.hidden))
    kept = 0
    episodes = r.prompts_per_batch * r.samples_per_prompt  # one rank's rollout batch
    if needs_teacher_hidden(obj, cfg.objective) and t_shape is not None:
        # the teacher's final hidden states of every loss token of the rollout batch, kept
        # through its minibatch updates (the losses rebuild its logits from them)
        kept = episodes * (seq - prompt_tokens) * t_shape.hidden * t_bytes
    # the teacher-student diagnostics: the hidden states of their sampled tokens, both models
    diag = tr.diagnostics_tokens * 2 * s.hidden * 4 if obj.needs_teacher else 0
    # the fused loss's float32 output-layer gradient buffer [V x H] (a trained output layer),
    # and under bf16 the output layer cast once per micro-batch (FSDP2 gathers it in bf16)
    head = s.vocab * s.hidden
    out_grad = {"DDP": 4 * head + (2 * head if tr.bf16 else 0),
                "FSDP2": 4 * head, "LoRA": 0}
    # HF generate under bf16 samples from a copy of the student in bf16 (an FSDP2 student is
    # gathered in bf16 instead)
    gen_copy = 2 * s.params if (r.backend == "hf" and tr.bf16) else 0
    ref = s.params * 2 if "ref" in needed_scores(obj, cfg.objective) else 0
    vllm = r.vllm.gpu_memory_utilization * gpu_gib * GIB if r.backend == "vllm" else 0.0
    states = {"DDP": 16 * s.params,
              "FSDP2": 16 * s.params / gpus + 2 * 2 * s.layer_params,
              "LoRA": w_bytes * s.params + 16 * s.lora_params}
    # HF generate's KV cache: one rollout batch of episodes, in the compute dtype
    kv_cache = r.batch_size * seq * s.kv_per_token * (2 if tr.bf16 else 4)
    rows: dict[str, dict[str, float]] = {}
    for name, st in states.items():
        teacher_here = (t_sharded if name == "FSDP2" else teacher) + kept
        copy = 0 if name == "FSDP2" else gen_copy
        train = st + act + logits + out_grad[name] + teacher_here + ref + diag + copy
        gathered, engine, kv = 0.0, vllm, kv_cache if r.backend == "hf" else 0.0
        if name == "FSDP2" and r.backend == "hf":  # generate on the gathered student
            gathered, engine, kv = s.params * (2 if tr.bf16 else 4), 0.0, kv_cache
            total = max(train, 12 * s.params / gpus + gathered + teacher_here + ref + kv)
        elif r.backend == "hf":  # no gradients while generating: weights and AdamW state
            total = max(train, st * 12 / 16 + teacher_here + ref + copy + kv)
        else:
            total = max(train, engine) if r.vllm.sleep else train + engine
        rows[name] = {"weights + grads + optimizer": st / GIB, "activations": act / GIB,
                      "loss chunks": logits / GIB, "output-layer gradient": out_grad[name] / GIB,
                      "teacher": teacher_here / GIB, "reference model": ref / GIB,
                      "diagnostics": diag / GIB, "vLLM engine": engine / GIB,
                      "generation copy (bf16)": copy / GIB,
                      "gathered for rollout": gathered / GIB, "KV cache (HF generate)": kv / GIB,
                      "context": OVERHEAD_GIB,
                      "total": (total + OVERHEAD_GIB * GIB) / GIB}
    info = {"student_params": s.params, "lora_params": s.lora_params,
            "teacher_params": t_shape.params if t_shape else 0, "tokens_per_micro_batch": tokens,
            "episode_tokens": seq,
            "lora_is_default": cfg.model.lora is None}
    return rows, info


def _default_lora() -> Any:
    from mmopd.config import LoraSettings

    return LoraSettings()


def render(rows: dict[str, dict[str, float]], info: dict[str, Any], gpus: int, gpu_gib: float,
           nodes: int = 1) -> str:
    """The plan as a Markdown table plus a verdict per strategy."""
    names = list(rows)
    lines = [f"student {info['student_params'] / 1e9:.2f} B parameters"
             + (f", in-process teacher {info['teacher_params'] / 1e9:.2f} B"
                if info["teacher_params"] else "")
             + f"; {gpus} GPU(s) x {gpu_gib:g} GiB" + (f" on {nodes} nodes" if nodes > 1 else "")
             + f"; {info['tokens_per_micro_batch']:,} tokens per micro-batch (episodes of "
             f"{info['episode_tokens']:,})", "",
             "| GiB per GPU | " + " | ".join(names) + " |",
             "|---|" + "---:|" * len(names)]
    for comp in rows[names[0]]:
        lines.append(f"| {comp} | " + " | ".join(f"{rows[n][comp]:.1f}" for n in names) + " |")
    lines.append("| fits | " + " | ".join(
        "yes" if rows[n]["total"] <= gpu_gib else "no" for n in names) + " |")
    lora = (f"LoRA: r={16} on every attention and MLP projection (model.lora unset)"
            if info["lora_is_default"] else "LoRA: the config's model.lora")
    lines += ["", f"{lora}, {info['lora_params'] / 1e6:.1f} M adapter parameters. FSDP2: the "
              "student sharded over all GPUs, gathered whole to roll out with HF generate or "
              "weight by weight into each rank's vLLM engine (configs/accelerate/fsdp.yaml; "
              "docs/scale-out.md); an in-process teacher is on every GPU unless "
              "teacher.shard=true."]
    return "\n".join(lines)


def launch_command(config: str, gpus: int, nodes: int, rows: dict[str, dict[str, float]] | None
                   = None, gpu_gib: float = 80.0, vllm: bool = False, lora: bool = False,
                   ) -> str:
    """How to start the run on that many GPUs: DDP through accelerate (a LoRA student always),
    or FSDP2 where the plan says DDP does not fit and FSDP2 does."""
    fsdp = (rows is not None and not lora
            and rows["DDP"]["total"] > gpu_gib >= rows["FSDP2"]["total"])
    head = f"accelerate launch --config_file configs/accelerate/{'fsdp' if fsdp else 'ddp'}.yaml"
    tail = f"-m mmopd train {config} trainer.bf16=true"
    if nodes == 1:
        return f"{head} --num_processes {gpus} {tail}"
    return (f"# on each of the {nodes} nodes (NODE_RANK 0..{nodes - 1}; MAIN: node 0's address)\n"
            f"{head} --num_machines {nodes} --num_processes {gpus * nodes} \\\n"
            "    --machine_rank $NODE_RANK --main_process_ip $MAIN --main_process_port 29500 \\\n"
            f"    {tail}")
