"""The control plane: who runs in the next step and where its KV cache lives, in integers.

The scheduler, the KV cache layouts (paged blocks, static slots) behind one contract, a request's
counters and the KV cache's sizing. Nothing here imports torch or a model: the core's tests need
neither, and the worker turns its plans into tensors.
"""
