"""A teacher served by vLLM's OpenAI-compatible server, for teachers on other GPUs or nodes.

`ServedTeacher.score` sends each episode's token ids (under its prompt view) as a token prompt to
`/v1/completions` with `max_tokens: 1` and vLLM's `prompt_logprobs: K` extension, and reads back,
at every student token, the teacher's log-prob of that token and its top-K. Episodes go in
batches (a list of token prompts per request), several requests at a time, results in episode
order. Only the standard library speaks HTTP.

What a served teacher gives, and what it cannot:
- `logp_N`: exact (the server's float32 log-softmax of the teacher's logits);
- `topk_ids_NK` / `topk_logp_NK`: when `topk` > 0, ids sorted by log-prob (ties in the server's
  order); ids may include padded output rows of the teacher beyond the tokenizer's vocabulary;
- `entropy_N`: with `entropy_topk` > 0 (an objective that reads the teacher's entropy: EOPD), a
  LOWER BOUND on the teacher's entropy: the server returns only the top-K (K = max(topk,
  `entropy_topk`)), so the entropy is that of the partition {top-K ids, the sampled token if
  outside them, everything else as one bucket}; merging outcomes never raises entropy. It is
  tight where the teacher is peaked and loose where its mass is spread thin. NaN otherwise;
- what is asked for is what the objective reads: `prompt_logprobs` is K, 0 for objectives
  that read only the sampled token's log-prob (the top-K of every token of a batch is about a
  gigabyte of JSON at scale);
- no hidden states: full-vocabulary objectives (keep_hidden=True) need an in-process teacher.

Episodes with images go one per request to vLLM's token-in endpoint (`served_wire`).

Before training, `check(tokenizer)` reaches the server, picks the served model, compares its
tokenizer with the student's on probe strings and test-scores one probe, whose values must be
log-probs (a server started with `--logprobs-mode raw_logits` returns logits there), so a wrong
server fails with a clear message instead of scoring garbage. Requests sample their one token at
temperature 1 with no top-p / top-k / penalties, whatever the served model's generation config.
Transient failures (connection errors, timeouts, 5xx, 408/429) are retried with exponential backoff
(capped at `max_backoff_s`) up to `max_retries` times, each retry reported; other 4xx are not. A
server that died and came back on the same URL is checked again (model, tokenizer, a probe) before
the batch it scored is returned, so a different model restarted there stops the run instead of
being trained on. The response shape is vLLM's (checked against vllm 0.32):
`choices[i].prompt_logprobs` is a list with one entry per prompt token (None first), each a dict
`{str(token_id): {"logprob", "rank", "decoded_token"}}` holding the prompt token itself (rank = 1 +
#tokens scoring higher or equal) and the top-K with ranks 1..K.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from mmopd.episode import Episode
from mmopd.teachers.scorer import KeepHidden, TokenScores
from mmopd.teachers.served_wire import (
    NEUTRAL_SAMPLING,
    error_body,
    generate_body,
    image_probe,
    position,
)

_RETRIED_4XX = (408, 429)  # request timeout / too many requests: the server is busy, not wrong
_START_HINT = ("start the teacher with `vllm serve MODEL --host 0.0.0.0 --port PORT "
               "--max-logprobs K` (K >= the top-k this run asks for) and point the run at "
               "http://HOST:PORT")
# Probe strings for the tokenizer check, besides the chat template's own rendering.
_PROBE_TEXTS = (
    "What is 17 * 23? Let's think step by step.\n\n  17 * 23 = 391, so \\boxed{391}.",
    "naïve café — 数学 ∑ x² 🙂",
    "\t tabs,   spaces,\n\nnewlines {\"json\": [1, 2.5e-3]} <tool_call>",
)


class ServedTeacherError(RuntimeError):
    """The served teacher is unreachable, misconfigured for this run, or answered nonsense."""


class ServedTeacher:
    """The `Teacher` protocol over a vLLM OpenAI-compatible server.

    url: the server's base URL (`http://host:8000`; a trailing `/v1` is accepted).
    model: the served model name; None picks the only one the server serves.
    view: which prompt view of each episode the teacher reads (`Episode.view`).
    batch_size: episodes per request; concurrency: requests in flight at once.
    timeout_s: socket timeout per request (connect, and the wait for the response).
    max_retries: retries of a transient failure, with min(backoff_s * 2**attempt, max_backoff_s)
        seconds between.
    entropy_topk: top-K requested for the entropy bound when the objective reads the
        teacher's entropy (vLLM's default `--max-logprobs` is 20, the maximum it accepts per
        request); 0: it reads none, and `entropy_N` is NaN.
    api_key: sent as a bearer token (`vllm serve --api-key`).
    """

    def __init__(self, url: str, *, model: str | None = None, view: str = "student",
                 batch_size: int = 8, concurrency: int = 2, timeout_s: float = 300.0,
                 max_retries: int = 3, backoff_s: float = 1.0, max_backoff_s: float = 30.0,
                 entropy_topk: int = 0, api_key: str | None = None,
                 vision: Any = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"served teacher url {url!r}: expected http://HOST:PORT")
        for name, value in (("batch_size", batch_size), ("concurrency", concurrency)):
            if value < 1:
                raise ValueError(f"served teacher {name}={value}: must be at least 1")
        if timeout_s <= 0 or min(max_retries, backoff_s, max_backoff_s, entropy_topk) < 0:
            raise ValueError("served teacher: timeout_s must be positive, max_retries, "
                             "backoff_s, max_backoff_s and entropy_topk non-negative")
        url = url.rstrip("/")
        self.url = url[: -len("/v1")] if url.endswith("/v1") else url
        self.model = model
        self._model_asked = model  # None: whichever single model the server serves
        self.view = view
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.entropy_topk = entropy_topk
        self.api_key = api_key
        self.vision = vision  # the student's VisionProcessor: episodes with images
        self.max_model_len: int | None = None  # from the server (check / first score)
        self._resolved = False
        self._checked: tuple[PreTrainedTokenizerBase, int] | None = None  # check()'s arguments
        self._reconnected = False  # a request got through after the server was unreachable

    # -- HTTP --------------------------------------------------------------------------------

    def _request(self, path: str, body: dict[str, Any] | None = None) -> Any:
        """GET (body None) or POST JSON to `path`; retries transient failures, then raises."""
        url = self.url + path
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        attempts, last, unreachable, t0 = self.max_retries + 1, "", False, time.monotonic()
        for attempt in range(attempts):
            if attempt:
                wait = min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s)
                tqdm.write(f"served teacher {url}: {last}; retry {attempt}/{self.max_retries} "
                           f"in {wait:g}s")
                time.sleep(wait)
            req = urllib.request.Request(url, data=data, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as e:
                detail = error_body(e)
                if 400 <= e.code < 500 and e.code not in _RETRIED_4XX:
                    raise ServedTeacherError(f"served teacher {url}: HTTP {e.code} (not retried): "
                                             f"{detail}") from None
                last = f"HTTP {e.code}: {detail}"
                continue
            except (TimeoutError, urllib.error.URLError, http.client.HTTPException,
                    ConnectionError) as e:
                reason = getattr(e, "reason", e)
                if isinstance(reason, TimeoutError) or isinstance(e, TimeoutError):
                    last = f"timed out after {self.timeout_s:g}s"
                else:
                    last = f"{type(reason).__name__}: {reason}"
                unreachable = True
                continue
            if unreachable:
                self._reconnected = True
            try:
                return json.loads(raw)
            except ValueError:
                raise ServedTeacherError(f"served teacher {url}: the response is not JSON: "
                                         f"{raw[:200]!r}") from None
        raise ServedTeacherError(f"served teacher {url}: request failed after {attempts} "
                                 f"attempt(s) over {time.monotonic() - t0:.0f}s (max_retries="
                                 f"{self.max_retries}); last error: {last}")

    # -- start-up check ----------------------------------------------------------------------

    def _resolve_model(self) -> None:
        """Reach /v1/models, pick or validate the model name, learn max_model_len."""
        try:
            listing = self._request("/v1/models")
        except ServedTeacherError as e:
            raise ServedTeacherError(f"{e}. Is the teacher server running? {_START_HINT}") from None
        models = {m.get("id"): m for m in listing.get("data", []) if isinstance(m, dict)}
        if not models:
            raise ServedTeacherError(f"served teacher {self.url}: /v1/models lists no model")
        if self.model is None:
            if len(models) > 1:
                raise ServedTeacherError(f"served teacher {self.url} serves several models "
                                         f"{sorted(models)}; name one (served teacher `model`)")
            self.model = next(iter(models))
        elif self.model not in models:
            raise ServedTeacherError(f"served teacher {self.url} does not serve {self.model!r}; "
                                     f"it serves {sorted(models)}")
        mml = models[self.model].get("max_model_len")
        if isinstance(mml, int) and mml > 0:
            self.max_model_len = mml
        self._resolved = True

    def check(self, tokenizer: PreTrainedTokenizerBase, *, topk: int = 0) -> None:
        """Fail before training, with a clear message, if this server cannot score the
        student's episodes: unreachable, no such model, a different tokenizer, unknown
        max_model_len, a `--max-logprobs` below the top-k the run will ask for (`topk`), or a
        response of an unexpected shape (a probe is scored)."""
        self._checked = (tokenizer, topk)
        self._resolve_model()
        probes = list(_PROBE_TEXTS)
        if tokenizer.chat_template:
            probe_chat = [{"role": "system", "content": "You are helpful."},
                          {"role": "user", "content": "What is 2+2?"},
                          {"role": "assistant", "content": "4"},
                          {"role": "user", "content": "and 3+3?"}]
            probes.insert(0, tokenizer.apply_chat_template(probe_chat, tokenize=False,
                                                           add_generation_prompt=True))
        probes.append(" ".join(tokenizer.all_special_tokens))
        for text in probes:
            try:
                res = self._request("/tokenize", {"model": self.model, "prompt": text,
                                                  "add_special_tokens": False})
            except ServedTeacherError as e:
                raise ServedTeacherError(f"{e}. The tokenizer check needs vLLM's /tokenize "
                                         "endpoint") from None
            mine = tokenizer(text, add_special_tokens=False)["input_ids"]
            theirs = res.get("tokens")
            if theirs != mine:
                at = next((i for i, (a, b) in enumerate(zip(mine, theirs or [])) if a != b),
                          min(len(mine), len(theirs or [])))
                raise ServedTeacherError(
                    f"served teacher {self.url}: the served teacher's tokenizer differs from the "
                    f"student's on {text[:60]!r}: student ids {mine[max(0, at - 3): at + 5]} vs "
                    f"server {(theirs or [])[max(0, at - 3): at + 5]} (first difference at token "
                    f"{at}). Token-level distillation needs a shared vocabulary: serve a teacher "
                    "of the student's family (or pass --tokenizer to vllm serve).")
            if self.max_model_len is None and isinstance(res.get("max_model_len"), int):
                self.max_model_len = res["max_model_len"]
        if self.max_model_len is None:
            raise ServedTeacherError(f"served teacher {self.url}: the server reports no "
                                     "max_model_len (neither /v1/models nor /tokenize); cannot "
                                     "check episode lengths before sending them")
        probe_ids = tokenizer(probes[0], add_special_tokens=False)["input_ids"]
        probe_ids = probe_ids[: min(len(probe_ids), self.max_model_len - 1, 64)]
        k = max(topk, self.entropy_topk, 1)  # at least the top token: checks the values too
        if len(probe_ids) >= 2:
            self._check_logprobs(*self._score_prompts(
                [probe_ids], [[0] + [1] * (len(probe_ids) - 1)], k))
        if self.vision is not None:  # an image the way episodes send them, expanded alike
            self._score_generate(*image_probe(tokenizer, self.vision), k)

    def _check_logprobs(self, logp: torch.Tensor, _: torch.Tensor, __: torch.Tensor,
                        top: torch.Tensor) -> None:
        """The probe's values must be log-probs: none above 0, the top-k's probabilities
        summing to at most 1. A server in a logits mode returns raw scores there."""
        mass = top.double().exp().sum(-1)
        if (logp > 1e-4).any() or (top > 1e-4).any() or (mass > 1 + 1e-3).any():
            raise ServedTeacherError(
                f"served teacher {self.url}: its prompt log-probs are not log-probs (values up "
                f"to {float(torch.cat([logp, top.flatten()]).max()):.3g}, top-k mass up to "
                f"{float(mass.max()):.3g}): the server returns logits (vllm serve "
                "--logprobs-mode raw_logits or processed_logits); restart it with "
                "--logprobs-mode raw_logprobs, vLLM's default")

    # -- scoring -----------------------------------------------------------------------------

    def score(self, episodes: list[Episode], *, topk: int = 0,
              keep_hidden: KeepHidden = False) -> TokenScores:
        """Per-student-token teacher log-probs, the entropy lower bound and optionally the
        top-`topk`, flat over the episodes' student tokens in order (the Teacher protocol)."""
        if keep_hidden is not False:
            raise ServedTeacherError("a served teacher has no hidden states: full-vocabulary "
                                     "objectives (rkl/fkl/jsd with topk=0, vopd, aopd, ...) need "
                                     "an in-process teacher (teacher.kind: model)")
        if not episodes:
            raise ValueError("score() needs at least one episode")
        if not self._resolved:
            self._resolve_model()
        k = max(topk, self.entropy_topk)
        seqs, masks, images = [], [], []
        for i, ep in enumerate(episodes):
            ids, mask, vision = ep.view(self.view)
            images.append(vision if vision is not None and vision.num_images else None)
            if images[-1] is not None and self.vision is None:
                raise ServedTeacherError("episodes with images reached a served teacher set up "
                                         "for a text student")
            if mask and mask[0]:
                raise ValueError("a loss token at position 0 has no context to be predicted from")
            if self.max_model_len is not None and len(ids) + 1 > self.max_model_len:
                raise ServedTeacherError(
                    f"served teacher {self.url}: episode {i} has {len(ids)} tokens (view "
                    f"{self.view!r}) but the server's max_model_len is {self.max_model_len} "
                    "(scoring needs room for one generated token); raise vllm serve "
                    "--max-model-len or lower rollout.max_episode_tokens")
            seqs.append(list(ids))
            masks.append(list(mask))
        # requests in episode order: runs of text episodes batched, each one with images alone
        work: list[list[int]] = []
        for i, im in enumerate(images):
            if im is None and work and images[work[-1][0]] is None \
                    and len(work[-1]) < self.batch_size:
                work[-1].append(i)
            else:
                work.append([i])

        def request(group: list[int]) -> tuple[torch.Tensor, ...]:
            if images[group[0]] is not None:
                return self._score_generate(seqs[group[0]], masks[group[0]], images[group[0]], k)
            return self._score_prompts([seqs[i] for i in group], [masks[i] for i in group], k)

        if self.concurrency == 1 or len(work) == 1:
            parts = [request(g) for g in work]
        else:
            with ThreadPoolExecutor(min(self.concurrency, len(work))) as pool:
                parts = list(pool.map(request, work))
        if self._reconnected and self._checked is not None:
            # the server went away and something answers again: is it the same teacher?
            self._reconnected = False
            tqdm.write(f"served teacher {self.url} answers again; checking it is the same "
                       "teacher before using its scores")
            self.model = self._model_asked
            self.check(self._checked[0], topk=self._checked[1])
        logp = torch.cat([p[0] for p in parts])
        ent = torch.cat([p[1] for p in parts])
        if not self.entropy_topk:  # nothing reads it: no bound from the sampled token alone
            ent = torch.full_like(ent, float("nan"))
        if not topk:
            return TokenScores(logp_N=logp, entropy_N=ent)
        return TokenScores(logp_N=logp, entropy_N=ent,
                           topk_ids_NK=torch.cat([p[2] for p in parts])[:, :topk],
                           topk_logp_NK=torch.cat([p[3] for p in parts])[:, :topk])

    def _score_prompts(self, seqs: list[list[int]], masks: list[list[int]],
                       k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One request: (logp [n], entropy bound [n], top-k ids [n, k], top-k logp [n, k]) over
        the n loss tokens of these token prompts."""
        body = {"model": self.model, "prompt": seqs, "max_tokens": 1, **NEUTRAL_SAMPLING,
                "prompt_logprobs": k, "return_token_ids": True}
        try:
            res = self._request("/v1/completions", body)
        except ServedTeacherError as e:
            if "logprobs" in str(e) and "HTTP 400" in str(e):
                raise ServedTeacherError(f"{e}. Restart the server with --max-logprobs {k} or "
                                         "lower the objective's top-k / entropy_topk") from None
            raise
        choices = res.get("choices") if isinstance(res, dict) else None
        if not isinstance(choices, list) or len(choices) != len(seqs):
            raise ServedTeacherError(f"served teacher {self.url}: sent {len(seqs)} prompts, got "
                                     f"{'no' if choices is None else len(choices)} choices back")
        choices = sorted(choices, key=lambda c: c.get("index", 0))
        for j, (choice, ids) in enumerate(zip(choices, seqs)):
            sent = choice.get("prompt_token_ids")
            if sent is not None and list(sent) != ids:
                raise ServedTeacherError(f"served teacher {self.url}: prompt {j} did not "
                                         f"round-trip: sent {len(ids)} token ids, the server "
                                         f"read {len(sent)} different ones")
        return self._read([c.get("prompt_logprobs") for c in choices], seqs, masks, k)

    def _score_generate(self, ids: list[int], mask: list[int], vision: Any,
                        k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One episode through vLLM's token-in endpoint (`vision` None: text only)."""
        try:
            res = self._request("/inference/v1/generate", generate_body(self, ids, vision, k))
        except ServedTeacherError as e:
            raise ServedTeacherError(f"{e}. Episodes with images are scored through vLLM's "
                                     "/inference/v1/generate: start the teacher with `vllm "
                                     "serve ... --enable-scale-out`") from None
        sent = res.get("prompt_token_ids") if isinstance(res, dict) else None
        if sent is None or list(sent) != list(ids):
            raise ServedTeacherError(
                f"served teacher {self.url}: the server read the episode as "
                f"{'?' if sent is None else len(sent)} tokens, the student rendered {len(ids)}: "
                "the teacher's image processing (min_pixels / max_pixels, patch size) differs "
                "from the student's; serve it with the student's (--mm-processor-kwargs)")
        return self._read([res.get("prompt_logprobs")], [list(ids)], [list(mask)], k)

    def _read(self, plps: list[Any], seqs: list[list[int]], masks: list[list[int]],
              k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logp, entropy bound, top-k ids, top-k logp) over the loss tokens of these prompts
        from their `prompt_logprobs`."""
        logp, ent, ids_k, logp_k = [], [], [], []
        for j, (plp, ids, mask) in enumerate(zip(plps, seqs, masks)):
            if not isinstance(plp, list) or len(plp) != len(ids):
                got = "none" if not isinstance(plp, list) else f"{len(plp)} positions"
                raise ServedTeacherError(f"served teacher {self.url}: prompt {j} has {len(ids)} "
                                         f"tokens but the server returned prompt log-probs for "
                                         f"{got} (is it vLLM, with prompt_logprobs support?)")
            for t in range(1, len(ids)):
                if not mask[t]:
                    continue
                lp, top_ids, top_lp, h = position(plp[t], ids[t], k)
                if lp is None or len(top_ids) != k:
                    raise ServedTeacherError(
                        f"served teacher {self.url}: prompt {j} position {t}: expected the "
                        f"log-prob of token {ids[t]} and the top-{k}, got {plp[t]!r:.300}")
                logp.append(lp)
                ent.append(h)
                ids_k.append(top_ids)
                logp_k.append(top_lp)
        n = len(logp)
        return (torch.tensor(logp, dtype=torch.float32).reshape(n),
                torch.tensor(ent, dtype=torch.float32).reshape(n),
                torch.tensor(ids_k, dtype=torch.long).reshape(n, k),
                torch.tensor(logp_k, dtype=torch.float32).reshape(n, k))
