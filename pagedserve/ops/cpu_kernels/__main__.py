"""``python -m pagedserve.ops.cpu_kernels``: which CPU kernels this machine would compute with, and
why (the variant, the instruction sets the CPU and OS allow, the library's path; or the reason
there are none). ``--json`` prints it as one JSON object (``pagedserve bench`` records it)."""

from __future__ import annotations

import argparse
import json

from pagedserve.ops import cpu_kernels


def describe() -> dict:
    try:
        kernels = cpu_kernels.load()
    except (cpu_kernels.KernelUnavailable, ValueError) as exc:
        return {"kernels": None, "reason": str(exc)}
    return {"kernels": kernels.isa, "cpu_features": sorted(kernels.cpu_features),
            "library": str(kernels.library.path)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    description = describe()
    if args.json:
        print(json.dumps(description))
    elif description["kernels"] is None:
        print(f"no CPU kernels: {description['reason']}")
    else:
        print(f"{description['kernels']} ({' '.join(description['cpu_features'])}): "
              f"{description['library']}")


if __name__ == "__main__":
    main()
