"""Shared fixtures: a locally built tokenizer and tiny random Qwen2 checkpoints on disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config) -> None:
    """Under pytest-xdist (`make test` runs one worker per core) each worker computes on one
    thread, so workers share the cores instead of oversubscribing them. The CLI subprocesses a
    worker starts inherit the same bound through OMP_NUM_THREADS: two of them spinning two
    OpenMP threads each on two cores run many times slower than one thread each."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        os.environ["MKL_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    from mmopd.tokenizer import build_char_tokenizer

    d = tmp_path_factory.mktemp("tok")
    build_char_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def tokenizer(tok_dir):
    from mmopd.config import ModelConfig, TinyModelConfig
    from mmopd.models import load_tokenizer

    return load_tokenizer(ModelConfig(tiny=TinyModelConfig(), tokenizer=str(tok_dir)))


def _save_tiny(root: Path, tok_dir: Path, **tiny) -> Path:
    from mmopd.config import ModelConfig, TinyModelConfig
    from mmopd.models import load_model, load_tokenizer

    cfg = ModelConfig(tiny=TinyModelConfig(**tiny), tokenizer=str(tok_dir))
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok)
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory, tok_dir) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("student"), tok_dir, hidden_size=32, num_layers=1,
                      intermediate_size=64, seed=1)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tok_dir) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("teacher"), tok_dir, hidden_size=48, num_layers=2,
                      intermediate_size=96, seed=2)


@pytest.fixture
def tiny_overrides(student_dir, teacher_dir, tmp_path) -> list[str]:
    """Overrides for a train config that runs in a few seconds on random tiny models."""
    return [
        f"model.path={student_dir}", f"teacher.model.path={teacher_dir}",
        "env.kwargs={level: 1}", "rollout.prompts_per_batch=4", "rollout.samples_per_prompt=2",
        "rollout.max_new_tokens=8", "rollout.minibatches=2", "trainer.steps=2",
        "trainer.micro_batch_size=3", f"trainer.output_dir={tmp_path / 'run'}",
        "eval.num_problems=4", "eval.pass_k=2", "eval.at_start=false", "optim.lr=1e-3",
    ]


@pytest.fixture(scope="session")
def sft_teacher_dir(tmp_path_factory, tok_dir) -> Path:
    """A teacher with a peaked distribution: a few seconds of SFT on level-1 worked solutions."""
    from mmopd.config import SFTConfig, load_config
    from mmopd.training.sft import sft

    out = tmp_path_factory.mktemp("sft-teacher")
    sft(load_config(SFTConfig, None, [
        "model={tiny: {hidden_size: 48, num_layers: 2, intermediate_size: 96, seed: 3}, "
        f"tokenizer: {tok_dir}}}", "data={env: {kwargs: {level: 1}}, num_examples: 640}",
        "epochs=2", "batch_size=32", "optim.lr=3e-3", f"output_dir={out}", "eval_problems=0"]))
    return out


# Expected from gymnasium's check_env itself, not problems with the env.
_KNOWN_CHECKER_WARNINGS = ("different from the unwrapped", "alternative render modes")


def check_env_quietly(env) -> None:
    """gymnasium's check_env, failing on any warning it raises except the known ones above."""
    import warnings

    from gymnasium.utils.env_checker import check_env

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env)
    unexpected = [str(w.message) for w in caught
                  if not any(k in str(w.message) for k in _KNOWN_CHECKER_WARNINGS)]
    assert not unexpected, unexpected
