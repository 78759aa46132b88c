"""A character-level tokenizer with a ChatML chat template, built locally (no download).

It is saved as an ordinary Hugging Face tokenizer directory, so tiny models load it through the
same `AutoTokenizer.from_pretrained` path that real checkpoints use. With `vision=True` it also
gets Qwen-VL's vision tokens, a chat template that renders image content items, and a Qwen2-VL
image processor saved next to it (a processor directory, like a real VLM checkpoint's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mmopd.vision import VISION_TOKENS

PAD, BOS, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# The same shape as Qwen2.5's template, so multi-turn rendering code is exercised as on real models.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2-VL's template shape: string content, or a list of image / text items in order.
CHATML_VISION_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item or 'image_url' in item %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_char_tokenizer(out_dir: str | Path | None = None, *, vision: bool = False,
                         min_pixels: int = 28 * 28 * 4,
                         max_pixels: int = 112 * 112) -> PreTrainedTokenizerFast:
    """Printable ASCII plus newline, one token per character, three special tokens.

    It is a byte-level BPE with no merges, the same kind of tokenizer as Qwen2's (space and
    newline are the byte-level symbols "Ġ" and "Ċ"), so loading it next to a Qwen2 config with
    AutoTokenizer yields an identical tokenizer. Every character is its own token, which keeps
    tiny models tiny (vocab 99); characters outside printable ASCII are dropped.

    `vision=True` appends the four Qwen-VL vision tokens (ids 99-102, text ids unchanged) and
    saves a Qwen2-VL image processor (patch 14, merge 2, images resized into
    [min_pixels, max_pixels]) to `out_dir`.
    """
    chars = ["\u010a", "\u0120"] + [chr(i) for i in range(33, 127)]  # Ċ = "\n", Ġ = " "
    vision_tokens = list(VISION_TOKENS) if vision else []
    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS] + chars + vision_tokens)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, eos_token=EOS,
        additional_special_tokens=[BOS, *vision_tokens], model_max_length=4096,
    )
    tok.chat_template = CHATML_VISION_TEMPLATE if vision else CHATML_TEMPLATE
    tok.padding_side = "left"
    if out_dir is not None:
        tok.save_pretrained(str(out_dir))
        if vision:
            tiny_image_processor(min_pixels, max_pixels).save_pretrained(str(out_dir))
    return tok


def tiny_image_processor(min_pixels: int, max_pixels: int) -> Any:
    """Qwen2-VL's image processor (the PIL backend: no torchvision needed)."""
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14,
                                    merge_size=2, temporal_patch_size=2)


# Gemma 3's template shape: a system message folds into the first user turn, replies are trimmed,
# the model's turns are "model", every turn ends with <end_of_turn>.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% set sys = '' %}{% if messages[0]['role'] == 'system' %}"
    "{% set sys = messages[0]['content'] + '\n\n' %}{% set messages = messages[1:] %}{% endif %}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ (sys if loop.first else '') + message['content'] | trim }}"
    "<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def build_bpe_tokenizer(out_dir: str | Path | None = None, *, vocab_size: int = 400,
                        corpus: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE with merges learnt from a small arithmetic corpus, special tokens and a
    Gemma-3-shaped chat template: a tokenizer that splits text differently from
    `build_char_tokenizer`'s (multi-character tokens, a space joined to the word after it,
    characters split into bytes), for cross-tokenizer distillation on tiny local models."""
    from tokenizers import trainers

    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    corpus = corpus or [
        f"What is {a} + {b}? The answer is {a + b}. {words[a % 10]} plus {words[b % 10]}"
        for a in range(30) for b in range(0, 30, 3)] + ["Hello, world! naïve café 東京"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    special = ["<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]
    core.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"], model_max_length=4096)
    tok.chat_template = GEMMA_TEMPLATE
    tok.padding_side = "left"
    if out_dir is not None:
        tok.save_pretrained(str(out_dir))
    return tok
