"""A character-level tokenizer with a ChatML chat template, built locally (no download).

It is saved as an ordinary Hugging Face tokenizer directory, so tiny models load it through the
same `AutoTokenizer.from_pretrained` path that real checkpoints use.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# The same shape as Qwen2.5's template, so multi-turn rendering code is exercised as on real models.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_char_tokenizer(out_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Printable ASCII plus newline, one token per character, three special tokens.

    It is a byte-level BPE with no merges, the same kind of tokenizer as Qwen2's (space and
    newline are the byte-level symbols "Ġ" and "Ċ"), so loading it next to a Qwen2 config with
    AutoTokenizer yields an identical tokenizer. Every character is its own token, which keeps
    tiny models tiny (vocab 99); characters outside printable ASCII are dropped.
    """
    chars = ["\u010a", "\u0120"] + [chr(i) for i in range(33, 127)]  # Ċ = "\n", Ġ = " "
    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS] + chars)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, eos_token=EOS,
        additional_special_tokens=[BOS], model_max_length=4096,
    )
    tok.chat_template = CHATML_TEMPLATE
    tok.padding_side = "left"
    if out_dir is not None:
        tok.save_pretrained(str(out_dir))
    return tok
