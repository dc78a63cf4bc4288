"""A training run on disk (Orbax steps, run config, run tokenizer) and opening whatever a checkpoint path holds."""
