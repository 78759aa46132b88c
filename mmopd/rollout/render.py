"""Chat rendering through the tokenizer's own chat template, incremental across turns.

The first prompt is rendered whole. Later turns are appended as token deltas: what the template
adds for the new messages (plus the next generation prompt) is found by rendering a fixed stand-in
conversation with and without them, so tokens already in an episode — in particular the ones the
student sampled — are never re-tokenised from text.

With a `VisionProcessor`, messages may carry images (content items `{"type": "image", ...}`): the
template's one placeholder per image is expanded to the image's token count and the images come
back as `VisionInputs`, in the order of their placeholders.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

from transformers import PreTrainedTokenizerBase

from mmopd.vision import VisionError, VisionInputs, VisionProcessor, image_items

Message = dict[str, Any]


@dataclass
class Rendered:
    """Token ids of rendered messages and the images among them."""

    ids: list[int]
    vision: VisionInputs | None = None

# A stand-in history: only the template's framing of *new* messages is taken from renders of it.
_STAND_IN: list[Message] = [
    {"role": "user", "content": "x"},
    {"role": "assistant", "content": "y"},
]


class RenderError(ValueError):
    """The chat template cannot be used incrementally (or rendered at all) for these messages."""


class ChatRenderer:
    """Turns chat messages into token ids with `tokenizer.apply_chat_template`."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase,
                 vision: VisionProcessor | None = None) -> None:
        self.tokenizer = tokenizer
        self.vision = vision

    def render(self, messages: list[Message], tools: list[dict[str, Any]] | None = None, *,
               generation_prompt: bool = True) -> Rendered:
        """Token ids (and images) of a conversation, followed by the assistant generation prompt
        unless `generation_prompt` is False; `tools` (function schemas) go to templates that
        render them (Qwen: into the system message)."""
        try:
            has_images = bool(image_items(messages))
        except VisionError as e:
            raise RenderError(str(e)) from e
        if has_images and self.vision is None:
            raise RenderError("messages contain images but the model is text-only; use a "
                              "vision-language model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL)")
        try:
            if not has_images:
                out = self.tokenizer.apply_chat_template(
                    messages, tools=tools, add_generation_prompt=generation_prompt,
                    tokenize=True, return_dict=True)
                return Rendered(list(out["input_ids"]))
            text = self.tokenizer.apply_chat_template(
                messages, tools=tools, add_generation_prompt=generation_prompt, tokenize=False)
        except Exception as e:  # jinja raises its own exception types for bad roles/content
            raise RenderError(f"chat template failed on {len(messages)} message(s): {e}") from e
        assert self.vision is not None
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        try:
            vision = self.vision.process(messages)
            return Rendered(self.vision.expand(ids, vision), vision)
        except VisionError as e:
            raise RenderError(str(e)) from e

    def prompt(self, messages: list[Message],
               tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of a conversation followed by the assistant generation prompt."""
        return self.render(messages, tools).ids

    def full(self, messages: list[Message],
             tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of a finished conversation (for supervised data)."""
        return self.render(messages, tools, generation_prompt=False).ids

    @cached_property
    def turn_closer(self) -> list[int]:
        """Tokens the template writes after an assistant message's content (e.g. <|im_end|>\\n)."""
        text = self.tokenizer.apply_chat_template(_STAND_IN, tokenize=False)
        tail = text[text.rindex("y") + 1:]
        return self.tokenizer.encode(tail, add_special_tokens=False)

    def close_turn(self, generated: list[int]) -> list[int]:
        """Tokens to append after a student turn so the context reads as a finished message.

        A turn that ended on the end-of-turn token gets the rest of the closer (a newline in
        ChatML); a truncated turn gets the whole closer.
        """
        if generated and generated[-1] in self.stop_token_ids:
            return self.turn_closer[1:]
        return list(self.turn_closer)

    @cached_property
    def stop_token_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        if self.turn_closer:
            ids.add(self.turn_closer[0])
        return {i for i in ids if i is not None}

    @cached_property
    def _stand_in_ids(self) -> list[int]:
        return self.full(_STAND_IN)

    def render_continuation(self, new_messages: list[Message]) -> Rendered:
        """What follows a closed assistant turn: the new messages (tool results, user replies,
        with their images) and the next assistant generation prompt."""
        base = self._stand_in_ids
        ext = self.render(_STAND_IN + list(new_messages))  # the stand-in has no images
        if ext.ids[: len(base)] != base:
            raise RenderError("the chat template re-renders earlier turns when messages are "
                              "appended; incremental multi-turn rendering is not possible with it")
        return Rendered(ext.ids[len(base):], ext.vision)

    def continuation(self, new_messages: list[Message]) -> list[int]:
        """Token ids of `render_continuation`."""
        return self.render_continuation(new_messages).ids
