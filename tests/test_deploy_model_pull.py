"""The chart's init container pins the weights it pulls: `pagedserve pull ORG/NAME --revision
REV` takes that revision's files, never whatever main points at now, so that pods started
months apart serve the same model. Offline, from a Hugging Face cache laid out as
huggingface_hub writes it (no download in tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OLD, NEW = "a" * 40, "b" * 40


def _hf_cache(hf_home: Path) -> None:
    """org/model with two snapshots; refs/main names the newer, refs/v1 the older."""
    repo = hf_home / "hub" / "models--org--model"
    for sha, layers in ((OLD, 2), (NEW, 3)):
        snapshot = repo / "snapshots" / sha
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text(json.dumps({"num_hidden_layers": layers}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(NEW)
    (repo / "refs" / "v1").write_text(OLD)


def _pull(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PAGEDSERVE_HOME": str(tmp_path / "store"),
           "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path),
           "PYTHONPATH": str(ROOT)}
    code = "import sys; from pagedserve.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, "pull", *args], capture_output=True,
                          text=True, timeout=120, env=env, cwd=ROOT)


def _stored_config(tmp_path: Path, name: str) -> dict:
    [config] = (tmp_path / "store").rglob("config.json")
    return json.loads(config.read_text())


def test_revision_pins_the_files(tmp_path):
    _hf_cache(tmp_path / "hf")
    out = _pull(tmp_path, "org/model", "--name", "pinned", "--revision", OLD)
    assert out.returncode == 0, out.stderr
    assert _stored_config(tmp_path, "pinned") == {"num_hidden_layers": 2}


def test_a_tag_is_followed_through_refs(tmp_path):
    _hf_cache(tmp_path / "hf")
    out = _pull(tmp_path, "org/model", "--name", "tagged", "--revision", "v1")
    assert out.returncode == 0, out.stderr
    assert _stored_config(tmp_path, "tagged") == {"num_hidden_layers": 2}


def test_without_revision_main_wins(tmp_path):
    _hf_cache(tmp_path / "hf")
    out = _pull(tmp_path, "org/model", "--name", "latest")
    assert out.returncode == 0, out.stderr
    assert _stored_config(tmp_path, "latest") == {"num_hidden_layers": 3}


def test_a_revision_that_is_not_there_fails(tmp_path):
    _hf_cache(tmp_path / "hf")
    out = _pull(tmp_path, "org/model", "--revision", "c" * 40)
    assert out.returncode != 0
    assert "c" * 40 in out.stderr
    assert not list((tmp_path / "store").rglob("config.json"))


def test_revision_of_a_path_is_refused(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    out = _pull(tmp_path, str(tmp_path / "model"), "--revision", OLD)
    assert out.returncode != 0
    assert "only a Hugging Face repository ORG/NAME has revisions" in out.stderr
