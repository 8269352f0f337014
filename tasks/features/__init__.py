"""tasks.features: the content-addressed feature cache, reading it for training, and extracting into it."""
