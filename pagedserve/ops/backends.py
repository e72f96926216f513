"""Which kernels run a model's attention and its elementwise ops: chosen once, at start-up.

Each seam has a base module that defines the interface and the plain-torch reference
(:mod:`pagedserve.ops.attention`: ``AttentionBackend``; :mod:`pagedserve.ops.fused_ops`: ``DecoderOps``)
and a Triton module that implements it (``attention_triton``, ``fused_ops_triton``). A backend
imports its base; the base never imports a backend. This module sits above both and is the
only place that imports the Triton ones, lazily: a machine without triton never loads them.

Triton is taken on CUDA when it imports and :func:`pagedserve.ops.triton_launch.launch_problem`
finds nothing in the way (a C compiler for the launchers, a kernel that launches); asked for
explicitly on CPU it runs under ``TRITON_INTERPRET=1`` (tests only: the interpreter is slow).

The engine decides in its execution plan (:mod:`pagedserve.worker.execution_plan`, with the
reason) and asks here for what it chose by name (``torch``/``triton``, ``True``/``False``);
``auto`` and ``None`` serve a model built alone (an embedder, tests).
"""

from __future__ import annotations

import logging

import torch

from pagedserve.ops.attention import TORCH_BACKEND, AttentionBackend
from pagedserve.ops.fused_ops import TORCH_OPS, DecoderOps

logger = logging.getLogger(__name__)


def select_backend(choice: str, device: torch.device) -> AttentionBackend:
    """The attention backend for ``choice`` (``auto``, ``torch`` or ``triton``) on `device`:
    ``auto`` is Triton on CUDA when its kernels can launch there, else torch."""
    if choice == "torch" or (choice == "auto" and device.type != "cuda"):
        return TORCH_BACKEND
    try:
        from pagedserve.ops.attention_triton import TRITON_BACKEND
        from pagedserve.ops.triton_launch import launch_problem
    except ImportError as exc:
        if choice == "triton":
            raise
        logger.warning("triton is not importable (%s); attention runs in plain torch", exc)
        return TORCH_BACKEND
    if device.type == "cuda" and (problem := launch_problem(device.type)) is not None:
        if choice == "triton":
            raise ValueError(f"attention_backend triton: {problem}")
        return TORCH_BACKEND
    return TRITON_BACKEND


def select_ops(fused: bool | None, device: torch.device) -> DecoderOps:
    """The decoder's elementwise ops: ``None`` is the Triton kernels on CUDA when they can
    launch there, torch elsewhere; ``True`` insists on Triton, ``False`` on torch."""
    if fused is False or (fused is None and device.type != "cuda"):
        return TORCH_OPS
    try:
        from pagedserve.ops.fused_ops_triton import TRITON_OPS
        from pagedserve.ops.triton_launch import launch_problem
    except ImportError as exc:
        if fused:
            raise
        logger.warning("triton is not importable (%s); the decoder's elementwise ops run in "
                       "plain torch", exc)
        return TORCH_OPS
    if device.type == "cuda" and (problem := launch_problem(device.type)) is not None:
        if fused:
            raise ValueError(f"fused_ops: {problem}")
        return TORCH_OPS  # launch_problem logged why, once for both selectors
    return TRITON_OPS
