"""Several processes: torchrun with 2 CPU processes on Gloo, resume across process counts, and the
collective helpers (which must do nothing in a single process)."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from conftest import REPO_ROOT, smoke

from checkpoints import load_checkpoint
from distributed import (
    all_reduce_mean,
    any_process,
    distributed,
    reduce_over_processes,
    same_on_every_process,
    wait_for_all,
)


def torchrun(*args, nproc=2, script="train.py"):
    """Run `torchrun --standalone --nproc_per_node=nproc script args` from the repo root."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           script, *args, "--device", "cpu"]  # Gloo, also where there are GPUs
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collectives(rank, port, results):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        a, b = torch.full([3], float(rank + 1)), torch.full([2, 2], 10.0 * rank)
        all_reduce_mean([a, b])
        same = torch.full([4], 1.0 + rank)  # differs between the processes
        results[rank] = dict(a=a.tolist(), b=b.flatten().tolist(), stop=any_process(rank == 1, torch.device("cpu")),
                             no_stop=any_process(False, torch.device("cpu")),
                             agree=same_on_every_process([a, b]), disagree=same_on_every_process([same]),
                             reduced=[reduce_over_processes(rank + 1, op, torch.device("cpu"))
                                      for op in ("sum", "max", "mean")])
    finally:
        torch.distributed.destroy_process_group()


def test_collectives_across_two_processes():
    results = mp.Manager().dict()
    mp.spawn(_collectives, args=(free_port(), results), nprocs=2)
    for rank in (0, 1):
        r = results[rank]
        assert r["a"] == [1.5] * 3 and r["b"] == [5.0] * 4  # the mean over the processes, in every process
        assert r["stop"] is True and r["no_stop"] is False  # a stop seen by rank 1 stops rank 0 too
        assert r["agree"] is True and r["disagree"] is False
        assert r["reduced"] == [3.0, 2.0, 1.5]  # 1 and 2 added, the larger, their mean


def test_collectives_do_nothing_in_one_process():
    assert not distributed()
    t = torch.tensor([1.0, 2.0])
    all_reduce_mean([t])
    assert t.tolist() == [1.0, 2.0]
    assert any_process(True, torch.device("cpu")) is True and any_process(False, torch.device("cpu")) is False
    assert same_on_every_process([t])
    assert reduce_over_processes(2.5, "sum", torch.device("cpu")) == 2.5 and wait_for_all() is None


@pytest.fixture(scope="module")
def two_process_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    result = torchrun(*smoke(data, out, "--max-steps", "8", "--eval-every", "0"))
    return out, result


def test_torchrun_two_processes_train_and_write_once(two_process_run):
    out, result = two_process_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 processes" in result.stdout
    assert result.stdout.count("done: 8 iterations, 64 images") == 1  # only rank 0 speaks
    state, _ = load_checkpoint(out / "Models")
    assert state["step"] == 8 and state["nimg"] == 64  # the global batch of 8 is split 4 + 4
    assert state["epoch"] == 1 and state["epoch_nimg"] == 2 * 8  # 6 iterations per epoch over 48 images
    assert len(state["history"]["loss_gen"]) == 8
    assert (out / "saved_examples" / "32x32" / "step_00000008.png").exists()


@pytest.mark.determinism
def test_resume_from_two_processes_into_one_and_back(two_process_run, tmp_path):
    import shutil

    import train
    out = tmp_path / "run"
    shutil.copytree(two_process_run[0], out)
    assert train.main(["--resume", "--out-dir", str(out), "--max-steps", "10", "--epochs", "4", "--device", "cpu"]) == 0
    state, _ = load_checkpoint(out / "Models")
    assert state["step"] == 10 and state["nimg"] == 80 and len(state["history"]["loss_gen"]) == 10
    result = torchrun("--resume", "--out-dir", str(out), "--max-steps", "14", "--epochs", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    state, _ = load_checkpoint(out / "Models")
    assert state["step"] == 14 and state["nimg"] == 112 and state["epoch"] == 2 and state["epoch_nimg"] == 16


def test_torchrun_batch_must_split_evenly(data, tmp_path):
    result = torchrun(*smoke(data, tmp_path, "--batch-size", "7", "--max-steps", "1"))
    assert result.returncode != 0
    assert result.stderr.count("error: --batch-size 7 does not split evenly across 2 processes") == 1  # rank 0
    assert "Traceback (most recent call last):\n  File \"" + str(REPO_ROOT) not in result.stderr


def test_torchrun_bench_reports_the_processes_together():
    result = torchrun("--preset", "smoke", "--iters", "2", "--warmup", "1", "--json", script="bench.py")
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1  # only rank 0 speaks
    r = json.loads(reports[0])
    assert r["processes"] == 2 and r["threads"] == 1 and r["batch_size"] == 16  # the global batch, 8 + 8
    assert r["img_per_s"] > 0 and r["peak_conv_gflops"] > 0 and r["gen_img_per_s"] > 0


def test_torchrun_bench_refuses_the_flags_that_start_processes_of_their_own():
    result = torchrun("--against", "HEAD", script="bench.py")
    assert result.returncode != 0  # torchrun reports the failed processes with a traceback of its own
    assert "error: --against starts processes of its own: run bench.py without torchrun" in result.stderr
