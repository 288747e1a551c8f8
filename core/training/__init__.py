"""Training SAEs on a pipeline's activations: collection, shuffle buffer, trainer, checkpoints."""
