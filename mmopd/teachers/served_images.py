"""What a served teacher sends for an episode with images (a VLM student; `ServedTeacher.vision`
is its VisionProcessor): one request per episode to vLLM's token-in endpoint
`/inference/v1/generate` (`vllm serve --enable-scale-out`) with the token ids, one placeholder per
image, the images as PNG data URLs and `prompt_logprobs: K`. The server expands each placeholder
from its image by its own processor; the expanded ids it returns must equal the episode's, or the
teacher's image processing differs from the student's and the run stops. Also the probe image
the start-up check scores."""

from __future__ import annotations

import base64
import io
from typing import Any

import torch


def data_url(image: Any) -> str:
    """A PIL image as a PNG data URL (lossless: the server decodes the very pixels)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def generate_body(teacher: Any, ids: list[int], vision: Any, k: int) -> dict[str, Any]:
    """The request scoring token ids `ids` (and the images of `vision`, None: text only) with the
    top-`k` prompt log-probs of every position."""
    body: dict[str, Any] = {
        "model": teacher.model, "token_ids": list(ids), "return_token_ids": True,
        "sampling_params": {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": k}}
    if vision is None:
        return body
    from mmopd.teachers.served import ServedTeacherError

    if vision.images is None:
        raise ServedTeacherError("the episode's images were kept as tensors only; a served "
                                 "teacher needs the resized images")
    body["token_ids"] = teacher.vision.collapse(list(ids), vision)
    body["content_parts"] = [{"type": "image_url", "url": data_url(im)} for im in vision.images]
    return body


def score_generate(teacher: Any, ids: list[int], mask: list[int], vision: Any, k: int,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One episode through the token-in endpoint (`vision` None: text only), read as
    `ServedTeacher._read` reads completions."""
    from mmopd.teachers.served import ServedTeacherError

    try:
        res = teacher._request("/inference/v1/generate", generate_body(teacher, ids, vision, k))
    except ServedTeacherError as e:
        raise ServedTeacherError(f"{e}. Episodes with images are scored through vLLM's "
                                 "/inference/v1/generate: start the teacher with `vllm serve "
                                 "... --enable-scale-out`") from None
    sent = res.get("prompt_token_ids") if isinstance(res, dict) else None
    if sent is None or list(sent) != list(ids):
        raise ServedTeacherError(
            f"served teacher {teacher.url}: the server read the episode as "
            f"{'?' if sent is None else len(sent)} tokens, the student rendered {len(ids)}: the "
            "teacher's image processing (min_pixels / max_pixels, patch size) differs from the "
            "student's; serve it with the student's (--mm-processor-kwargs)")
    return teacher._read([res.get("prompt_logprobs")], [list(ids)], [list(mask)], k)


def image_probe(tokenizer: Any, vision: Any) -> tuple[list[int], list[int], Any]:
    """(ids, loss mask over the text after the image, VisionInputs) of a one-image question,
    rendered as the student renders episodes."""
    from PIL import Image

    from mmopd.rollout.render import ChatRenderer

    side = 2 * vision.factor
    r = ChatRenderer(tokenizer, vision).render([{"role": "user", "content": [
        {"type": "image", "image": Image.new("RGB", (side, side), (200, 40, 40))},
        {"type": "text", "text": "What colour is this?"}]}])
    last = max(i for i, t in enumerate(r.ids) if t == vision.image_token_id)
    return r.ids, [int(i > last + 1) for i in range(len(r.ids))], r.vision
