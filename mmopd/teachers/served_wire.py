"""What a served teacher and vLLM's server exchange: request bodies, and the reading of their
answers (one position's prompt log-probs, the entropy bound, error messages).

An episode with images (a VLM student; `ServedTeacher.vision` is its VisionProcessor) goes alone
to vLLM's token-in endpoint `/inference/v1/generate` (`vllm serve --enable-scale-out`) with the
token ids, one placeholder per image, the images as PNG data URLs and `prompt_logprobs: K`. The
server expands each placeholder from its image by its own processor; the expanded ids it returns
must equal the episode's, or the teacher's image processing differs from the student's and the
run stops. Also the probe image the start-up check scores."""

from __future__ import annotations

import base64
import io
import json
import math
import urllib.error
from collections.abc import Sequence
from typing import Any


def data_url(image: Any) -> str:
    """A PIL image as a PNG data URL (lossless: the server decodes the very pixels)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# The one token a scoring request samples: at temperature 1, nothing else applied, whatever
# defaults the served model's generation config would add (vLLM fills unset fields from it).
NEUTRAL_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                    "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}


def generate_body(teacher: Any, ids: list[int], vision: Any, k: int) -> dict[str, Any]:
    """The request scoring token ids `ids` (and the images of `vision`, None: text only) with the
    top-`k` prompt log-probs of every position."""
    body: dict[str, Any] = {
        "model": teacher.model, "token_ids": list(ids), "return_token_ids": True,
        "sampling_params": {"max_tokens": 1, **NEUTRAL_SAMPLING, "prompt_logprobs": k}}
    if vision is None:
        return body
    body["token_ids"], images = teacher.vision.engine_prompt(ids, vision)
    body["content_parts"] = [{"type": "image_url", "url": data_url(im)} for im in images]
    return body


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


def position(entry: Any, token: int, k: int) -> tuple[float | None, list[int], list[float], float]:
    """(log p(token), top-k ids, top-k log-probs, entropy lower bound) from one position's
    `{str(id): {"logprob", "rank", ...}}`."""
    if not isinstance(entry, dict):
        return None, [], [], 0.0
    own = entry.get(str(token))
    lp = float(own["logprob"]) if isinstance(own, dict) else None
    # the prompt token comes first with its true rank; the top-k follow with ranks 1..k
    top = sorted((int(v["rank"]), -float(v["logprob"]), int(tid)) for tid, v in entry.items()
                 if isinstance(v, dict) and v.get("rank") is not None and v["rank"] <= k)[:k]
    top_ids, top_lp = [t[2] for t in top], [-t[1] for t in top]
    probs = [math.exp(x) for x in top_lp]
    if lp is not None and token not in top_ids:
        probs.append(math.exp(lp))  # the sampled token is one more known outcome
    return lp, top_ids, top_lp, entropy_lower_bound(probs)


def entropy_lower_bound(probs: Sequence[float]) -> float:
    """Entropy of the known probabilities plus one bucket for the remaining mass: a lower
    bound on the entropy of the full distribution (merging outcomes never raises entropy)."""
    h = -sum(p * math.log(p) for p in probs if p > 0)
    rest = 1.0 - sum(probs)
    return h - rest * math.log(rest) if rest > 1e-12 else h


def error_body(e: urllib.error.HTTPError) -> str:
    """The server's error message (vLLM: {"error": {"message": ...}}), or its raw body."""
    try:
        raw = e.read().decode(errors="replace")
    except Exception:  # a body that cannot be read still leaves the status code
        return e.reason if isinstance(e.reason, str) else ""
    try:
        err = json.loads(raw).get("error", raw)
        return str(err.get("message", err)) if isinstance(err, dict) else str(err)
    except (ValueError, AttributeError):
        return raw[:500]
