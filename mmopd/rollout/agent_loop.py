"""The agent loop: drives a batch of environments with a Sampler, turn by turn, into Episodes.

Each turn the student generates until it ends its turn. If the env offers tools (reset() returns
info["tools"]) and the reply calls them, the calls are parsed (in the env's own format when it
names one in info["tool_parser"], else rollout.tool_parser's), executed and their results appended
as tool messages; otherwise the reply goes to env.step() and the observation comes back as a new
message. Either way the new context is appended as a token delta rendered by the chat template, and
the student's tokens stay exactly as sampled — nothing is re-tokenised. Single-turn envs (math)
terminate after the first reply.

Failures are data: an env that raises (in reset or step) or a prompt that cannot be rendered
(a corrupt image, say) ends its episode with stop reason "error", and a reset() or step() that
runs past `env_timeout_s` (rollout.env_timeout_s) with "env_timeout"; an episode whose reset
failed has no tokens and the trainer leaves it out of the batch. Malformed tool calls, unknown
tools, bad arguments and tool errors become tool messages the model reads; budgets end episodes
with "max_turns" or "token_budget".

Images (vision-language students) flow the same way: prompt images are rendered into the
episode, tools receive the episode's images (`ToolContext`), and images a tool returns become part
of its tool message, so the next turn sees them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym

from mmopd.episode import (
    STOP_BUDGET,
    STOP_DRIFT,
    STOP_ENV,
    STOP_EOS,
    STOP_ERROR,
    STOP_MAX_TURNS,
    STOP_TIMEOUT,
    Episode,
    PromptView,
)
from mmopd.rollout.render import ChatRenderer, Message, RenderError
from mmopd.rollout.sampler import Sampler, SamplingParams
from mmopd.rollout.timeout import CallTimeout, time_limit
from mmopd.rollout.toolcalls import HermesParser, ParsedReply, ToolCallParser, make_parser
from mmopd.tools import (
    Tool,
    ToolContext,
    ToolResult,
    ToolSetupError,
    call_tool,
    resolve_tools,
    tool_schema,
)
from mmopd.vision import image_items


class EnvContractError(ValueError):
    """An environment's reset() does not provide what the agent loop needs."""


# (token ids, log-probs, stop reason) of one generated turn
Turn = tuple[list[int], list[float], str]


@dataclass
class _Slot:
    """One running episode: its env, its tools and the conversation so far as messages."""

    ep: Episode
    env: gym.Env
    tools: dict[str, Tool] | None
    messages: list[Message] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)  # every image shown so far, for tools
    failed: bool = False  # reset or prompt rendering failed: nothing to generate
    parser: ToolCallParser | None = None  # the env's own call format (info["tool_parser"])


_TOOL_CACHE: dict[str, dict[str, Tool]] = {}


def _tools_for(spec: Any, env_id: str) -> dict[str, Tool] | None:
    """Tool objects for an env's info["tools"] (names, {name, **kwargs} dicts or Tool objects),
    built once per distinct spec: sandboxes and search indexes are not rebuilt every episode."""
    if not spec:
        return None
    if not isinstance(spec, (list, tuple)):
        raise EnvContractError(f"{env_id}: info['tools'] must be a list of tool names or tools")
    key = json.dumps([s if isinstance(s, (str, dict)) else id(s) for s in spec], sort_keys=True,
                     default=str)
    if key not in _TOOL_CACHE:
        _TOOL_CACHE[key] = resolve_tools(list(spec))
    return _TOOL_CACHE[key]


def env_tools(env: gym.Env, env_id: str = "env") -> dict[str, Tool] | None:
    """The tools an env offers (info["tools"] of the first of a few resets that works: a bad
    data row is the rollout's to record), built once: a tool that cannot be set up on this
    machine raises ToolSetupError now, before any model loads."""
    for seed in range(8):
        try:
            _, info = env.reset(seed=seed)
        except Exception:
            continue
        return _tools_for(info.get("tools") if isinstance(info, dict) else None, env_id)
    return None


class AgentLoop:
    """Runs episodes to the end. `generate(slots, budgets)` produces one turn per running slot."""

    def __init__(self, renderer: ChatRenderer, *, max_turns: int = 8,
                 max_episode_tokens: int = 0, max_calls_per_turn: int = 4,
                 parser: ToolCallParser | None = None, env_id: str = "env",
                 decode: Callable[[list[int]], str] | None = None,
                 env_timeout_s: float = 0.0) -> None:
        self.renderer = renderer
        self.env_timeout_s = env_timeout_s  # bound on each reset() / step() (0: none)
        self.max_turns = max_turns
        self.max_episode_tokens = max_episode_tokens  # 0: unbounded
        self.max_calls_per_turn = max_calls_per_turn
        self.parser = parser or HermesParser()
        self.env_id = env_id
        tok = renderer.tokenizer
        self.decode = decode or (lambda ids: tok.decode(ids, skip_special_tokens=True))

    # ------------------------------------------------------------------ start

    def start(self, envs: list[gym.Env], starts: list[dict[str, Any]], n: int = 1,
              teacher_view: bool = False, views: Sequence[str] = ()) -> list[_Slot]:
        """Reset `n` envs per start; episodes of one start share its group index.

        `teacher_view` renders info["teacher_messages"] as the teacher's prompt; each name in
        `views` renders info[f"{name}_messages"] as a further prompt view (e.g. "negative").
        """
        if len(envs) < len(starts) * n:
            raise ValueError(f"need {len(starts) * n} env instances, got {len(envs)}")
        slots = []
        for g, start in enumerate(starts):
            for j in range(n):
                env = envs[g * n + j]
                try:
                    slots.append(self._start_one(env, start, g, teacher_view, views))
                except (EnvContractError, ToolSetupError):
                    raise
                except Exception as e:  # a bad row (corrupt image, ...), a hung or broken env
                    why = STOP_TIMEOUT if isinstance(e, CallTimeout) else STOP_ERROR
                    ep = Episode([], [], [], [], prompt_len=0, group=g, stop_reason=why,
                                 metadata={"error": f"{type(e).__name__}: {e}", "start": start})
                    slots.append(_Slot(ep, env, None, failed=True))
        return slots

    def _start_one(self, env: gym.Env, start: dict[str, Any], group: int, teacher_view: bool,
                   views: Sequence[str]) -> _Slot:
        with time_limit(self.env_timeout_s, f"{self.env_id}: reset()"):
            _, info = env.reset(**start)
        if not isinstance(info, dict) or "messages" not in info:
            raise EnvContractError(f"{self.env_id}: reset() must return info['messages'] "
                                   "(the chat messages of the prompt)")
        tools = _tools_for(info.get("tools"), self.env_id)
        schemas = [tool_schema(t) for t in tools.values()] if tools else None
        prompt = self.renderer.render(info["messages"], tools=schemas)
        teacher = None
        if teacher_view:
            if "teacher_messages" not in info:
                raise EnvContractError(
                    f"{self.env_id}: teacher.view=privileged needs info['teacher_messages'] from "
                    "reset(); this env/problem provides none (e.g. no worked solution)")
            teacher = self.renderer.render(info["teacher_messages"], tools=schemas)
        extra = {}
        for name in views:
            if f"{name}_messages" not in info:
                raise EnvContractError(f"{self.env_id}: the {name!r} view needs "
                                       f"info['{name}_messages'] from reset()")
            r = self.renderer.render(info[f"{name}_messages"], tools=schemas)
            extra[name] = PromptView(r.ids, r.vision)
        meta = {k: v for k, v in info.items() if not (k == "tools" or k.endswith("messages"))}
        messages = list(info["messages"])
        meta["messages"] = messages
        n = len(prompt.ids)
        ep = Episode(input_ids=list(prompt.ids), loss_mask=[0] * n, step_index=[-1] * n,
                     sampled_logprobs=[0.0] * n, prompt_len=n, group=group,
                     teacher_prompt_ids=teacher.ids if teacher else None, metadata=meta,
                     vision=prompt.vision,
                     prompt_images=prompt.vision.num_images if prompt.vision else 0,
                     teacher_prompt_vision=teacher.vision if teacher else None, views=extra)
        images = [it.get("image", it.get("image_url")) for it in image_items(messages)]
        parser = None
        if info.get("tool_parser") is not None:
            try:
                parser = make_parser(info["tool_parser"])
            except ValueError as e:
                raise EnvContractError(f"{self.env_id}: info['tool_parser']: {e}") from e
        return _Slot(ep, env, tools, messages, images, parser=parser)

    # ------------------------------------------------------------------ run

    def remaining(self, slot: _Slot) -> int | None:
        """Tokens the episode may still grow by (None: unbounded)."""
        if not self.max_episode_tokens:
            return None
        return self.max_episode_tokens - len(slot.ep.input_ids)

    def run(self, slots: list[_Slot],
            generate: Callable[[list[_Slot]], list[Turn]]) -> list[Episode]:
        active = [i for i, s in enumerate(slots) if not s.failed]
        for turn in range(self.max_turns):
            still = []
            for i in active:
                left = self.remaining(slots[i])
                if left is not None and left <= 0:
                    slots[i].ep.stop_reason = STOP_BUDGET
                else:
                    still.append(i)
            if not still:
                active = []
                break
            outs = generate([slots[i] for i in still])
            active = [i for i, (ids, logp, why) in zip(still, outs)
                      if self.advance(slots[i], turn, ids, logp, why)]
        for i in active:  # ran out of turns
            slots[i].ep.stop_reason = STOP_MAX_TURNS
        return [s.ep for s in slots]

    # ------------------------------------------------------------------ one turn

    def advance(self, slot: _Slot, turn: int, ids: list[int], logprobs: list[float],
                stop_reason: str) -> bool:
        """Append one student turn and whatever answers it; True while the episode goes on."""
        ep = slot.ep
        left = self.remaining(slot)
        cut = left is not None and len(ids) > left
        if cut:  # the episode's token budget ends inside this turn
            ids, logprobs, stop_reason = ids[:left], logprobs[:left], STOP_BUDGET
        ep.append(ids, student=True, step=turn, logprobs=logprobs)
        ep.stop_reason = stop_reason
        text = self.decode(ids)
        ep.metadata.setdefault("completions", []).append(text)
        slot.messages.append({"role": "assistant", "content": text})
        if cut or stop_reason == STOP_DRIFT:  # a drifted reply is not worth acting on
            return False
        if slot.tools is not None:
            parsed = (slot.parser or self.parser).parse(self._raw_text(ids))
            if parsed.wants_tools:
                return self._observe(slot, ids, self._run_tools(slot, parsed))
        try:
            with time_limit(self.env_timeout_s, f"{self.env_id}: step()"):
                obs, reward, terminated, truncated, info = slot.env.step(text)
        except Exception as e:  # a failing or hung env is data: record it and move on
            ep.stop_reason = STOP_TIMEOUT if isinstance(e, CallTimeout) else STOP_ERROR
            ep.metadata["error"] = f"{type(e).__name__}: {e}"
            return False
        ep.reward += float(reward)
        ep.metadata.update({k: v for k, v in info.items() if k not in ("messages", "role")})
        if terminated or truncated:
            if truncated:
                ep.stop_reason = STOP_ENV
            return False
        return self._observe(slot, ids, [{"role": info.get("role", "user"), "content": str(obs)}])

    def _raw_text(self, ids: list[int]) -> str:
        """The reply with special tokens kept (tool-call tags may be special tokens), minus the
        end-of-turn token."""
        if ids and ids[-1] in self.renderer.stop_token_ids:
            ids = ids[:-1]
        return self.renderer.tokenizer.decode(ids, skip_special_tokens=False)

    def _run_tools(self, slot: _Slot, parsed: ParsedReply) -> list[Message]:
        meta = slot.ep.metadata
        results: list[tuple[str, ToolResult]] = [
            ("error", ToolResult(f"Error: {e}", error=True)) for e in parsed.errors]
        meta["parse_errors"] = meta.get("parse_errors", 0) + len(parsed.errors)
        assert slot.tools is not None
        context = ToolContext(images=list(slot.images))
        for k, call in enumerate(parsed.calls):
            if k >= self.max_calls_per_turn:
                results.append((call.name, ToolResult(
                    f"Error: at most {self.max_calls_per_turn} tool calls per turn; "
                    f"{len(parsed.calls) - k} were not run", error=True)))
                break
            t = slot.tools.get(call.name)
            if t is None:
                res = ToolResult(f"Error: unknown tool {call.name!r}; available: "
                                 f"{', '.join(slot.tools)}", error=True)
            else:
                res = call_tool(t, call.arguments, context=context)
            results.append((call.name, res))
        meta["tool_calls"] = meta.get("tool_calls", 0) + len(parsed.calls)
        meta["tool_errors"] = meta.get("tool_errors", 0) + sum(r.error for _, r in results)
        return [self._tool_message(slot, name, r) for name, r in results]

    def _tool_message(self, slot: _Slot, name: str, res: ToolResult) -> Message:
        """A tool result as a message; images it returns (a zoom) are shown to VLM students."""
        if not res.images:
            return {"role": "tool", "name": name, "content": res.text}
        if self.renderer.vision is None:
            note = f"[{len(res.images)} image(s) returned; this model cannot see images]"
            return {"role": "tool", "name": name, "content": f"{res.text}\n{note}".strip()}
        slot.images.extend(res.images)
        content = [{"type": "text", "text": res.text}] if res.text else []
        content += [{"type": "image", "image": img} for img in res.images]
        return {"role": "tool", "name": name, "content": content}

    def _observe(self, slot: _Slot, ids: list[int], messages: list[Message]) -> bool:
        """Close the student's turn and append the answer to it, if the budget allows."""
        try:
            cont = self.renderer.render_continuation(messages)
        except RenderError as e:  # e.g. an image a tool returned cannot be used
            slot.ep.stop_reason = STOP_ERROR
            slot.ep.metadata["error"] = f"RenderError: {e}"
            return False
        delta = self.renderer.close_turn(ids) + cont.ids
        left = self.remaining(slot)
        if left is not None and len(delta) >= left:
            slot.ep.stop_reason = STOP_BUDGET  # no room for the observation and a reply
            return False
        slot.ep.append(delta, student=False, vision=cont.vision)
        slot.messages.extend(messages)
        return True


def collect_episodes(
    envs: list[gym.Env],
    starts: list[dict[str, Any]],
    sampler: Sampler,
    renderer: ChatRenderer,
    params: SamplingParams,
    *,
    teacher_view: bool = False,
    views: Sequence[str] = (),
    max_turns: int = 8,
    max_episode_tokens: int = 0,
    parser: ToolCallParser | None = None,
    env_id: str = "env",
    decode: Callable[[list[int]], str] | None = None,
    desc: str = "rollout",
    env_timeout_s: float = 0.0,
) -> list[Episode]:
    """One episode per (start, sample): `params.n` samples of each start, grouped by start index.

    `starts` are reset() keyword arguments (e.g. {"seed": 3} or {"options": {"index": 0}});
    `envs` needs len(starts) * params.n instances (one per concurrent episode).
    """
    loop = AgentLoop(renderer, max_turns=max_turns, max_episode_tokens=max_episode_tokens,
                     parser=parser, env_id=env_id, decode=decode, env_timeout_s=env_timeout_s)
    slots = loop.start(envs, starts, params.n, teacher_view, views)
    one = SamplingParams(n=1, temperature=params.temperature, top_p=params.top_p,
                         max_new_tokens=params.max_new_tokens, stop=params.stop)

    def generate(batch: list[_Slot]) -> list[Turn]:
        vision = [s.ep.vision for s in batch]
        samples = sampler.generate([s.ep.input_ids for s in batch], one, desc=desc,
                                   vision=vision if any(v is not None for v in vision) else None)
        return [(s.token_ids, s.logprobs, s.stop_reason) for (s,) in samples]

    return loop.run(slots, generate)


def expert_reply(env: gym.Env, messages: list[Message]) -> str:
    """The env's expert reply for its current state (envs that can demonstrate implement
    `expert_reply(messages) -> str`)."""
    try:
        fn = env.get_wrapper_attr("expert_reply")
    except AttributeError:
        fn = None
    if fn is None:
        raise EnvContractError(f"{type(env.unwrapped).__name__} has no expert_reply(messages); "
                               "multi-turn demonstrations need one")
    return str(fn(messages))


def collect_demonstrations(envs: list[gym.Env], starts: list[dict[str, Any]],
                           renderer: ChatRenderer, *, max_turns: int = 8,
                           env_id: str = "env") -> list[Episode]:
    """Expert episodes through the same loop (tools run for real): each turn is the env's
    `expert_reply` tokenised and ended with the end-of-turn token; loss_mask marks those turns."""
    loop = AgentLoop(renderer, max_turns=max_turns, env_id=env_id)
    slots = loop.start(envs, starts)
    end = renderer.turn_closer[:1]
    encode = renderer.tokenizer.encode

    def generate(batch: list[_Slot]) -> list[Turn]:
        out = []
        for s in batch:
            ids = encode(expert_reply(s.env, s.messages), add_special_tokens=False) + end
            out.append((ids, [0.0] * len(ids), STOP_EOS))
        return out

    return loop.run(slots, generate)
