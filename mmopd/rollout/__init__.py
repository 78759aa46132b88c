"""Rollout: turning a student into episodes. Samplers (HF generate, a colocated vLLM engine, a
drift stop in front of either), the chat renderer and tool-call parsers, the multi-turn agent
loop over gymnasium envs, held-out evaluation, and the seeds of a run's random streams."""
