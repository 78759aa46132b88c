"""Data parallelism on CPU (gloo, two processes): the token-mean loss is exact across ranks, and
`mmopd train` runs to the end under torchrun.

Each rank divides its summed token loss by the kept-token count summed over all ranks and
multiplies by the world size, because DDP averages gradients. With two ranks holding different
numbers of kept tokens, that must give exactly the gradient of one process doing the whole batch
— and a per-rank token mean must not.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmopd.config import TrainConfig, load_config
from mmopd.objectives import OBJECTIVES

HERE = Path(__file__).parent


def _torchrun(*args: str, timeout: int = 300,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Two local processes on gloo. `accelerate launch` cannot start several CPU processes
    without MPI, and torchrun alone leaves accelerate on one process per rank unless
    ACCELERATE_USE_CPU is set. On a time-out the launcher is sent SIGTERM, on which it ends
    the ranks (each runs in a session of its own), so a hung rank fails the test instead of
    outliving it."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", *args]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env, cwd=HERE.parent, start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                out, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, err = proc.communicate()
            pytest.fail(f"torchrun timed out after {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _case(name: str, overrides: list[str], student, teacher, tok) -> dict:
    """A fixed minibatch of 8 episodes, four queries of two: two with at most 3 reply tokens,
    two with up to 12, scored and planned as the trainer does. Rank 0 takes the first query,
    rank 1 the other three: unequal shares of tokens (the batch normaliser) and of queries (the
    per-query one)."""
    from mmopd.envs import make_env
    from mmopd.logprobs import lm_head_fn
    from mmopd.objectives import make_plan, needed_scores, needs_teacher_hidden
    from mmopd.rollout.agent_loop import collect_episodes
    from mmopd.rollout.render import ChatRenderer
    from mmopd.rollout.sampler import HFSampler, SamplingParams
    from mmopd.teachers.scorer import HFScorer
    from mmopd.training.losses import Heads
    from mmopd.training.scoring import score_batch

    cfg = load_config(TrainConfig, None, overrides + [f"objective.name={name}",
                                                      "trainer.micro_batch_size=3"])
    obj = OBJECTIVES[name]
    torch.manual_seed(0)
    eps = []
    for max_new in (3, 12):
        got = collect_episodes([make_env(cfg.env.id, level=1) for _ in range(4)],
                               [{"seed": max_new + i} for i in range(2)],
                               HFSampler(student, tok), ChatRenderer(tok),
                               SamplingParams(n=2, max_new_tokens=max_new))
        for ep in got:  # four queries in all: a per-query normaliser counts them over ranks
            ep.group += len(eps) // 2
        eps += got
    heads = Heads(lm_head_fn(student), lm_head_fn(student), lm_head_fn(teacher))
    tb, teach, slices, _ = score_batch(
        eps, HFScorer(student, tok.pad_token_id), HFScorer(teacher, tok.pad_token_id), 0,
        needs_teacher_hidden(obj, cfg.objective), heads=heads,
        needs=needed_scores(obj, cfg.objective))
    plan = make_plan(obj, tb, 9, 10, cfg.objective)  # REOPOLD: refinement keeps a subset
    return {"episodes": eps, "slices": slices, "tb": tb, "plan": plan, "teach": teach,
            "cfg": cfg, "split": [[0, 1], [2, 3, 4, 5, 6, 7]]}


def _grads(student, tok, case: dict, name: str, which: list[int]) -> dict[str, torch.Tensor]:
    """One process, no DDP: the gradient of the token mean over episodes `which`."""
    from mmopd.logprobs import lm_head_fn
    from mmopd.training.losses import Heads, accumulate_gradients
    from mmopd.training.optim import make_accelerator

    student.zero_grad(set_to_none=True)
    heads = Heads(lm_head_fn(student), lm_head_fn(student), lm_head_fn(case["teacher"]))
    accumulate_gradients(student, make_accelerator(), [case["episodes"][i] for i in which],
                         [case["slices"][i] for i in which], case["tb"], case["plan"],
                         case["teach"], OBJECTIVES[name], case["cfg"], heads, tok.pad_token_id)
    return {k: p.grad.clone() for k, p in student.named_parameters()}


def _rel_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """|a - b| / |b| over all parameters' gradients as one vector."""
    diff = sum(float((a[k] - b[k]).double().pow(2).sum()) for k in b) ** 0.5
    return diff / sum(float(b[k].double().pow(2).sum()) for k in b) ** 0.5


def test_token_mean_is_exact_across_ranks(tiny_overrides, student_dir, teacher_dir, tmp_path):
    """Two ranks with 1 vs 3 queries and fewer vs more kept tokens (REOPOLD normalises per
    query, RKL over the minibatch's kept tokens), under DDP and under
    FSDP2 (which also checks that the output layer applied outside the model's forward gets the
    right, reduce-scattered gradient), by the autograd and the fused loss path: the gradient
    equals one process's over the whole batch."""
    from mmopd.config import ModelConfig
    from mmopd.models import load_model, load_tokenizer

    tok = load_tokenizer(ModelConfig(path=str(student_dir)))
    student = load_model(ModelConfig(path=str(student_dir)), tok, trainable=True)
    teacher = load_model(ModelConfig(path=str(teacher_dir)), tok).requires_grad_(False)
    names = ["reopold", "rkl"]  # policy gradient over kept tokens; full-vocabulary divergence
    cases = {n: _case(n, tiny_overrides, student, teacher, tok) for n in names}
    # a rank whose minibatch is empty (its episodes failed to start) still joins the step
    idle = {**cases["reopold"], "split": [[], list(range(8))], "objective": "reopold"}
    bundle = tmp_path / "bundle.pt"
    torch.save({"student": str(student_dir), "teacher": str(teacher_dir),
                "cases": {**cases, "reopold-idle": idle}}, bundle)
    p = _torchrun(str(HERE / "_ddp_worker.py"), str(bundle), str(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]

    for name, case in cases.items():
        case["teacher"] = teacher
        kept = [int(case["plan"].counted_N[torch.cat([case["slices"][i] for i in half])].sum())
                for half in case["split"]]
        assert 0 < kept[0] < kept[1], kept  # unequal shares: a per-rank mean would be biased
        whole = _grads(student, tok, case, name, list(range(8)))
        assert any(g.abs().sum() > 0 for g in whole.values())
        for mode in ("ddp", "fsdp", "ddp-fused", "fsdp-fused"):
            # gradients are all-reduced (DDP) or reduce-scattered (FSDP, gathered here): both
            # ranks hold the same ones, equal to one process's over the whole batch
            assert _rel_err(ranks[0][mode][name], ranks[1][mode][name]) == 0.0, (mode, name)
            assert _rel_err(ranks[0][mode][name], whole) < 1e-6, (mode, name)
        # what DDP would give if each rank normalised by its own share: the mean of the two
        # halves' means, weighting rank 0's few tokens (or queries) as much as rank 1's many
        halves = [_grads(student, tok, case, name, half) for half in case["split"]]
        naive = {k: (halves[0][k] + halves[1][k]) / 2 for k in whole}
        assert _rel_err(naive, whole) > 1e-2, name
        if name == "reopold":  # rank 0 idle, rank 1 all 8 episodes: the whole batch's gradient
            for mode in ("ddp", "fsdp", "ddp-fused", "fsdp-fused"):
                got = [ranks[r][mode]["reopold-idle"] for r in (0, 1)]
                assert _rel_err(got[0], got[1]) == 0.0, mode
                assert _rel_err(got[0], whole) < 1e-6, mode


def test_fsdp2_bf16_reduces_gradients_in_fp32(student_dir, tmp_path):
    """A bf16 FSDP2 launch computes in bf16 and reduce-scatters gradients in float32
    (accelerate's policy would reduce them in bf16)."""
    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
           "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP"}
    p = _torchrun(str(HERE / "_precision_worker.py"), str(student_dir), str(tmp_path), env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    for r in (0, 1):
        policies = torch.load(tmp_path / f"rank{r}.pt")
        assert len(policies) >= 2, policies  # the decoder layers and the root
        assert set(policies.values()) == {(torch.bfloat16, torch.float32)}, policies


def test_sharded_teacher_is_read_by_rank_0_only_and_scores_as_one_process(
        tokenizer, teacher_dir, tmp_path):
    """teacher.shard: rank 0 reads the checkpoint, the other rank builds the structure on the
    meta device and receives its shards; each rank holds about half of the weights, and the
    teacher scores episodes as the whole model does in one process."""
    from mmopd.config import ModelConfig
    from mmopd.envs import make_env
    from mmopd.models import load_model
    from mmopd.rollout.agent_loop import collect_episodes
    from mmopd.rollout.render import ChatRenderer
    from mmopd.rollout.sampler import HFSampler, SamplingParams
    from mmopd.teachers.scorer import HFScorer

    teacher = load_model(ModelConfig(path=str(teacher_dir)), tokenizer)
    torch.manual_seed(0)
    eps = collect_episodes([make_env("mmopd/MathText-v0", level=1) for _ in range(6)],
                           [{"seed": i} for i in range(3)], HFSampler(teacher, tokenizer),
                           ChatRenderer(tokenizer), SamplingParams(n=2, max_new_tokens=10))
    torch.save(eps, tmp_path / "episodes.pt")
    want = HFScorer(teacher, tokenizer.pad_token_id).score(eps)
    p = _torchrun(str(HERE / "_teacher_shard_worker.py"), str(teacher_dir),
                  str(tmp_path / "episodes.pt"), str(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert len(got[0]["reads"]) == 1 and not got[1]["reads"]  # only rank 0 read weights
    assert not got[0]["meta_before"] and got[1]["meta_before"]
    for g in got:
        assert g["local"] <= 0.55 * g["total"]  # about half of the teacher per rank
        torch.testing.assert_close(g["logp"], want.logp_N, atol=1e-5, rtol=0)
        torch.testing.assert_close(g["entropy"], want.entropy_N, atol=1e-5, rtol=0)


def test_reopold_entropy_threshold_is_the_whole_batchs(tmp_path):
    """REOPOLD's refinement keeps the top-beta entropies of the rollout batch, which is split
    over the ranks: the threshold is taken over every rank's tokens (the same on each), not per
    rank."""
    import _gather_worker

    from mmopd.objectives.zoo import top_threshold

    p = _torchrun(str(HERE / "_gather_worker.py"), str(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    whole = torch.cat([_gather_worker.share(r) for r in (0, 1)])
    tau = top_threshold(whole, 0.2)
    assert got[0]["tau"] == got[1]["tau"] == tau
    assert not got[0]["keep"].any()  # rank 0's entropies all lie below the batch's top 20 %
    assert int(got[1]["keep"].sum()) == 100  # the batch's top 20 %: 100 of 500, all rank 1's


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["model.lora={r: 4}"]], ids=["full", "lora"])
def test_train_two_processes_end_to_end(extra, tiny_overrides, tmp_path):
    """`mmopd train` under torchrun with two CPU ranks: both finish, rank 0 alone writes the run
    directory, metrics and a checkpoint that loads (a LoRA student's merged, plus its adapter)."""
    run = tmp_path / "run"
    p = _torchrun("-m", "mmopd", "train", str(HERE.parent / "configs" / "tiny" / "reopold.yaml"),
                  *tiny_overrides, "trainer.steps=4", "trainer.save_every=2",
                  f"trainer.output_dir={run}", *extra)
    assert p.returncode == 0, p.stderr[-3000:]
    results = [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith('{"run_dir"')]
    assert len(results) == 2  # one per rank; the evaluation is gathered to rank 0
    assert sorted(r["eval"] is None for r in results) == [False, True]
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # rank 0's rows only, once each
    assert all(r["grad_norm"] > 0 for r in rows)
    assert [json.loads(ln)["step"] for ln in (run / "eval.jsonl").read_text().splitlines()] == [4]
    assert sorted(d.name for d in (run / "checkpoints").iterdir()) == ["step-2", "step-4"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "step-4")
    assert (run / "checkpoints" / "step-4" / "adapter").is_dir() == bool(extra)


@pytest.mark.parametrize("name", ["ddp.yaml", "fsdp.yaml"])
def test_accelerate_configs_load(name):
    """The shipped `accelerate launch` files parse with the installed accelerate, and every
    fsdp_config key is one its launcher knows (a misspelt key would be dropped silently)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    cfg = load_config_from_file(str(HERE.parent / "configs" / "accelerate" / name))
    known = {a.dest for a in launch_command_parser()._actions}
    assert set(cfg.fsdp_config) <= known, set(cfg.fsdp_config) - known
    if name == "fsdp.yaml":
        assert cfg.distributed_type == "FSDP" and cfg.fsdp_config["fsdp_version"] == 2
        assert "fsdp_use_orig_params" not in cfg.fsdp_config  # FSDP1-only; v2 rejects it


def test_launch_mistakes_are_refused(monkeypatch):
    """torchrun without ACCELERATE_USE_CPU (ranks that would each train alone), FSDP version 1
    and DeepSpeed ZeRO-3 (sharded, with no gathered path for per-rank forwards: they would
    deadlock) fail with one clear error."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from mmopd.config import ConfigError
    from mmopd.training.optim import check_launch, make_accelerator

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="ACCELERATE_USE_CPU=true"):
        make_accelerator()
    monkeypatch.delenv("WORLD_SIZE")
    fsdp1 = SimpleNamespace(num_processes=2, distributed_type=DistributedType.FSDP, state=None,
                            is_fsdp2=False)
    with pytest.raises(ConfigError, match="FSDP version 1 is not supported"):
        check_launch(fsdp1)
    check_launch(SimpleNamespace(num_processes=2, distributed_type=DistributedType.FSDP,
                                 state=None, is_fsdp2=True))  # FSDP2: trains (tests/test_fsdp.py)
    zero3 = SimpleNamespace(num_processes=2, distributed_type=DistributedType.DEEPSPEED,
                            state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3)))
    with pytest.raises(ConfigError, match="ZeRO-3"):
        check_launch(zero3)
