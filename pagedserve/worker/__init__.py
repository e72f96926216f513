"""The worker: a step's plan (integers) -> tensors -> one forward pass -> sampled tokens.

The model runner and its step buffers, CUDA graphs, the sampler with penalties, logit bias and
prompt logprobs, and the embedding runners (encoders and pooled decoders). With ``ops/``,
``parallel/`` and ``models/``, the only layer that imports torch.
"""
