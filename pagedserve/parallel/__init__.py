"""Tensor parallelism's two halves: the process group with its collectives, and each rank's share
of every weight. Below the models and loaders, which cut and combine through them."""
