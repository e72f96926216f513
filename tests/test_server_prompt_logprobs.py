"""Prompt logprobs of the bundled model, through the engine, the OpenAI API and lm-eval.

The reference is transformers on the same GGUF in float32, and the server runs ``--dtype
float32``, so both compute the same thing. lm-eval's ``local-completions`` loglikelihood (what
every multiple-choice task uses) reads the prompt's logprobs from ``echo`` with ``logprobs``:
its per-item loglikelihoods must be transformers' own. Also here: ``max_tokens`` 0, vLLM's
``prompt_logprobs`` field, ``logit_bias`` through the API, and their 400s.
"""

from __future__ import annotations

import json
import logging

import openai
import pytest
import torch

from pagedserve.bench.server_process import ServerProcess
from pagedserve.config import EngineConfig
from pagedserve.engine import Engine
from pagedserve.loader import load_model
from pagedserve.sampling_params import SamplingParams

pytestmark = pytest.mark.slow
logger = logging.getLogger(__name__)

MODEL = "smollm2:135m"
SERVER_ARGS = ["--served-model-name", MODEL, "--dtype", "float32", "--kv-cache-memory", "128MiB",
               "--max-model-len", "1024"]
PROMPT = "The quick brown fox jumps over the lazy dog. Then it"
TOL = 1e-3


@pytest.fixture(scope="module")
def loaded(smollm_gguf):
    return load_model(smollm_gguf)


@pytest.fixture(scope="module")
def hf_smollm(smollm_gguf):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(smollm_gguf.parent), gguf_file=smollm_gguf.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def server(smollm_gguf):
    with ServerProcess(str(smollm_gguf), SERVER_ARGS) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                         timeout=120)


def reference(model, ids: list[int]) -> torch.Tensor:
    """(n - 1, V): row p is transformers' distribution of token p + 1."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(dim=-1)


# -- the engine ----------------------------------------------------------------------------------


def test_engine_prompt_logprobs_match_transformers(loaded, hf_smollm):
    engine = Engine.from_model(loaded, EngineConfig(dtype="float32", kv_cache_memory=64 << 20,
                                                    max_num_batched_tokens=16))
    messages = [{"role": "user", "content": "Why is the sky blue? Answer in one sentence."}]
    ids = loaded.tokenizer.encode(loaded.tokenizer.apply_chat_template(messages),
                                  add_special_tokens=False)
    assert len(ids) > 32  # three steps of chunked prefill at least
    engine.add_request(ids, SamplingParams(max_tokens=1, prompt_logprobs=5))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    [got] = [o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None]
    ref = reference(hf_smollm, ids)
    assert len(got) == len(ids) and got[0] is None
    worst = 0.0
    for p, entry in enumerate(got[1:]):
        worst = max(worst, abs(entry.sampled.logprob - float(ref[p, ids[p + 1]])))
        assert [alt.rank for alt in entry.top] == [1, 2, 3, 4, 5]
        for alt in entry.top:
            worst = max(worst, abs(alt.logprob - float(ref[p, alt.token_id])))
        assert entry.top[0].token_id == int(ref[p].argmax()) or \
            float(ref[p].max() - ref[p, entry.top[0].token_id]) < TOL
    logger.info("engine vs transformers: %d prompt positions, largest difference %.2e",
                len(ids) - 1, worst)
    assert worst < TOL


# -- the OpenAI API ------------------------------------------------------------------------------


def test_echo_with_logprobs_and_max_tokens_zero_is_the_prompt_scored(client, loaded, hf_smollm):
    ids = loaded.tokenizer.encode(PROMPT)
    reply = client.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=3,
                                      max_tokens=0)
    [choice] = reply.choices
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), 0)
    lp = choice.logprobs
    assert lp.tokens == [loaded.tokenizer.token_text(t) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = reference(hf_smollm, ids)
    for p, (logprob, top) in enumerate(zip(lp.token_logprobs[1:], lp.top_logprobs[1:],
                                           strict=True)):
        assert logprob == pytest.approx(float(ref[p, ids[p + 1]]), abs=TOL)
        assert top[lp.tokens[p + 1]] == logprob  # the token itself, and the top 3
        assert 3 <= len(top) <= 4 and max(top.values()) == pytest.approx(float(ref[p].max()),
                                                                          abs=TOL)
    offsets = [0]
    for token in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(token))
    assert lp.text_offset == offsets


def test_echo_then_the_answer_streamed_or_not(client):
    kwargs = dict(model=MODEL, prompt=PROMPT, echo=True, logprobs=1, temperature=0)
    alone = client.completions.create(**kwargs, max_tokens=0).choices[0].logprobs
    whole = client.completions.create(**kwargs, max_tokens=3,
                                      extra_body={"ignore_eos": True}).choices[0]
    n = len(alone.tokens)
    lp = whole.logprobs
    assert lp.tokens[:n] == alone.tokens and len(lp.tokens) == n + 3
    assert lp.token_logprobs[1:n] == pytest.approx(alone.token_logprobs[1:], abs=1e-5)
    assert whole.text == PROMPT + "".join(lp.tokens[n:])
    assert lp.text_offset[n] == len(PROMPT)  # the answer's offsets: into the text shown
    chunks = list(client.completions.create(**kwargs, max_tokens=3, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert sum((s.tokens for s in streamed), []) == lp.tokens
    assert sum((s.text_offset for s in streamed), []) == lp.text_offset
    assert sum((s.token_logprobs for s in streamed), [])[1:] == pytest.approx(
        lp.token_logprobs[1:], abs=1e-5)
    [zero] = [c for c in client.completions.create(**kwargs, max_tokens=0, stream=True)
              if c.choices]
    assert zero.choices[0].text == PROMPT and zero.choices[0].finish_reason == "length"
    assert zero.choices[0].logprobs.tokens == alone.tokens


def test_prompt_logprobs_in_vllms_shape(client, loaded):
    ids = loaded.tokenizer.encode(PROMPT)
    echoed = client.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=0,
                                       max_tokens=0).choices[0].logprobs
    reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1,
                                      extra_body={"prompt_logprobs": 2})
    got = reply.choices[0].model_extra["prompt_logprobs"]
    assert len(got) == len(ids) and got[0] is None
    for p, entry in enumerate(got[1:], 1):
        own = entry[str(ids[p])]
        assert own["logprob"] == pytest.approx(echoed.token_logprobs[p], abs=1e-5)
        assert own["decoded_token"] == echoed.tokens[p]
        ranks = sorted(e["rank"] for e in entry.values())
        assert ranks[:2] == [1, 2] and own["rank"] >= 1 and len(entry) in (2, 3)
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=1,
        extra_body={"prompt_logprobs": 0})
    top = chat.model_extra["prompt_logprobs"]  # vLLM puts a chat's at the top
    assert len(top) == chat.usage.prompt_tokens and top[0] is None
    assert all(len(entry) == 1 for entry in top[1:])


@pytest.mark.parametrize(("route", "body", "param"), [
    ("completions", {"max_tokens": 0}, "max_tokens"),
    ("chat", {"max_tokens": 0}, "max_tokens"),
    ("chat", {"max_completion_tokens": 0}, "max_completion_tokens"),
    ("completions", {"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ("chat", {"prompt_logprobs": 0, "stream": True}, "prompt_logprobs"),
    ("completions", {"prompt_logprobs": 21}, "prompt_logprobs"),
    ("completions", {"logit_bias": {"5": 100.5}}, "logit_bias"),
    ("completions", {"logit_bias": {"five": 1}}, "logit_bias"),
    ("completions", {"logit_bias": {"49152": 1}}, "logit_bias"),
    ("chat", {"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ("chat", {"logit_bias": {"-3": 1}}, "logit_bias"),
])
def test_bad_values_are_400s_naming_the_field(client, route, body, param):
    known = {k: body.pop(k) for k in ("max_tokens", "max_completion_tokens", "stream")
             if k in body}
    with pytest.raises(openai.BadRequestError) as err:
        if route == "chat":
            client.chat.completions.create(model=MODEL, messages=[{"role": "user",
                                                                  "content": "Hi"}],
                                           **known, extra_body=body)
        else:
            client.completions.create(model=MODEL, prompt="Hi", **known, extra_body=body)
    assert err.value.param == param
    assert err.value.body["message"].startswith(param)


def test_logit_bias_forces_and_bans_tokens(client, loaded):
    text = loaded.tokenizer.token_text
    forced = loaded.tokenizer.encode(" capital")[0]
    reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0,
                                      logit_bias={str(forced): 100}, logprobs=0,
                                      extra_body={"ignore_eos": True})
    assert reply.choices[0].text == text(forced) * 4
    assert all(lp < -1 for lp in reply.choices[0].logprobs.token_logprobs)  # raw logprobs
    first = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, temperature=0,
                                      logprobs=0).choices[0].logprobs.tokens[0]
    [first_id] = loaded.tokenizer.encode(first, add_special_tokens=False)
    banned = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, temperature=0,
                                       logit_bias={str(first_id): -100}, logprobs=0)
    assert banned.choices[0].logprobs.tokens[0] != first
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name a color."}], max_tokens=3,
        temperature=0, logit_bias={str(forced): 100})
    assert chat.choices[0].message.content == text(forced) * 3


# -- lm-eval -------------------------------------------------------------------------------------

ITEMS = [
    ("The capital of France is", ["Paris", "London", "Berlin"], 0),
    ("Two plus two equals", ["four", "five", "seven"], 0),
    ("The sun rises in the", ["east", "west", "north"], 0),
    ("Water freezes at zero degrees", ["Celsius", "Fahrenheit", "Kelvin"], 0),
    ("A baby cat is called a", ["kitten", "puppy", "calf"], 0),
    ("The opposite of hot is", ["cold", "warm", "green"], 0),
    ("Bees make", ["honey", "milk", "bread"], 0),
    ("The largest planet in the solar system is", ["Jupiter", "Mars", "Mercury"], 0),
    ("People read books in a", ["library", "garage", "swimming pool"], 0),
    ("The color of the clear sky is", ["blue", "red", "brown"], 0),
    ("A week has seven", ["days", "months", "years"], 0),
    ("Fish live in", ["water", "trees", "deserts"], 0),
    ("The first letter of the alphabet is", ["A", "Z", "M"], 0),
    ("Ice is frozen", ["water", "fire", "sand"], 0),
    ("Cows eat", ["grass", "rocks", "metal"], 0),
    ("The moon orbits the", ["Earth", "Sun", "Mars"], 0),
    ("Ten minus three is", ["seven", "eight", "two"], 0),
    ("Shakespeare wrote", ["Hamlet", "Harry Potter", "The Hobbit"], 0),
    ("To cut paper you use", ["scissors", "a spoon", "a pillow"], 0),
    ("Birds can", ["fly", "swim underwater for hours", "photosynthesize"], 0),
]


@pytest.fixture(scope="module")
def lm_eval_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-eval-task")
    data = root / "items.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                            for q, c, a in ITEMS))
    (root / "pagedserve_tiny_mc.yaml").write_text(f"""\
task: pagedserve_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return root


def test_lm_eval_loglikelihoods_are_transformers_own(server, loaded, hf_smollm, lm_eval_task,
                                                     tmp_path, monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")  # nothing may be downloaded: the task and data are here
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    pytest.importorskip("lm_eval")
    import lm_eval
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager
    from transformers import PreTrainedTokenizerFast

    # lm-eval tokenizes (it must know where the context ends) with a Hugging Face tokenizer:
    # the model's own, saved from its GGUF; the server gets token ids
    PreTrainedTokenizerFast(tokenizer_object=loaded.tokenizer.backend).save_pretrained(
        tmp_path / "tokenizer")
    lm = LocalCompletionsAPI(model=MODEL, base_url=f"{server.url}/v1/completions",
                             tokenizer_backend="huggingface", tokenizer=str(tmp_path / "tokenizer"),
                             batch_size=len(ITEMS), max_retries=1)
    results = lm_eval.simple_evaluate(model=lm, tasks=["pagedserve_tiny_mc"],
                                      task_manager=TaskManager(include_path=str(lm_eval_task)),
                                      log_samples=True)
    samples = results["samples"]["pagedserve_tiny_mc"]
    assert len(samples) == len(ITEMS)
    scored = [(lm._encode_pair(*arguments), loglikelihood) for sample in samples
              for arguments, [(loglikelihood, _)] in zip(sample["arguments"], sample["resps"],
                                                         strict=True)]
    assert len(scored) == sum(len(c) for _, c, _ in ITEMS)
    # transformers' loglikelihoods, all sequences in one batch: padded on the right, which
    # causal attention keeps out of the real positions
    sequences = [context + continuation for (context, continuation), _ in scored]
    width = max(map(len, sequences))
    with torch.no_grad():
        batch = torch.tensor([ids + [0] * (width - len(ids)) for ids in sequences])
        ref = hf_smollm(batch).logits.float().log_softmax(dim=-1)  # (N, width, V)
    worst = 0.0
    for row, ((context, continuation), loglikelihood) in enumerate(scored):
        expected = sum(float(ref[row, len(context) - 1 + j, t])
                       for j, t in enumerate(continuation))
        worst = max(worst, abs(loglikelihood - expected))
    logger.info("lm-eval vs transformers: %d loglikelihoods, largest difference %.2e",
                len(scored), worst)
    assert worst < TOL, worst
    accuracy = results["results"]["pagedserve_tiny_mc"]["acc,none"]
    assert accuracy >= 0.6  # the easy items: a scorer reading the wrong logprobs is near 1/3
