"""The CPU kernels (pagedserve/ops/cpu_kernels): their tiles hold Q4_1 and Q8_0 weights exactly,
every instruction-set variant this CPU can run computes llama.cpp's integer arithmetic and the
same bits as the others, a row's result does not depend on its batch-mates, and an engine reads
them on every step through the native decoder and stays close to float32."""

import functools
import os
import subprocess

import pytest
import torch

from pagedserve.config import EngineConfig
from pagedserve.llm import LLM
from pagedserve.models import llama
from pagedserve.models.decoder_layers import NATIVE_STEP_TOKENS, native_rows
from pagedserve.ops import cpu_kernels
from pagedserve.ops.cpu_kernels import isa
from pagedserve.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def kernels(cpu_kernels_built) -> cpu_kernels.Kernels:
    """The variant the engine picks on this CPU."""
    try:
        return cpu_kernels.load()
    except cpu_kernels.KernelUnavailable as exc:
        pytest.skip(f"no CPU kernels here: {exc}")


def runnable_variants() -> list[str]:
    """The variants of this architecture (those this CPU cannot run skip, saying why)."""
    return [v.name for v in isa.variants_for()] or ["none"]


def load_variant(name: str) -> cpu_kernels.Kernels:
    """`name`'s kernels with the others forced off (PAGEDSERVE_CPU_ISA), as the engine would
    load them; for avxvnni on a CPU that has its instruction only in the AVX-512 form, the
    stand-in below. Raises KernelUnavailable (or ValueError) where neither can run."""
    saved = os.environ.get(isa.FORCE_ENV)
    os.environ[isa.FORCE_ENV] = name
    try:
        return cpu_kernels.load()
    except (cpu_kernels.KernelUnavailable, ValueError):
        stand_in = avxvnni_stand_in() if name == "avxvnni" else None
        if stand_in is None:
            raise
        return stand_in
    finally:
        if saved is None:
            os.environ.pop(isa.FORCE_ENV)
        else:
            os.environ[isa.FORCE_ENV] = saved


# AVX-VNNI's vpdpbusd on 256 bits (VEX) is on Intel's client cores and Xeons since Sapphire
# Rapids; AMD's Zen 4 (this project's machines) has the same instruction only in its AVX-512 VL
# form (EVEX). There the avxvnni variant's source is compiled for that form (tiles_avx2.h's
# PS_VNNI256 without __AVXVNNI__): every line of the variant, its 256-bit tiles included, runs
# and is checked; only the instruction's encoding differs from the shipped library.
STAND_IN_NEEDS = frozenset({"avx2", "fma", "f16c", "avx512f", "avx512vl", "avx512vnni"})


@functools.cache
def avxvnni_stand_in() -> cpu_kernels.Kernels | None:
    """The avxvnni variant built for AVX-512 VL VNNI, once per version of the sources (None
    where this CPU lacks that too, or there is no compiler); its self-test must pass."""
    from pagedserve.ops.cpu_kernels import build
    from pagedserve.ops.cpu_kernels.library import KernelLibrary

    probe = cpu_kernels._find(build.PROBE, cpu_kernels._load_probe)
    features = probe.features()
    cxx = build.compiler()
    if not STAND_IN_NEEDS <= features or cxx is None:
        return None
    # beside the build of these sources, not in it (tests copy that directory as an install)
    path = build.cache_root() / "evex-stand-in" / build.source_hash() / build.library_name("avxvnni")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        command = build.command("avxvnni", tmp, cxx)
        at = command.index("-mavxvnni")
        command[at : at + 1] = ["-mavx512vl", "-mavx512vnni"]
        subprocess.run(command, check=True, capture_output=True)
        os.replace(tmp, path)
    library = KernelLibrary(path)
    assert library.isa == "avxvnni"
    assert library.selftest(probe) == 0, "the avxvnni stand-in failed its self-test"
    return cpu_kernels.Kernels(library, features)


@pytest.fixture(scope="module", params=runnable_variants())
def variant(request, cpu_kernels_built) -> cpu_kernels.Kernels:
    """Each variant in turn, as :func:`load_variant` gives it."""
    try:
        return load_variant(request.param)
    except (cpu_kernels.KernelUnavailable, ValueError) as exc:
        pytest.skip(f"{request.param}: {exc}")


def unpack(kernels, blocks: torch.Tensor, k: int):
    """tiles -> q (n, k/32, 32), d and lo (n, k/32), in float64."""
    q, d, lo = kernels.unpack(blocks)
    return q.double(), d.double(), lo.double()


def dequantize(kernels, blocks: torch.Tensor, k: int) -> torch.Tensor:
    q, d, lo = unpack(kernels, blocks, k)
    return (lo[..., None] + d[..., None] * q).flatten(1).float()


def reference(kernels, x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """llama.cpp's Q4_1 x Q8 arithmetic, in float64: x rounded to int8 per group of 32."""
    m, k = x.shape
    groups = x.view(m, k // 32, 32).double()
    scale = groups.abs().amax(-1) / 127
    p = torch.where(scale[..., None] > 0, (groups / scale[..., None]).round(), 0.0)
    q, d, lo = unpack(kernels, blocks, k)
    dots = torch.einsum("mgj,ngj->mng", p, q)  # integer sums, exact in float64
    offsets = lo[None] * (scale * p.sum(-1))[:, None]  # (m, n, G)
    return (dots * (d[None] * scale[:, None])).sum(-1) + offsets.sum(-1)


def test_tiles_hold_q4_1_weights_exactly(smollm_gguf, kernels):
    llm = LLM(str(smollm_gguf), dtype="float32")  # dense float32, as dequantized from Q4_1
    w = llm.engine.runner.model.layers[3].mlp.down.weight
    blocks = kernels.pack(w)
    assert blocks.shape == (w.shape[0] // 16, w.shape[1] // 32, 320) and blocks.dtype == torch.uint8
    assert torch.equal(dequantize(kernels, blocks, w.shape[1]), w)


def test_tiles_are_16_columns_wide_as_kernels_h_draws_them(kernels):
    w = torch.randn(32, 96)  # 2 tiles, 3 groups
    blocks = kernels.pack(w)
    assert kernels.geometry.tile_columns == 16 and blocks.shape == (2, 3, 320)
    q, d, lo = kernels.unpack(blocks)
    q0, d0, lo0 = cpu_kernels.packing.int4_grid(w)
    assert torch.equal(q.float(), q0) and torch.equal(d, d0.half().float())
    assert torch.equal(lo, lo0.half().float())
    # the first tile's first group: 16 d, 16 lo, then column c's q at byte 64 + 4c + i of
    # vector 0 (low nibbles: positions 0-3, high: 4-7), vector 1 from byte 128
    first = blocks[0, 0]
    assert torch.equal(first[:32].view(torch.float16).float(), d[:16, 0])
    assert torch.equal(first[32:64].view(torch.float16).float(), lo[:16, 0])
    assert torch.equal(first[64:128:4] & 0x0F, q[:16, 0, 0])
    assert torch.equal(first[64:128:4] >> 4, q[:16, 0, 4])
    assert torch.equal(first[128:192:4] & 0x0F, q[:16, 0, 8])
    with pytest.raises(ValueError, match="multiple of"):
        kernels.pack(torch.randn(24, 64))


def test_the_pool_runs_the_threads_it_is_given(kernels):
    """The kernels' own thread pool (csrc/thread_pool.h), not torch's."""
    library, threads = kernels.library, kernels.library.threads
    try:
        library.set_threads(2)
        assert library.parallel_threads(64) == 2
        library.set_threads(1)
        assert library.parallel_threads(64) == 1
        library.set_threads(3)  # more threads than this machine may have: still correct
        assert library.parallel_threads(3) == 3
    finally:
        library.set_threads(threads)


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("shape", [(960, 576), (576, 1536), (48, 64), (32, 224), (16, 96)])
def test_each_variant_computes_llama_cpp_arithmetic(variant, rows, shape):
    torch.manual_seed(rows)
    n, k = shape
    blocks = variant.pack(torch.randn(n, k) * 0.02)
    x = torch.randn(rows, k)
    x[0, :32] = 0  # an all-zero group: scale 0, no division by it
    got = variant.matmul(x, blocks)
    want = reference(variant, x, blocks)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-5)
    exact = x @ dequantize(variant, blocks, k).t()
    assert (got - exact).abs().max() / exact.abs().max() < 2e-2  # the int8 rounding of x


def test_a_rows_result_does_not_depend_on_its_batch_mates(variant):
    torch.manual_seed(0)
    blocks = variant.pack(torch.randn(3072, 576) * 0.02)
    x = torch.randn(9, 576)
    together = variant.matmul(x, blocks)
    for r in range(9):
        assert torch.equal(variant.matmul(x[r : r + 1], blocks)[0], together[r])


def test_every_variant_gives_the_same_bits(kernels):
    """The same integer dot products, then the same float operations in the same order: what
    one variant computes, every other does, to the bit (matmuls of 1 to 70 rows)."""
    torch.manual_seed(1)
    w = torch.randn(96, 320) * 0.05
    x = torch.randn(70, 320)
    results = {}
    for name in runnable_variants():
        try:
            chosen = load_variant(name)
        except cpu_kernels.KernelUnavailable:
            continue
        results[name] = [chosen.matmul(x[:rows], chosen.pack(w)) for rows in (1, 5, 70)]
        results[name] += [chosen.matmul_q8(x[:rows], chosen.pack_q8(w)) for rows in (1, 5, 70)]
    assert kernels.isa in results
    first = next(iter(results.values()))
    for name, got in results.items():
        assert all(torch.equal(a, b) for a, b in zip(got, first, strict=True)), name


def test_kernel_refuses_mismatched_shapes(kernels):
    blocks = kernels.pack(torch.randn(64, 64))
    with pytest.raises(ValueError, match="columns"):
        kernels.matmul(torch.randn(1, 96), blocks)
    with pytest.raises(ValueError, match="blocks must be"):
        kernels.matmul_q8(torch.randn(1, 64), blocks)


@pytest.mark.parametrize("rows, n", [(1, 49152), (64, 49152), (3, 7), (5, 8), (4, 1037)])
def test_each_variants_rows_max_is_torch_max(variant, rows, n):
    """The greedy rows' choice: torch.max(dim=-1)'s values and first indices, bit for bit,
    with ties (a repeated maximum in several lanes and the tail), all -inf rows, and NaN."""
    g = torch.Generator().manual_seed(rows * 1000 + n)
    x = torch.randn(rows, n, generator=g)
    if n >= 8:
        x[0, [3, n // 2, n - 1]] = 50.0  # a tie: the first index wins
    if rows > 1:
        x[1] = float("-inf")  # nothing larger than -inf: index 0
    values, indices = variant.rows_max(x)
    expected_values, expected_indices = x.max(dim=-1)
    assert torch.equal(values, expected_values) and torch.equal(indices, expected_indices)
    x[rows - 1, n // 3] = float("nan")  # NaN is reported as NaN, as torch does
    assert torch.isnan(variant.rows_max(x)[0][rows - 1])


def test_the_sampler_takes_greedy_rows_with_the_kernels_rows_max(kernels):
    """Same tokens as torch's reduction; the runner hands it over where the kernels run."""
    from pagedserve.core.request import Request
    from pagedserve.outputs import RequestMetrics
    from pagedserve.worker.sampler import Sampler

    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(3))
    logits[2, [10, 20]] = 9.0
    requests = [Request(str(i), [1, 2], SamplingParams(temperature=0), frozenset({0}), 4,
                        RequestMetrics(0.0)) for i in range(6)]
    plain = Sampler(seed=0)(logits, requests)
    calls = []

    def counted(x):
        calls.append(x.shape)
        return kernels.rows_max(x)

    native = Sampler(seed=0, rows_max=counted)(logits, requests)
    assert [s.token_id for s in native] == [s.token_id for s in plain] == (
        logits.argmax(-1).tolist())
    assert calls == [(6, 300)]


def reference_q8(kernels, x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """llama.cpp's Q8_0 x Q8 arithmetic, in float64."""
    m, k = x.shape
    groups = x.view(m, k // 32, 32).double()
    scale = groups.abs().amax(-1) / 127
    p = torch.where(scale[..., None] > 0, (groups / scale[..., None]).round(), 0.0)
    q, d = kernels.unpack_q8(blocks)
    dots = torch.einsum("mgj,ngj->mng", p, q.double())
    return (dots * (d.double()[None] * scale[:, None])).sum(-1)


def test_q8_tiles_hold_the_bundled_models_q8_0_embedding_exactly(smollm_gguf, kernels):
    llm = LLM(str(smollm_gguf), dtype="float32")  # token_embd is Q8_0 in the file
    w = llm.engine.runner.model.embed[:4096]
    blocks = kernels.pack_q8(w)
    assert blocks.shape == (256, 18, 544) and blocks.dtype == torch.uint8
    q, d = kernels.unpack_q8(blocks)
    assert torch.equal((d[..., None] * q.float()).flatten(1), w)
    assert q.abs().max() == 127


@pytest.mark.parametrize("rows", [1, 2, 5])
@pytest.mark.parametrize("shape", [(48, 576), (32, 64), (16, 416)])
def test_each_variants_q8_kernel_computes_llama_cpp_arithmetic(variant, rows, shape):
    torch.manual_seed(rows)
    n, k = shape
    w = torch.randn(n, k) * 0.05
    w[0, :32] = 0  # an all-zero group of weights: d 0
    w[1, :32] = -w[1, :32].abs()  # a group all negative: q down to -127
    blocks = variant.pack_q8(w)
    x = torch.randn(rows, k)
    x[0, 32:64] = 0
    got = variant.matmul_q8(x, blocks)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    assert torch.allclose(got.double(), reference_q8(variant, x, blocks), rtol=1e-4, atol=1e-5)
    assert (got - x @ w.t()).abs().max() / (x @ w.t()).abs().max() < 2e-2
    for r in range(rows):  # a row's result does not depend on its batch-mates
        assert torch.equal(variant.matmul_q8(x[r : r + 1], blocks)[0], got[r])
    with pytest.raises(ValueError, match="columns"):
        variant.matmul_q8(torch.randn(1, k + 32), blocks)


class Recorder:
    """Stands in for a model's native decoder and counts its steps."""

    def __init__(self, decoder):
        self.decoder, self.rows = decoder, []

    def forward(self, x, *args):
        self.rows.append(x.shape[0])
        return self.decoder.forward(x, *args)


def test_engine_steps_read_the_kernels_and_stay_close_to_float32(smollm_gguf, kernels,
                                                                 monkeypatch):
    config = EngineConfig(low_bit_small_steps=True, native_kernels=True, dtype="float32")
    llm = LLM(str(smollm_gguf), engine_config=config)
    exact = LLM(str(smollm_gguf), dtype="float32")
    model = llm.engine.runner.model
    down = model.layers[0].mlp.down
    assert down._q4 is not None and down._int4 is None
    assert model.lm_head._q8 is not None and model.lm_head._int8 is None
    params = SamplingParams(temperature=0, max_tokens=12)
    got = llm.generate(["The capital of France is"], params)[0]
    want = exact.generate(["The capital of France is"], params)[0]
    assert got.token_ids[:4] == want.token_ids[:4]
    ref = exact.engine.runner.prompt_logits(got.prompt_token_ids[-1:], [0])
    # a one-token step takes the decode path: the native decoder, whose matmuls are the kernel's
    native = model.decoder_layers
    native.decoder = recorder = Recorder(native.decoder)
    logits = llm.engine.runner.prompt_logits(got.prompt_token_ids[-1:], [0])
    assert recorder.rows == [1]
    # without the decoder, the same step runs op by op, each matmul through the kernel
    model.decoder_layers = native.per_op
    calls = []
    chosen = model.kernels
    assert chosen.isa == kernels.isa  # the best variant this CPU allows
    original = chosen.matmul
    monkeypatch.setattr(chosen, "matmul", lambda x, b: calls.append(b is down._q4) or original(x, b))
    per_op = llm.engine.runner.prompt_logits(got.prompt_token_ids[-1:], [0])
    assert any(calls)
    calls.clear()  # a prompt's tokens read the kernel too (row-independent, unlike MKL's GEMM)
    prompt = llm.engine.runner.prompt_logits(got.prompt_token_ids, [0])
    assert any(calls)
    assert (prompt.argmax(-1) == exact.engine.runner.prompt_logits(
        got.prompt_token_ids, [0]).argmax(-1)).float().mean() > 0.8
    for out in (logits, per_op):
        assert not torch.equal(out, ref)
        assert (out - ref).abs().max() / ref.abs().max() < 0.1
        assert (out[-1].argmax() == ref[-1].argmax()).item()
    # the same computation up to float32 rounding, seen through the int8 LM head
    assert (logits - per_op).abs().max() / per_op.abs().max() < 1e-2


def decode_steps_both_ways(llm: LLM) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Makes `llm` compute each of its steps (decodes and prompts) twice on the same cache, op
    by op and then natively; returns the (native, per-op) final hidden states of every step."""
    runner = llm.engine.runner
    model = runner.model
    native, forward = model.decoder_layers, model.forward
    assert native.name == "native"
    pairs = []

    def both(input_ids, positions, kv_caches, meta):
        if not native.takes_step(meta, input_ids.shape[0]):
            return forward(input_ids, positions, kv_caches, meta)
        model.decoder_layers = native.per_op  # the per-op path first writes this step's K/V ...
        runner.attention.prepare(meta, runner.dims)
        want = forward(input_ids, positions, kv_caches, meta)
        model.decoder_layers = native  # ... and the native one writes them again
        got = forward(input_ids, positions, kv_caches, meta)
        pairs.append((got, want))
        return got

    model.forward = both
    return pairs


@pytest.mark.parametrize(("model_dir", "kv_cache_dtype"), [
    ("tiny_llama_dir", "float32"), ("tiny_qwen2_dir", "float32"), ("tiny_llama_dir", "float16")])
def test_native_decoder_computes_what_the_per_op_path_does(model_dir, kv_cache_dtype, request,
                                                           monkeypatch, kernels):
    """Every step computed both ways on the same cache, one sequence alone and then 12 at once
    (prompts beside decodes, contexts over several blocks, finishing one by one): GQA, llama3
    rope scaling, Qwen2's q/k/v biases; a float16 cache rounds K and V as torch's .to() does."""
    # the per-op path reads the int4 weights in steps of up to 16 rows too, as the native one
    monkeypatch.setattr(llama, "SMALL_STEP_TOKENS", NATIVE_STEP_TOKENS)
    config = EngineConfig(low_bit_small_steps=True, native_kernels=True, dtype="float32",
                          max_num_seqs=16, kv_cache_dtype=kv_cache_dtype)
    llm = LLM(str(request.getfixturevalue(model_dir)), engine_config=config)
    assert llm.engine.runner.kv_caches[0][0].dtype == getattr(torch, kv_cache_dtype)
    pairs = decode_steps_both_ways(llm)
    prompts = [[3 + (7 * i + n) % 500 for i in range(n)] for n in range(5, 65, 5)]
    alone = llm.generate([prompts[-1]], SamplingParams(temperature=0, max_tokens=6,
                                                        ignore_eos=True))
    engine, tokens = llm.engine, {}
    for i, prompt in enumerate(prompts):  # finishing one by one
        engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=4 + i,
                                                  ignore_eos=True), request_id=str(i))
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.delta_token_ids)
    assert {got.shape[0] for got, _ in pairs} >= set(range(1, 13))  # decode steps, and prompts
    for got, want in pairs:
        # float32's last bits may differ (sums in another order), and now and then that moves
        # an activation of the second layer across an int8 rounding step (1/127 of its group)
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 1e-2 * want.abs().max()
    errors = sorted(((got - want).abs().max() / want.abs().max()).item() for got, want in pairs)
    assert errors[len(errors) // 2] < 1e-6  # most steps: float32's rounding alone
    assert alone[0].token_ids == tokens["11"][:6]


def test_a_prefix_cache_hit_rounds_as_the_whole_prompt_did(tiny_llama_dir, kernels):
    """The native decoder computes each token's row alone (its matmuls and its attention), so
    the tail a prefix-cache hit leaves to compute, a prompt chunked under a small token budget
    and the whole prompt in one step give the same bits, hence the same greedy tokens."""
    prompt = [3 + (11 * i) % 400 for i in range(70)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outputs = []
    for budget in (2048, 24):
        config = EngineConfig(low_bit_small_steps=True, native_kernels=True, dtype="float32",
                              max_num_batched_tokens=budget)
        llm = LLM(str(tiny_llama_dir), engine_config=config)
        assert llm.engine.runner.model.decoder_layers.name == "native"
        outputs += [llm.generate([prompt], params)[0].token_ids for _ in range(2)]
        assert llm.engine.kv.prefix_hits > 0  # the second run read the first one's blocks
    assert all(tokens == outputs[0] for tokens in outputs)


def test_a_requests_tokens_do_not_depend_on_its_batch_mates(tiny_qwen2_dir, kernels):
    """Alone, or beside 7 other requests of other lengths (prompts prefilled beside its decode
    steps, batches of every size as they finish), a greedy request gets the same tokens and
    the same logprobs, to the bit."""
    config = EngineConfig(low_bit_small_steps=True, native_kernels=True, dtype="float32",
                          max_num_batched_tokens=48)
    llm = LLM(str(tiny_qwen2_dir), engine_config=config)
    prompt = [5 + (13 * i) % 300 for i in range(37)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2)
    alone = llm.generate([prompt], params)[0]
    others = [[7 + (3 * i + n) % 250 for i in range(n)] for n in (9, 20, 41, 3, 60, 17, 33)]
    together = llm.generate([others[0], others[1], prompt, *others[2:]], params)[2]
    assert together.token_ids == alone.token_ids
    assert together.logprobs == alone.logprobs


def test_native_decoder_on_the_bundled_model_layer_by_layer(smollm_gguf, kernels):
    """The real shapes (9 query heads over 3 KV heads of 64, 576 wide, 1536 in the MLP): one
    layer computes what the per-op layer does up to float32 rounding; over 30 layers the int8
    rounding of activations turns those last bits into whole rounding steps now and then (a
    deep model's answer to any change of rounding), which stays a few percent."""
    config = EngineConfig(low_bit_small_steps=True, native_kernels=True, dtype="float32")
    llm = LLM(str(smollm_gguf), engine_config=config)
    runner, model = llm.engine.runner, llm.engine.runner.model
    forward, errors = model.forward, {}

    def compare(input_ids, positions, kv_caches, meta):
        if model.decoder_layers.takes_step(meta, input_ids.shape[0]) and not errors:
            runner.attention.prepare(meta, runner.dims)
            x, residual, rope = model.embed[input_ids].float(), None, model.rotary.at(positions)
            for n, (layer, kv) in enumerate(zip(model.layers, kv_caches, strict=True), 1):
                x, residual = layer(x, residual, rope, kv, meta)  # the per-op path
                if n in (1, 30):
                    decoder = model.kernels.decoder(
                        model.native_weights(n), model.rotary.cos, model.rotary.sin,
                        9, 3, 64, model.config.rms_norm_eps)
                    lens, tables = native_rows(positions, meta)
                    got = decoder.forward(model.embed[input_ids].float(), positions,
                                          meta.slot_mapping, lens, tables,
                                          [c for pair in kv_caches[:n] for c in pair])
                    want = x + residual
                    errors[n] = ((got - want).abs().max() / want.abs().max()).item()
        return forward(input_ids, positions, kv_caches, meta)

    model.forward = compare
    llm.generate(["What is the capital of France?", "Write a haiku about the sea."],
                 SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert errors[1] < 1e-6 and errors[30] < 0.1


def test_native_decoder_refuses_inconsistent_steps(tiny_llama_dir, kernels):
    config = EngineConfig(low_bit_small_steps=True, native_kernels=True, dtype="float32")
    runner = LLM(str(tiny_llama_dir), engine_config=config).engine.runner
    decoder = runner.model.decoder_layers.decoder
    caches = [c for kv in runner.kv_caches for c in kv]
    x = torch.zeros(1, runner.config.hidden_size)
    table = torch.zeros(1, 4, dtype=torch.int32)

    def ints(*v):
        return torch.tensor(v, dtype=torch.int32)

    before = x.clone()
    with pytest.raises(cpu_kernels.KernelError, match="outside the cache"):
        decoder.forward(x, ints(0), ints(10**9), ints(1), table, caches)
    with pytest.raises(cpu_kernels.KernelError, match="position 5 for a context of 1"):
        decoder.forward(x, ints(5), ints(0), ints(1), table, caches)
    with pytest.raises(cpu_kernels.KernelError, match="block -1 outside the cache"):
        decoder.forward(x, ints(0), ints(0), ints(1), table - 1, caches)
    with pytest.raises(cpu_kernels.KernelError, match="block table is too short"):
        decoder.forward(x, ints(99), ints(0), ints(100), table, caches)
    assert torch.equal(x, before)  # refused before anything was computed
    with pytest.raises(ValueError, match="a K and a V cache per layer"):
        decoder.forward(x, ints(0), ints(0), ints(1), table, caches[:2])
    with pytest.raises(ValueError, match="positions must be int32"):
        decoder.forward(x, ints(0).long(), ints(0), ints(1), table, caches)
    assert decoder.forward(x, ints(0), ints(0), ints(1), table, caches).shape == x.shape
