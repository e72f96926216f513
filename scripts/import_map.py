"""Draw the package's layers from its imports: who imports whom, package by package.

Reads the same import graph tests/test_imports.py checks (every ``import`` in every module,
lazy ones included, read with :mod:`ast`; nothing is imported) and draws it as a matrix: a row
per importing package, a column per imported one, both in layer order from the top (entry
points) to the bottom (``core``), each cell the number of module-to-module imports. Layering
shows as every count on one side of the diagonal; the modules at the package's root (value
objects and services, beside the layers) are one row and column at the end.

    python scripts/import_map.py                       # docs/architecture-layers.png
    python scripts/import_map.py --out /tmp/map.png
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# top to bottom, as docs/ARCHITECTURE.md draws them
ORDER = ("cli", "server", "bench", "engine", "worker", "loader", "models", "parallel", "ops",
         "core", "structured", "hub", "(root)")


def _import_test():
    spec = importlib.util.spec_from_file_location("test_imports",
                                                  ROOT / "tests" / "test_imports.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def package_of(module: str) -> str:
    """``pagedserve.worker.sampler`` -> ``worker``; a module at the root (or ``__main__``, the
    entry point) -> ``(root)`` / ``cli``."""
    parts = module.split(".")
    if parts[1:2] == ["__main__"]:
        return "cli"
    package = parts[1] if len(parts) > 1 else "(root)"
    return package if package in ORDER else "(root)"


def package_counts(edges: dict[str, set[str]]) -> Counter[tuple[str, str]]:
    """(importing package, imported package) -> module-to-module imports between them."""
    counts: Counter[tuple[str, str]] = Counter()
    for source, targets in edges.items():
        for target in targets:
            a, b = package_of(source), package_of(target)
            if a != b:
                counts[a, b] += 1
    return counts


def draw(counts: Counter[tuple[str, str]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(ORDER)
    grid = np.zeros((n, n))
    for (a, b), count in counts.items():
        grid[ORDER.index(a), ORDER.index(b)] = count
    fig, ax = plt.subplots(figsize=(8.5, 7.5))
    ax.imshow(np.where(grid > 0, np.log1p(grid), np.nan), cmap="Blues", vmin=0)
    for i in range(n):
        for j in range(n):
            if grid[i, j]:
                ax.text(j, i, int(grid[i, j]), ha="center", va="center", fontsize=8)
    ax.set_xticks(range(n), ORDER, rotation=45, ha="right")
    ax.set_yticks(range(n), ORDER)
    ax.set_xlabel("imported package")
    ax.set_ylabel("importing package")
    layers = ORDER.index("structured") - 0.5  # the layers above, the packages beside below
    for at in (layers,):
        ax.axhline(at, color="grey", lw=0.8)
        ax.axvline(at, color="grey", lw=0.8)
    ax.plot([-0.5, layers], [-0.5, layers], color="grey", lw=0.6, ls=":")
    ax.set_title("pagedserve's imports, package by package (layers from the top)\n"
                 "above the diagonal: a package imports one below it", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "architecture-layers.png")
    args = parser.parse_args(argv)
    graph = _import_test().import_graph(ROOT)
    counts = package_counts(graph.all_edges())
    upward = [f"{a} -> {b}" for (a, b) in counts
              if max(ORDER.index(a), ORDER.index(b)) < ORDER.index("structured")
              and ORDER.index(b) < ORDER.index(a)]
    draw(counts, args.out)
    print(f"wrote {args.out}: {sum(counts.values())} imports between packages"
          + (f"; upward: {', '.join(upward)}" if upward else "; none goes up"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
