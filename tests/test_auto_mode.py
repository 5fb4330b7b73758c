"""Mode `auto`: lossless switching between ar and linear_spec, the chooser on synthetic cost models, and the
measured cost model's calibration (saved, reused, remeasured when the executor changes)."""

from __future__ import annotations

import pytest

import nld_trt
from law_executor import CONFIG, LawExecutor, ar_law
from nld_trt.decoding import SEQUENCE_TYPES, GenerationParams, run
from nld_trt.decoding.auto import AR, Acceptance, AutoPlanner, AutoSequence
from nld_trt.evaluate import load_task
from nld_trt.executors.cost import CostModel, calibration_file, fit, load_or_calibrate
from test_sampling_laws import PROMPT, chi_square_p


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    return nld_trt.load(max_batch=16, max_seq_len=512, calibration_dir=tmp_path_factory.mktemp("calibration"))


@pytest.fixture(scope="module")
def questions():
    return [p.question for p in load_task("gsm_synth")[:16]]


@pytest.mark.parametrize("concurrency", [1, 4, 16])
def test_greedy_auto_gives_exactly_the_ar_tokens(embedded, questions, concurrency):
    batch = questions[:concurrency]
    ar = embedded.generate(batch, mode="ar", max_new_tokens=48)
    auto = embedded.generate(batch, mode="auto", max_new_tokens=48)
    assert [r.token_ids for r in auto] == [r.token_ids for r in ar]
    assert all(r.stats.auto["steps"] for r in auto)  # it did plan every request


def test_forced_switches_mid_request_stay_lossless(embedded, questions):
    cycle = [AR, ("linear_spec", 4), ("linear_spec", 32), AR, AR, ("linear_spec", 8), ("linear_spec", 16)]
    forced = AutoPlanner(cost=lambda: pytest.fail("a forced planner needs no cost model"),
                         force=lambda seq, n: cycle[(n + len(seq.out)) % len(cycle)])
    params = GenerationParams(mode="auto", max_new_tokens=48).resolved(embedded.config)
    seqs = [AutoSequence(embedded.encode(q), params, embedded.config, 0, embedded.tokenizer.decode)
            for q in questions[:6]]
    run(embedded.executor, seqs, planner=forced)
    ar = embedded.generate(questions[:6], mode="ar", max_new_tokens=48)
    assert [s.out for s in seqs] == [r.token_ids for r in ar]
    used = {name for s in seqs for name in s.steps}
    assert {"ar", "linear_spec/4", "linear_spec/32"} <= used  # really switched within requests
    assert all(len(s.steps) >= 2 for s in seqs)


def test_sampled_auto_keeps_the_ar_law_while_switching():
    cycle = [AR, ("linear_spec", 4), ("linear_spec", 2)]
    planner = AutoPlanner(cost=None, force=lambda seq, n: cycle[(n // 7 + len(seq.out)) % len(cycle)])
    params = GenerationParams(mode="auto", max_new_tokens=3, temperature=1.0, block_length=4, eos_token_ids=(),
                              top_p=0.9).resolved(CONFIG)
    seqs = [AutoSequence(list(PROMPT), params, CONFIG, seed) for seed in range(4000)]
    run(LawExecutor(max_batch=512), seqs, planner=planner)
    assert chi_square_p([tuple(s.out) for s in seqs], ar_law(PROMPT, 3, top_p=0.9)) > 1e-3


# the chooser on synthetic cost models ---------------------------------------------------------------
class Flat:
    """Weight-bound: every pass costs the same."""

    def pass_time(self, tokens, attention=0.0, rows=0.0, keys=0.0):
        return 0.01


class Linear:
    """Compute-bound: a pass costs its tokens."""

    def __init__(self, base=0.0, per_token=0.001):
        self.base, self.per_token = base, per_token

    def pass_time(self, tokens, attention=0.0, rows=0.0, keys=0.0):
        return self.base + self.per_token * tokens


def requests(n: int, rate: float, tiny, block: int = 32, lossy: bool = False) -> list[AutoSequence]:
    params = GenerationParams(mode="auto", max_new_tokens=200, block_length=block, allow_lossy=lossy).resolved(tiny.config)
    seqs = []
    for i in range(n):
        s = AutoSequence([1, 2, 3], params, tiny.config, i)
        s.out = [5]
        s.acceptance = Acceptance.prior(rate, weight=1000)
        s.shared = s.acceptance  # planned already: keep this estimate
        seqs.append(s)
    return seqs


def chosen(planner, seqs):
    planner.plan(seqs)
    return [s.option for s in seqs]


def test_weight_bound_cost_speculates_with_the_longest_block_that_pays(tiny):
    assert chosen(AutoPlanner(Flat()), requests(4, 0.95, tiny)) == [("linear_spec", 32)] * 4


def test_compute_bound_cost_at_high_load_steps_ar(tiny):
    assert chosen(AutoPlanner(Linear()), requests(32, 0.7, tiny)) == [AR] * 32
    # the same cost with one request and a weight-bound floor still speculates
    assert chosen(AutoPlanner(Linear(base=0.02)), requests(1, 0.9, tiny))[0][0] == "linear_spec"


def test_low_acceptance_takes_a_shorter_block_or_ar(tiny):
    mild = Linear(base=0.01, per_token=0.0004)
    good = chosen(AutoPlanner(mild), requests(1, 0.95, tiny))[0]
    medium = chosen(AutoPlanner(mild), requests(1, 0.75, tiny))[0]
    assert good[0] == medium[0] == "linear_spec" and medium[1] < good[1]
    assert chosen(AutoPlanner(Flat()), requests(1, 0.2, tiny)) == [AR]  # drafting does not pay


def test_the_latency_guard_keeps_a_request_from_waiting_too_long(tiny):
    """A drafts well, B badly: speculating pays for the batch, but B would wait 2x its ar time per token or more."""
    cost = Linear(base=0.01, per_token=0.0001)
    a, b = requests(1, 0.999, tiny) + requests(1, 0.05, tiny)
    assert chosen(AutoPlanner(cost, guard=4.0), [a, b])[0][0] == "linear_spec"
    a, b = requests(1, 0.999, tiny) + requests(1, 0.05, tiny)
    assert chosen(AutoPlanner(cost, guard=1.5), [a, b]) == [AR, AR]


def test_dlm_only_when_the_request_allows_lossy_decoding(tiny):
    lossless = requests(2, 0.1, tiny)
    assert all(o[0] != "dlm" for s in lossless for o in s.options((4, 8, 16, 32)))
    lossy = requests(2, 0.1, tiny, lossy=True)
    for s in lossy:
        s.acceptance.dlm_tokens = 8.0
    assert [o[0] for o in chosen(AutoPlanner(Flat()), lossy)] == ["dlm", "dlm"]


def test_auto_with_allow_lossy_decodes_and_reports_its_steps(tiny):
    r = tiny.generate([1, 40, 41, 42], mode="auto", allow_lossy=True, max_new_tokens=24, eos_token_ids=(),
                      block_length=8)
    assert len(r.token_ids) == 24 and sum(r.stats.auto["steps"].values()) >= 1
    with pytest.raises(nld_trt.errors.GenerationError, match="allow_lossy is for mode auto"):
        tiny.generate([1, 40], mode="ar", allow_lossy=True)


# calibration ------------------------------------------------------------------------------------
def test_the_fit_is_flat_then_linear():
    points = [{"rows": 1, "chunk": n, "cache": 0, "tokens": n, "attention": 0.0,
               "seconds": 0.005 + 0.0001 * max(0, n - 64)} for n in (1, 8, 32, 64, 128, 256, 512)]
    m = fit(points)
    assert m.knee == 64 and m.max_error < 1e-6
    assert m.pass_time(1) == pytest.approx(0.005) and m.pass_time(512) == pytest.approx(0.005 + 0.0448)


def test_the_fit_separates_the_cost_of_reading_each_rows_context():
    """A decode pass pays per cache position each row reads (its pages), whatever its chunk: the fit finds
    that term apart from the query-key pairs."""
    points = []
    for rows in (1, 4, 16):
        for chunk in (1, 8, 32):
            for cache in (64, 512):
                tokens, keys = rows * chunk, rows * (cache + chunk)
                attention = tokens * (cache + chunk)
                points.append({"rows": rows, "chunk": chunk, "cache": cache, "tokens": tokens, "keys": keys,
                               "attention": attention,
                               "seconds": 0.005 + 1e-4 * max(0, tokens - 32) + 2e-9 * attention + 5e-8 * keys})
    m = fit(points)
    assert m.max_error < 1e-6 and m.read_cost == pytest.approx(5e-8, rel=1e-4)
    assert m.attention_cost == pytest.approx(2e-9, rel=1e-4) and m.knee == 32


def test_calibration_is_saved_reused_and_remeasured_when_the_executor_changes(tiny_dir, tmp_path):
    first = nld_trt.load(tiny_dir, max_batch=2, max_seq_len=128, max_block_length=8)
    model, path, measured = load_or_calibrate(first.executor, first.pages, tmp_path)
    assert measured and path.is_file() and model.points and "fit:" in model.table()
    again, path2, measured2 = load_or_calibrate(first.executor, first.pages, tmp_path)
    assert not measured2 and path2 == path and again.to_json() == model.to_json()
    other = nld_trt.load(tiny_dir, max_batch=4, max_seq_len=128, max_block_length=8)  # another executor shape
    assert calibration_file(other.executor, tmp_path) != path
    _, path3, measured3 = load_or_calibrate(other.executor, other.pages, tmp_path)
    assert measured3 and path3 != path
    path.write_text('{"format": 0}')  # stale format: measured again
    assert load_or_calibrate(first.executor, first.pages, tmp_path)[2]
    assert CostModel.from_json(__import__("json").loads(path.read_text())).identity == model.identity


# served ------------------------------------------------------------------------------------------
def test_a_deployment_defaulting_to_auto_serves_the_ar_tokens_at_every_concurrency(embedded, questions, tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    import urllib.request

    from nld_trt.serving.client import GrpcClient
    from nld_trt.serving.package import ServingOptions, package_repository
    from nld_trt.serving.server import TritonServer

    repo = package_repository(None, tmp_path / "repo", ServingOptions(max_batch=16, max_seq_len=512, default_mode="auto"),
                              sync_model=False)
    want = embedded.generate(questions, mode="ar", max_new_tokens=40)
    with TritonServer(repo) as server:
        grpc = GrpcClient(server.grpc_url, timeout=120)
        for concurrency in (1, 8, 16):
            with ThreadPoolExecutor(concurrency) as pool:
                got = list(pool.map(lambda q: grpc.generate(text_input=q, max_tokens=40), questions[:concurrency]))
            assert [g.token_ids for g in got] == [w.token_ids for w in want[:concurrency]]
            assert all(g.stats["mode"] == "auto" and g.stats["auto"]["steps"] for g in got)
        metrics = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
        assert "nld_auto_steps_total{" in metrics and 'option="' in metrics
        assert (repo / "nld" / "1" / "calibration").is_dir()  # saved beside the artifacts
        assert server.stop() == 0


def test_what_a_step_costs_beyond_its_passes_is_learnt_and_favours_fewer_steps(tiny):
    """On a CPU the decoding loop's own work per sequence can dominate an ar step: the planner learns it
    from measured step times, and then speculates where the passes alone would not pay."""
    cost = Linear(base=0.001, per_token=0.0002)
    planner = AutoPlanner(cost)
    seqs = requests(8, 0.8, tiny)
    assert chosen(planner, seqs) == [AR] * 8  # passes alone: 8 x 32 tokens cost too much
    for s in seqs:
        s.option = None
    for _ in range(200):  # every step took 8 ms more than its forward passes: 1 ms per sequence
        planner.observe(seqs, cost.pass_time(8) + 0.008)
    assert planner.row_overhead == pytest.approx(0.001, rel=0.01)
    assert all(o[0] == "linear_spec" for o in chosen(planner, seqs))
