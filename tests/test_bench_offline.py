"""`bench offline`: named random-weight shapes, a tiny run through the command line on CPU,
and the transformers peer built on the engine's own tensors."""

from __future__ import annotations

import json

import pytest
import torch

from pagedserve.cli import main
from pagedserve.config import EngineConfig
from pagedserve.engine import Engine
from pagedserve.loader import ModelLoadError, load_model
from pagedserve.loader.shapes import SHAPES, shape_for


def test_named_shapes_are_the_models_configs():
    llama = shape_for("dummy:llama-3.1-8b")
    assert (llama.num_layers, llama.hidden_size, llama.num_heads, llama.num_kv_heads,
            llama.vocab_size) == (32, 4096, 32, 8, 128256)
    assert 8.0e9 < llama.num_parameters < 8.1e9
    assert llama.rope_scaling["rope_type"] == "llama3"
    small = shape_for("llama-3.2-1b")
    assert small.tie_word_embeddings and 1.2e9 < small.num_parameters < 1.3e9
    qwen = shape_for("dummy:Qwen2.5-7B")
    assert qwen.architecture == "qwen2" and qwen.attention_bias
    assert 7.0e9 < qwen.num_parameters < 7.7e9
    shape_for("dummy:llama-3.1-8b").rope_scaling["factor"] = 1.0  # a copy: the table stays
    assert SHAPES["llama-3.1-8b"].rope_scaling["factor"] == 8.0
    with pytest.raises(ModelLoadError, match="unknown dummy shape 'dummy:gpt-5'"):
        shape_for("dummy:gpt-5")


def test_dummy_name_loads_random_weights_of_that_shape():
    loaded = load_model("dummy:tiny-qwen2", dtype="float32")
    assert loaded.config == SHAPES["tiny-qwen2"]
    assert loaded.weights["model.layers.1.self_attn.q_proj.bias"].shape == (64,)
    assert torch.equal(load_model("dummy:tiny-qwen2").weights["model.norm.weight"],
                       torch.ones(64))


@pytest.mark.parametrize("name", ["dummy:tiny-llama", "dummy:tiny-qwen2"])
def test_transformers_peer_runs_on_the_engines_tensors(name):
    from pagedserve.bench.offline_peer import transformers_on

    loaded = load_model(name)
    hf = transformers_on(loaded.config, loaded.weights)
    down = loaded.weights["model.layers.0.mlp.down_proj.weight"]
    assert hf.model.layers[0].mlp.down_proj.weight.data_ptr() == down.data_ptr()  # no copy
    engine = Engine.from_model(loaded, EngineConfig(dtype="float32", kv_cache_memory=1 << 20))
    ids = list(range(3, 60))
    ours = engine.runner.prompt_logits(ids, list(range(4)))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert float((ours - ref).abs().max() / ref.abs().max()) < 1e-4


def test_offline_command_runs_batches_and_the_peer_on_a_dummy_shape(tmp_path, capsys):
    out = tmp_path / "offline.json"
    code = main(["bench", "offline", "dummy:tiny-llama", "--batch-sizes", "1,3",
                 "--input-len", "8", "--output-len", "5", "--dtype", "float32",
                 "--peer", "transformers", "--peer-batch-size", "2", "--out", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    assert [r["num_prompts"] for r in results] == [1, 3, 2]
    assert [r["output_tokens"] for r in results] == [5, 15, 10]
    assert results[1]["decode_step_ms"] > 0
    assert results[2]["label"] == "transformers generate, batch 2"
    assert "offline throughput, 8 in / 5 out" in capsys.readouterr().out
