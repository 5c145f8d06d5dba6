"""The worker side: models, data, DeepSpeed glue, checkpoints and the training loop."""
