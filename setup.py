"""The CPU kernels, compiled when the package is built or installed (``pip install .``,
``pip install -e .``, a wheel): one library per instruction-set variant of this architecture
and the probe that picks one at run time (pagedserve/ops/cpu_kernels/build.py says what and how;
everything else about the package is in pyproject.toml).

The kernels are optional: without a C++ compiler the install still succeeds, with a warning,
and the engine compiles them at its first start where it finds one (or runs on torch's kernels).
"""

import importlib.util
import logging
import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location(
    "_pagedserve_build", HERE / "pagedserve" / "ops" / "cpu_kernels" / "build.py")
build = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = build
_spec.loader.exec_module(build)

log = logging.getLogger("pagedserve.setup")


class BuildCpuKernels(build_ext):
    """Compiles each kernel library with build.py's command (the run-time fallback's), in
    parallel; a library that fails is left out with a warning."""

    def finalize_options(self):
        super().finalize_options()
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1

    def build_extension(self, ext: Extension) -> None:
        target = ext.name.rsplit(".", 1)[1].removeprefix("_kernels_").removeprefix("_")
        output = Path(self.get_ext_fullpath(ext.name))
        try:
            build.compile_library(target, output)
        except build.KernelBuildError as exc:
            self.warn(f"pagedserve: {exc}; the engine will compile the CPU kernels at run time "
                      "if it finds a compiler, else use torch's")


def kernel_extensions() -> list[Extension]:
    sources = [str(p.relative_to(HERE)) for p in sorted(build.SOURCE_DIR.iterdir())]
    names = [build.PROBE] + [v.name for v in build.isa.variants_for()]
    if len(names) == 1:  # an architecture without variants yet: nothing to build
        return []
    return [Extension(f"pagedserve.ops.cpu_kernels._{'probe' if n == build.PROBE else 'kernels_' + n}",
                      sources=[], depends=sources, optional=True)
            for n in names]


setup(ext_modules=kernel_extensions(), cmdclass={"build_ext": BuildCpuKernels})
