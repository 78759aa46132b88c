"""The `mmopd` command: train, sft, eval, compare, export, demo, envs, objectives, tokenizer."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _config_error(msg: str) -> Exception:
    from mmopd.config import ConfigError

    return ConfigError(msg)


def _known_errors() -> tuple[type[BaseException], ...]:
    from mmopd.compare import CompareError
    from mmopd.config import ConfigError
    from mmopd.demo import DemoPremiseError
    from mmopd.envs.math_text import DatasetError
    from mmopd.envs.registration import EnvNotFoundError
    from mmopd.export import ExportError
    from mmopd.models import ModelLoadError
    from mmopd.plan import PlanError
    from mmopd.rollout.agent_loop import EnvContractError
    from mmopd.rollout.render import RenderError
    from mmopd.teachers.cache import CacheError
    from mmopd.teachers.served import ServedTeacherError
    from mmopd.training.checkpoint import CheckpointError
    from mmopd.training.faults import NonFiniteError
    from mmopd.training.sft import SFTDataError

    return (ConfigError, ModelLoadError, CheckpointError, RenderError, EnvContractError,
            SFTDataError, DatasetError, EnvNotFoundError, CacheError, DemoPremiseError, PlanError,
            ServedTeacherError, NonFiniteError, CompareError, ExportError)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmopd", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="on-policy distillation run from a YAML config")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. objective.lam=0.2")
    t.add_argument("--print-config", action="store_true", help="print the resolved config, exit")

    s = sub.add_parser("sft", help="supervised fine-tuning on an env's worked solutions")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*")

    c = sub.add_parser("cache-teacher", help="Lightning OPD: roll out with the initial student, "
                       "score with the teacher once, save the scores for teacher.kind=cache")
    c.add_argument("config", help="a train config (model, teacher, env, rollout, seed)")
    c.add_argument("overrides", nargs="*")
    c.add_argument("--out", required=True, help="directory for teacher_cache.pt")
    c.add_argument("--batches", type=int, default=8, help="rollout batches to cache")

    e = sub.add_parser("eval", help="greedy accuracy, pass@k and maj@k of a model on an env; "
                       "every generation to a JSONL")
    e.add_argument("model", help="hub name or save_pretrained directory")
    e.add_argument("--env", default="mmopd/MathText-v0")
    e.add_argument("--env-kwargs", default='{"split": "test"}', help="JSON kwargs for the env")
    e.add_argument("--source", help="the env's problems: a hub dataset id, a save_to_disk "
                   "folder, or a Parquet / CSV / JSONL file (env kwarg source)")
    e.add_argument("--preset", help="column preset of the source: gsm8k, math, math500, aime, "
                   "vqa, verl, easyr1")
    e.add_argument("--subset", help="the hub dataset's subset (config name), e.g. main")
    e.add_argument("--num-problems", type=int, default=200)
    e.add_argument("--samples", "--pass-k", dest="pass_k", type=int, default=0,
                   help="sampled replies per problem for pass@n and maj@n (0: greedy only)")
    e.add_argument("--temperature", type=float, default=1.0, help="of the sampled replies")
    e.add_argument("--top-p", type=float, default=1.0,
                   help="of the sampled replies (REOPOLD's paper: --temperature 0.6 --top-p 0.95 "
                        "for math and visual reasoning)")
    e.add_argument("--out", help="JSONL of every generation (default: runs/eval/MODEL.jsonl)")
    e.add_argument("--max-new-tokens", type=int, default=64)
    e.add_argument("--max-turns", type=int, default=8, help="assistant turns (multi-turn envs)")
    e.add_argument("--env-timeout", type=float, default=60.0,
                   help="seconds each env reset() / step() may take (0: unbounded)")

    d = sub.add_parser("demo", help="tiny end-to-end demo: SFT teacher, weak student, REOPOLD")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--fast", action="store_true", help="a smoke-sized run (seconds, not minutes)")
    d.add_argument("--world", choices=["math", "agent", "vision"], default="math",
                   help="math: single-turn arithmetic; agent: multi-turn calculator tool use; "
                   "vision: tiny Qwen2.5-VL models answering about images")
    d.add_argument("--rollout", choices=["hf", "vllm"], default="hf",
                   help="the distillation stage's rollout engine (vllm: needs vLLM installed)")
    d.add_argument("--seed", type=int, default=0,
                   help="moves every seed of the world (both models and the distillation run)")

    x = sub.add_parser("export", help="a checkpoint as a clean save_pretrained folder with a "
                       "model card")
    x.add_argument("checkpoint", help="RUN_DIR/checkpoints/step-N")
    x.add_argument("--out", required=True, help="a new (or empty) folder")
    x.add_argument("--push-to-hub", metavar="REPO", help="also upload the folder to this hub "
                   "repository (huggingface_hub; needs a login)")

    m = sub.add_parser("compare", help="problems whose greedy answer flipped between two "
                       "`mmopd eval` files")
    m.add_argument("a", help="the earlier eval JSONL (e.g. before distillation)")
    m.add_argument("b", help="the later one")

    pl = sub.add_parser("plan", help="per-GPU memory of a run under DDP, FSDP2 and LoRA, and "
                        "which fit")
    pl.add_argument("config")
    pl.add_argument("overrides", nargs="*", help="dotted.key=value")
    pl.add_argument("--gpus", type=int, default=8, help="GPUs per node (default 8)")
    pl.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    pl.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    pl.add_argument("--prompt-tokens", type=int, default=512,
                    help="prompt length the activations are estimated for (default 512)")
    pl.add_argument("--turns", type=int, default=1,
                    help="assistant turns per episode (multi-turn agents; default 1)")

    sub.add_parser("envs", help="list registered environments").add_argument(
        "--import", dest="imports", action="append", default=[],
        help="also import this module (which registers its envs)")
    sub.add_parser("objectives", help="list registered objectives")
    k = sub.add_parser("tokenizer", help="build the character tokenizer used by tiny models")
    k.add_argument("out")
    k.add_argument("--vision", action="store_true",
                   help="add Qwen-VL vision tokens and a Qwen2-VL image processor (tiny VLMs)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file load/save bars drown the run's own progress
    try:
        return _run(args)
    except _known_errors() as e:
        print(f"mmopd {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the newest complete checkpoint is intact", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    if args.cmd == "envs":
        from mmopd.envs import import_env_modules, list_envs

        import_env_modules(args.imports)
        print("\n".join(list_envs()))
        return 0
    if args.cmd == "objectives":
        from mmopd.objectives import OBJECTIVES

        for name, obj in sorted(OBJECTIVES.items()):
            print(f"{name:10s} {obj.doc}")
        return 0
    if args.cmd == "tokenizer":
        from mmopd.tokenizer import build_char_tokenizer

        build_char_tokenizer(args.out, vision=args.vision)
        print(f"wrote {args.out}")
        return 0
    if args.cmd == "train":
        from mmopd.config import TrainConfig, dump_yaml, load_config

        cfg = load_config(TrainConfig, args.config, args.overrides)
        if args.print_config:
            print(dump_yaml(cfg))
            return 0
        from mmopd.training.loop import train

        res = train(cfg)
        if res.get("stopped"):  # preempted: a clean stop, resumable
            where = (f"checkpoint {res['checkpoint']}" if res["checkpoint"]
                     else "no checkpoint (no step had run)")
            print(f"mmopd train: stopped by {res['stopped']} at step {res['step']}; {where}; "
                  "continue with trainer.resume=auto", file=sys.stderr)
        print(json.dumps({"run_dir": res["run_dir"], "eval": res["eval"], "step": res["step"],
                          **({"stopped": res["stopped"]} if res.get("stopped") else {})}))
        return 0
    if args.cmd == "sft":
        from mmopd.config import SFTConfig, load_config
        from mmopd.training.sft import sft

        print(json.dumps(sft(load_config(SFTConfig, args.config, args.overrides))))
        return 0
    if args.cmd == "cache-teacher":
        from mmopd.config import TrainConfig, load_config
        from mmopd.teachers.cache import build_teacher_cache

        if args.batches < 1:
            raise _config_error(f"--batches must be positive, got {args.batches}")
        path = build_teacher_cache(load_config(TrainConfig, args.config, args.overrides),
                                   args.out, args.batches)
        print(f"wrote {path}")
        return 0
    if args.cmd == "eval":
        return _eval(args)
    if args.cmd == "export":
        from mmopd.export import export

        out = export(args.checkpoint, args.out, args.push_to_hub)
        print(f"wrote {out}" + (f"; uploaded to {args.push_to_hub}" if args.push_to_hub else ""))
        return 0
    if args.cmd == "compare":
        from mmopd.compare import compare, format_comparison, read_records

        a, b = read_records(args.a), read_records(args.b)
        print(format_comparison(a, b, compare(a, b), (args.a, args.b)))
        return 0
    if args.cmd == "plan":
        from mmopd.config import TrainConfig, load_config
        from mmopd.plan import PlanError, estimate, launch_command, render

        if args.gpus < 1 or args.nodes < 1 or args.gpu_memory <= 0:
            raise PlanError("--gpus and --nodes must be >= 1 and --gpu-memory > 0")
        cfg = load_config(TrainConfig, args.config, args.overrides)
        world = args.gpus * args.nodes
        rows, info = estimate(cfg, world, args.gpu_memory, args.prompt_tokens, args.turns)
        print(render(rows, info, world, args.gpu_memory, args.nodes))
        print("\n" + launch_command(args.config, args.gpus, args.nodes, rows, args.gpu_memory,
                                    cfg.rollout.backend == "vllm", cfg.model.lora is not None))
        return 0
    if args.cmd == "demo":
        from mmopd.demo import run_demo

        run_demo(args.out, fast=args.fast, world=args.world, rollout=args.rollout,
                 seed=args.seed)
        return 0
    raise AssertionError(args.cmd)


def _eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mmopd.config import ConfigError, ModelConfig
    from mmopd.envs import make_env
    from mmopd.rollout.evaluate import EnvPool, evaluation_episodes, records, summarise

    try:
        kwargs = json.loads(args.env_kwargs)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--env-kwargs: not JSON: {e}") from None
    if not isinstance(kwargs, dict):
        raise ConfigError(f"--env-kwargs: expected a JSON object, got {args.env_kwargs}")
    kwargs.update({k: v for k, v in (("source", args.source), ("preset", args.preset),
                                     ("subset", args.subset)) if v is not None})
    if args.num_problems < 1 or args.pass_k < 0:
        raise ConfigError("--num-problems must be positive and --samples >= 0")
    if not 0 < args.top_p <= 1 or args.temperature < 0:
        raise ConfigError("--top-p must be in (0, 1] and --temperature >= 0")
    name = Path(args.model.rstrip("/")).name or "model"
    out = Path(args.out) if args.out else Path("runs") / "eval" / f"{name}.jsonl"
    pool = EnvPool(lambda: make_env(args.env, **kwargs))
    pool.take(1)  # a bad env, source or preset fails before the model loads

    from mmopd.models import load_model, load_tokenizer, load_vision

    cfg = ModelConfig(path=args.model)
    tok = load_tokenizer(cfg)
    vision = load_vision(cfg, tok)
    greedy, sampled = evaluation_episodes(
        load_model(cfg, tok, vision=vision), tok, pool, num_problems=args.num_problems,
        pass_k=args.pass_k, temperature=args.temperature, top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        max_turns=args.max_turns, env_id=args.env, vision=vision, env_timeout_s=args.env_timeout)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for row in records(greedy, sampled, args.pass_k):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(json.dumps({**summarise(greedy, sampled, args.pass_k), "generations": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
