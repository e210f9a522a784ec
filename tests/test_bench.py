"""bench.py: the FLOP counter, the penalty cycle, and the JSON report on a tiny model."""
import io
import json
import re
import subprocess
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_user_error

import bench
import distributed
import ops
from settings import UserError


def test_flop_count_of_a_convolution_forward_and_backward():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    w = torch.randn(5, 3, 3, 3, requires_grad=True)
    forward = 2 * 2 * 5 * 3 * 9 * 8 * 8
    with bench.FlopCount() as counter:
        F.conv2d(x, w, padding=1)
    assert counter.total == forward
    with bench.FlopCount() as counter:
        F.conv2d(x, w, padding=1).sum().backward()
    assert counter.total == 3 * forward  # forward, input gradient, weight gradient
    with bench.FlopCount() as counter, torch.no_grad():
        F.conv2d(x, w, padding=1)
    assert counter.total == forward


def test_flop_count_of_a_convolution_with_its_bias_and_activation_in_the_kernel(monkeypatch):
    monkeypatch.setitem(ops.LAYOUT, "channels_last", True)  # the CPU's settings: oneDNN's fused kernel
    monkeypatch.setitem(ops.EPILOGUE, "enabled", True)
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    w, b = torch.randn(5, 3, 3, 3, requires_grad=True), torch.randn(5, requires_grad=True)
    with bench.FlopCount() as counter:
        y = ops.conv2d_bias_lrelu(x, w, b, padding=1)
    assert "BiasLReLU" in y.grad_fn.name() and counter.total == 2 * 2 * 5 * 3 * 9 * 8 * 8
    with bench.FlopCount() as counter:
        ops.conv2d_bias_lrelu(x, w, b, padding=1).sum().backward()
    assert counter.total == 3 * 2 * 2 * 5 * 3 * 9 * 8 * 8


@pytest.mark.parametrize("loss,pl_weight,expected", [("wgan-gp", 2.0, 8), ("logistic", 0.0, 4), ("logistic", 2.0, 8)])
def test_cycle_length_is_the_lcm_of_the_penalty_intervals(loss, pl_weight, expected):
    cfg = SimpleNamespace(loss=loss, gp_lambda=10.0, drift=0.001, r1_gamma=1.0, wgan_r1_gamma=0.0, d_reg_interval=4,
                          pl_weight=pl_weight, pl_interval=8)
    assert bench.cycle_length(cfg) == expected


def test_bench_json_report(capsys):
    assert bench.main(["--preset", "smoke", "--batch-size", "8", "--iters", "4", "--warmup", "1", "--json",
                       "--device", "cpu"]) == 0
    r = json.loads(capsys.readouterr().out)
    for key in ("img_per_s", "sec_per_kimg", "peak_mem_mb", "gflop_per_img", "peak_conv_gflops",
                "fraction_of_peak", "gen_img_per_s"):
        assert r[key] > 0, key
    assert r["sec_per_kimg"] == pytest.approx(1000 / r["img_per_s"])
    assert r["fraction_of_peak"] == pytest.approx(r["img_per_s"] * r["gflop_per_img"] / r["peak_conv_gflops"])
    assert r["iters"] == 4 and r["batch_size"] == 8 and r["resolution"] == 32
    # the convolutions' share of the step is a part of it, and the bound the rest of the step leaves above
    assert 0 < r["conv_time_share"] < 1
    assert r["conv_bound_of_peak"] == pytest.approx(r["fraction_of_peak"] / r["conv_time_share"])
    # the smoke model's forward passes alone: G and D convolutions at 32x32 with at most 32 channels
    assert 0.05 < r["gflop_per_img"] < 1.0


def test_bench_takes_the_faster_of_the_peaks_timed_before_and_after_the_iterations(capsys, monkeypatch):
    peaks = iter([100.0, 150.0])  # a shared machine slowed down while the first was timed
    monkeypatch.setattr(bench, "conv_peak_gflops", lambda device: next(peaks))
    assert bench.main(["--preset", "smoke", "--batch-size", "4", "--iters", "4", "--warmup", "0", "--json",
                       "--device", "cpu"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["peak_conv_gflops"] == 150.0
    assert r["fraction_of_peak"] == pytest.approx(r["achieved_gflops"] / 150.0)


def test_bench_counts_model_flops_whichever_convolution_algorithm_runs(capsys, monkeypatch):
    monkeypatch.setitem(ops.WINOGRAD, "min_channels", 1)  # the smoke model's layers use it too
    monkeypatch.setitem(ops.WINOGRAD, "min_size", 2)
    calls = []
    monkeypatch.setattr(ops, "winograd_conv", lambda *a, f=ops.winograd_conv: calls.append(1) or f(*a))
    results = {}
    for setting in ("on", "off"):
        assert bench.main(["--preset", "smoke", "--batch-size", "4", "--iters", "4", "--warmup", "0", "--json",
                           "--device", "cpu", "--winograd", setting]) == 0
        results[setting] = json.loads(capsys.readouterr().out)
        assert (len(calls) > 0) == (setting == "on")  # the timed iterations and generation ran it
        calls.clear()
    assert results["on"]["winograd"] and not results["off"]["winograd"]
    assert results["on"]["gflop_per_img"] == results["off"]["gflop_per_img"]


def test_bench_under_torchrun_splits_the_batch_and_adds_up_the_processes(capsys, monkeypatch):
    """Two processes, the second one's figures 1.5 times the first's: each trains on half the batch, the images
    per second count the global batch in the slower one's time, the peaks and generation speeds add up."""
    twin = dict(sum=lambda v: 2.5 * v, max=lambda v: 1.5 * v, mean=lambda v: 1.25 * v)
    monkeypatch.setattr(bench, "conv_peak_gflops", lambda device: 100.0)
    monkeypatch.setattr(bench, "generation_speed", lambda run, cfg, device: 50.0)
    monkeypatch.setattr(bench, "timed", lambda fn, device, *a, **k: fn() or 2.0)  # every timing: 2 s
    batches = []
    monkeypatch.setattr(bench, "train_step", lambda run, cfg, data, idx, f=bench.train_step: batches.append(len(idx))
                        or f(run, cfg, data, idx))
    args = ["--preset", "smoke", "--batch-size", "8", "--iters", "4", "--warmup", "0", "--json", "--device", "cpu"]
    results = {}
    for processes in (1, 2):
        monkeypatch.setattr(distributed, "setup_device",
                            lambda cfg, f=distributed.setup_device, n=processes: (0, n, f(cfg)[2]))
        monkeypatch.setattr(bench, "reduce_over_processes",
                            lambda value, op, device, n=processes: twin[op](value) if n == 2 else value)
        assert bench.main(args) == 0
        results[processes] = json.loads(capsys.readouterr().out)
        assert set(batches) == {8 // processes}
        batches.clear()
    one, two = results[1], results[2]
    assert two["processes"] == 2 and two["batch_size"] == 8
    assert one["img_per_s"] == 4 * 8 / 2.0 and two["img_per_s"] == 4 * 8 / 3.0
    assert two["gflop_per_img"] == pytest.approx(one["gflop_per_img"], rel=1e-3)  # a few FLOPs per batch
    assert two["peak_conv_gflops"] == 250.0 and one["peak_conv_gflops"] == 100.0
    assert two["gen_img_per_s"] == 125.0 and one["gen_img_per_s"] == 50.0
    assert "x 2 processes" in bench.report(two) and "x 2 processes" not in bench.report(one)


@pytest.mark.parametrize("flags", [["--against", "HEAD"], ["--check-tiny"], ["--check-node"]])
def test_bench_under_torchrun_refuses_the_flags_that_start_their_own_processes(capsys, monkeypatch, flags):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert_user_error(capsys, bench.main(flags), f"{flags[0]} starts processes of its own", "without torchrun")


def test_op_times_add_up_to_the_model_flops_and_list_the_slowest_first(capsys):
    assert bench.main(["--preset", "smoke", "--batch-size", "4", "--iters", "4", "--warmup", "1", "--json",
                       "--device", "cpu", "--winograd", "off", "--op-times", "100000"]) == 0
    r = json.loads(capsys.readouterr().out)
    rows, by_name = r["ops_by_shape"], r["ops_by_name"]
    assert [x["ms"] for x in rows] == sorted((x["ms"] for x in rows), reverse=True)
    assert sum(x["ms"] for x in rows) == pytest.approx(r["op_ms_per_iter"]) and r["iter_ms"] > 0
    # an iteration's FLOPs, op by op, are the model FLOPs bench counts per image times the batch (other
    # iterations of the same cycle: a few FLOPs differ)
    gflop_per_iter = sum(x["gflops"] * x["ms"] / 1000 for x in rows if x["gflops"])
    assert gflop_per_iter == pytest.approx(r["gflop_per_img"] * 4, rel=1e-3)
    assert sum((x["gflops"] or 0) * x["ms"] / 1000 for x in by_name) == pytest.approx(gflop_per_iter, rel=1e-6)
    for op in by_name:
        assert op["ms"] == pytest.approx(sum(x["ms"] for x in rows if x["op"] == op["op"]))
        assert op["calls"] == pytest.approx(sum(x["calls"] for x in rows if x["op"] == op["op"]))
    names = {x["op"]: x for x in by_name}
    assert names["convolution"]["gflops"] > 0 and names["mul"]["gflops"] is None
    assert names["convolution_backward"]["calls"] > names["convolution"]["calls"] / 2  # G's and D's backward
    text = bench.report(dict(r, ops_by_name=by_name[:2], ops_by_shape=rows[:3]))
    by_op_text, by_shape_text = text.split("operations, each timed")[1].split("by operation and input shapes")
    assert by_op_text.count("%") == 2 and by_shape_text.count("%") == 3


@pytest.mark.parametrize("flags,message", [(["--op-times", "0"], "--op-times must be >= 1, got 0"),
                                           (["--op-times", "3", "--compile"], "leave out --compile"),
                                           (["--op-times", "3", "--against", "HEAD"], "--against"),
                                           (["--op-times", "3", "torchrun"], "without torchrun")])
def test_op_times_refuses_what_it_cannot_time(capsys, monkeypatch, flags, message):
    if "torchrun" in flags:
        monkeypatch.setenv("WORLD_SIZE", "2")
        flags = flags[:-1]
    assert_user_error(capsys, bench.main(["--preset", "smoke", "--device", "cpu", *flags]), message)


def test_bench_bad_iters(capsys):
    assert_user_error(capsys, bench.main(["--preset", "smoke", "--iters", "0"]), "--iters")


def test_node_check_needs_a_gpu(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert_user_error(capsys, bench.main(["--check-node"]), "--check-node needs a CUDA GPU", "--check-tiny")


def test_node_check_tiny_benches_trains_evaluates_and_samples(data, tmp_path, capsys, monkeypatch):
    """The whole check at its tiny size on the CPU: train.py, evaluate.py and generate_images.py run
    as programs; the summary comes from their outputs (stats.jsonl, evaluation.json, grid.png)."""
    monkeypatch.setattr(bench, "conv_peak_gflops", lambda device: 100.0)  # the peak's big convolution is slow here
    out = tmp_path / "check"
    assert bench.main(["--check-tiny", "--data-root", str(data), "--out-dir", str(out), "--json"]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["bench"]["eager"]["img_per_s"] > 0 and s["bench"]["eager"]["resolution"] == 32
    assert s["kimg"] > 0 and s["img_per_s"] > 0 and s["sec_per_kimg"] == pytest.approx(1000 / s["img_per_s"])
    assert s["evaluation"]["swd"] > 0 and 0 <= s["evaluation"]["recall"] <= 1
    assert (out / "samples" / "grid.png").is_file() and s["grid"] == str(out / "samples" / "grid.png")
    assert json.loads((out / "summary.json").read_text())["kimg"] == s["kimg"]
    assert s["resolution"] == 32 and list(s["swd_levels"]) == ["32", "16"]  # every pyramid level, the largest first
    report = bench.node_report(s)
    assert "node check on" in report and "grid (32x32)" in report and f"32: {s['swd_levels']['32']:.1f}" in report


def test_node_check_names_a_failed_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "bench", lambda cfg, iters, warmup: {})
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)  # as in a fresh shell: stdout to a file is buffered
    code = bench.main(["--check-tiny", "--data-root", str(tmp_path / "missing"), "--out-dir", str(tmp_path / "c")])
    assert_user_error(capsys, code, "the training of the node check failed (exit 2)", "missing", "train.log")


def git_head_file(name):
    done = subprocess.run(["git", "-C", str(Path(bench.__file__).parent), "show", f"HEAD:{name}"], capture_output=True)
    if done.returncode != 0:
        pytest.skip("not a git checkout")
    return done.stdout


def test_against_alternates_the_two_codes_and_reports_the_ratio_of_their_means(capsys, monkeypatch):
    monkeypatch.setattr(bench, "export_revision", lambda rev, folder: (Path(folder) / "bench.py").write_text(rev))
    calls = []

    def fake_bench(tree, args, name):  # this tree runs at 10 img/s, the revision at 8
        calls.append((name, args))
        if name == "HEAD":
            assert (Path(tree) / "bench.py").read_text() == "HEAD"  # the exported revision's
        else:
            assert Path(tree) == Path(bench.__file__).parent
        return dict(device="cpu", resolution=32, batch_size=4, iters=4, fraction_of_peak=0.3, gflop_per_img=0.1,
                    img_per_s=10.0 if name == "this tree" else 8.0)

    monkeypatch.setattr(bench, "bench_process", fake_bench)
    assert bench.main(["--preset", "smoke", "--against", "HEAD", "--iters", "4", "--rounds=3", "--json"]) == 0
    c = json.loads(capsys.readouterr().out)
    assert [name for name, _ in calls] == ["this tree", "HEAD", "HEAD", "this tree", "this tree", "HEAD"]
    assert all(args == ["--preset", "smoke", "--iters", "4"] for _, args in calls)
    assert len(c["this"]) == len(c["previous"]) == 3 and c["ratio"] == pytest.approx(1.25)
    assert bench.main(["--preset", "smoke", "--against=HEAD", "--rounds", "1"]) == 0
    assert "ratio of the means: 1.250x" in capsys.readouterr().out
    calls.clear()  # the abbreviations argparse takes are not handed on either (a child would compare again)
    assert bench.main(["--preset", "smoke", "--agai", "HEAD", "--roun=1", "--iters", "4"]) == 0
    assert [args for _, args in calls] == [["--preset", "smoke", "--iters", "4"]] * 2


@pytest.mark.parametrize("old_python", [False, True])  # tarfile's extraction filters came with Python 3.11.4
def test_against_exports_the_committed_files(tmp_path, monkeypatch, old_python):
    if old_python:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    committed = git_head_file("bench.py")
    bench.export_revision("HEAD", tmp_path)
    assert (tmp_path / "bench.py").read_bytes() == committed
    assert (tmp_path / "tests" / "test_bench.py").read_bytes() == git_head_file("tests/test_bench.py")


def test_against_a_revision_git_does_not_know_names_it(capsys):
    git_head_file("bench.py")
    assert_user_error(capsys, bench.main(["--preset", "smoke", "--against", "no-such-revision"]),
                      "--against no-such-revision")
    assert_user_error(capsys, bench.main(["--preset", "smoke", "--against=--output=x.tar"]), "--against", "'--output")


def test_against_bad_rounds_and_a_failed_bench_are_one_line(capsys, tmp_path):
    assert_user_error(capsys, bench.main(["--preset", "smoke", "--rounds", "2"]), "--rounds needs --against")
    assert_user_error(capsys, bench.main(["--preset", "smoke", "--against", "HEAD", "--rounds", "0"]), "--rounds")
    assert_user_error(capsys, bench.main(["--check-tiny", "--against", "HEAD"]), "--against", "--check-tiny")
    (tmp_path / "bench.py").write_text("import sys\nsys.exit('error: --iters is not a flag here')\n")
    with pytest.raises(UserError, match="bench.py of OLD failed .exit 1.: error: --iters is not a flag here"):
        bench.bench_process(tmp_path, ["--iters", "4"], "OLD")


@pytest.mark.parametrize("name,kind", [("../outside.py", tarfile.REGTYPE), ("link.py", tarfile.SYMTYPE)])
def test_against_takes_only_plain_files_inside_the_folder(tmp_path, monkeypatch, name, kind):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        member = tarfile.TarInfo(name)
        member.type, member.linkname = kind, "/etc/passwd" if kind == tarfile.SYMTYPE else ""
        archive.addfile(member, io.BytesIO(b""))
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: SimpleNamespace(returncode=0,
                                                                                 stdout=buffer.getvalue()))
    with pytest.raises(UserError, match=f"--against HEAD: the revision holds '{re.escape(name)}'"):
        bench.export_revision("HEAD", tmp_path / "tree")
    assert not (tmp_path / "tree").exists() and not (tmp_path / "outside.py").exists()
