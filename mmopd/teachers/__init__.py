"""Teachers: what scores the student's tokens. An in-process model (`scorer`), a model behind a
vLLM server (`served`), scores saved ahead of time (`cache`), and the EMA of the student (`ema`)."""
