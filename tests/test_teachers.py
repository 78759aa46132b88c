"""Several teachers in one run: the config rules, the mixture env, the router's exact placement
of each teacher's scores, and a mixed-env two-teacher run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmopd.config import ConfigError, TrainConfig, load_config
from mmopd.envs import make_env
from mmopd.episode import Episode
from mmopd.teachers.router import RoutedTeacher, RouteError, kept_by_teacher
from mmopd.teachers.scorer import HFScorer

MIXTURE = ("env={id: mmopd/Mixture-v0, kwargs: {envs: [{id: mmopd/MathText-v0, weight: 1, "
           "kwargs: {level: 1}}, {id: mmopd/ToolMath-v0, weight: 1, kwargs: {level: 1, "
           "system_prompt: null, call_format: react}}]}}")


def _two(a: str = "a", b: str = "b", **routing) -> list[str]:
    return ["model.path=s", f"teachers=[{{name: {a}, model: {{path: t1}}}}, "
            f"{{name: {b}, model: {{path: t2}}}}]",
            "routing=" + json.dumps(routing or {"routes": {"mmopd/MathText-v0": "a"},
                                                "default": "b"})]


@pytest.mark.parametrize("overrides,match", [
    (_two("a", "a"), "two teachers are named 'a'"),
    (_two(routes={"mmopd/MathText-v0": "c"}), "names no teacher: 'c'"),
    (_two(default="nobody"), "names no teacher: 'nobody'"),
    (_two(routes={}), "need routes"),
    (_two(by="domain", default="a"), "env or metadata.KEY"),
    ([*_two(), "teacher.model.path=t3"], "either `teacher:`"),
    ([*_two(), "objective.name=rkl"], "rebuilds one teacher's logits"),
    ([*_two(), "objective.name=vopd"], "rebuilds one teacher's logits"),
    ([*_two(), "objective.drift_stop=true", "objective.drift_threshold=0.5"],
     "rebuilds one teacher's logits|one teacher"),
    (["model.path=s", "teachers=[{name: a, kind: ema, view: privileged}, "
      "{name: b, kind: ema, view: privileged}]", "routing.default=a"], "at most one EMA"),
    (["model.path=s", "teachers=[{name: a, kind: cache, cache: d}, {name: b, model: {path: t}}]",
      "routing.default=a"], "cannot share a run"),
    (["model.path=s", "teachers=[{name: 'a b', model: {path: t}}]", "routing.default=a"],
     "teacher.name"),
])
def test_config_refuses_bad_teacher_lists(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TrainConfig, None, overrides)


def test_routed_metadata_config_loads():
    cfg = load_config(TrainConfig, None, _two(by="metadata.domain",
                                              routes={"algebra": "a", "geometry": "b"}))
    assert [t.name for t in cfg.teacher_list] == ["a", "b"] and cfg.routing.key == "domain"


def test_mixture_env_draws_by_weight_and_cycles_for_evaluation():
    env = make_env("mmopd/Mixture-v0", envs=[
        {"id": "mmopd/MathText-v0", "weight": 3, "kwargs": {"level": 1}},
        {"id": "mmopd/ToolMath-v0", "weight": 1, "kwargs": {"level": 1}}])
    drawn = [env.reset(seed=s)[1]["env"] for s in range(400)]
    assert drawn == [env.reset(seed=s)[1]["env"] for s in range(400)]  # reproducible
    assert 0.65 < drawn.count("mmopd/MathText-v0") / 400 < 0.85
    test = make_env("mmopd/Mixture-v0", split="test", envs=[
        {"id": "mmopd/MathText-v0", "kwargs": {"level": 1}}, {"id": "mmopd/ToolMath-v0"}])
    assert [test.reset(options={"index": i})[1]["env"] for i in range(4)] == [
        "mmopd/MathText-v0", "mmopd/ToolMath-v0"] * 2
    assert test.unwrapped.num_problems == 2 * min(
        e.unwrapped.num_problems for e in test.unwrapped.envs)
    obs, info = test.reset(options={"index": 1})
    assert "tools" in info  # ToolMath's own info passes through
    *_, info = test.step("The answer is 0.")
    assert info["env"] == "mmopd/ToolMath-v0"


@pytest.mark.parametrize("envs,match", [
    ([], "non-empty"), ([{"weight": 1}], "with an `id`"),
    ([{"id": "mmopd/MathText-v0", "weight": -1}], "weight"),
    ([{"id": "mmopd/MathText-v0", "wieght": 1}], "unknown key"),
    ([{"id": "mmopd/MathText-v0"}, {"id": "mmopd/MathText-v0"}], "listed twice"),
    ([{"id": "mmopd/MathText-v0", "weight": 0}], "sum to 0"),
])
def test_mixture_env_refuses_bad_specs(envs, match):
    with pytest.raises(ValueError, match=match):
        make_env("mmopd/Mixture-v0", envs=envs)


def _episodes(tokenizer, n: int = 5) -> list[Episode]:
    out = []
    for i in range(n):
        prompt = tokenizer.encode(f"<|im_start|>user\nq{i}<|im_end|>\n<|im_start|>assistant\n")
        reply = tokenizer.encode("x" * (i + 2))
        ep = Episode(list(prompt), [0] * len(prompt), [-1] * len(prompt), [0.0] * len(prompt),
                     prompt_len=len(prompt), reward=float(i))
        ep.append(reply, student=True, step=0, logprobs=[0.0] * len(reply))
        ep.metadata["domain"] = "geo" if i % 2 else "alg"
        out.append(ep)
    return out


def test_router_puts_each_teachers_scores_in_place(tokenizer, student_dir, teacher_dir):
    from transformers import AutoModelForCausalLM

    pad = tokenizer.pad_token_id
    a = HFScorer(AutoModelForCausalLM.from_pretrained(student_dir), pad, micro_batch_size=2)
    b = HFScorer(AutoModelForCausalLM.from_pretrained(teacher_dir), pad, micro_batch_size=3)
    eps = _episodes(tokenizer)
    router = RoutedTeacher({"a": a, "b": b}, "domain", {"alg": "a", "geo": "b"})
    got = router.score(eps, topk=3)
    assert router.last_routes == ["a", "b", "a", "b", "a"]
    start = 0
    for ep, name in zip(eps, router.last_routes):
        own = (a if name == "a" else b).score([ep], topk=3)
        n = ep.num_generated
        assert torch.allclose(got.logp_N[start: start + n], own.logp_N, atol=1e-6)
        assert torch.allclose(got.entropy_N[start: start + n], own.entropy_N, atol=1e-6)
        assert torch.equal(got.topk_ids_NK[start: start + n], own.topk_ids_NK)
        start += n
    assert start == got.logp_N.numel() and got.span_N is None
    slices = [torch.arange(s, s + e.num_generated) for s, e in zip(
        [sum(x.num_generated for x in eps[:i]) for i in range(len(eps))], eps)]
    keep = torch.zeros(start, dtype=torch.bool)
    keep[slices[1]] = True  # every token of episode 1 (teacher b), none of the others
    assert kept_by_teacher(router.last_routes, slices, [0, 1, 3], keep) == {
        "teacher/a/kept_frac": 0.0,
        "teacher/b/kept_frac": len(slices[1]) / (len(slices[1]) + len(slices[3]))}


def test_router_refuses_an_episode_no_route_covers(tokenizer, student_dir):
    from transformers import AutoModelForCausalLM

    a = HFScorer(AutoModelForCausalLM.from_pretrained(student_dir), tokenizer.pad_token_id)
    eps = _episodes(tokenizer, 2)
    with pytest.raises(RouteError, match="its domain is 'geo'"):
        RoutedTeacher({"a": a}, "domain", {"alg": "a"}).score(eps)
    eps[1].metadata.pop("domain")
    with pytest.raises(RouteError, match="no metadata field 'domain'"):
        RoutedTeacher({"a": a}, "domain", {"alg": "a"}).score(eps)
    assert RoutedTeacher({"a": a}, "domain", {}, default="a").score(eps).logp_N.numel() == sum(
        e.num_generated for e in eps)


def test_unrouted_environment_fails_before_training(tiny_overrides, teacher_dir):
    from mmopd.training.loop import train

    cfg = load_config(TrainConfig, None, [
        *[o for o in tiny_overrides if not o.startswith(("teacher.", "env."))], MIXTURE,
        f"teachers=[{{name: math, model: {{path: {teacher_dir}}}}}]",
        "routing.routes={mmopd/MathText-v0: math}"])
    with pytest.raises(ConfigError, match=r"no teacher for environment\(s\) \['mmopd/ToolMath"):
        train(cfg)


def test_a_mixed_env_two_teacher_run_trains(tiny_overrides, student_dir, teacher_dir,
                                            tmp_path: Path):
    """MathText and ToolMath episodes in one batch, each scored by its own teacher (a separate
    model, and the frozen initial student reading the privileged view)."""
    from mmopd.training.loop import train

    cfg = load_config(TrainConfig, None, [
        *[o for o in tiny_overrides if not o.startswith(("teacher.", "env."))], MIXTURE,
        f"teachers=[{{name: math, model: {{path: {teacher_dir}}}}}, "
        "{name: tools, kind: self, view: privileged, logp_floor: -5}]",
        "routing.routes={mmopd/MathText-v0: math, mmopd/ToolMath-v0: tools}",
        "rollout.prompts_per_batch=6", "rollout.max_turns=2", "objective.name=reopold",
        "objective.step_weighting=sod", "trainer.report_to=none", "eval.num_problems=2"])
    out = train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert out["step"] == 2
    row = rows[0]
    names = {k.split("/")[1] for k in row if k.startswith("teacher/")}
    assert names <= {"math", "tools"} and names  # whichever the batch drew
    episodes = sum(row.get(f"teacher/{n}/episodes", 0) for n in ("math", "tools"))
    assert episodes == 12  # 6 prompts x 2 samples, every one scored by exactly one teacher
    for n in names:
        assert 0 <= row[f"teacher/{n}/kept_frac"] <= 1
        assert torch.isfinite(torch.tensor(row[f"teacher/{n}/kl"]))
    # evaluation cycles through the mixture's envs (2 problems: one each) and reports each
    assert {"accuracy/mmopd/MathText-v0", "accuracy/mmopd/ToolMath-v0",
            "pass@2/mmopd/ToolMath-v0"} <= set(out["eval"])


def test_mixture_evaluation_reports_each_env():
    from mmopd.rollout.evaluate import summarise_outcomes

    rows = [{"correct": True, "tokens": 4, "env": "a", "hits": [True, False], "majority": True},
            {"correct": False, "tokens": 6, "env": "b", "hits": [False, False],
             "majority": False},
            {"correct": True, "tokens": 2, "env": "b", "hits": [False, True], "majority": False}]
    out = summarise_outcomes(rows, 2)
    assert out["accuracy"] == pytest.approx(2 / 3) and out["accuracy/a"] == 1.0
    assert out["accuracy/b"] == 0.5 and out["pass@2/b"] == 0.5 and out["pass@2/a"] == 1.0
    single = summarise_outcomes([{k: v for k, v in r.items() if k != "env"} for r in rows], 2)
    assert not any("/" in k for k in single)  # one env: no breakdown
