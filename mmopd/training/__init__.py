"""Training: `assemble` builds a run's parts from its config, `loop` is the on-policy loop,
`losses` the chunked loss path, `scoring` the per-token scores of a rollout batch; besides them
the optimiser, checkpoints, run-directory metrics, the off-policy warm-up and supervised
fine-tuning (`sft`)."""
