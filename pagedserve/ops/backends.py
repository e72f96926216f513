"""Which kernels run a model's attention and its elementwise ops: chosen once, at start-up.

Each seam has a base module that defines the interface and the plain-torch reference
(:mod:`pagedserve.ops.attention`: ``AttentionBackend``; :mod:`pagedserve.ops.fused_ops`: ``DecoderOps``)
and a Triton module that implements it (``attention_triton``, ``fused_ops_triton``). A backend
imports its base; the base never imports a backend. This module sits above both and is the
only place that imports the Triton ones, lazily: a machine without triton never loads them.

The engine decides in its execution plan (:mod:`pagedserve.worker.execution_plan`, with the
reason): ``auto`` becomes Triton on CUDA when it imports and
:func:`pagedserve.ops.triton_launch.launch_problem` finds nothing in the way, else torch. The
selectors here only turn those resolved names into objects and ask nothing of the device; a
component built outside an engine (an embedder, a test) resolves a plan, or names torch.
Triton asked for on a CPU runs under ``TRITON_INTERPRET=1`` (tests only: the interpreter is slow).
"""

from __future__ import annotations

from pagedserve.ops.attention import TORCH_BACKEND, AttentionBackend
from pagedserve.ops.fused_ops import TORCH_OPS, DecoderOps


def select_backend(name: str) -> AttentionBackend:
    """The attention backend the plan resolved: ``torch`` or ``triton``."""
    if name == "torch":
        return TORCH_BACKEND
    if name == "triton":
        from pagedserve.ops.attention_triton import TRITON_BACKEND

        return TRITON_BACKEND
    raise ValueError(f"attention_backend must be a resolved torch or triton, got {name!r} "
                     "(the execution plan decides auto)")


def select_ops(fused: bool) -> DecoderOps:
    """The decoder's elementwise ops the plan resolved: ``True`` the Triton kernels, ``False``
    torch's."""
    if fused is False:
        return TORCH_OPS
    if fused is True:
        from pagedserve.ops.fused_ops_triton import TRITON_OPS

        return TRITON_OPS
    raise ValueError(f"fused_ops must be a resolved True or False, got {fused!r} (the "
                     "execution plan decides None)")
