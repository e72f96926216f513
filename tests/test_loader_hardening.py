"""Corrupt model files fail once and clearly: a one-line ModelLoadError naming the key and the
value found, from `read_model_info` and `load_model`; one line from `pagedserve show`; and
`pagedserve serve` exits 1 with the reason instead of answering "loading" for good.

The files are the bundled SmolLM2's metadata over a small model (tests/gguf_image.py), with one
value changed each: the cases an attacker measured against `serve` (issue 27, finding 4).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
from gguf_image import ARRAY, UINT32, GGUFImage, Value, nested_array, shrink

from pagedserve.bench.server_process import free_port
from pagedserve.cli import main as cli_main
from pagedserve.loader import ModelLoadError, load_model, read_model_info


@pytest.fixture(scope="module")
def small_image(smollm_gguf) -> GGUFImage:
    return shrink(GGUFImage.read(smollm_gguf))


def _set(key: str, value: Value):
    return lambda image: image.fields.__setitem__(key, value)


def _dims(tensor: str, dims: list[int]):
    def edit(image: GGUFImage) -> None:
        next(t for t in image.tensors if t.name == tensor).dims = dims
    return edit


# name -> (edit, what the message must say)
CASES = {
    "head_count_0": (_set("llama.attention.head_count", Value(UINT32, 0)),
                     "llama.attention.head_count must be an integer between 1 and 16384, "
                     "found 0"),
    "tensor_dim_0": (_dims("blk.0.attn_q.weight", [0, 64]),
                     "tensor 'blk.0.attn_q.weight' has dimensions [0, 64]"),
    "alignment_array": (_set("general.alignment", Value(ARRAY, [32], UINT32)),
                        "general.alignment must be an integer between 1 and 1073741824, "
                        "found an array of 1 item"),
    "array_200k_deep": (_set("general.tags", Value(ARRAY, None, raw=nested_array(200_000))),
                        "metadata key 'general.tags' nests arrays more than 4 deep"),
    "block_count_2**32-1": (_set("llama.block_count", Value(UINT32, 2**32 - 1)),
                            "llama.block_count must be an integer between 1 and 65536, "
                            "found 4294967295"),
    "context_length_2**32-1": (_set("llama.context_length", Value(UINT32, 2**32 - 1)),
                               "llama.context_length must be an integer between 1 and "
                               "67108864, found 4294967295"),
}


@pytest.fixture(scope="module")
def bad_files(small_image, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("bad-gguf")
    files = {}
    for name, (edit, _) in CASES.items():
        image = small_image.copy()
        edit(image)
        files[name] = image.write(folder / f"{name}.gguf")
    return files


def test_the_small_model_loads(small_image, tmp_path):
    """The base of every case is a good file: each failure below is the edit's."""
    loaded = load_model(small_image.write(tmp_path / "small.gguf"))
    assert (loaded.config.num_layers, loaded.config.num_heads, loaded.config.vocab_size) == (
        2, 4, 400)
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("the cat sat")) == "the cat sat"


@pytest.mark.parametrize("case", CASES)
def test_a_bad_value_is_a_one_line_error_naming_it(bad_files, case):
    expected = CASES[case][1]
    for read in (read_model_info, load_model):
        started = time.monotonic()
        with pytest.raises(ModelLoadError) as caught:
            read(bad_files[case])
        assert time.monotonic() - started < 5
        message = str(caught.value)
        assert expected in message and "\n" not in message, (read.__name__, message)
        assert message.startswith(f"{case}.gguf")


@pytest.mark.parametrize("case", CASES)
def test_show_prints_one_line(bad_files, case, capsys, caplog):
    assert cli_main(["show", str(bad_files[case])]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    assert err.startswith("Error: ") and CASES[case][1] in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_show_in_a_process_prints_one_line_and_verbose_the_traceback(bad_files):
    path = str(bad_files["array_200k_deep"])
    plain, verbose = (subprocess.Popen([sys.executable, "-m", "pagedserve", *flags, "show", path],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                      for flags in ([], ["--verbose"]))
    plain_err, verbose_err = plain.communicate(timeout=60)[1], verbose.communicate(timeout=60)[1]
    assert plain.returncode == 1 and verbose.returncode == 1
    assert plain_err.count("\n") == 1 and "Traceback" not in plain_err, plain_err
    assert "Traceback" in verbose_err and "nests arrays more than 4 deep" in verbose_err


class Served:
    """`pagedserve serve` in a child, its output lines timed as they come."""

    def __init__(self, argv: list[str]) -> None:
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen([*argv, "--port", str(free_port())], text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def finish(self, timeout: float = 60) -> tuple[int, float | None, list[str]]:
        """Exit status, seconds from "listening ...; loading" to the exit, the output."""
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        exited = time.monotonic()
        self._reader.join(5)
        loading = next((t for t, line in self.lines if "listening on" in line), None)
        return code, None if loading is None else exited - loading, [
            line for _, line in self.lines]


# Before, each of these killed the load thread (ZeroDivisionError, TypeError, MemoryError after
# 17 s of growth) and left the server "loading" for good. The other three cases take the same
# path (a ModelLoadError from the loader), which the tests above show for each.
HUNG_SERVE = ["head_count_0", "alignment_array", "block_count_2**32-1"]


@pytest.mark.slow
@pytest.mark.parametrize("case", HUNG_SERVE)
def test_serve_exits_1_with_the_reason(bad_files, case):
    """Within 10 s of the load's start (the port is bound and answers 503 meanwhile; about
    3 s of it are the engine's imports), one ERROR line saying why, no traceback."""
    code, seconds, out = Served([sys.executable, "-m", "pagedserve", "serve",
                                 str(bad_files[case])]).finish()
    errors = [line for line in out if " ERROR " in line]
    assert code == 1, out
    assert seconds is not None and seconds < 10, (seconds, out)
    assert len(errors) == 1 and CASES[case][1] in errors[0], out
    assert not any("Traceback" in line for line in out), out


@pytest.mark.slow
def test_serve_exits_1_whatever_the_load_raises(small_image, tmp_path, monkeypatch):
    """A loader bug (here a RecursionError the loader did not turn into a ModelLoadError) still
    ends the server, with one line naming the exception. The model loads in the engine-core
    process: the bug is planted there too, by a sitecustomize every process of the server
    imports."""
    path = small_image.write(tmp_path / "small.gguf")
    (tmp_path / "sitecustomize.py").write_text(
        "from pagedserve.engine.core import EngineCore\n"
        "def boom(*args, **kwargs):\n"
        "    raise RecursionError('maximum recursion depth exceeded')\n"
        "EngineCore.from_model = classmethod(boom)\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]))
    code, seconds, out = Served([sys.executable, "-m", "pagedserve", "serve", str(path)]).finish()
    errors = [line for line in out if " ERROR " in line]
    assert code == 1 and seconds is not None and seconds < 10, out
    assert len(errors) == 1 and "RecursionError: maximum recursion depth exceeded" in errors[0]


def test_what_memory_cannot_hold_is_refused_before_it_is_allocated(small_image, tmp_path,
                                                                   monkeypatch):
    """The small model: 8192 positions x 16 dims x 8 bytes = 1 MiB of rotary tables, about
    389 KiB of float32 weights."""
    from pagedserve.loader import checks

    path = small_image.write(tmp_path / "small.gguf")
    monkeypatch.setattr(checks, "available_memory", lambda: 1 << 19)
    with pytest.raises(ModelLoadError, match=r"^small.gguf: llama.context_length is 8192, whose "
                                             r"rotary tables need 1.0 MiB; 512.0 KiB of memory"):
        load_model(path)
    monkeypatch.setattr(checks, "available_memory", lambda: 1200 << 10)
    with pytest.raises(ModelLoadError, match=r"^small.gguf: its weights need 389.2 KiB in float32; "
                                             r"1.2 MiB of memory is available"):
        load_model(path)
    monkeypatch.setattr(checks, "available_memory", lambda: 2 << 20)
    assert load_model(path).config.max_position_embeddings == 8192


# ---------------------------------------------------------------------------------------------
# config.json


@pytest.mark.parametrize(("key", "value", "message"), [
    ("num_attention_heads", 0, "num_attention_heads must be an integer between 1 and 16384, "
                               "found 0"),
    ("num_key_value_heads", 3, "num_attention_heads (4) must be a multiple of "
                               "num_key_value_heads (3)"),
    ("hidden_size", -64, "hidden_size must be an integer between 1 and 1048576, found -64"),
    ("intermediate_size", "128", "intermediate_size must be an integer"),
    ("num_hidden_layers", 2**32 - 1, "num_hidden_layers must be an integer between 1 and 65536"),
    ("num_hidden_layers", 5, "num_hidden_layers is 5, which needs at least 45 tensors"),
    ("vocab_size", 0, "vocab_size must be an integer between 1 and 16777216, found 0"),
    ("max_position_embeddings", 2**40, "max_position_embeddings must be an integer between 1 "
                                       "and 67108864"),
    ("head_dim", 7, "head_dim must be even"),
    ("rms_norm_eps", float("nan"), "rms_norm_eps must be a finite number"),
    ("rope_theta", -1.0, "rope_theta must be a finite number > 1.0"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                      "high_freq_factor": 4.0}, "rope_scaling.high_freq_factor (4.0) must "
                                                "exceed low_freq_factor (4.0)"),
    ("rope_scaling", {"rope_type": "linear", "factor": 0}, "rope_scaling.factor must be a "
                                                          "finite number > 0.0, found 0"),
    ("rope_scaling", [1, 2], "rope_scaling must be an object, found an array of 2 items"),
    ("architectures", "LlamaForCausalLM", "architectures must be a list"),
])
def test_hf_config_values_are_checked(tiny_llama_dir, tmp_path, key, value, message):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("rope_parameters", None)  # transformers 5 keeps rope_scaling in there
    config.setdefault("rope_theta", 10000.0)
    config[key] = value
    (model_dir / "config.json").write_text(json.dumps(config))
    for read in (read_model_info, load_model):
        with pytest.raises(ModelLoadError) as caught:
            read(model_dir)
        assert message in str(caught.value) and "\n" not in str(caught.value)


def test_hf_tensor_of_the_wrong_shape_is_named(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model_dir)
    weights = load_file(str(model_dir / "model.safetensors"))
    weights["model.layers.0.mlp.up_proj.weight"] = weights["model.layers.0.mlp.up_proj.weight"][1:]
    save_file(weights, str(model_dir / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"tensor 'model\.layers\.0\.mlp\.up_proj\.weight' "
                                             r"has shape \(\d+, \d+\), but the config needs"):
        load_model(model_dir)
