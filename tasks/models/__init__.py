"""tasks.models: bases, heads, the full model and its bundle, optimizers, training, evaluation, predict, the
registry."""
