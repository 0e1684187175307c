"""fastvq.bench: shapes and provider selection, the timing loop, the correctness gate, the report and the CLI.

Fast (tiny shapes, one repeat); the real sweep is `python -m fastvq.bench`, and CI
runs `python -m fastvq.bench --quick`.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from fastvq import reference
from fastvq.bench import cli, report
from fastvq.bench.memory import measure
from fastvq.bench.providers import Check, Provider, Runner, select_providers
from fastvq.bench.run import Options, Result, run_case
from fastvq.bench.timing import Stats, plan_repeats, quantile, time_alternating
from fastvq.bench.verify import Oracle, check_rows, judge, judge_gather
from fastvq.bench.workloads import DEFAULT_CASES, Case, make_data, parse_shapes, select_cases


# ---- workloads ------------------------------------------------------------------------------
def test_parse_shapes_labels_and_explicit_shapes():
    cases = parse_shapes("core-2,33x1030x3-l2", ("search", "train"), DEFAULT_CASES)
    assert [(c.workload, c.label, c.n, c.k, c.d, c.l2norm) for c in cases] == [
        ("search", "core-2", 16384, 16384, 64, False),
        ("train", "core-2", 16384, 16384, 64, False),
        ("search", "33x1030x3-l2", 33, 1030, 3, True),
        ("train", "33x1030x3-l2", 33, 1030, 3, True),
    ]


@pytest.mark.parametrize("spec", ["", "12x3", "0x4x4", "nonsense", "4x4x4x4"])
def test_parse_shapes_rejects_bad_entries(spec):
    with pytest.raises(ValueError, match="--shapes"):
        parse_shapes(spec, ("search",), DEFAULT_CASES)


def test_default_sweep_has_the_issue_shapes():
    shapes = {(c.workload, c.n, c.k, c.d) for c in DEFAULT_CASES}
    for n, k, d in [(32768, 1024, 64), (16384, 16384, 64), (8192, 65536, 32)]:
        assert ("search", n, k, d) in shapes
    assert {("train", 32768, 1024, 64), ("train", 16384, 16384, 64)} <= shapes
    assert any(c.workload == "kmeans" for c in DEFAULT_CASES)
    assert any(c.l2norm and c.k == 16384 and c.d == 8 for c in DEFAULT_CASES)


def test_make_data_is_seeded_and_l2_rows_are_unit():
    case = Case("train", "t", 33, 7, 5, l2norm=True)
    a, b = make_data(case, seed=3), make_data(case, seed=3)
    assert torch.equal(a.x, b.x) and torch.equal(a.codebook, b.codebook) and torch.equal(a.grad_out, b.grad_out)
    torch.testing.assert_close(a.x.norm(dim=1), torch.ones(33))
    torch.testing.assert_close(a.codebook.norm(dim=1), torch.ones(7))
    assert not torch.equal(make_data(case, seed=4).x, a.x)


def test_kmeans_flops_count_every_iteration():
    assert Case("kmeans", "k", 10, 4, 2, iters=3).flops == 3 * 2 * 10 * 4 * 2
    assert Case("search", "s", 10, 4, 2, iters=3).flops == 2 * 10 * 4 * 2


# ---- provider selection ---------------------------------------------------------------------
def test_select_providers_keeps_sgemm_and_the_oracle_backend_is_opt_in():
    default = select_providers(None)
    assert "fastvq-torch" not in {p.name for p in default["search"]}
    chosen = select_providers("naive,fastvq-torch")
    assert [p.name for p in chosen["search"]] == ["sgemm", "naive", "fastvq-torch"]
    assert [p.name for p in chosen["train"]] == ["sgemm", "fastvq-torch"]
    with pytest.raises(ValueError, match="--providers"):
        select_providers("naive,nope")


# ---- timing ---------------------------------------------------------------------------------
def test_quantile_matches_linear_interpolation():
    values = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0]
    for q in (0.0, 0.25, 0.5, 0.75, 1.0):
        torch.testing.assert_close(quantile(values, q), float(torch.quantile(torch.tensor(values), q)))


def test_time_alternating_warms_up_then_rotates_the_order():
    calls = []
    runs = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    stats = time_alternating(runs, repeats=3, warmup=1)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert all(s.repeats == 3 for s in stats.values())


def test_slow_providers_do_fewer_rounds_but_at_least_min_repeats():
    assert plan_repeats(estimate_s=1.0, repeats=7, min_repeats=3, budget_s=5.0) == 5
    assert plan_repeats(estimate_s=4.0, repeats=7, min_repeats=3, budget_s=5.0) == 3
    assert plan_repeats(estimate_s=0.01, repeats=7, min_repeats=3, budget_s=5.0) == 7
    calls = []
    runs = {"fast": lambda: calls.append("fast"), "slow": lambda: calls.append("slow")}
    stats = time_alternating(runs, repeats=5, warmup=0, min_repeats=2, budget_s=2.0,
                             estimates_s={"fast": 0.001, "slow": 1.0})
    assert (stats["fast"].repeats, stats["slow"].repeats) == (5, 2)


def test_a_slow_provider_skips_the_extra_warm_up():
    calls = []
    runs = {"fast": lambda: calls.append("fast"), "slow": lambda: calls.append("slow")}
    time_alternating(runs, repeats=1, warmup=1, min_repeats=1, estimates_s={"fast": 0.01, "slow": 2.0},
                     warm_if_under_s=1.0)
    assert calls == ["fast", "fast", "slow"]


def test_stats_median_and_spread():
    stats = Stats([4.0, 1.0, 3.0, 2.0])
    assert (stats.median_ms, stats.min_ms, stats.max_ms, stats.q1_ms, stats.q3_ms) == (2.5, 1.0, 4.0, 1.75, 3.25)


# ---- correctness gate -----------------------------------------------------------------------
def _search_inputs(n=257, k=33, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)


def test_check_rows_spread_with_first_and_last():
    rows = check_rows(1030, 16, 8)
    assert rows[0] == 0 and rows[-1] == 1029 and len(rows) == 512 and bool((rows[1:] > rows[:-1]).all())
    assert len(check_rows(1030, 65536, 64)) == 32  # the oracle's work is bounded on big codebooks
    assert len(check_rows(0, 4, 4)) == 0 and check_rows(1, 4, 4).tolist() == [0]


def test_judge_passes_the_oracle_and_fails_a_wrong_code():
    x, codebook = _search_inputs()
    rows = check_rows(len(x), len(codebook), x.shape[1])
    best, _ = reference.nearest_code(x, codebook)
    oracle = Oracle()
    verdict = judge(x, codebook, best, rows, oracle)
    assert verdict.ok and verdict.passed == verdict.rows == len(x)
    farthest = reference.pairwise_sqdist(x, codebook).argmax(1)
    wrong = best.clone()
    wrong[100] = farthest[100]
    verdict = judge(x, codebook, wrong, rows, oracle)
    assert not verdict.ok and verdict.passed == len(x) - 1 and verdict.max_excess > 1.0


def test_exact_oracle_agrees_with_the_reference():
    x, codebook = _search_inputs(n=300, k=40, d=6)
    from fastvq.bench.verify import ExactOracle

    rows = torch.arange(300)
    assert judge(x, codebook, ExactOracle().indices(x, codebook), rows, Oracle()).ok


def test_judge_accepts_an_exact_tie_either_way():
    x, codebook = _search_inputs(n=3, k=4, d=3)
    codebook[3] = codebook[1]
    x[:] = codebook[1] + 0.01
    rows = check_rows(3, 4, 3)
    assert judge(x, codebook, torch.tensor([1, 3, 1]), rows, Oracle()).ok


@pytest.mark.parametrize("indices, message", [
    (torch.tensor([0, 4, 0]), "out of range"),
    (torch.tensor([0, 1]), "shape"),
    (torch.tensor([0.0, 1.0, 2.0]), "integer"),
])
def test_judge_reports_malformed_indices(indices, message):
    x, codebook = _search_inputs(n=3, k=4, d=3)
    verdict = judge(x, codebook, indices, check_rows(3, 4, 3), Oracle())
    assert not verdict.ok and message in verdict.message


def test_judge_gather():
    x, codebook = _search_inputs(n=9, k=4, d=3)
    indices = torch.arange(9) % 4
    rows = torch.arange(9)
    assert judge_gather(codebook[indices], codebook, indices, rows) == ""
    quantized = codebook[indices].clone()
    quantized[8, 1] += 1.0
    assert "1 of 9" in judge_gather(quantized, codebook, indices, rows)


# ---- one case end to end, with fake providers -----------------------------------------------
class _Fake(Provider):
    workload = "search"

    def __init__(self, name, shift=0, absent=None, raises=False):
        self.name, self.shift, self.absent, self.raises = name, shift, absent, raises
        self.description = name
        self.timed_runs = 0

    def absent_reason(self, case, data):
        return self.absent

    def prepare(self, case, data):
        if self.raises:
            raise RuntimeError("cannot prepare")
        provider = self

        class _Runner(Runner):
            def __call__(self):
                provider.timed_runs += 1

            def checked_run(self, rows, oracle):
                best, _ = reference.nearest_code(data.x, data.codebook)
                indices = (best + provider.shift) % case.k
                from fastvq.bench.verify import judge as judge_indices

                return Check(judge_indices(data.x, data.codebook, indices, rows, oracle))

        return _Runner()


def test_run_case_times_the_correct_and_never_the_wrong():
    case = Case("search", "fake", 65, 9, 3)
    good, wrong = _Fake("good"), _Fake("wrong", shift=1)
    absent, broken = _Fake("absent", absent="no such package"), _Fake("broken", raises=True)
    options = Options(repeats=2, warmup=1, min_repeats=1, memory=False)
    results = {r.provider: r for r in run_case(case, [good, wrong, absent, broken], options)}
    assert results["good"].status == "ok" and results["good"].stats.repeats == 2 and good.timed_runs == 3
    assert results["wrong"].status == "wrong" and results["wrong"].stats is None and wrong.timed_runs == 0
    assert "not a nearest code" in results["wrong"].reason
    assert (results["absent"].status, results["absent"].reason) == ("absent", "no such package")
    assert results["broken"].status == "error" and "cannot prepare" in results["broken"].reason


# ---- derived figures and the report ---------------------------------------------------------
def _result(case, provider, role, times, delta_mb=None, status="ok"):
    result = Result(case, provider, role, provider, status, stats=Stats(times) if times else None)
    if delta_mb is not None:
        result.memory = {"peak_rss_mb": 300.0 + delta_mb, "delta_mb": delta_mb}
    return result


def test_derive_gflops_sgemm_share_ratios_and_targets():
    case = Case("train", "core-t", 1000, 500, 10)  # 1e7 FLOPs; targets apply to core-* cases only
    results = [
        _result(case, "sgemm", "sgemm", [1.0]),
        _result(case, "vqtorch", "baseline", [30.0, 40.0, 50.0], delta_mb=1000.0),
        _result(case, "fastvq-cpu", "fastvq", [2.0, 3.0, 4.0], delta_mb=50.0),
    ]
    report.derive(results)
    fast = results[2].derived
    torch.testing.assert_close(fast["gflops"], 1e7 / 3e-3 / 1e9)
    torch.testing.assert_close(fast["pct_sgemm"], 100.0 / 3.0)
    torch.testing.assert_close(fast["speedup"]["vqtorch"], 40.0 / 3.0)
    torch.testing.assert_close(fast["memory_ratio"]["vqtorch"], 0.05)
    assert "speedup" not in results[0].derived or not results[0].derived["speedup"]
    lines = report.target_lines(results)
    assert [met for met, _ in lines] == [True, True]
    assert "13.33× faster than vqtorch" in lines[0][1]
    results[2].stats = Stats([10.0])
    report.derive(results)
    assert [met for met, _ in report.target_lines(results)] == [False, True]
    for result in results:  # the same figures on a shape without targets: ratios only, no verdicts
        result.case = Case("train", "small", 1000, 500, 10)
    assert report.target_lines(results) == []


def test_wrong_rows_are_shown_and_absent_ones_summarised():
    case = Case("search", "s", 10, 4, 2)
    results = [_result(case, "naive", "baseline", [1.0]),
               _result(case, "fastvq-cpu", "fastvq", None, status="wrong"),
               _result(case, "fastvq-cuda", "fastvq", None, status="absent")]
    results[1].reason = "3 of 10 checked rows are not a nearest code"
    results[2].reason = "no CUDA device"
    report.derive(results)
    rows = report.table_rows(results, "search")
    assert [cells[2] for cells, _ in rows] == ["naive", "fastvq-cpu"]
    assert rows[1][0][-1].startswith("WRONG: 3 of 10") and rows[1][1] == "red"
    assert report.absent_lines(results, "search") == ["fastvq-cuda: no CUDA device"]
    assert "WRONG" in report.render(results, "test machine")


# ---- the command line -----------------------------------------------------------------------
def test_cli_tiny_run_writes_json_and_plot(tmp_path, capsys):
    path, png, md = tmp_path / "bench.json", tmp_path / "bench.png", tmp_path / "bench.md"
    code = cli.main(["--shapes", "65x17x3", "--workloads", "search,train,kmeans",
                     "--providers", "naive,addmm,faiss-flat,vqtorch,faiss-kmeans,fastvq-cpu",
                     "--repeats", "2", "--min-repeats", "1", "--warmup", "0", "--kmeans-iters", "2",
                     "--no-memory", "--no-progress", "--json", str(path), "--plot", str(png), "--markdown", str(md)])
    assert code == 0
    table = md.read_text()
    assert "| case | N×K×d | provider | ms |" in table and "| 65x17x3 | naive |" in table
    document = json.loads(path.read_text())
    assert document["schema"] == "fastvq.bench/1"
    assert document["machine"]["torch_threads"] == torch.get_num_threads()
    assert document["command"].startswith("python -m fastvq.bench --shapes 65x17x3")
    by_key = {(r["workload"], r["provider"]): r for r in document["results"]}
    naive, addmm = by_key[("search", "naive")], by_key[("search", "addmm")]
    assert naive["status"] == addmm["status"] == "ok"
    assert len(naive["timing"]["times_ms"]) == 2
    torch.testing.assert_close(addmm["speedup"]["naive"], naive["timing"]["median_ms"] / addmm["timing"]["median_ms"])
    for key, result in by_key.items():
        assert result["status"] in ("ok", "absent"), (key, result["reason"])
        if result["status"] == "ok" and result["role"] != "sgemm":
            assert result["check"]["ok"], key
    if by_key[("kmeans", "faiss-kmeans")]["status"] == "ok":
        assert by_key[("kmeans", "faiss-kmeans")]["check"]["inertia"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "search forward" in capsys.readouterr().out


def test_cli_rejects_bad_arguments():
    with pytest.raises(SystemExit, match="--shapes"):
        cli.main(["--shapes", "1x2"])
    with pytest.raises(SystemExit, match="--repeats"):
        cli.main(["--repeats", "0"])
    with pytest.raises(SystemExit, match="--workloads"):
        cli.main(["--workloads", "search,nope"])


def test_select_cases_quick_and_kmeans_iters():
    cases = select_cases(True, None, ("kmeans",), 4)
    assert cases and all(c.workload == "kmeans" and c.iters == 4 for c in cases)


def test_importing_the_bench_imports_no_baseline_library():
    code = ("import sys, fastvq.bench; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('faiss', 'vector_quantize_pytorch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_memory_is_measured_in_a_child():
    case = Case("search", "m", 2048, 1024, 64)  # naive's N×K distance matrix is 8 MiB
    mem = measure("search", "naive", case, seed=0, threads=1)
    assert "error" not in mem, mem
    assert mem["peak_rss_mb"] > mem["before_mb"] > 10
    assert 8 <= mem["delta_mb"] < 200
    assert not math.isnan(mem["peak_rss_mb"])


def test_faiss_ivf_reports_recall_and_is_timed_even_when_approximate():
    pytest.importorskip("faiss")
    from fastvq.bench.search_providers import FaissIVF, ivf_nlist

    assert ivf_nlist(65536) == 1024 and ivf_nlist(100) == 2
    case = Case("search", "ivf", 300, 2048, 8)
    options = Options(repeats=1, warmup=0, min_repeats=1, memory=False)
    (result,) = run_case(case, [FaissIVF(min_codes=1024, target_recall=0.5)], options)
    assert result.status == "ok" and result.stats.repeats == 1
    assert 0.0 < result.check["recall_at_1"] <= 1.0 and result.check["rows"] == 300
    assert 1 <= result.check["nprobe"] <= result.check["nlist"] == ivf_nlist(2048)
    (exact,) = run_case(case, [FaissIVF(min_codes=1024, target_recall=1.0)], options)
    assert exact.check["nprobe"] >= result.check["nprobe"]
    assert exact.check["recall_at_1"] == 1.0  # the tuning sample is every row here
    (absent,) = run_case(Case("search", "small", 30, 512, 8), [FaissIVF(min_codes=1024)], options)
    assert absent.status == "absent" and absent.reason.startswith("not applicable")
