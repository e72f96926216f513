"""The dequantized-weight cache: a second load reads it, a bad file or opt-out falls back."""

from __future__ import annotations

import logging

import torch

from pagedserve.loader import load_model, weight_cache


def test_second_load_comes_from_the_cache_with_identical_weights(
        tiny_llama_gguf, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PAGEDSERVE_HOME", str(tmp_path))
    caplog.set_level(logging.INFO, logger="pagedserve.loader.gguf")
    first = load_model(tiny_llama_gguf)
    file = weight_cache.cache_file(tiny_llama_gguf, torch.float32)
    assert file.is_file()
    assert "from GGUF tensors" in caplog.text
    caplog.clear()
    second = load_model(tiny_llama_gguf)
    assert "from the dequantized-weight cache" in caplog.text
    assert first.weights.keys() == second.weights.keys()
    for name, w in first.weights.items():
        assert torch.equal(w, second.weights[name]), name
    assert first.config == second.config


def test_a_corrupt_cache_file_is_ignored_and_opting_out_writes_nothing(
        tiny_llama_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_HOME", str(tmp_path))
    file = weight_cache.cache_file(tiny_llama_gguf, torch.float32)
    file.parent.mkdir(parents=True)
    file.write_bytes(b"not a safetensors file")
    loaded = load_model(tiny_llama_gguf)
    assert loaded.weights  # loaded from the GGUF, and the cache rewritten
    assert weight_cache.load(tiny_llama_gguf, torch.float32) is not None

    monkeypatch.setenv("PAGEDSERVE_HOME", str(tmp_path / "other"))
    monkeypatch.setenv("PAGEDSERVE_WEIGHT_CACHE", "0")
    load_model(tiny_llama_gguf)
    assert not (tmp_path / "other").exists()


def test_a_full_disk_leaves_no_file_and_the_model_still_loads(
        tiny_llama_gguf, tmp_path, monkeypatch, caplog):
    """safetensors reports ENOSPC as its own SafetensorError, not OSError: the load goes on."""
    from safetensors import SafetensorError

    def full_disk(weights, filename, metadata=None):
        with open(filename, "wb") as half:
            half.write(b"\0" * 100)
        raise SafetensorError("Error while serializing: I/O error: No space left on device")

    monkeypatch.setenv("PAGEDSERVE_HOME", str(tmp_path))
    monkeypatch.setattr(weight_cache, "save_file", full_disk)
    caplog.set_level(logging.WARNING, logger="pagedserve.loader.weight_cache")
    loaded = load_model(tiny_llama_gguf)
    assert loaded.weights
    assert "No space left on device" in caplog.text
    assert list(weight_cache.cache_dir().iterdir()) == []


def test_it_never_takes_the_last_of_a_disk(tiny_llama_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_HOME", str(tmp_path))
    weights = load_model(tiny_llama_gguf).weights
    size = sum(w.numel() * w.element_size() for w in weights.values())
    for file in weight_cache.cache_dir().iterdir():
        file.unlink()
    real = weight_cache.shutil.disk_usage
    tight = real(tmp_path)._replace(free=2 * size - 1)
    monkeypatch.setattr(weight_cache.shutil, "disk_usage", lambda path: tight)
    assert weight_cache.store(tiny_llama_gguf, torch.float32, weights) is None
    assert list(weight_cache.cache_dir().iterdir()) == []
    monkeypatch.setattr(weight_cache.shutil, "disk_usage", real)
    assert weight_cache.store(tiny_llama_gguf, torch.float32, weights) is not None


def test_a_new_file_pushes_out_the_least_recently_used(tmp_path, monkeypatch):
    """Bounded by PAGEDSERVE_WEIGHT_CACHE_MAX in all: a re-pulled or edited GGUF (new mtime, new
    key) does not pile up dequantized copies of itself; a dead writer's temporary goes too."""
    import os

    monkeypatch.setenv("PAGEDSERVE_HOME", str(tmp_path))
    weights = {"w": torch.zeros(1024)}  # 4 KiB a file, plus the header
    models = []
    for name in "abc":
        model = tmp_path / f"{name}.gguf"
        model.write_bytes(b"GGUF")
        models.append(model)
    monkeypatch.setenv("PAGEDSERVE_WEIGHT_CACHE_MAX", str(2 * 4096 + 1000))
    a = weight_cache.store(models[0], torch.float32, weights)
    b = weight_cache.store(models[1], torch.float32, weights)
    os.utime(a, (1, 1))
    os.utime(b, (2, 2))
    assert weight_cache.load(models[0], torch.float32) is not None  # a is used again: newest
    dead = weight_cache.cache_dir() / "x-float32-0.tmp999999999"
    dead.write_bytes(b"half")
    c = weight_cache.store(models[2], torch.float32, weights)
    assert sorted(p.name for p in weight_cache.cache_dir().iterdir()) == sorted([a.name, c.name])
