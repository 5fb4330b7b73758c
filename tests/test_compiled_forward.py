"""The fast decode passes (nld_trt/executors/static_pass.py) decode what the eager reference decodes.

How they are compared: `Lockstep` runs every call on a reference executor and on the fast one (same chunks,
same commits, each on its own cache) and hands the fast one's logits to the decoding loop, recording the
largest logit difference at every position the loop can read and every argmax that differs. The static
pass without padding does the reference's arithmetic, so it must be bit-equal (difference 0). Padding a
batch up to a bucket changes the GEMMs' row count, and torch.compile fuses and reorders float operations,
so those are compared with a margin: the logits may differ by float noise (`TOL`), and a greedy token may
differ from the pure eager run only where an argmax flipped, which a difference below TOL can do only at a
near-tie of the reference (top-2 margin <= 2 * TOL).

torch.compile costs 5-30 s per shape here, so the compiled executors are built once per model and few
shapes are compiled; the uncompiled static pass (compile="static") covers the padding logic cheaply.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import nld_trt
from nld_trt.decoding import SEQUENCE_TYPES, GenerationParams, run
from nld_trt.errors import NLDError
from nld_trt.evaluate import load_task
from nld_trt.executors import Chunk, TorchExecutor
from nld_trt.executors.base import Executor, PassBatch, PassRow
from nld_trt.executors.static_pass import MIN_KEYS, PassInputs, PassShape, batch_buckets, pick_bucket
from paged import Pager
from nld_trt.executors.torch_executor import compile_blocker
from nld_trt.model import fuse_projections

TOL = 1e-4  # float noise allowed between the reference and a padded or compiled pass (measured: ~1e-5)
MODES = ("ar", "dlm", "linear_spec")


class Lockstep(Executor):
    """Every pass on `ref` and on `fast` (same page tables, each on its own cache); returns the fast executor's
    logits, records how far apart they are."""

    def __init__(self, ref: TorchExecutor, fast: TorchExecutor) -> None:
        assert ref.layout == fast.layout
        super().__init__(ref.config, ref.layout, ref.max_batch, ref.max_chunk)
        self.ref, self.fast = ref, fast
        self.max_diff = 0.0
        self.flips: list[float] = []  # the reference's top-2 margin where the argmax differed
        self.fast_passes = 0  # calls the static passes served (the rest took the eager path)

    @property
    def has_lora(self) -> bool:
        return self.ref.has_lora

    def forward(self, batch: PassBatch):
        a, b = self.ref.forward(batch), self.fast.forward(batch)
        lens = [len(r.chunk.tokens) for r in batch.rows]
        self.fast_passes += self.fast.passes.shape_for(len(lens), max(lens)) is not None
        for i, (r, n) in enumerate(zip(batch.rows, lens)):
            if not batch.all_logits:
                x, y = a[i : i + 1], b[i : i + 1]
            else:
                keep = slice(n - 1, n) if r.chunk.last_logits_only else slice(0, n)
                x, y = a[i, keep], b[i, keep]
            x, y = x.float().cpu(), y.float().cpu()
            self.max_diff = max(self.max_diff, float((x - y).abs().max()))
            top = x.topk(2, dim=-1).values
            flipped = x.argmax(-1) != y.argmax(-1)
            self.flips += (top[flipped, 0] - top[flipped, 1]).tolist()
        return b

    def _forward(self, *args, **kwargs):
        raise AssertionError("Lockstep runs whole passes")


def decode(executor: Executor, config, prompts, batch: int, **params) -> list[list[int]]:
    p = GenerationParams(**params).resolved(config)
    out = []
    for i in range(0, len(prompts), batch):
        seqs = run(executor, [SEQUENCE_TYPES[p.mode](x, p, config, 0) for x in prompts[i : i + batch]])
        out += [s.out for s in seqs]
    return out


def reference(model, like: TorchExecutor) -> TorchExecutor:
    return TorchExecutor(model, like.max_batch, like.max_seq_len, like.max_chunk, kernels=False, layout=like.layout)


def check_against_reference(model, fast: TorchExecutor, prompts, batch: int, tol: float, **params) -> Lockstep:
    """Decode through Lockstep and alone on the reference; tokens equal, or differing only after a near-tie."""
    expected = decode(reference(model, fast), model.config, prompts, batch, **params)
    lock = Lockstep(reference(model, fast), fast)
    got = decode(lock, model.config, prompts, batch, **params)
    assert lock.fast_passes > 0, "the static passes served no call: the comparison tested the eager path"
    assert lock.max_diff <= tol, f"logits differ by {lock.max_diff} (allowed {tol})"
    assert all(margin <= 2 * tol for margin in lock.flips)  # implied by max_diff <= tol: stated, not assumed
    if got != expected:
        assert lock.flips, "tokens differ from the reference although no argmax did"
    return lock


def random_prompts(vocab: int, n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(130, vocab, (int(torch.randint(3, 30, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


# ------------------------------------------------------------------------------------------------------------
# bookkeeping (what the CUDA-graph path uses too), plain Python


def test_batch_buckets_are_powers_of_two_then_max_batch():
    assert batch_buckets(1) == (1,)
    assert batch_buckets(8) == (1, 2, 4, 8)
    assert batch_buckets(12) == (1, 2, 4, 8, 12)
    assert [pick_bucket((1, 2, 4, 8, 12), b) for b in (1, 2, 3, 5, 8, 9, 12, 13)] == [1, 2, 4, 8, 8, 12, 12, None]


def test_each_call_is_served_by_the_smallest_bucket_of_its_chunk_length(tiny_dir):
    model = nld_trt.load(tiny_dir, compile=False).model
    ex = TorchExecutor(model, max_batch=6, max_seq_len=64, compile="static", chunk_lens=(1, 8))
    p = ex.passes
    assert p.buckets == (1, 2, 4, 6) and p.chunk_lens == (1, 8)
    assert [str(s) for s in p.shapes] == ["1x1", "2x1", "4x1", "6x1", "1x8", "2x8", "4x8", "6x8"]
    assert p.shape_for(3, 8) == PassShape(4, 8) and p.shape_for(5, 1) == PassShape(6, 1)
    assert p.shape_for(1, 5) is None  # a prefill, or a chunk length not prepared: the eager path
    # the cache: 6 x 64 positions in pages of 16, and the scratch page
    assert ex.layout.pages == 24 and ex.cache.k[0].shape == (25, 16, 2, 16) and ex.layout.scratch == 24
    eager = TorchExecutor(model, max_batch=6, max_seq_len=64)
    assert eager.passes is None and eager.layout == ex.layout


def test_padding_rows_and_tables_go_to_the_scratch_page(tiny_dir):
    layout = nld_trt.load(tiny_dir, max_batch=2, max_seq_len=64, kv_cache_tokens=128, page_size=16).executor.layout
    assert layout.pages == 8 and layout.table_width == 4
    rows = [PassRow(Chunk([7, 8, 9], block=True, lora=True), 10, [5]), PassRow(Chunk([4]), 0, [2, 6])]
    host = PassInputs.pack(PassShape(4, 3), layout, rows)
    assert host.tokens.tolist() == [[7, 8, 9], [4, 0, 0], [0, 0, 0], [0, 0, 0]]
    assert host.tables.tolist() == [[5, 8, 8, 8, 8], [2, 6, 8, 8, 8], [8] * 5, [8] * 5]  # + one scratch column
    assert host.committed.tolist() == [10, 0, 0, 0]
    assert host.chunk_lens.tolist() == [3, 1, 3, 3]
    assert host.block.tolist() == [1, 0, 0, 0] and host.lora.tolist() == [1, 0, 0, 0]
    assert host.keys == 13
    assert PassInputs.pack(PassShape(1, 1), layout, [PassRow(Chunk([3]), 0, [0])]).keys == MIN_KEYS
    with pytest.raises(ValueError, match="do not fit"):
        PassInputs.pack(PassShape(1, 2), layout, rows[:1] * 2)


def test_a_padded_static_pass_writes_the_cache_as_the_reference_does(tiny_dir):
    """Real rows' K/V land where the reference puts them; padding (rows and chunk tail) only on the scratch page."""
    model = nld_trt.load(tiny_dir, compile=False).model
    kw = dict(max_batch=3, max_seq_len=32, page_size=4)
    ref = TorchExecutor(model, **kw)
    fast = TorchExecutor(model, **kw, compile="static", chunk_lens=(1, 4), batch_buckets=(3,))
    tables = {0: [3, 7, 1], 1: [0, 5, 2]}  # pages in no particular order
    for ex in (ref, fast):
        for s, pages in tables.items():
            ex.forward(PassBatch([PassRow(Chunk([1, 140 + s, 150, 160 + s]), 0, pages)], all_logits=False))
    rows = [PassRow(Chunk([200, 201, 202, 203], block=True), 4, tables[1]), PassRow(Chunk([210, 211]), 4, tables[0])]
    a, b = ref.forward(PassBatch(rows)), fast.forward(PassBatch(rows))
    # float noise only: a padded bucket changes the GEMM row count (3 x 4 rows here against 2 x 4), which on
    # CPUs with AVX-512/AMX changes how oneDNN blocks the sums (bit-equal on AVX2 machines)
    assert (a[0] - b[0]).abs().max() <= 1e-5 and (a[1, :2] - b[1, :2]).abs().max() <= 1e-5
    scratch = ref.layout.scratch
    for layer in range(model.config.num_hidden_layers):
        for kc_ref, kc_fast in ((ref.cache.k[layer], fast.cache.k[layer]), (ref.cache.v[layer], fast.cache.v[layer])):
            assert (kc_ref[:scratch] - kc_fast[:scratch]).abs().max() <= 1e-5  # real pages: the same K/V
            assert torch.equal(kc_ref[:scratch] == 0, kc_fast[:scratch] == 0)  # ... at the same positions
            assert kc_fast[scratch].abs().sum() > 0 and kc_ref[scratch].abs().sum() == 0  # padding: scratch only


def test_last_logits_only_computes_the_head_for_the_last_position(tiny_dir):
    model = nld_trt.load(tiny_dir, compile=False).model
    ref = TorchExecutor(model, max_batch=2, max_seq_len=32)
    fast = TorchExecutor(model, max_batch=2, max_seq_len=32, compile="static", chunk_lens=(4,), batch_buckets=(2,))
    batch = PassBatch([PassRow(Chunk([1, 140, 141, 142], last_logits_only=True), 0, [0]),
                       PassRow(Chunk([1, 150, 151], last_logits_only=True), 0, [1])])
    a, b = ref.forward(batch), fast.forward(batch)
    assert b.shape == a.shape == (2, 4, model.config.vocab_size)
    assert torch.allclose(a[0, 3], b[0, 3], atol=1e-5) and torch.allclose(a[1, 2], b[1, 2], atol=1e-5)
    assert b.stride(1) == 0  # one row per sequence, shown at every position: no [B, T, V] head


# ------------------------------------------------------------------------------------------------------------
# no host synchronisation inside a pass

SYNC_OPS = {"_local_scalar_dense", "nonzero", "nonzero_numpy", "masked_select", "is_nonzero", "equal", "item", "unique",
            "_unique2", "unique_consecutive", "unique_dim"}


class HostReads(TorchDispatchMode):
    """Records every aten op that reads a tensor's value back to the host (int/bool/item) or sizes its
    output by the data (nonzero...): each is a device synchronisation on CUDA."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in SYNC_OPS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_a_static_pass_reads_nothing_back_from_the_device(tiny_dir):
    model = nld_trt.load(tiny_dir, compile=False).model
    fast = TorchExecutor(model, max_batch=2, max_seq_len=32, compile="static", chunk_lens=(1, 4), batch_buckets=(2,))
    ref = TorchExecutor(model, max_batch=2, max_seq_len=32)
    batch = PassBatch([PassRow(Chunk([1, 140, 141, 142], block=True, lora=True), 0, [0]),
                       PassRow(Chunk([1, 150]), 0, [1])])
    for ex in (fast, ref):
        with HostReads() as reads:
            ex.forward(batch)
        if ex is fast:
            assert reads.seen == []  # the whole call: packing, the pass, the head
        else:  # the check can fail: the reference path does read lengths back
            assert {"aten.item.default", "aten.is_nonzero.default"} <= set(reads.seen), reads.seen
            assert any("nonzero_numpy" in op or op == "aten.nonzero.default" for op in reads.seen), reads.seen


# ------------------------------------------------------------------------------------------------------------
# the static pass uncompiled: bit-equal without padding, within noise with it


@pytest.mark.parametrize("which", ["tiny_dir", "tiny_dir_b"])
@pytest.mark.parametrize("mode", MODES)
def test_the_static_pass_is_the_reference_arithmetic(request, which, mode):
    model = nld_trt.load(request.getfixturevalue(which), compile=False).model
    fast = TorchExecutor(model, max_batch=4, max_seq_len=128, compile="static", chunk_lens=(1, 8),
                         batch_buckets=(1, 4))
    prompts = random_prompts(model.config.vocab_size, 8, seed=3)
    for batch in (1, 4):  # exactly a bucket: no padding rows
        lock = check_against_reference(model, fast, prompts, batch, tol=0.0, mode=mode, max_new_tokens=20,
                                       block_length=8, eos_token_ids=())
        assert lock.max_diff == 0.0 and not lock.flips


@pytest.mark.parametrize("mode", MODES)
def test_padded_buckets_decode_like_the_reference(tiny_dir_b, mode):
    model = nld_trt.load(tiny_dir_b, compile=False).model
    fast = TorchExecutor(model, max_batch=4, max_seq_len=128, compile="static", chunk_lens=(1, 4), batch_buckets=(4,))
    prompts = random_prompts(model.config.vocab_size, 6, seed=5)
    for batch in (1, 3):  # 1 and 3 rows padded to 4
        check_against_reference(model, fast, prompts, batch, TOL, mode=mode, max_new_tokens=16, block_length=4,
                                eos_token_ids=())


# ------------------------------------------------------------------------------------------------------------
# torch.compile (CPU): one compiled executor per model, few shapes


@pytest.fixture(scope="module")
def compiled_embedded():
    nld = nld_trt.load(max_batch=4, max_seq_len=512, compile=False)
    fast = TorchExecutor(nld.model, max_batch=4, max_seq_len=512, compile=True, batch_buckets=(1, 4))
    assert fast.passes.kind == "inductor" and fast.passes.chunk_lens == (1, nld.config.block_size)
    prompts = [nld.encode(p.question) for p in load_task("gsm_synth")[:6]]
    return nld, fast, prompts


@pytest.mark.parametrize("mode,lora", [("ar", False), ("dlm", False), ("linear_spec", True), ("linear_spec", False)])
def test_compiled_passes_decode_the_embedded_model_like_the_reference(compiled_embedded, mode, lora):
    nld, fast, prompts = compiled_embedded
    for batch in (1, 3):  # batch 3: prompts of different lengths, padded to the bucket of 4
        check_against_reference(nld.model, fast, prompts, batch, TOL, mode=mode, lora=lora, max_new_tokens=48)


def prefix_reuse_against_plain(model, fast: TorchExecutor, prompts, mode: str, **params) -> int:
    """Two turns (the second = first prompt + its answer + the next prompt's tail) on the fast executor with
    the prefix cache, against the eager reference without it: the same tokens, or a first difference at a
    near-tie of the plain run. Returns the prompt tokens reused."""
    from nld_trt.decoding.auto import AR, AutoPlanner
    from nld_trt.decoding.driver import page_manager
    from nld_trt.kv import PageManager

    cold = reference(model, fast)
    hot_pages, cold_pages = page_manager(fast), PageManager(cold.layout.pages, cold.layout.page_size, prefix_cache=False)
    p = GenerationParams(mode=mode, logprobs=True, top_logprobs=2, **params).resolved(model.config)
    forced = [AR, ("linear_spec", 8), AR, ("linear_spec", 4)]

    def decode_on(executor, pages, batch):
        planner = AutoPlanner(cost=None, force=lambda seq, n: forced[len(seq.out) % len(forced)]) if mode == "auto" else None
        return run(executor, [SEQUENCE_TYPES[mode](x, p, model.config, 0) for x in batch], planner=planner, pages=pages)

    reused = 0
    for _ in range(2):
        hot, plain = decode_on(fast, hot_pages, prompts), decode_on(cold, cold_pages, prompts)
        for h, c in zip(hot, plain):
            if h.out != c.out:
                i = next(i for i, (x, y) in enumerate(zip(h.out, c.out)) if x != y)
                top = c.logprobs[i].top
                assert top[0][1] - top[1][1] <= 2 * TOL, (mode, i, top)
        reused += sum(s.stats.cached_tokens for s in hot)
        prompts = [x + s.out + prompts[(i + 1) % len(prompts)][-5:] for i, (x, s) in enumerate(zip(prompts, hot))]
    return reused


@pytest.mark.parametrize("mode", MODES + ("auto",))
def test_compiled_passes_with_prefix_reuse_give_the_plain_tokens(compiled_embedded, mode):
    nld, fast, prompts = compiled_embedded
    assert prefix_reuse_against_plain(nld.model, fast, prompts[:4], mode, max_new_tokens=32) > 4 * 32


@pytest.fixture(scope="module")
def compiled_random(tiny_dir):
    model = nld_trt.load(tiny_dir, compile=False).model
    lines: list[str] = []
    fast = TorchExecutor(model, max_batch=4, max_seq_len=128, compile=True, chunk_lens=(1, 8), batch_buckets=(4,),
                         progress=lines.append)
    return model, fast, lines


@pytest.mark.parametrize("mode,lora", [("ar", False), ("dlm", False), ("linear_spec", True), ("linear_spec", False)])
def test_compiled_passes_decode_a_random_model_like_the_reference(compiled_random, mode, lora):
    model, fast, _ = compiled_random
    prompts = random_prompts(model.config.vocab_size, 8, seed=11)
    for batch in (1, 4):
        check_against_reference(model, fast, prompts, batch, TOL, mode=mode, lora=lora, max_new_tokens=24,
                                block_length=8, eos_token_ids=())


@pytest.mark.parametrize("mode", MODES + ("auto",))
def test_compiled_passes_with_prefix_reuse_give_a_random_models_plain_tokens(compiled_random, mode):
    model, fast, _ = compiled_random
    prompts = random_prompts(model.config.vocab_size, 4, seed=17)
    assert prefix_reuse_against_plain(model, fast, prompts, mode, max_new_tokens=24, block_length=8,
                                      eos_token_ids=()) > 0


def test_a_compiled_pass_never_recompiles_at_run_time(compiled_random):
    """Shapes are compiled at load; a pass of another cache length reuses them (the length is dynamic)."""
    model, fast, _ = compiled_random
    pager = Pager(fast)
    s = pager.allocate()
    try:
        for n in (3, 17, 40):  # different committed lengths, hence different numbers of keys and pages
            pager.forward([s], [Chunk(list(range(130, 130 + n)))], all_logits=False)  # eager prefill
            pager.commit(s, n)
            pager.forward([s], [Chunk([131])])  # would raise RecompileError if a guard failed
    finally:
        pager.release(s)


# ------------------------------------------------------------------------------------------------------------
# CUDA graphs: need a GPU


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="CUDA graphs need a CUDA GPU, which this machine lacks; their bookkeeping (buckets, "
                           "padding, which graph serves which call) is tested above on CPU")
@pytest.mark.parametrize("mode", MODES)
def test_cuda_graphs_decode_like_the_cpu_reference(tiny_dir, mode):
    cpu = nld_trt.load(tiny_dir, compile=False).model
    gpu = nld_trt.load(tiny_dir, device="cuda", dtype="float32", compile=False).model
    fast = TorchExecutor(gpu, max_batch=4, max_seq_len=128, compile=True, chunk_lens=(1, 8), batch_buckets=(1, 4))
    assert fast.passes.kind == "cuda-graphs" and "CUDA graphs" in fast.compile_report
    prompts = random_prompts(cpu.config.vocab_size, 6, seed=13)
    for batch in (1, 3):
        check_against_reference(cpu, fast, prompts, batch, TOL, mode=mode, max_new_tokens=24, block_length=8,
                                eos_token_ids=())


# ------------------------------------------------------------------------------------------------------------
# fused projections, which models compile, the options


def test_fused_projections_keep_the_checkpoint_layout(tiny_dir):
    model = nld_trt.load(tiny_dir, compile=False).model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, model.config.hidden_size)
    mlp_before = model.encoder.layers[0].mlp(x)
    assert fuse_projections(model) == 2 * model.config.num_hidden_layers
    assert fuse_projections(model) == 2 * model.config.num_hidden_layers  # idempotent
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
    attn, mlp = model.encoder.layers[0].self_attn, model.encoder.layers[0].mlp
    assert attn.q_proj.weight.data_ptr() == attn.qkv_weight.data_ptr()  # views: no memory added
    assert mlp.up_proj.weight.data_ptr() == mlp.gate_up_weight[mlp.gate_proj.weight.shape[0]:].data_ptr()
    assert torch.equal(mlp(x, fused=True), mlp_before)


def test_quantized_or_hooked_models_stay_on_the_eager_path(tiny_dir):
    from nld_trt.quant.linear import FP8Linear

    model = nld_trt.load(tiny_dir, compile=False).model
    assert compile_blocker(model) is None
    h = model.config.hidden_size
    model.encoder.layers[1].mlp.up_proj = FP8Linear(h, model.config.intermediate_size)
    assert "encoder.layers.1.mlp.up_proj" in compile_blocker(model)
    with pytest.raises(NLDError, match="compile=False"):
        TorchExecutor(model, max_batch=1, max_seq_len=32, compile=True)
    with pytest.raises(NLDError, match="compile must be"):
        TorchExecutor(nld_trt.load(tiny_dir, compile=False).model, max_batch=1, max_seq_len=32, compile="fast")


def test_compile_defaults_to_eager_on_cpu_and_is_an_option_everywhere(tiny_dir, capsys):
    from nld_trt.cli import main
    from nld_trt.serving.package import ServingOptions, render_config

    assert nld_trt.load(tiny_dir).executor.passes is None
    main(["generate", "--model", str(tiny_dir), "--no-compile", "--max-new-tokens", "2", "--json", "hi"])
    assert capsys.readouterr().out.startswith("{")
    config = nld_trt.load(tiny_dir).config
    text = render_config("nld", True, "manifest.json", ServingOptions(compile="true").checked(config))
    assert 'key: "compile" value { string_value: "true" }' in text
    with pytest.raises(NLDError, match="compile must be one of auto, true, false"):
        ServingOptions(compile="yes").checked(config)


def test_compilation_reports_progress_and_one_line_at_load(compiled_random):
    _, fast, lines = compiled_random
    assert lines[0].startswith("compiling the forward pass 1/2 (batch x chunk 4x1)")
    assert lines[-1] == fast.compile_report
    assert fast.compile_report.startswith("compiled 2 forward passes (batch 4 x chunk 1,8) with torch.compile in ")
