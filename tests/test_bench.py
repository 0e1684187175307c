"""fastvq.bench's logic: shapes, providers, the alternation, the correctness gate, the report, the CLI.
Nothing here asserts a speed; the sweep is `python -m fastvq.bench`, and CI runs `--quick`."""
import json
import re
import subprocess
import sys

import pytest
import torch

import fastvq
from fastvq import _cpu, reference
from fastvq.bench import cli, device_check, judge, providers, report
from fastvq.bench.cases import Case, make_data, select_cases
from fastvq.bench.run import Options, Result, measure_memory, run_case, time_alternating

TINY = Options(repeats=1, fast_repeats=1, warmup=0, min_repeats=1, memory=False)


def test_shapes_sweeps_and_seeded_data():
    cases = select_cases(False, "core-2,33x1030x3-l2,8x4x2-bf16", ("nearest_code", "train"))
    assert [(c.workload, c.label, c.n, c.k, c.d, c.l2norm, c.dtype) for c in cases[::2]] == [
        ("nearest_code", "core-2", 16384, 16384, 64, False, "float32"),
        ("nearest_code", "33x1030x3-l2", 33, 1030, 3, True, "float32"),
        ("nearest_code", "8x4x2-bf16", 8, 4, 2, False, "bfloat16")]
    for spec in ("", "12x3", "0x4x4", "nonsense", "4x4x4x4"):
        with pytest.raises(ValueError, match="--shapes"):
            select_cases(False, spec, ("nearest_code",))
    on_gpu = select_cases(False, None, ("nearest_code", "train"), "cuda")
    assert all(c.device == "cuda" for c in on_gpu)
    assert {c.workload for c in on_gpu if c.dtype == "bfloat16"} == {"nearest_code"}
    assert {c.iters for c in select_cases(True, None, ("kmeans",), kmeans_iters=4)} == {4}
    assert not select_cases(False, "8x16x2", ("kmeans",))  # k-means needs K <= N
    assert Case("kmeans", "k", 10, 4, 2, iters=3).flops == 3 * Case("nearest_code", "s", 10, 4, 2).flops == 480
    case = Case("train", "t", 33, 7, 5, l2norm=True)
    a, b = make_data(case, seed=3), make_data(case, seed=3)
    assert torch.equal(a.x, b.x) and torch.equal(a.grad_out, b.grad_out) and not torch.equal(make_data(case, 4).x, a.x)
    torch.testing.assert_close(a.codebook.norm(dim=1), torch.ones(7))


def test_alternation_warm_up_round_cutting_and_summary():
    calls = []
    runs = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    assert {len(t) for t in time_alternating(runs, Options(repeats=3, fast_repeats=0, warmup=1)).values()} == {3}
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    times = time_alternating(runs, Options(repeats=7, fast_repeats=0, min_repeats=3, budget_s=5.0),
                             {"a": 1.0, "b": 4.0, "c": 0.01})
    assert [len(times[name]) for name in "abc"] == [5, 3, 7]  # rounds cut to fit the budget, never under 3
    # a case whose runs all take under FAST_CASE_S: fast_repeats rounds of each, so every round has all of them
    times = time_alternating(runs, Options(repeats=5, fast_repeats=25, warmup=0), {"a": 0.001, "b": 0.0249, "c": 0.02})
    assert [len(times[name]) for name in "abc"] == [25, 25, 25]
    times = time_alternating(runs, Options(repeats=5, fast_repeats=25, warmup=0), {"a": 0.001, "b": 0.025, "c": 0.02})
    assert [len(times[name]) for name in "abc"] == [5, 5, 5]
    calls.clear()
    runs = {"fast": lambda: calls.append("fast"), "slow": lambda: calls.append("slow")}
    times = time_alternating(runs, Options(repeats=5, fast_repeats=0, warmup=1, min_repeats=2, budget_s=2.0),
                             {"fast": 0.001, "slow": 1.0})  # slow: no warm-up (>= WARM_IF_UNDER_S)
    assert calls.count("slow") == 2 and calls.count("fast") == 6 and len(times["slow"]) == 2
    values = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0]
    timing = Result(Case("nearest_code", "s", 1, 1, 1), "p", "baseline", "", times_ms=values).timing
    for key, q in (("q1_ms", 0.25), ("median_ms", 0.5), ("q3_ms", 0.75)):
        torch.testing.assert_close(timing[key], float(torch.quantile(torch.tensor(values), q)))


def test_judge_and_check_pass_the_right_answers_and_reject_the_wrong_ones(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x, codebook = torch.randn(257, 5, generator=g), torch.randn(33, 5, generator=g)
    rows, best = judge.spread(257, 512), reference.nearest_code(x, codebook)[0]
    judge.check_nearest(x, codebook, best, rows)
    judge.check_nearest(x, codebook, judge.exact_nearest(x, codebook)[1], rows)  # the float64 expansion agrees
    wrong = best.clone()
    wrong[256] = reference.pairwise_sqdist(x, codebook)[256].argmax()
    with pytest.raises(judge.Wrong, match="1 of 257 checked rows are not a nearest code"):
        judge.check_nearest(x, codebook, wrong, rows)
    for bad, message in ((best[:-1], "shape"), (best.float(), "integer"), (best + 33, "out of range")):
        with pytest.raises(judge.Wrong, match=message):
            judge.check_nearest(x, codebook, bad, rows)
    # --check: the cpu backend passes, and an off-by-one nearest_code is caught
    lines = []
    assert device_check.check_device(torch.device("cpu"), lines.append) == 0 and "check cpu: checking" in lines
    assert "check FastVectorQuantizer under bf16 autocast" in lines
    right = fastvq.nearest_code

    def off_by_one(x, codebook, backend):
        indices, sqdist = right(x, codebook, backend=backend)
        return (indices + 1) % len(codebook), sqdist
    monkeypatch.setattr(fastvq, "nearest_code", off_by_one)
    assert any("chose code" in failure for failure in device_check.check_backend("cpu", torch.device("cpu")))


def test_the_gluon_search_is_checked_where_it_runs_and_its_failures_say_so(monkeypatch):
    pytest.importorskip("triton")
    import fastvq.triton as kernels

    lines = []
    assert device_check.check_gluon_search(torch.device("cpu"), lines.append) == []
    assert lines == ["check triton with set_search_kernel('gluon'): skipped: Gluon kernels need a CUDA device "
                     "(no interpreter)"]
    searched = []
    right = fastvq.nearest_code

    def recorded(x, codebook, backend):
        searched.append((x.dtype, x.shape[1]))
        return right(x, codebook, backend=backend)
    monkeypatch.setattr(fastvq, "nearest_code", recorded)
    assert device_check.check_backend("cpu", torch.device("cpu"), (torch.bfloat16,), 33) == []
    assert searched and {dtype for dtype, _ in searched} == {torch.bfloat16} and max(d for _, d in searched) == 33
    monkeypatch.setattr(fastvq, "nearest_code", right)
    seen = []
    monkeypatch.setattr(kernels, "gluon_search_reason", lambda x, codebook: None)
    monkeypatch.setattr(device_check, "check_backend", lambda backend, device, dtypes, max_dim: seen.append(
        kernels.search_kernel()) or [f"{backend} {dtypes} d <= {max_dim} wrong"])
    monkeypatch.setattr(device_check, "check_side_stream", lambda backend, device, dtype: [f"{dtype} stream"])
    assert device_check.check_gluon_search(torch.device("cpu"), lines.append) == [
        "(gluon search) triton (torch.bfloat16,) d <= 64 wrong", "(gluon search) torch.bfloat16 stream"]
    assert seen == ["gluon"] and kernels.search_kernel() == "triton"  # asked for while checking, then reset


def test_the_float32_only_provider_turns_the_prefilter_off_for_its_runs_only():
    case = Case("nearest_code", "k", 16, 8192, 64)
    data = make_data(case)
    assert judge.judge_precision("fastvq-cpu-float32", data) == judge.judge_precision("fastvq-cpu", data) == "ieee"
    setup = providers.REGISTRY[("nearest_code", "fastvq-cpu-float32")].setup
    if _cpu.prefilter_reason(case.n, case.k, case.d):
        with pytest.raises(providers.Absent, match="fastvq-cpu runs without the prefilter here already"):
            setup(case, data)
        return
    run = setup(case, data)
    before = _cpu.prefilter_stats()["calls"]
    quantized, indices = run()[:2]
    assert _cpu.prefilter_stats()["calls"] == before and _cpu.prefilter_mode() == "auto"
    want = fastvq.quantize(data.x, data.codebook, backend="cpu")
    assert _cpu.prefilter_stats()["calls"] == before + 1  # the default does use it at this shape
    assert torch.equal(indices, want[1]) and torch.equal(quantized, want[0])


def test_the_autocast_check_catches_a_wrong_loss_and_a_wrong_code(monkeypatch):
    right = fastvq.FastVectorQuantizer.forward

    def doubled_loss(self, x, *args, **kwargs):
        quantized, indices, loss = right(self, x, *args, **kwargs)
        return quantized, indices, 2 * loss

    def shifted_codes(self, x, *args, **kwargs):
        quantized, indices, loss = right(self, x, *args, **kwargs)
        return quantized, (indices + 1) % self.codebook_size, loss
    assert device_check.check_autocast_module(torch.device("cpu")) == []
    monkeypatch.setattr(fastvq.FastVectorQuantizer, "forward", doubled_loss)
    assert "loss" in " ".join(device_check.check_autocast_module(torch.device("cpu")))
    monkeypatch.setattr(fastvq.FastVectorQuantizer, "forward", shifted_codes)
    assert "not a nearest code" in " ".join(device_check.check_autocast_module(torch.device("cpu")))


def test_run_case_times_the_right_providers_never_the_wrong_one_and_measures_memory(monkeypatch):
    def fake(name, shift=0, error=None):
        def setup(case, data):
            if error:
                raise error
            indices = (reference.nearest_code(data.x, data.codebook)[0] + shift) % case.k
            return lambda: (data.codebook[indices], indices)
        return providers.Provider(name, "nearest_code", "baseline", name, setup)
    fakes = [fake("good"), fake("wrong", shift=1), fake("absent", error=providers.Absent("no such package")),
             fake("broken", error=RuntimeError("cannot set up"))]
    results = {r.provider: r for r in run_case(Case("nearest_code", "fake", 65, 9, 3), fakes, TINY)}
    assert results["good"].status == "ok" and len(results["good"].times_ms) == 1
    assert results["wrong"].status == "wrong" and not results["wrong"].times_ms
    assert "not a nearest code" in results["wrong"].reason
    assert (results["absent"].status, results["absent"].reason) == ("absent", "no such package")
    assert results["broken"].status == "error" and "cannot set up" in results["broken"].reason
    # the FMA burst timed in the same rounds: the case's peak on every row, never a row of its own
    assert set(results) == {"good", "wrong", "absent", "broken"}
    assert len({r.peak_gflops for r in results.values()}) == 1 and 0.05 < results["good"].peak_gflops < 1e5
    memory = measure_memory("naive", Case("nearest_code", "m", 2048, 1024, 64), seed=0)  # in a child process
    assert "error" not in memory, memory
    assert memory["peak_rss_mb"] > memory["before_mb"] > 10 and 8 <= memory["delta_mb"] < 200  # cdist's N×K: 8 MiB
    pytest.importorskip("faiss")  # faiss IVF: timed with its recall
    monkeypatch.setattr(providers, "IVF_MIN_CODES", 1024)
    ivf = [providers.REGISTRY["nearest_code", "faiss-ivf"]]
    (result,) = run_case(Case("nearest_code", "ivf", 300, 2048, 8), ivf, TINY)
    assert result.status == "ok" and len(result.times_ms) == 1 and result.check["rows"] == 300
    assert 0.0 < result.check["recall_at_1"] <= 1.0 and 1 <= result.check["nprobe"] <= result.check["nlist"] == 52
    assert (providers.ivf_nlist(65536), providers.ivf_nlist(2048), providers.ivf_nlist(100)) == (1024, 52, 2)
    (absent,) = run_case(Case("nearest_code", "s", 30, 512, 8), ivf, TINY)
    assert absent.status == "absent" and absent.reason.startswith("not applicable")


def test_the_memory_yardstick_times_one_read_of_the_int8_codes_for_streaming_calls_only():
    read = [providers.REGISTRY["nearest_code", "int8-read"]]
    case = Case("nearest_code", "stream", 3, 1030, 33)  # d = 33: 36 int8 entries a code, and a scale and a norm
    assert case.int8_code_bytes == 1030 * (36 + 8)
    (result,) = run_case(case, read, TINY)
    assert result.status == "ok" and len(result.times_ms) == 1 and result.check == {}  # unchecked, like sgemm
    (absent,) = run_case(Case("nearest_code", "big", 33, 1030, 33), read, TINY)
    assert absent.status == "absent" and absent.reason.startswith("not applicable")
    results = [Result(case, "sgemm", "sgemm", "", times_ms=[1.0]),
               Result(case, "int8-read", "memory", "", times_ms=[0.5]),
               Result(case, "naive", "baseline", "", times_ms=[4.0]),
               Result(case, "fastvq-cpu", "fastvq", "", times_ms=[2.0])]
    report.derive(results, peak_gflops=20.0)
    derived = results[1].derived
    torch.testing.assert_close(derived["read_gbps"], 1030 * 44 / 0.5e-3 / 1e9)
    assert derived["gflops"] is None and derived["pct_peak"] is None and derived["speedup"] == {}
    assert results[3].derived["speedup"]["naive"] == 2.0 and "int8-read" not in results[3].derived["speedup"]
    headers, rows = report.table_rows(results, "nearest_code")
    cells, style = rows[1]
    assert cells[2] == "int8-read" and style == "dim"
    assert cells[-1] == f"yardstick ({1030 * 44 / 2**20:.1f} MiB read, {derived['read_gbps']:.1f} GB/s)"
    assert cells[headers.index("GFLOP/s")] == "—" and cells[headers.index("%peak")] == "—"


def test_a_provider_failing_while_timed_fails_the_case_timing_beside_the_peak_probe():
    def setup(case, data):
        calls = []

        def run():
            calls.append(1)
            if len(calls) > 1:  # the checked run passes, the timed ones raise
                raise RuntimeError("lost the device")
            indices = reference.nearest_code(data.x, data.codebook)[0]
            return data.codebook[indices], indices
        return run
    flaky = providers.Provider("flaky", "nearest_code", "baseline", "flaky", setup)
    (result,) = run_case(Case("nearest_code", "t", 65, 9, 3), [flaky], TINY)
    assert result.status == "error" and result.reason == "while timing: RuntimeError: lost the device"
    assert result.peak_gflops is None and not result.times_ms


def test_derived_figures_tables_and_the_cli_end_to_end(tmp_path, capsys):
    case = Case("train", "core-t", 1000, 500, 10)  # 1e7 FLOPs
    results = [Result(case, "sgemm", "sgemm", "", times_ms=[1.0]),
               Result(case, "vector-quantize-pytorch", "baseline", "", times_ms=[30.0, 40.0, 50.0],
                      memory={"delta_mb": 1000.0}),
               Result(case, "fastvq-cpu", "fastvq", "", times_ms=[2.0, 3.0, 4.0], memory={"delta_mb": 50.0}),
               Result(case, "fastvq-cuda", "fastvq", "", status="absent", reason="no CUDA device"),
               Result(case, "fastvq-torch", "fastvq", "", status="wrong", reason="3 of 10 rows are not a nearest code")]
    report.derive(results, peak_gflops=20.0)
    fast = results[2].derived
    torch.testing.assert_close(fast["gflops"], 1e7 / 3e-3 / 1e9)
    torch.testing.assert_close(fast["pct_sgemm"], 100.0 / 3.0)
    torch.testing.assert_close(fast["pct_peak"], 100.0 * (1e7 / 3e-3 / 1e9) / 20.0)
    torch.testing.assert_close(fast["pct_best_peak"], fast["pct_peak"])
    results[2].peak_gflops = 4.0  # the burst timed in the case's own rounds wins over the run's best reading
    report.derive(results, peak_gflops=20.0)
    torch.testing.assert_close(results[2].derived["pct_peak"], 100.0 * (1e7 / 3e-3 / 1e9) / 4.0)
    torch.testing.assert_close(results[2].derived["pct_best_peak"], 100.0 * (1e7 / 3e-3 / 1e9) / 20.0)
    results[2].peak_gflops = None
    report.derive(results, peak_gflops=20.0)
    torch.testing.assert_close(fast["speedup"]["vector-quantize-pytorch"], 40.0 / 3.0)
    torch.testing.assert_close(fast["memory_ratio"]["vector-quantize-pytorch"], 0.05)
    headers, rows = report.table_rows(results, "train")
    assert [cells[2] for cells, _ in rows] == ["sgemm", "vector-quantize-pytorch", "fastvq-cpu", "fastvq-torch"]
    assert rows[3][0][-1].startswith("WRONG: 3 of 10") and rows[3][1] == "red"
    assert (rows[2][0][7], rows[2][0][8]) == ("17", "13.33")  # %peak, ×VectorQuantize
    table = report.markdown(results, "test machine", "python -m fastvq.bench")
    assert re.search(r"\| \*\*fastvq-cpu\*\* +\|", table) and "absent: fastvq-cuda: no CUDA device" in table
    # the same figures and tables, end to end through the CLI, with JSON and a plot
    path, png, md = tmp_path / "b.json", tmp_path / "b.png", tmp_path / "b.md"
    names = "naive,addmm,faiss-flat,vector-quantize-pytorch,faiss-kmeans,sklearn-kmeans,fastvq-cpu"
    code = cli.main(f"--shapes 65x17x3 --providers {names} --repeats 2 --fast-repeats 2 --min-repeats 1 --warmup 0 "
                    "--kmeans-iters 2 "
                    f"--no-memory --no-progress --json {path} --plot {png} --markdown {md}".split())
    assert code == 0 and "nearest_code forward" in capsys.readouterr().out
    assert re.search(r"\| 65x17x3 +\| naive +\|", md.read_text())
    document = json.loads(path.read_text())
    assert document["schema"] == "fastvq.bench/2" and document["command"].startswith("python -m fastvq.bench --shapes")
    assert document["machine"]["torch_threads"] == torch.get_num_threads() and "isa" in document["machine"]
    assert document["machine"]["fma_peak"]["gflops"] > 0 and document["machine"]["fma_peak"]["isa"] == _cpu.simd_level()
    by_key = {(r["workload"], r["provider"]): r for r in document["results"]}
    assert {w for w, _ in by_key} == {"nearest_code", "nearest_codes", "train", "kmeans", "rvq_train", "rvq_beam"}
    assert all(by_key[("nearest_codes", name)]["check"]["rows"] > 0 for name in ("naive", "faiss-flat", "fastvq-cpu"))
    assert all(r["status"] in ("ok", "absent") for r in by_key.values()), [r["reason"] for r in by_key.values()]
    naive, addmm = by_key[("nearest_code", "naive")], by_key[("nearest_code", "addmm")]
    assert len(naive["times_ms"]) == 2 and by_key[("kmeans", "fastvq-cpu")]["check"]["inertia"] > 0
    assert by_key[("kmeans", "sklearn-kmeans")]["check"]["inertia"] > 0
    assert by_key[("kmeans", "fastvq-cpu")]["derived"]["pct_peak"] > 0
    ratio = naive["timing"]["median_ms"] / addmm["timing"]["median_ms"]
    torch.testing.assert_close(addmm["derived"]["speedup"]["naive"], ratio)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_arguments_provider_selection_and_a_missing_gpu(capsys):
    for argv in ("--shapes 1x2", "--repeats 0", "--workloads search", "--providers naive,vqtorch", "--device nope"):
        with pytest.raises(SystemExit, match=argv.split()[0]):  # the message names the argument
            cli.main(argv.split())
    assert "fastvq-torch" not in {p.name for p in providers.select(None)["nearest_code"]}
    chosen = providers.select("naive,fastvq-torch")  # sgemm always; the slow oracle only when named
    assert [p.name for p in chosen["nearest_code"]] == ["sgemm", "naive", "fastvq-torch"]
    assert [p.name for p in chosen["train"]] == ["sgemm", "fastvq-torch"]
    assert cli.main(["--device", f"cuda:{torch.cuda.device_count()}", "--check"]) == 0  # a GPU job without the GPU
    out = capsys.readouterr().out
    assert "no such CUDA device here" in out and "nothing was run" in out


def test_import_fastvq_loads_no_bench_and_the_bench_no_baseline():
    code = ("import sys, torch; before = set(sys.modules); import fastvq; new = set(sys.modules) - before; "
            "print(sorted(m for m in new if m.split('.')[0] in ('rich', 'tqdm', 'matplotlib', 'faiss', "
            "'vector_quantize_pytorch') or m.startswith('fastvq.bench'))); import fastvq.bench.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('faiss', 'vector_quantize_pytorch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "[]"]  # torch itself imports tqdm (torch.hub), so only what fastvq adds counts
