"""ServedTeacher: scoring episodes through vLLM's OpenAI-compatible server.

The fast tests use a small local HTTP stub: it stands in for an unreachable, slow or misbehaving
server and answers in vLLM's response shape from a known next-token table, so parsing, batching,
retries and error messages are checked without vLLM. Correctness against a real model is the
`vllm`-marked group: a real `vllm serve` on a tiny checkpoint, compared with the in-process
HFScorer (run with the vLLM virtual env's python).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import torch

from mmopd.episode import Episode
from mmopd.teachers.served import ServedTeacher, ServedTeacherError
from mmopd.teachers.served_wire import entropy_lower_bound
from mmopd.vision import VisionInputs

# -- episodes ------------------------------------------------------------------------------------


def make_episode(tok: Any, question: str, replies: list[str], observation: str = "",
                 teacher_question: str | None = None) -> Episode:
    """Prompt (chat template) + student replies (loss_mask 1), with a user observation between
    replies (loss_mask 0); optionally a teacher view with another question."""

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    def prompt(q: str) -> list[int]:
        return ids(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True))

    ep = Episode([], [], [], [], prompt_len=0)
    ep.append(prompt(question), student=False)
    ep.prompt_len = len(ep.input_ids)
    for i, reply in enumerate(replies):
        if i:
            ep.append(ids(f"\n<|im_start|>user\n{observation}<|im_end|>\n<|im_start|>assistant\n"),
                      student=False)
        ep.append(ids(reply + "<|im_end|>"), student=True, step=i)
    if teacher_question is not None:
        ep.teacher_prompt_ids = prompt(teacher_question)
    return ep


@pytest.fixture(scope="module")
def char_tok():
    from mmopd.tokenizer import build_char_tokenizer

    return build_char_tokenizer()


@pytest.fixture(scope="module")
def episodes(char_tok) -> list[Episode]:
    return [
        make_episode(char_tok, "What is 12+35?", ["12+35 = 47. \\boxed{47}"]),
        make_episode(char_tok, "Compute 7*8.", ["Let me use the tool.", "It says 56, so 56."],
                     observation="calculator: 56"),
        make_episode(char_tok, "2+2?", ["4"], teacher_question="2+2? (answer: 4)"),
        make_episode(char_tok, "Spell cat backwards.", ["t a c -> tac"]),
        make_episode(char_tok, "What is 9-3?", ["9-3 = 6\n\\boxed{6}"]),
    ]


# -- a stub server in vLLM's response shape --------------------------------------------------------


class Stub:
    """A local HTTP server for the fast tests (NOT vLLM). /v1/completions answers prompt
    log-probs from a fixed next-token table log p(y_t | y_{t-1}) in vLLM's shape; `script` queues
    canned (status, payload) answers per path before the normal ones; `delay` sleeps per path."""

    def __init__(self, tokenize: Callable[[str], list[int]], vocab: int, *,
                 max_model_len: int = 512, models: tuple[str, ...] = ("tiny",)) -> None:
        gen = torch.Generator().manual_seed(0)
        self.table_VV = torch.log_softmax(3 * torch.randn(vocab, vocab, generator=gen), -1)
        self.tokenize, self.max_model_len, self.models = tokenize, max_model_len, models
        self.calls: Counter[str] = Counter()
        self.script: dict[str, list[tuple[int, Any]]] = {}
        self.delay: dict[str, float] = {}
        self.drop_position = False  # answer one prompt position too few
        self.image_token, self.expand = -1, []  # token-in endpoint: placeholder, tokens per image
        self.generate_bodies: list[dict[str, Any]] = []
        self.completion_bodies: list[dict[str, Any]] = []
        self.shift = 0.0  # added to every returned value (5.0: a server returning logits)
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, body: dict[str, Any] | None) -> None:
                stub.calls[self.path] += 1
                time.sleep(stub.delay.get(self.path, 0.0))
                queued = stub.script.get(self.path)
                status, payload = queued.pop(0) if queued else stub.reply(self.path, body)
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out
                    pass

            def do_GET(self) -> None:
                self._answer(None)

            def do_POST(self) -> None:
                self._answer(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever,
                                        kwargs={"poll_interval": 0.02}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def reply(self, path: str, body: dict[str, Any] | None) -> tuple[int, Any]:
        if path == "/v1/models":
            return 200, {"object": "list", "data": [
                {"id": m, "object": "model", "max_model_len": self.max_model_len}
                for m in self.models]}
        if path == "/tokenize":
            toks = self.tokenize(body["prompt"])
            return 200, {"count": len(toks), "max_model_len": self.max_model_len,
                         "tokens": toks, "token_strs": None}
        if path == "/v1/completions":
            self.completion_bodies.append(body)
            k = body["prompt_logprobs"]
            choices = []
            for i, ids in enumerate(body["prompt"]):
                plp: list[dict[str, Any] | None] = [None]
                for t in range(1, len(ids)):
                    row = self.table_VV[ids[t - 1]] + self.shift
                    own = row[ids[t]]
                    entry = {str(ids[t]): {"logprob": own.item(), "rank": int((row >= own).sum()),
                                           "decoded_token": "?"}}
                    vals, top = row.topk(k)
                    for r, (v, j) in enumerate(zip(vals.tolist(), top.tolist())):
                        entry[str(j)] = {"logprob": v, "rank": r + 1, "decoded_token": "?"}
                    plp.append(entry)
                if self.drop_position:
                    plp.pop()
                choices.append({"index": i, "text": "x", "prompt_logprobs": plp,
                                "prompt_token_ids": ids, "token_ids": None})
            return 200, {"object": "text_completion", "model": body["model"],
                         "choices": choices[::-1]}  # any order: the client sorts by index
        if path == "/inference/v1/generate":  # vLLM's token-in endpoint, images expanded
            self.generate_bodies.append(body)
            ids: list[int] = []
            for t in body["token_ids"]:
                ids += [t] * (self.expand.pop(0) if t == self.image_token else 1)
            plp = self.reply("/v1/completions", {"prompt": [ids], "model": "x",
                                                 "prompt_logprobs": body["sampling_params"][
                                                     "prompt_logprobs"]})[1]["choices"][0][
                                                         "prompt_logprobs"]
            return 200, {"prompt_token_ids": ids, "prompt_logprobs": plp, "choices": []}
        return 404, {"error": {"message": f"no route {path}", "code": 404}}


@pytest.fixture
def stub(char_tok):
    s = Stub(lambda text: char_tok(text, add_special_tokens=False)["input_ids"], len(char_tok))
    yield s
    s.close()


def quick(url: str, **kw: Any) -> ServedTeacher:
    """A teacher with a small retry budget, so failing tests stay fast."""
    return ServedTeacher(url, **{"max_retries": 2, "backoff_s": 0.01, "timeout_s": 5.0, **kw})


def reference(table_VV: torch.Tensor, episodes: list[Episode], view: str, k: int):
    """(logp, entropy, topk ids, topk logp) of the stub's table at every loss token."""
    rows, targets = [], []
    for ep in episodes:
        ids, mask, _ = ep.view(view)
        for t in range(1, len(ids)):
            if mask[t]:
                rows.append(ids[t - 1])
                targets.append(ids[t])
    lp = table_VV[rows]
    ent = -(lp.exp() * lp).sum(-1)
    vals, top = lp.topk(k, dim=-1)
    return lp.gather(-1, torch.tensor(targets)[:, None]).squeeze(-1), ent, top, vals


def bound_from_known(table_VV: torch.Tensor, episodes: list[Episode], view: str,
                     k: int) -> torch.Tensor:
    """Entropy of {top-k ids, the target if outside them, the rest as one bucket}."""
    out = []
    for ep in episodes:
        ids, mask, _ = ep.view(view)
        for t in range(1, len(ids)):
            if mask[t]:
                p = table_VV[ids[t - 1]].double().exp()
                known = torch.zeros_like(p, dtype=torch.bool)
                known[p.topk(k).indices] = True
                known[ids[t]] = True
                rest = (1 - p[known].sum()).clamp_min(1e-30)
                out.append(float(-(p[known] * p[known].log()).sum() - rest * rest.log()))
    return torch.tensor(out, dtype=torch.float32)


# -- fast tests (stub server) --------------------------------------------------------------------


@pytest.mark.parametrize("view", ["student", "teacher"])
def test_scores_parse_in_order_batched_and_concurrent(stub, char_tok, episodes, view):
    teacher = quick(stub.url + "/v1", view=view, batch_size=2, concurrency=2, entropy_topk=8)
    teacher.check(char_tok)
    assert teacher.model == "tiny" and teacher.max_model_len == 512
    stub.calls.clear()
    s = teacher.score(episodes, topk=4)
    assert stub.calls["/v1/completions"] == 3  # 5 episodes in batches of 2
    logp, ent, top, vals = reference(stub.table_VV, episodes, view, 4)
    n = sum(ep.num_generated for ep in episodes)
    assert s.logp_N.shape == (n,) and s.topk_ids_NK.shape == (n, 4) and s.hidden_NH is None
    assert s.logp_N.dtype == s.entropy_N.dtype == s.topk_logp_NK.dtype == torch.float32
    assert s.topk_ids_NK.dtype == torch.long
    torch.testing.assert_close(s.logp_N, logp, atol=1e-6, rtol=0)
    torch.testing.assert_close(s.topk_logp_NK, vals, atol=1e-6, rtol=0)
    assert torch.equal(s.topk_ids_NK, top)
    assert (s.entropy_N <= ent + 1e-5).all()  # a lower bound on the full entropy ...
    assert (s.entropy_N >= bound_from_known(stub.table_VV, episodes, view, 8) - 1e-5).all()
    no_topk = teacher.score(episodes)
    assert no_topk.topk_ids_NK is None and torch.equal(no_topk.logp_N, s.logp_N)


def test_only_what_the_objective_reads_is_asked_for(stub, char_tok, episodes):
    """An objective that reads only the sampled token's log-prob: prompt_logprobs 0 (the top-20
    of every token was a gigabyte of JSON per rank per batch at scale), no entropy; every
    request samples its token at temperature 1 with nothing else applied."""
    teacher = quick(stub.url)
    teacher.check(char_tok)
    stub.completion_bodies.clear()
    s = teacher.score(episodes)
    assert [b["prompt_logprobs"] for b in stub.completion_bodies] == [0]
    body = stub.completion_bodies[0]
    assert body["temperature"] == 1.0 and body["top_p"] == 1.0 and body["top_k"] == 0
    assert body["repetition_penalty"] == 1.0
    torch.testing.assert_close(s.logp_N, reference(stub.table_VV, episodes, "student", 1)[0],
                               atol=1e-6, rtol=0)
    assert s.entropy_N.isnan().all() and s.topk_ids_NK is None
    stub.completion_bodies.clear()
    teacher.score(episodes, topk=3)
    assert stub.completion_bodies[0]["prompt_logprobs"] == 3


def test_a_server_returning_logits_is_refused(stub, char_tok):
    """vllm serve --logprobs-mode raw_logits answers prompt "log-probs" that are logits: the
    start-up probe sees values above 0 and refuses the server, naming the flag."""
    stub.shift = 5.0
    with pytest.raises(ServedTeacherError, match="--logprobs-mode raw_logprobs"):
        quick(stub.url).check(char_tok)


def test_entropy_lower_bound_is_a_bound():
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        p = torch.softmax(2 * torch.randn(50, generator=gen, dtype=torch.float64), -1)
        full = float(-(p * p.log()).sum())
        srt = p.sort(descending=True).values.tolist()
        bounds = [entropy_lower_bound(srt[:k]) for k in (1, 5, 20, 50)]
        assert all(b <= full + 1e-9 for b in bounds)
        assert bounds == sorted(bounds)  # more known outcomes, a tighter bound
        assert bounds[-1] == pytest.approx(full, abs=1e-9)


def test_unreachable_url_fails_fast_with_a_hint(char_tok):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    teacher = quick(f"http://127.0.0.1:{port}")
    t0 = time.monotonic()
    with pytest.raises(ServedTeacherError) as e:
        teacher.check(char_tok)
    assert time.monotonic() - t0 < 3
    msg = str(e.value)
    assert f"127.0.0.1:{port}/v1/models" in msg and "3 attempt(s)" in msg
    assert "Connection" in msg and "vllm serve" in msg


def test_slow_server_times_out_after_bounded_retries(stub, episodes):
    stub.delay["/v1/completions"] = 1.5
    teacher = quick(stub.url, timeout_s=0.3, max_retries=1)
    t0 = time.monotonic()
    with pytest.raises(ServedTeacherError, match=r"2 attempt\(s\).*timed out after 0.3s"):
        teacher.score(episodes[:1])
    assert time.monotonic() - t0 < 1.5
    assert stub.calls["/v1/completions"] == 2


def test_server_error_is_retried_then_succeeds(stub, episodes):
    stub.script["/v1/completions"] = [(500, {"error": {"message": "engine hiccup"}}),
                                      (503, {"error": {"message": "busy"}})]
    s = quick(stub.url).score(episodes[:2])
    assert stub.calls["/v1/completions"] == 3
    assert s.logp_N.numel() == episodes[0].num_generated + episodes[1].num_generated


def test_persistent_server_error_names_the_last_error(stub, episodes):
    stub.script["/v1/completions"] = [(500, {"error": {"message": "engine dead"}})] * 3
    with pytest.raises(ServedTeacherError, match=r"3 attempt\(s\).*HTTP 500: engine dead"):
        quick(stub.url).score(episodes[:1])


def test_client_error_is_not_retried(stub, episodes):
    stub.script["/v1/completions"] = [(400, {"error": {
        "message": "Token id 500 is out of vocabulary", "type": "BadRequestError", "code": 400}})]
    with pytest.raises(ServedTeacherError, match="HTTP 400 .*Token id 500 is out of vocabulary"):
        quick(stub.url).score(episodes[:1])
    assert stub.calls["/v1/completions"] == 1


def test_max_logprobs_refusal_suggests_the_server_flag(stub, episodes):
    stub.script["/v1/completions"] = [(400, {"error": {"message": "Requested prompt logprobs "
                                                       "of 32, which is greater than max allowed: "
                                                       "20"}})]
    with pytest.raises(ServedTeacherError, match="--max-logprobs 32"):
        quick(stub.url).score(episodes[:1], topk=32)


def test_tokenizer_mismatch_is_refused(stub, char_tok):
    def shifted(text: str) -> list[int]:  # a server whose vocabulary is off by one for digits
        ids = char_tok(text, add_special_tokens=False)["input_ids"]
        digits = set(char_tok("0123456789", add_special_tokens=False)["input_ids"])
        return [i + 1 if i in digits else i for i in ids]

    stub.tokenize = shifted
    with pytest.raises(ServedTeacherError, match="tokenizer differs from the student's"):
        quick(stub.url).check(char_tok)


def test_model_name_is_picked_or_validated(char_tok):
    s = Stub(lambda t: char_tok(t, add_special_tokens=False)["input_ids"], len(char_tok),
             models=("a", "b"))
    try:
        with pytest.raises(ServedTeacherError, match=r"several models \['a', 'b'\]"):
            quick(s.url).check(char_tok)
        with pytest.raises(ServedTeacherError, match="does not serve 'c'"):
            quick(s.url, model="c").check(char_tok)
        teacher = quick(s.url, model="b")
        teacher.check(char_tok)
        assert teacher.model == "b"
    finally:
        s.close()


def test_round_trip_mismatch_is_an_error(stub, episodes):
    stub.drop_position = True
    with pytest.raises(ServedTeacherError, match="prompt log-probs for .* positions"):
        quick(stub.url).score(episodes[:1])


def test_too_long_episode_fails_before_sending(char_tok, episodes):
    s = Stub(lambda t: char_tok(t, add_special_tokens=False)["input_ids"], len(char_tok),
             max_model_len=20)
    try:
        with pytest.raises(ServedTeacherError, match="episode 0 has .* max_model_len is 20"):
            quick(s.url).score(episodes[:1])
        assert s.calls["/v1/completions"] == 0
    finally:
        s.close()


def test_hidden_states_and_stray_images_are_refused(stub, episodes):
    teacher = quick(stub.url)
    with pytest.raises(ServedTeacherError, match="no hidden states.*in-process teacher"):
        teacher.score(episodes, keep_hidden=True)
    vis = Episode(list(episodes[0].input_ids), list(episodes[0].loss_mask),
                  list(episodes[0].step_index), list(episodes[0].sampled_logprobs),
                  episodes[0].prompt_len,
                  vision=VisionInputs(torch.zeros(4, 8), torch.tensor([[1, 2, 2]])))
    with pytest.raises(ServedTeacherError, match="set up for a text student"):
        teacher.score([vis])
    assert stub.calls["/v1/completions"] == 0


def test_episodes_with_images_go_to_the_token_in_endpoint(tmp_path):
    """A VLM student's episodes: text ones batched to /v1/completions, each one with images
    alone to /inference/v1/generate with one placeholder per image and the resized images as
    PNG data URLs; the server's expansion must be the student's. Scores land in episode order."""
    import base64
    import io

    from PIL import Image

    from mmopd.config import ModelConfig, TinyModelConfig
    from mmopd.models import load_tokenizer, load_vision
    from mmopd.rollout.render import ChatRenderer
    from mmopd.tokenizer import build_char_tokenizer

    build_char_tokenizer(tmp_path, vision=True)
    cfg = ModelConfig(tiny=TinyModelConfig(arch="qwen2_5_vl"), tokenizer=str(tmp_path))
    tok = load_tokenizer(cfg)
    vision = load_vision(cfg, tok)
    renderer = ChatRenderer(tok, vision)

    def vl_episode(w: int, h: int, reply: str) -> Episode:
        r = renderer.render([{"role": "user", "content": [
            {"type": "image", "image": Image.new("RGB", (w, h), (9, 99, 199))},
            {"type": "text", "text": "colour?"}]}])
        ep = Episode([], [], [], [], prompt_len=0)
        ep.append(r.ids, student=False, vision=r.vision)
        ep.prompt_len = len(ep.input_ids)
        ep.append(tok(reply + "<|im_end|>", add_special_tokens=False)["input_ids"], student=True)
        return ep

    eps = [vl_episode(100, 70, "blue"), make_episode(tok, "2+2?", ["4"]),
           make_episode(tok, "3+3?", ["6"]), vl_episode(30, 30, "sky")]
    counts = [vision.tokens_per_image(e.vision) for e in (eps[0], eps[3])]
    s = Stub(lambda text: tok(text, add_special_tokens=False)["input_ids"], len(tok))
    try:
        s.image_token = vision.image_token_id
        teacher = quick(s.url, vision=vision, concurrency=1)
        s.expand = [n for c in counts for n in c]
        got = teacher.score(eps, topk=3)
        want = reference(s.table_VV, eps, "student", 3)
        assert torch.allclose(got.logp_N, want[0]) and torch.equal(got.topk_ids_NK, want[2])
        assert s.calls["/v1/completions"] == 1  # the two text episodes, one batch
        assert len(s.generate_bodies) == 2
        body = s.generate_bodies[0]
        assert body["token_ids"].count(vision.image_token_id) == 1  # collapsed
        png = base64.b64decode(body["content_parts"][0]["url"].split(",", 1)[1])
        assert Image.open(io.BytesIO(png)).size == (112, 56)  # the resized image, lossless
        s.expand = [counts[0][0] + 4]  # a server that resizes differently
        with pytest.raises(ServedTeacherError, match="image processing .* differs"):
            teacher.score(eps[:1])
    finally:
        s.close()


# -- against a real vLLM server --------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    pytest.importorskip("vllm", reason="needs vllm (run with the vLLM virtual env's python)")
    from vllm_utils import VLLMServer, build_tiny_checkpoint

    root = tmp_path_factory.mktemp("served-teacher")
    model_dir = build_tiny_checkpoint(root / "tiny")
    # --enable-scale-out: vLLM's token-in endpoint, which episodes with images go to
    server = VLLMServer(model_dir, root / "vllm.log", "--enable-scale-out")
    try:
        server.wait_healthy(timeout_s=300)
        print(f"\nvllm serve healthy after {server.startup_s:.1f}s: {' '.join(server.command)}")
        yield server, model_dir
    finally:
        server.stop()


@pytest.mark.vllm
def test_served_scores_match_in_process_hf(vllm_server, episodes):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmopd.teachers.scorer import HFScorer

    server, model_dir = vllm_server
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    k = 5
    for view in ("student", "teacher"):
        served = ServedTeacher(server.url, view=view, batch_size=2, concurrency=2,
                               entropy_topk=20)
        served.check(tok)
        s = served.score(episodes, topk=k)
        h = HFScorer(model, tok.pad_token_id, view=view).score(episodes, topk=k + 1)
        dlogp = (s.logp_N - h.logp_N).abs().max().item()
        print(f"\n[{view}] max |log p served - log p HF| = {dlogp:.2e} over {s.logp_N.numel()} "
              f"tokens; entropy bound gap mean {(h.entropy_N - s.entropy_N).mean():.3f} nats")
        assert dlogp < 1e-3
        torch.testing.assert_close(s.topk_logp_NK, h.topk_logp_NK[:, :k], atol=1e-3, rtol=0)
        gaps = h.topk_logp_NK[:, :-1] - h.topk_logp_NK[:, 1:]  # [N, k]: a tie has a tiny gap
        untied = (gaps > 2e-3).all(-1)
        assert untied.float().mean() > 0.8
        assert torch.equal(s.topk_ids_NK[untied], h.topk_ids_NK[untied, :k])
        assert (s.entropy_N <= h.entropy_N + 1e-4).all()
        assert (s.entropy_N > 0).all()
    again = ServedTeacher(server.url).score(episodes, topk=k)  # prefix-cached prompts: same
    first = ServedTeacher(server.url).score(episodes, topk=k)
    assert torch.equal(again.logp_N, first.logp_N)


@pytest.mark.vllm
def test_the_token_in_endpoint_scores_as_completions_do(vllm_server, episodes):
    """The request a VLM episode goes out as, here without images, on a real server: the same
    scores as the /v1/completions path, read the same way (with images: test_vllm_vision)."""
    server, model_dir = vllm_server
    served = ServedTeacher(server.url)
    served.check(__import__("transformers").AutoTokenizer.from_pretrained(model_dir))
    for ep in episodes[:3]:
        ids, mask, _ = ep.view("student")
        a = served._score_prompts([list(ids)], [list(mask)], 5)
        b = served._score_generate(list(ids), list(mask), None, 5)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=0)


@pytest.mark.vllm
def test_real_server_refuses_another_tokenizer_and_long_episodes(vllm_server, char_tok):
    from mmopd.tokenizer import build_char_tokenizer

    server, _ = vllm_server
    vlm_tok = build_char_tokenizer(vision=True)  # the text ids plus four vision tokens
    with pytest.raises(ServedTeacherError, match="tokenizer differs from the student's"):
        ServedTeacher(server.url).check(vlm_tok)
    long = make_episode(char_tok, "x" * 500, ["y" * 20])
    teacher = ServedTeacher(server.url)
    teacher.check(char_tok)
    with pytest.raises(ServedTeacherError, match="max_model_len is 512"):
        teacher.score([long])
    with pytest.raises(ServedTeacherError, match="--max-logprobs 21"):
        teacher.score([make_episode(char_tok, "1+1?", ["2"])], topk=21)
    with pytest.raises(ServedTeacherError, match="--max-logprobs 21"):  # before training
        ServedTeacher(server.url).check(char_tok, topk=21)


@pytest.mark.vllm
def test_real_server_in_a_logits_mode_is_refused(tmp_path, char_tok):
    """A real `vllm serve --logprobs-mode raw_logits` returns logits as prompt log-probs: the
    start-up check refuses it; the fixture's server (vLLM's default mode) passes, with and
    without top-k."""
    pytest.importorskip("vllm", reason="needs vllm (run with the vLLM virtual env's python)")
    from vllm_utils import VLLMServer, build_tiny_checkpoint

    model_dir = build_tiny_checkpoint(tmp_path / "tiny")
    server = VLLMServer(model_dir, tmp_path / "vllm.log", "--logprobs-mode", "raw_logits")
    try:
        server.wait_healthy(timeout_s=300)
        with pytest.raises(ServedTeacherError, match="--logprobs-mode raw_logprobs"):
            ServedTeacher(server.url).check(char_tok)
    finally:
        server.stop()


@pytest.mark.vllm
@pytest.mark.parametrize("objective", [
    ["objective.name=reopold"],
    ["objective.name=rkl", "objective.topk=8", "objective.topk_source=teacher"],
])
def test_training_with_a_served_teacher_matches_the_in_process_teacher(
        vllm_server, student_dir, tmp_path, objective):
    """The same run with the teacher behind the server and loaded in process: same rollouts,
    same teacher scores, so the same losses (the served path changes where scores come from,
    nothing else)."""
    import json

    from mmopd.config import TrainConfig, load_config
    from mmopd.training.loop import train

    server, model_dir = vllm_server
    common = [f"model.path={student_dir}", "env.kwargs={level: 1}",
              "rollout.prompts_per_batch=4", "rollout.samples_per_prompt=2",
              "rollout.max_new_tokens=12", "rollout.minibatches=2", "trainer.steps=2",
              "trainer.micro_batch_size=4", "eval.num_problems=4", "eval.pass_k=0",
              "eval.at_start=false", "optim.lr=1e-3", "trainer.diagnostics_tokens=0",
              "teacher.check_template=false", *objective]
    losses = {}
    for kind, extra in (("served", ["teacher.kind=served", f"teacher.served.url={server.url}"]),
                        ("model", [f"teacher.model.path={model_dir}"])):
        out = tmp_path / kind
        train(load_config(TrainConfig, None, [*common, *extra, f"trainer.output_dir={out}"]))
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        losses[kind] = [r["loss"] for r in rows]
    assert losses["served"] == pytest.approx(losses["model"], abs=1e-4, rel=1e-3)


@pytest.mark.vllm
def test_training_survives_a_served_teacher_that_dies(student_dir, tmp_path):
    """A real `vllm serve` killed (SIGKILL) mid-run. (1) A new server comes up on the same URL:
    the trainer retries with backoff, checks the new server is the same teacher and finishes,
    with the losses of a run whose teacher never left (nothing trained on garbage). (2) It never
    comes back: the run stops naming the URL and the attempts, its checkpoints are complete, and
    `resume=auto` finishes it once a server is back."""
    pytest.importorskip("vllm", reason="needs vllm (run with the vLLM virtual env's python)")
    import os
    import subprocess
    import sys
    from pathlib import Path

    from vllm_utils import VLLMServer, build_tiny_checkpoint, free_port

    from mmopd.config import TrainConfig, load_config
    from mmopd.training.checkpoint import list_checkpoints
    from mmopd.training.loop import train

    model_dir = build_tiny_checkpoint(tmp_path / "tiny")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = Path(__file__).parent.parent / "configs" / "tiny" / "reopold.yaml"
    common = [f"model.path={student_dir}", "env.kwargs={level: 1}", "rollout.prompts_per_batch=4",
              "rollout.samples_per_prompt=2", "rollout.max_new_tokens=12", "trainer.steps=12",
              "trainer.save_every=2", "trainer.micro_batch_size=4", "eval.num_problems=2",
              "eval.pass_k=0", "eval.at_start=false", "optim.lr=1e-3",
              "trainer.diagnostics_tokens=0", "teacher.check_template=false"]
    served = ["teacher.kind=served", f"teacher.served.url={url}", "teacher.served.backoff_s=0.5",
              "teacher.served.max_backoff_s=2"]

    def start(name: str) -> VLLMServer:
        server = VLLMServer(model_dir, tmp_path / f"{name}.log", port=port)
        server.wait_healthy(timeout_s=300)
        print(f"\nvllm serve {name} healthy after {server.startup_s:.1f}s")
        return server

    def launch(out: Path, retries: int) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "mmopd", "train", str(config), *common, *served,
             f"teacher.served.max_retries={retries}", f"trainer.output_dir={out}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"})

    def kill_after(server: VLLMServer, proc: subprocess.Popen, out: Path, rows: int) -> None:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= rows:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before the server was killed"
        server.kill()

    def losses(out: Path) -> list[float]:
        return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]

    reference = tmp_path / "reference"  # the same run, its teacher in process
    train(load_config(TrainConfig, config, [*common, f"teacher.model.path={model_dir}",
                                            f"trainer.output_dir={reference}"]))

    # (1) the server dies after step 2 and a new one answers on the same URL
    server = start("first")
    back = tmp_path / "comes-back"
    proc = launch(back, retries=60)
    kill_after(server, proc, back, rows=2)
    server = start("second")
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    log = out + err  # progress lines go to stdout, errors to stderr
    assert proc.returncode == 0, log[-3000:]
    assert f"served teacher {url}/v1/completions: " in log and "retry 1/60" in log
    assert "answers again; checking it is the same teacher" in log
    print(f"survived: {log.count(' retry ')} retried requests while the server was away")
    assert losses(back) == pytest.approx(losses(reference), abs=1e-4, rel=1e-3)

    # (2) the server dies after step 4 and does not come back within the retries
    gone = tmp_path / "never-returns"
    proc = launch(gone, retries=3)
    kill_after(server, proc, gone, rows=4)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, (out + err)[-3000:]
    print("stopped: " + err.strip().splitlines()[-1][:300])
    assert f"served teacher {url}/v1/completions: request failed after 4 attempt(s)" in err
    done = list_checkpoints(gone / "checkpoints")
    assert done and done[-1].name in {"step-4", "step-6"}  # complete, whichever came last
    server = start("third")
    try:
        train(load_config(TrainConfig, config, [*common, *served, f"trainer.output_dir={gone}",
                                                "trainer.resume=auto"]))
    finally:
        server.stop()
    assert losses(gone) == pytest.approx(losses(reference), abs=1e-4, rel=1e-3)
