"""Measure the speed of training and generation on this machine, on synthetic data.

    python bench.py --preset demo                         # the demo model
    python bench.py --resolution 64 --channel-base 16384 --channel-max 256 --batch-size 16 --mapping-layers 8
    python bench.py --preset adni256 --batch-size 32 --json

Times full training iterations (D step, G step, lazy regularisation at its interval, EMA) after a
warm-up, exactly as train.py runs them, and generation with the EMA generator at batch 64. It
also times one large 3x3 convolution, the machine's practical compute peak, and reports the
training step's FLOP/s (counted with torch.utils.flop_counter) as a fraction of it; on the CPU also
the share of the step spent in convolution kernels, and the fraction the step would reach if nothing
else took time (its FLOP/s over the convolutions' time alone). Takes the
same preset and setting flags as train.py, plus --iters, --warmup and --json.

    python bench.py --preset demo256 --op-times 20      # where a step's time goes

--op-times N then runs --iters more iterations with every operation timed on its own (Python and autograd
between the operations are not in it) and lists the N slowest: by operation, and by operation and the shapes
of its inputs, each with its share and, for convolutions and matrix products, its GFLOP/s.

    python bench.py --preset demo256 --against HEAD~3   # this tree against an earlier revision

--against REV benches the project's files at git revision REV beside this tree, each in its own
process, alternating --rounds times, and reports both and the ratio of their means: a shared machine's
speed moves from run to run, and alternation lets it move both alike.

    torchrun --standalone --nproc_per_node=4 bench.py --preset auto256   # a node's 4 GPUs together

Under torchrun the processes split the batch as train.py's do, and the figures are theirs together:
images per second of the global batch, each process's peak timed at the same moment and added up."""
import deps  # noqa: F401  (first: stops with one line when this Python lacks a package)

# isort: split
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

import constants
from dataset import cache_on_device
from demo_data import ensure_demo_dataset
from distributed import (
    describe_device,
    joined,
    launched_processes,
    peak_memory_mb,
    reduce_over_processes,
    resolve_device,
    seed_everything,
    wait_for_all,
)
from ops import WINOGRAD, conv_clock, use_winograd
from settings import UserError, command, parse_settings, resolve_settings, writable_folder
from training import autocast, build_run, reg_intervals, train_step
from utils import read_jsonl, save_json

B = constants.BENCH
ITERS, WARMUP, GENERATION_BATCH, PEAK_CONV, ROUNDS = (B["iters"], B["warmup"], B["generation_batch"],
                                                     B["peak_conv"], B["rounds"])
NODE = constants.NODE_CHECK
NODE_FIGURES = ("swd", "ms_ssim_fake", "ms_ssim_real", "precision", "recall", "copy_rate")  # in the summary
EXTRA_FLAGS = [
    (("--preset",), dict(choices=sorted(constants.PRESETS), help="named set of settings from constants.PRESETS")),
    (("--iters",), dict(type=int, metavar="N", help=f"timed training iterations (default: {ITERS})")),
    (("--warmup",), dict(type=int, metavar="N", help=f"untimed iterations first (default: {WARMUP})")),
    (("--json",), dict(action="store_true", help="print the results as one JSON object on stdout")),
    (("--op-times",), dict(type=int, metavar="N", help="also time every operation of --iters more iterations on "
                                                       "its own and list the N slowest, by operation and by input "
                                                       "shapes, with their GFLOP/s (one process, not compiled)")),
    (("--against",), dict(metavar="REV", help="also bench this project at git revision REV, each in its own "
                                              "process, the two alternating; reports both and their ratio")),
    (("--rounds",), dict(type=int, metavar="N", help=f"--against: alternations of the two (default: {ROUNDS})")),
    (("--check-node",), dict(action="store_true",
                             help=f"the GPU node check (sized for 10 minutes): bench.py at {NODE['bench_preset']} "
                                  f"with and without --compile, {NODE['train_seconds']} s of {NODE['train_preset']} "
                                  "training on the demo data, an evaluation and a sample grid; one summary")),
    (("--check-tiny",), dict(action="store_true",
                             help="--check-node shrunk to a 32x32 model and seconds of training, on any device "
                                  "(a check of the check itself)")),
]


def synthetic_data(cfg, n):
    """Random uint8 slices shaped like the real data (1 channel, or 3 with IMAGE_MODE RGB), two classes."""
    channels = 3 if cfg.image_mode == "RGB" else 1
    g = torch.Generator().manual_seed(cfg.seed)
    images = torch.randint(0, 256, (n, channels, cfg.resolution, cfg.resolution), dtype=torch.uint8, generator=g)
    return SimpleNamespace(images=images, labels=torch.arange(n) % 2, class_names=["AD", "NC"], channels=channels)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats=1, best=False):
    """Seconds per call of fn(): the mean over `repeats` calls, or with `best` the fastest call (for a
    peak that other work on the machine only ever lowers). Callers warm up first."""
    times = []
    for _ in range(repeats if best else 1):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(1 if best else repeats):
            fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times) if best else times[0] / repeats


def conv_peak_gflops(device):
    """FLOP/s of one large 3x3 convolution (forward, float32), the fastest of several: the practical peak."""
    p = PEAK_CONV
    batch = p["batch"] * (4 if device.type == "cuda" else 1)
    x = torch.randn(batch, p["channels"], p["size"], p["size"], device=device)
    w = torch.randn(p["channels"], p["channels"], 3, 3, device=device)
    flops = 2 * batch * p["channels"] ** 2 * 9 * p["size"] ** 2
    conv = lambda: F.conv2d(x, w, padding=1)  # noqa: E731
    conv()  # warm-up
    return flops / timed(conv, device, 5 if device.type == "cpu" else 50, best=True) / 1e9


def op_flops(func, args, kwargs, out):
    """FLOPs of one dispatched operation by the formulas of torch.utils.flop_counter (matrix products and
    convolutions, forward and backward); 0 for the rest."""
    if func._overloadpacket is torch.ops.mkldnn._convolution_pointwise:  # a convolution, its bias and activation
        x, weight, bias, padding, stride, dilation, groups = args[:7]
        func, kwargs = torch.ops.aten.convolution.default, {}
        args = (x, weight, bias, stride, padding, dilation, False, [0, 0], groups)
    formula = flop_registry.get(func._overloadpacket)
    return formula(*args, **kwargs, out_val=out) if formula is not None else 0


class FlopCount(TorchDispatchMode):
    """Counts the FLOPs of every operation run inside it (op_flops); without flop_counter's per-module
    tracking, which fails inside torch.no_grad."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.total += op_flops(func, args, kwargs, out)
        return out


class OpTimes(TorchDispatchMode):
    """Times every operation run inside it, on its own, by operation and the shapes of its first two
    tensor arguments (--op-times): rows[(name, shapes)] = [seconds, calls, FLOPs]."""

    def __init__(self, device):
        super().__init__()
        self.device, self.rows = device, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        synchronize(self.device)
        start = time.perf_counter()
        out = func(*args, **kwargs)
        synchronize(self.device)
        seconds = time.perf_counter() - start
        shapes = tuple(tuple(a.shape) for a in args[:2] if isinstance(a, torch.Tensor))
        name = str(func._overloadpacket).removeprefix("aten.")
        row = self.rows.setdefault((name, shapes), [0.0, 0, 0])
        row[0], row[1], row[2] = row[0] + seconds, row[1] + 1, row[2] + op_flops(func, args, kwargs, out)
        return out


def op_times(run, cfg, data, device, iters):
    """`iters` more training iterations with every operation timed (OpTimes), as rows per iteration, the
    slowest first: op, shapes, ms, calls and GFLOP/s (None for operations that count no FLOPs)."""
    with OpTimes(device) as clock:
        iterations(run, cfg, data, iters)
    rows = [dict(op=name, shapes=[list(s) for s in shapes], ms=1000 * t / iters, calls=n / iters,
                 gflops=f / t / 1e9 if f and t else None) for (name, shapes), (t, n, f) in clock.rows.items()]
    return sorted(rows, key=lambda r: -r["ms"])


def iterations(run, cfg, data, count, processes=1):
    """Run `count` training iterations on seeded random batches; under torchrun each process takes its
    share of the batch, as in train.py."""
    for _ in range(count):
        idx = torch.randint(0, len(data.images), (cfg.batch_size // processes,))
        train_step(run, cfg, data, idx)
        run.step, run.nimg = run.step + 1, run.nimg + cfg.batch_size


def cycle_length(cfg):
    """Iterations after which every lazy penalty has run equally often: their least common multiple."""
    return math.lcm(*[r for r in reg_intervals(cfg).values() if r] or [1])


def training_flops(run, cfg, data, device, processes=1):
    """Model FLOPs per image of a training iteration, with the penalties amortised over their cycle. They
    are counted as direct convolutions: Winograd's algorithm multiplies less for the same model."""
    cycle = cycle_length(cfg)
    use_winograd("off", device)
    with FlopCount() as counter:
        iterations(run, cfg, data, cycle, processes)
    use_winograd(cfg.winograd, device)
    return counter.total / (cycle * cfg.batch_size // processes)


def summed_over_processes(measure, device):
    """measure() of every process, all measuring at the same moment, added up (a conv peak, a generation
    speed: the processes' together); the one figure in a single process."""
    wait_for_all()
    return reduce_over_processes(measure(), "sum", device)


def generation_speed(run, cfg, device):
    """Images per second of the EMA generator at batch 64 (no gradients, constant noise; bf16 with --amp)."""
    z = torch.randn(GENERATION_BATCH, cfg.z_dim, device=device)
    labels = torch.arange(GENERATION_BATCH, device=device) % 2 if cfg.conditional else None

    @torch.no_grad()
    def generate():
        with autocast(run):
            run.G_ema(z, labels, noise_mode="const")

    generate()  # warm-up
    return GENERATION_BATCH / timed(generate, device, 2 if device.type == "cpu" else 20)


def bench(cfg, iters, warmup, top_ops=0):
    """Time training and generation; under torchrun, of all the processes together (each rank's figures
    combined: the slowest one's time for the global batch, the peaks and generation speeds added up).
    top_ops > 0: also time every operation of `iters` more iterations and keep the `top_ops` slowest."""
    with joined(cfg) as (_, processes, device):
        return bench_on(cfg, iters, warmup, processes, device, top_ops)


def bench_on(cfg, iters, warmup, processes, device, top_ops=0):
    seed_everything(cfg.seed)
    peak = summed_over_processes(lambda: conv_peak_gflops(device), device)
    data = synthetic_data(cfg, max(4 * cfg.batch_size, 64))
    run = build_run(cfg, data, device)
    cache_on_device(data, cfg, device)
    cycle = cycle_length(cfg)
    iters = max(cycle, iters // cycle * cycle)  # whole cycles, so the penalties are amortised exactly
    iterations(run, cfg, data, warmup, processes)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    wait_for_all()
    with conv_clock(device.type == "cpu" and not cfg.compile) as clock:  # CUDA kernels run asynchronously
        seconds = timed(lambda: iterations(run, cfg, data, iters, processes), device)
    conv_share = reduce_over_processes(clock["seconds"] / seconds, "mean", device) or None
    seconds = reduce_over_processes(seconds, "max", device)
    memory = reduce_over_processes(peak_memory_mb(device), "max", device)
    # the fastest peak seen, before or after the iterations: other work only lowers it
    peak = max(peak, summed_over_processes(lambda: conv_peak_gflops(device), device))
    img_per_s = iters * cfg.batch_size / seconds
    flops = training_flops(run, cfg, data, device, processes)
    achieved = img_per_s * flops / 1e9
    ops = op_times(run, cfg, data, device, iters) if top_ops else None
    return dict(device=describe_device(device), resolution=cfg.resolution, batch_size=cfg.batch_size,
                channel_base=cfg.channel_base, channel_max=cfg.channel_max, mapping_layers=cfg.mapping_layers,
                threads=torch.get_num_threads(), processes=processes, iters=iters, amp=run.amp, compile=cfg.compile,
                winograd=WINOGRAD["enabled"],
                img_per_s=img_per_s, sec_per_kimg=1000 / img_per_s, peak_mem_mb=memory, gflop_per_img=flops / 1e9,
                achieved_gflops=achieved, peak_conv_gflops=peak, fraction_of_peak=achieved / peak,
                conv_time_share=conv_share, conv_bound_of_peak=achieved / peak / conv_share if conv_share else None,
                gen_img_per_s=summed_over_processes(lambda: generation_speed(run, cfg, device), device),
                **(op_summary(ops, top_ops, 1000 * seconds / iters) if ops else {}))


def op_summary(rows, top, ms_per_iter):
    """--op-times' figures: the `top` slowest rows, the same summed by operation, their total time per
    iteration, and the timed iterations' own time per iteration (measured without the per-op clock)."""
    by_op = {}
    for r in rows:
        t = by_op.setdefault(r["op"], dict(op=r["op"], ms=0.0, calls=0.0, gflop=0.0))
        t["ms"], t["calls"] = t["ms"] + r["ms"], t["calls"] + r["calls"]
        t["gflop"] += (r["gflops"] or 0) * r["ms"] / 1000
    for t in by_op.values():
        gflop = t.pop("gflop")
        t["gflops"] = gflop / t["ms"] * 1000 if gflop and t["ms"] else None
    return dict(op_ms_per_iter=sum(r["ms"] for r in rows), iter_ms=ms_per_iter,
                ops_by_name=sorted(by_op.values(), key=lambda r: -r["ms"])[:top], ops_by_shape=rows[:top])


def report(r):
    n = r["processes"]  # under torchrun: the processes' figures together
    return (f"{r['device']}{f' x {n} processes' if n > 1 else ''}, {r['resolution']}x{r['resolution']}, "
            f"batch {r['batch_size']}, channels {r['channel_base']}/{r['channel_max']}, "
            f"{r['mapping_layers']} mapping layers, {r['iters']} iterations"
            f"{', bf16' if r['amp'] else ''}{', compiled' if r['compile'] else ''}"
            f"{', Winograd 3x3' if r['winograd'] else ''}:\n"
            f"  training    {r['img_per_s']:.3f} img/s ({r['sec_per_kimg']:.1f} s/kimg), "
            f"peak memory {r['peak_mem_mb']:.0f} MB{' per process' if n > 1 else ''}\n"
            f"  compute     {r['gflop_per_img']:.1f} GFLOP/img -> {r['achieved_gflops']:.1f} GFLOP/s = "
            f"{100 * r['fraction_of_peak']:.0f}% of one 3x3 conv's {r['peak_conv_gflops']:.1f} GFLOP/s"
            f"{f' ({n} processes timing theirs at once, added up)' if n > 1 else ''}\n"
            + (f"  convs       {100 * r['conv_time_share']:.0f}% of the training time: with the rest taking none, "
               f"{100 * r['conv_bound_of_peak']:.0f}% of the peak\n" if r["conv_time_share"] else "") +
            f"  generation  {r['gen_img_per_s']:.1f} img/s at batch {GENERATION_BATCH}{' in each' if n > 1 else ''}"
            + (op_report(r) if "op_ms_per_iter" in r else ""))


def op_report(r):
    """--op-times' tables: time per iteration, its share of the operations' total, GFLOP/s, calls."""
    def line(x, label):
        gflops = f"{x['gflops']:8.1f}" if x["gflops"] else "       -"
        return f"\n  {x['ms']:9.2f} {100 * x['ms'] / r['op_ms_per_iter']:5.1f}% {gflops} {x['calls']:8.2f}  {label}"
    head = "\n      ms/iter share  GFLOP/s calls/it  by operation"
    return (f"\noperations, each timed on its own: {r['op_ms_per_iter']:.0f} ms per iteration in them "
            f"({r['iter_ms']:.0f} ms per iteration untimed)" + head
            + "".join(line(x, x["op"]) for x in r["ops_by_name"]) + head + " and input shapes"
            + "".join(line(x, f"{x['op']} {' '.join(str(tuple(s)) for s in x['shapes'])}") for x in r["ops_by_shape"]))


# ---------------------------------------------------------------------------------------
# --against: this tree and an earlier revision, alternating in separate processes
# ---------------------------------------------------------------------------------------
def export_revision(rev, folder):
    """The project's files at git revision `rev`, written into `folder`; the working tree is untouched."""
    root = Path(__file__).resolve().parent
    if rev.startswith("-"):
        raise UserError(f"--against takes a git revision (a commit, tag or branch), got {rev!r}")
    try:
        tar = subprocess.run(["git", "-C", str(root), "archive", "--format=tar", rev, "--"], capture_output=True)
    except FileNotFoundError:
        raise UserError("--against needs git on the PATH") from None
    if tar.returncode != 0:
        message = tar.stderr.decode(errors="replace").strip().splitlines() or ["git archive failed"]
        raise UserError(f"--against {rev}: {message[-1]}")
    with tarfile.open(fileobj=io.BytesIO(tar.stdout)) as archive:
        for member in archive.getmembers():  # git archive writes relative files and folders; nothing else is taken
            outside = member.name.startswith("/") or ".." in Path(member.name).parts
            if outside or not (member.isfile() or member.isdir()):
                raise UserError(f"--against {rev}: the revision holds {member.name!r}, which is not a plain file")
        archive.extractall(folder, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))


def bench_process(tree, args, name):
    """bench.py of the project in `tree` run with `args` in its own process; its JSON results."""
    done = subprocess.run([sys.executable, str(Path(tree) / "bench.py"), *args, "--json"], capture_output=True,
                          text=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines or not lines[-1].startswith("{"):
        why = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"bench.py of {name} failed (exit {done.returncode}): {why}")
    return json.loads(lines[-1])


def compare(args, rev, rounds):
    """`rounds` runs each of this tree's bench.py and REV's with `args`, alternating which goes first."""
    with tempfile.TemporaryDirectory(prefix="bench_against_") as folder:
        export_revision(rev, folder)
        trees = [("this tree", Path(__file__).resolve().parent), (rev, Path(folder))]
        results = {name: [] for name, _ in trees}
        for r in range(rounds):
            for name, tree in trees if r % 2 == 0 else trees[::-1]:
                results[name].append(bench_process(tree, args, name))
    mean = {name: sum(x["img_per_s"] for x in xs) / len(xs) for name, xs in results.items()}
    return dict(against=rev, rounds=rounds, this=results["this tree"], previous=results[rev],
                ratio=mean["this tree"] / mean[rev])


def compare_report(c):
    first = c["this"][0]
    lines = [f"{first['device']}, {first['resolution']}x{first['resolution']}, batch {first['batch_size']}, "
             f"{first['iters']} iterations: this tree against {c['against']}, {c['rounds']} rounds alternating"]
    for name, results in (("this tree", c["this"]), (c["against"], c["previous"])):
        speeds = ", ".join(f"{r['img_per_s']:.2f}" for r in results)
        shares = ", ".join(f"{100 * r['fraction_of_peak']:.0f}%" for r in results)
        mean = sum(r["img_per_s"] for r in results) / len(results)
        lines.append(f"  {name:>12s}  training {speeds} img/s (mean {mean:.2f}); of the conv peak {shares} "
                     f"({results[0]['gflop_per_img']:.2f} GFLOP/img)")
    lines.append(f"  ratio of the means: {c['ratio']:.3f}x")
    return "\n".join(lines)


def without_flags(argv, flags):
    """argv without the given value-taking flags and their values: `--flag V`, `--flag=V`, and the abbreviations
    argparse took for them (else a child bench would compare again)."""
    def named(arg):
        name = arg.split("=", 1)[0]
        return len(name) > 2 and any(flag.startswith(name) for flag in flags)

    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif named(a):
            skip = "=" not in a
        else:
            out.append(a)
    return out


# ---------------------------------------------------------------------------------------
# The node check: bench, a short training, an evaluation (train.py, evaluate.py and
# generate_images.py run as programs, each in its own process)
# ---------------------------------------------------------------------------------------
def run_script(script, args, log, deadline=None):
    """Run `python script args` with its output in `log`; with `deadline` (seconds), SIGTERM it then
    (train.py then saves a checkpoint and stops). Returns the exit status."""
    command = [sys.executable, str(Path(__file__).with_name(script)), *map(str, args)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the log in the order it was written: its last line is the error
    with open(log, "w") as f:
        process = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env)
        try:
            return process.wait(timeout=deadline)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)
            return process.wait()
        finally:
            if process.poll() is None:
                process.kill()


def last_line(log):
    lines = [line for line in Path(log).read_text(errors="replace").replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def training_speed(stats):
    """(kimg reached, s/kimg, img/s, peak memory in MB) from a run's stats.jsonl."""
    ticks = [t for t in read_jsonl(stats) if t.get("img_per_s")]
    if not ticks:
        return 0.0, math.nan, math.nan, math.nan
    seconds = sum((t["nimg"] - before) / t["img_per_s"] for before, t in zip([0] + [t["nimg"] for t in ticks], ticks))
    nimg = ticks[-1]["nimg"]
    return nimg / 1000, seconds / (nimg / 1000), nimg / seconds, max(t["mem_mb"] for t in ticks)


def check_node(given, tiny):
    """Bench, train, evaluate and sample on this machine; returns the summary (also in summary.json)."""
    check = constants.NODE_CHECK_TINY if tiny else NODE
    device = resolve_device(given.get("DEVICE", "auto"))
    if device.type != "cuda" and not tiny:
        raise UserError("--check-node needs a CUDA GPU and this machine has none (--check-tiny runs a tiny "
                        "version of it anywhere)")
    start, out = time.perf_counter(), Path(given.get("OUT_DIR", check["out_dir"]))
    data_root = given.get("DATA_ROOT", constants.DEMO_ROOT)
    if Path(data_root) == Path(constants.DEMO_ROOT):
        ensure_demo_dataset(constants.DEMO_ROOT, atrophy=constants.DEMO_ATROPHY)
    writable_folder(out, "--out-dir")
    out.mkdir(parents=True, exist_ok=True)
    benches = {}
    for compiled in check["compile"]:
        cfg = resolve_settings(dict(given, COMPILE=compiled), "", check["bench_preset"])
        benches["compile" if compiled else "eager"] = bench(cfg, check["iters"], check["warmup"])
    run, device_flag = out / "run", ["--device", device.type]
    train_args = ["--preset", check["train_preset"], "--data-root", data_root, "--out-dir", run, "--overwrite",
                  "--kimg", 1e6, "--eval-every", 0, "--checkpoint-every", 10**6, *device_flag]
    status = run_script("train.py", train_args, out / "train.log", deadline=check["train_seconds"])
    if status not in (0, 128 + signal.SIGTERM) or not list((run / "Models").glob("checkpoint_*.pt")):
        raise UserError(f"the training of the node check failed (exit {status}): {last_line(out / 'train.log')} "
                        f"(all of it in {out / 'train.log'})")
    evaluation = out / "evaluation.json"
    for script, args, log in (("evaluate.py", ["--checkpoint", run / "Models", "--data-root", data_root, "--n",
                                               check["eval_n"], "--out", evaluation, *device_flag], "evaluate.log"),
                              ("generate_images.py", ["--checkpoint", run / "Models", "--out-dir", out / "samples",
                                                      *device_flag], "generate.log")):
        if run_script(script, args, out / log) != 0:
            raise UserError(f"{script} in the node check failed: {last_line(out / log)} (all of it in {out / log})")
    kimg, sec_per_kimg, img_per_s, memory = training_speed(run / "stats.jsonl")
    figures = json.loads(evaluation.read_text())
    levels = {k[4:]: v for k, v in figures.items() if re.fullmatch(r"swd_\d+", k)}  # "256": SWD at 256x256, ...
    summary = dict(device=describe_device(device), bench=benches, train_preset=check["train_preset"], data=data_root,
                   train_seconds=check["train_seconds"], kimg=kimg, sec_per_kimg=sec_per_kimg, img_per_s=img_per_s,
                   train_peak_mem_mb=memory, evaluation={k: figures.get(k) for k in NODE_FIGURES},
                   swd_levels=levels, resolution=max(map(int, levels), default=None),
                   grid=str(out / "samples" / "grid.png"), total_seconds=time.perf_counter() - start)
    save_json(summary, out / "summary.json")
    return summary


def node_report(s):
    lines = [f"node check on {s['device']} ({s['total_seconds'] / 60:.1f} min in all)"]
    for name, r in s["bench"].items():
        lines.append(f"  bench {r['resolution']}x{r['resolution']} {name:7s}  {r['img_per_s']:8.1f} img/s "
                     f"({r['sec_per_kimg']:.2f} s/kimg), peak memory {r['peak_mem_mb']:,.0f} MB, "
                     f"generation {r['gen_img_per_s']:.0f} img/s")
    lines.append(f"  training {s['train_preset']} on {s['data']} for {s['train_seconds']} s: {s['kimg']:.1f} kimg, "
                 f"{s['sec_per_kimg']:.2f} s/kimg, {s['img_per_s']:.1f} img/s, peak memory "
                 f"{s['train_peak_mem_mb']:,.0f} MB")
    e = s["evaluation"]
    lines.append(f"  evaluation: SWD {e['swd']:.1f}, MS-SSIM {e['ms_ssim_fake']:.3f} (real {e['ms_ssim_real']:.3f}), "
                 f"precision {e['precision']:.3f}, recall {e['recall']:.3f}, copy_rate {e['copy_rate']:.3f}")
    levels = ", ".join(f"{res}: {v:.1f}" for res, v in s["swd_levels"].items())
    lines.append(f"  SWD per pyramid level (resolution: SWD): {levels}")
    lines.append(f"  grid ({s['resolution']}x{s['resolution']}): {s['grid']}")
    return "\n".join(lines)


def own_processes(opts):
    """The given flags that make bench.py start processes of its own."""
    return [f for f in ("against", "check_node", "check_tiny") if getattr(opts, f, None) not in (None, False)]


def checked_op_times(opts, cfg):
    """--op-times' N (0 without it), refused where the operations cannot be timed one by one."""
    top = getattr(opts, "op_times", None)
    if top is None:
        return 0
    if top < 1:
        raise UserError(f"--op-times must be >= 1, got {top}")
    if cfg.compile:
        raise UserError("--op-times times the operations of eager training: leave out --compile")
    if launched_processes() > 1:
        raise UserError("--op-times times one process: run bench.py without torchrun")
    return top


@command
def main(argv=None):
    given, opts = parse_settings(argv, "", __doc__, EXTRA_FLAGS)
    if getattr(opts, "against", None) is not None and (getattr(opts, "check_node", False)
                                                       or getattr(opts, "check_tiny", False)):
        raise UserError("--against benches training; it does not combine with --check-node or --check-tiny")
    own = own_processes(opts)
    if getattr(opts, "op_times", None) is not None and own:
        raise UserError(f"--op-times times this tree's training in this process; it does not combine with "
                        f"--{own[0].replace('_', '-')}")
    if own and launched_processes() > 1:
        raise UserError(f"--{own[0].replace('_', '-')} starts processes of its own: run bench.py without torchrun")
    if getattr(opts, "check_node", False) or getattr(opts, "check_tiny", False):
        summary = check_node(given, getattr(opts, "check_tiny", False))
        print(json.dumps(summary) if getattr(opts, "json", False) else node_report(summary))
        return 0
    iters, warmup = getattr(opts, "iters", ITERS), getattr(opts, "warmup", WARMUP)
    if iters < 1 or warmup < 0:
        raise UserError(f"--iters must be >= 1 and --warmup >= 0, got {iters} and {warmup}")
    cfg = resolve_settings(given, "", getattr(opts, "preset", None))
    rev, rounds = getattr(opts, "against", None), getattr(opts, "rounds", None)
    if rounds is not None and (rev is None or rounds < 1):
        raise UserError(f"--rounds needs --against and must be >= 1, got {rounds}")
    if rev is not None:
        args = without_flags(sys.argv[1:] if argv is None else list(map(str, argv)), ("--against", "--rounds"))
        c = compare([a for a in args if a != "--json"], rev, rounds or ROUNDS)
        print(json.dumps(c) if getattr(opts, "json", False) else compare_report(c))
        return 0
    results = bench(cfg, iters, warmup, checked_op_times(opts, cfg))
    print(json.dumps(results) if getattr(opts, "json", False) else report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
