"""The device the engine computes on, checked before anything is loaded onto it.

torch itself answers ``--device cuda`` on a CPU-only build with an assertion deep inside its
CUDA initialisation; :func:`check_device` says instead what is missing and how to get it.
"""

from __future__ import annotations

# The CUDA builds are on PyTorch's own index (pick the CUDA version your driver supports at
# https://pytorch.org/get-started/locally/); README's "With a GPU" says the same.
CUDA_TORCH_INSTALL = (
    "pip install --force-reinstall torch --index-url https://download.pytorch.org/whl/cu128"
)


def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this machine's CPU (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return frozenset()


def on_device(values: list, dtype, device):
    """A small tensor of ``values`` on ``device`` (a torch.device) without a blocking copy: on
    CUDA through pinned memory (PyTorch's caching host allocator keeps the buffer until the
    copy is done), so the host goes on preparing while the device runs the previous step. A
    plain ``torch.tensor(values, device=cuda)`` copies from pageable memory, which waits for
    everything queued on the device before it."""
    import torch

    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


class DeviceError(ValueError):
    """The device asked for cannot be used by this torch on this machine."""


def check_device(device: str) -> None:
    """Raise DeviceError unless ``device`` ("cpu", "cuda", "cuda:N") can run the engine."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise DeviceError(f"device must be cpu, cuda or cuda:N, got {device!r}") from None
    if parsed.type == "cpu":
        return
    if parsed.type != "cuda":
        raise DeviceError(f"device {device!r} is not supported: pagedserve runs on cpu or cuda")
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        raise DeviceError(
            f"device {device!r}: this torch ({torch.__version__}) was built without CUDA. "
            f"Install a CUDA build into this environment, e.g. `{CUDA_TORCH_INSTALL}` (see "
            "README, 'With a GPU'), or leave --device out to run on the CPU"
        )
    if not torch.cuda.is_available():
        raise DeviceError(
            f"device {device!r}: torch {torch.__version__} is built for CUDA but sees no GPU "
            "(check nvidia-smi, the driver, and CUDA_VISIBLE_DEVICES)"
        )
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise DeviceError(f"device {device!r}: this machine has {torch.cuda.device_count()} "
                          "GPU(s), numbered from 0")
