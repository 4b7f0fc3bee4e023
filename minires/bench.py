"""``python -m minires bench``: how fast is one training step, where does the time go,
and how does it compare with PyTorch on the same machine?

One *training step* is what the training loop does per batch::

    logits = model(x); loss = loss_fn(logits, y)     # forward, loss
    opt.zero_grad(); model.backward(loss_fn.backward(), input_grad=False)  # zero_grad, backward
    opt.step()                                       # SGD, momentum 0.9, weight decay 5e-4

Neither library computes the gradient of the images (minires:
``input_grad=False``; PyTorch: the input does not require grad).

Every measurement runs in a fresh Python process (a *worker*: this same
command with the hidden ``--worker`` option), for two reasons:

* the peak resident memory (``ru_maxrss``) of a fresh process is the peak of
  one model's training step, not of whatever ran before it;
* NumPy's BLAS and PyTorch each keep a pool of threads; in one process on a
  small machine they compete for the cores and both get slower. With
  ``--compare torch`` the workers alternate (minires, torch, minires, torch...),
  so a slow moment of the machine hits both sides alike.

A worker warms up (the first steps allocate buffers and fault pages in), then
times ``--repeat`` steps; the reported step time is the median over all timed
steps of all rounds. The first minires worker also times every leaf layer's
forward and backward (by wrapping them as instance attributes, as
``minires.models.summary`` does) and checks that every activation and gradient
is float32 (no silent float64 upcast).

PyTorch is imported only inside the torch worker; the package does not need it.
"""
import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy

from . import ops

PHASES = ("forward", "loss", "zero_grad", "backward", "optimizer")
SGD_SETTINGS = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}


# --- helpers shared by both workers ---------------------------------------------------

def _peak_rss_mib():
    """Peak resident memory of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def _summarize(seconds):
    """Times in seconds -> {"median", "min", "all"} in milliseconds."""
    ms = [1000 * s for s in seconds]
    return {"median": statistics.median(ms), "min": min(ms), "all": ms}


def _blas_info():
    """The BLAS / OpenMP thread pools loaded in this process (threadpoolctl), or None."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    keys = ("user_api", "internal_api", "version", "num_threads", "architecture", "threading_layer")
    return [{k: pool[k] for k in keys if pool.get(k) is not None} for pool in threadpool_info()]


def _synthetic_batch(batch, input_shape, num_classes, seed=0):
    """A float32 batch of standard-normal images and random labels (NumPy arrays)."""
    rng = numpy.random.default_rng(seed)
    x = rng.standard_normal((batch, *input_shape), dtype=numpy.float32)
    y = rng.integers(0, num_classes, size=batch)
    return x, y


def _time_steps(step, warmup, repeat):
    """Run ``step()`` (which returns per-phase seconds) warmup + repeat times; keep the timed ones."""
    for _ in range(warmup):
        step()
    return [step() for _ in range(repeat)]


def _phase_report(records):
    """[(forward, loss, ...) seconds per step] -> per-phase and total summaries."""
    out = {name: _summarize([r[i] for r in records]) for i, name in enumerate(PHASES)}
    out["step"] = _summarize([sum(r) for r in records])
    return out


# --- the minires worker -----------------------------------------------------------------

def _worker_result(records, rss_before, versions):
    """What every worker reports: phase times, peak memory, BLAS and library versions."""
    return {"phases_ms": _phase_report(records), "peak_rss_mib": _peak_rss_mib(),
            "rss_before_step_mib": rss_before, "blas": _blas_info(), "versions": versions}


def _minires_worker(args):
    from . import backend, nn
    from .models import build_model
    from .optim import SGD

    xp = backend.set_backend(args.backend)
    if xp is numpy:
        def sync():
            pass
    else:
        sync = xp.cuda.Device().synchronize
    backend.manual_seed(0)
    model = build_model(args.model, in_channels=args.input[0])
    num_classes = model.fc.out_features
    loss_fn = nn.CrossEntropyLoss()
    opt = SGD(model, **SGD_SETTINGS)
    x, y = _synthetic_batch(args.batch, args.input, num_classes)
    x, y = backend.to_device(x), backend.to_device(y)
    rss_before = _peak_rss_mib()

    def step():
        t0 = time.perf_counter()
        logits = model(x)
        sync()
        t1 = time.perf_counter()
        loss_fn(logits, y)  # returns a Python float, so the loss is computed by now
        t2 = time.perf_counter()
        opt.zero_grad()
        sync()
        t3 = time.perf_counter()
        model.backward(loss_fn.backward(), input_grad=False)
        sync()
        t4 = time.perf_counter()
        opt.step()
        sync()
        t5 = time.perf_counter()
        return (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)

    result = _worker_result(_time_steps(step, args.warmup, args.repeat), rss_before,
                            {"numpy": numpy.__version__})
    if xp is not numpy:
        result["gpu_pool_mib"] = xp.get_default_memory_pool().total_bytes() / 2**20
        result["versions"]["cupy"] = xp.__version__
    if args.layers:
        result["layers"], result["float32"] = _time_layers(model, loss_fn, x, y, args.repeat, sync)
    return result


def _time_layers(model, loss_fn, x, y, repeat, sync):
    """Per leaf layer: median forward and backward time (ms) over ``repeat`` steps
    (without the optimizer step; ``step_ms`` is the median of those steps, with
    the timing overhead), and a float32 check of every activation, input gradient and parameter gradient.

    A hook (``Module.hooks``) around each leaf's forward and backward
    synchronizes, times and checks it. Time spent outside the leaves (the
    residual adds and the gradient sums of the blocks) shows up as the gap to
    the step's phases.
    """
    leaves = [(name, m) for name, m in model.named_modules() if not m.named_children()]
    seconds = {name: {"forward": [], "backward": []} for name, _ in leaves}
    shapes, not_float32 = {}, []
    checked = {"activations": 0, "gradients": 0}

    def check(what, name, a):
        checked["activations" if what == "output" else "gradients"] += 1
        if a.dtype != numpy.float32:
            not_float32.append(f"{name} {what}: {a.dtype}")

    def timed(kind):
        def hook(name, m, call, arg):
            sync()
            t0 = time.perf_counter()
            result = call(arg)
            sync()
            seconds[name][kind].append(time.perf_counter() - t0)
            if kind == "forward":
                shapes[name] = tuple(int(s) for s in result.shape[1:])
            if result is not None:  # (None: the first conv's dx, not computed)
                check("output" if kind == "forward" else "dx", name, result)
            return result
        return hook

    steps = []
    with model.hooks(forward=timed("forward"), backward=timed("backward"), modules=leaves):
        for _ in range(max(repeat, 1)):
            t0 = time.perf_counter()
            logits = model(x)
            loss_fn(logits, y)
            model.zero_grad()
            model.backward(loss_fn.backward(), input_grad=False)
            sync()
            steps.append(time.perf_counter() - t0)
        for name, g in model.named_grads().items():
            check("grad", name, g)
    rows = [{"layer": name, "type": type(m).__name__, "output_shape": shapes.get(name),
             "forward_ms": 1000 * statistics.median(seconds[name]["forward"]),
             "backward_ms": 1000 * statistics.median(seconds[name]["backward"])}
            for name, m in leaves]
    float32 = {"ok": not not_float32, "not_float32": not_float32, **checked}
    return {"rows": rows, "step_ms": 1000 * statistics.median(steps)}, float32


# --- the PyTorch worker -----------------------------------------------------------------

def _torch_cifar_resnet(depth, plain, in_channels, num_classes):
    """minires's CIFAR ResNet/plain net in PyTorch (option A shortcut: subsample and
    append zero channels), with PyTorch's default initialization."""
    import torch
    from torch import nn as tnn

    class Block(tnn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = tnn.BatchNorm2d(cout)
            self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = tnn.BatchNorm2d(cout)
            self.stride, self.extra = stride, cout - cin

        def forward(self, x):
            out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
            if plain:
                return torch.relu(out)
            shortcut = x[:, :, ::self.stride, ::self.stride]
            if self.extra:
                n, _, h, w = shortcut.shape
                shortcut = torch.cat([shortcut, shortcut.new_zeros(n, self.extra, h, w)], 1)
            return torch.relu(out + shortcut)

    n = (depth - 2) // 6
    layers = [tnn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), tnn.BatchNorm2d(16), tnn.ReLU()]
    cin = 16
    for i, width in enumerate((16, 32, 64)):
        for j in range(n):
            layers.append(Block(cin, width, 2 if i > 0 and j == 0 else 1))
            cin = width
    layers += [tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Linear(64, num_classes)]
    return tnn.Sequential(*layers)


def _torch_worker(args):
    import torch
    import torch.nn.functional as tF

    device = "cuda" if args.backend == "cupy" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--compare torch with --backend cupy needs a CUDA build of PyTorch")
    if device == "cuda":
        # cuDNN convolutions default to TF32 (10-bit mantissa) on Ampere and later;
        # CuPy's GEMMs stay full float32, so compare float32 with float32.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    torch.manual_seed(0)
    depth = int(args.model.lstrip("plainresnet"))  # "resnet56" -> 56, "plain20" -> 20
    num_classes = 10  # the CIFAR factories' default, as in the minires worker
    model = _torch_cifar_resnet(depth, args.model.startswith("plain"), args.input[0], num_classes).to(device)
    opt = torch.optim.SGD(model.parameters(), **SGD_SETTINGS)
    x, y = _synthetic_batch(args.batch, args.input, num_classes)
    x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    rss_before = _peak_rss_mib()

    def step():
        t0 = time.perf_counter()
        logits = model(x)
        sync()
        t1 = time.perf_counter()
        loss = tF.cross_entropy(logits, y)
        sync()
        t2 = time.perf_counter()
        opt.zero_grad()
        t3 = time.perf_counter()
        loss.backward()
        sync()
        t4 = time.perf_counter()
        opt.step()
        sync()
        t5 = time.perf_counter()
        return (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)

    versions = {"torch": torch.__version__}
    if device == "cuda":
        versions["cudnn"] = f"{torch.backends.cudnn.version()}, TF32 off"
    result = _worker_result(_time_steps(step, args.warmup, args.repeat), rss_before, versions)
    result["num_threads"] = torch.get_num_threads()
    if device == "cuda":  # the peak of what PyTorch's caching allocator handed out
        result["gpu_pool_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


# --- the command: run the workers, combine, print -----------------------------------------

def _run_worker(args, library, layers):
    """Run one worker process; returns its JSON result (the last line of its stdout)."""
    cmd = [sys.executable, "-m", "minires", "bench", "--worker", library,
           "--model", args.model, "--batch", str(args.batch), "--backend", args.backend,
           "--repeat", str(args.repeat), "--warmup", str(args.warmup),
           "--input", *map(str, args.input), "--kernels", ops.get_kernels()]
    if layers:
        cmd.append("--layers")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"the {library} benchmark process failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _combine(results):
    """Pool the timed steps of several workers of one library."""
    combined = {"phases_ms": {}, "rounds_median_ms": [r["phases_ms"]["step"]["median"] for r in results]}
    for phase in (*PHASES, "step"):
        combined["phases_ms"][phase] = _summarize(
            [ms / 1000 for r in results for ms in r["phases_ms"][phase]["all"]])
    for key in ("peak_rss_mib", "rss_before_step_mib", "gpu_pool_mib"):
        if key in results[0]:
            combined[key] = max(r[key] for r in results)
    for key in ("blas", "versions", "num_threads", "layers", "float32"):
        if key in results[0]:
            combined[key] = results[0][key]
    return combined


def _cpu_name():
    """The CPU model (from /proc/cpuinfo on Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _blas_line(blas):
    if blas is None:
        return "BLAS: unknown (pip install threadpoolctl to see which kernel runs)"
    pools = [f"{p.get('internal_api', '?')} {p.get('version', '')}".strip()
             + (f" kernel {p['architecture']}" if p.get("architecture") else "")
             + f", {p.get('num_threads', '?')} threads" for p in blas]
    return "BLAS: " + ("; ".join(pools) if pools else "no BLAS thread pool found")


def _round_ratio(runs, i):
    """minires / torch step medians of round i: how much the ratio itself moves between rounds."""
    return runs["minires"][i]["phases_ms"]["step"]["median"] / runs["torch"][i]["phases_ms"]["step"]["median"]


def _print_layers(layers, print_fn):
    rows, step_ms = layers["rows"], layers["step_ms"]
    print_fn("\nper layer (median over the timed steps, ms; synchronized around each layer)")
    print_fn(f"{'layer':<26} {'type':<18} {'output':<14} {'forward':>9} {'backward':>9}")
    for r in rows:
        shape = "x".join(map(str, r["output_shape"] or ()))
        print_fn(f"{r['layer']:<26} {r['type']:<18} {shape:<14} {r['forward_ms']:>9.2f} {r['backward_ms']:>9.2f}")
    by_type = {}
    for r in rows:
        t = by_type.setdefault(r["type"], [0.0, 0.0, 0])
        t[0] += r["forward_ms"]
        t[1] += r["backward_ms"]
        t[2] += 1
    print_fn(f"\nby layer type{'':<12} {'count':>6} {'forward':>9} {'backward':>9} {'share of step':>14}")
    for kind, (f, b, count) in sorted(by_type.items(), key=lambda kv: -(kv[1][0] + kv[1][1])):
        print_fn(f"{kind:<25} {count:>6} {f:>9.1f} {b:>9.1f} {100 * (f + b) / step_ms:>13.0f}%")
    inside = sum(r["forward_ms"] + r["backward_ms"] for r in rows)
    print_fn(f"{'outside leaf layers':<25} {'':>6} {'':>9} {'':>9} {100 * (1 - inside / step_ms):>13.0f}%"
             "   (residual adds, gradient sums, loss, zero_grad)")
    print_fn(f"(shares of this pass's forward + backward, {step_ms:.1f} ms median; the optimizer step is not in it)")


def run_bench(args, print_fn=print):
    """Run the benchmark described by the parsed ``args``; print it and return the result dict."""
    from .models import CIFAR_MODELS, MODELS

    if args.model not in MODELS:
        raise ValueError(f"unknown model {args.model!r}; choose one of: {', '.join(MODELS)}")
    if args.compare == "torch" and args.model not in CIFAR_MODELS:
        raise ValueError(f"--compare torch supports the CIFAR networks ({', '.join(CIFAR_MODELS)}), "
                         f"got {args.model!r}")
    if args.compare == "torch" and importlib.util.find_spec("torch") is None:
        raise RuntimeError("--compare torch needs PyTorch: pip install torch==2.13.0 (the CPU build "
                           "the tests use), or any build with CUDA for --backend cupy")
    rounds = args.rounds or (3 if args.compare else 1)
    shape = "x".join(map(str, args.input))
    coretype = os.environ.get("OPENBLAS_CORETYPE")
    print_fn(f"bench: {args.model}, batch {args.batch}, input {shape}, float32, backend {args.backend}, kernels {ops.get_kernels()}; "
             f"{args.warmup} warm-up + {args.repeat} timed steps per process, {rounds} process(es) per library"
             + (", interleaved with torch" if args.compare else ""))
    print_fn(f"machine: {_cpu_name()}, {os.cpu_count()} CPUs; "
             f"OPENBLAS_CORETYPE={coretype if coretype is not None else '(not set)'}")

    runs = {"minires": [], "torch": []}
    for i in range(rounds):
        runs["minires"].append(_run_worker(args, "minires", layers=(i == 0)))
        line = f"  round {i + 1}/{rounds}: minires {runs['minires'][-1]['phases_ms']['step']['median']:8.1f} ms"
        if args.compare:
            runs["torch"].append(_run_worker(args, "torch", layers=False))
            line += (f"   torch {runs['torch'][-1]['phases_ms']['step']['median']:8.1f} ms"
                     f"   ratio {_round_ratio(runs, -1):.2f}x")
        print_fn(line)

    result = {"model": args.model, "batch": args.batch, "input_shape": list(args.input), "backend": args.backend,
              "kernels": ops.get_kernels(),
              "warmup": args.warmup, "repeat": args.repeat, "rounds": rounds,
              "environment": {"OPENBLAS_CORETYPE": coretype, "cpu_count": os.cpu_count(),
                              "python": platform.python_version()},
              "minires": _combine(runs["minires"])}
    mine = result["minires"]
    mine["images_per_s"] = 1000 * args.batch / mine["phases_ms"]["step"]["median"]
    print_fn(f"minires {_blas_line(mine['blas'])}")
    if args.compare:
        theirs = result["torch"] = _combine(runs["torch"])
        theirs["images_per_s"] = 1000 * args.batch / theirs["phases_ms"]["step"]["median"]
        result["ratio"] = mine["phases_ms"]["step"]["median"] / theirs["phases_ms"]["step"]["median"]
        result["round_ratios"] = [_round_ratio(runs, i) for i in range(rounds)]
        result["rss_ratio"] = mine["peak_rss_mib"] / theirs["peak_rss_mib"]
        cudnn = f", cuDNN {theirs['versions']['cudnn']}" if "cudnn" in theirs["versions"] else ""
        print_fn(f"torch {theirs['versions']['torch']}{cudnn}, {theirs['num_threads']} threads; "
                 f"{_blas_line(theirs['blas'])}")

    _print_layers(mine["layers"], print_fn)

    n_steps = rounds * args.repeat
    print_fn(f"\ntraining step, median of {n_steps} timed steps (ms)")
    header = f"{'':<22} {'minires':>10}"
    if args.compare:
        header += f" {'torch':>10} {'ratio':>7}"
    print_fn(header)
    for phase in (*PHASES, "step"):
        a = mine["phases_ms"][phase]["median"]
        line = f"{phase if phase != 'step' else 'whole step':<22} {a:>10.1f}"
        if args.compare:
            b = result["torch"]["phases_ms"][phase]["median"]
            line += f" {b:>10.1f} " + (f"{a / b:>6.2f}x" if b > 0.05 else f"{'-':>7}")
        print_fn(line)
    line = f"{'images/s':<22} {mine['images_per_s']:>10.0f}"
    if args.compare:
        line += f" {result['torch']['images_per_s']:>10.0f}"
    print_fn(line)
    line = f"{'peak RSS (MiB)':<22} {mine['peak_rss_mib']:>10.0f}"
    if args.compare:
        line += f" {result['torch']['peak_rss_mib']:>10.0f} {result['rss_ratio']:>6.2f}x"
    print_fn(line + "   (whole process: libraries, model, one step)")
    if "gpu_pool_mib" in mine:  # CuPy's pool keeps what it allocated: its size is the peak
        line = f"{'GPU memory peak (MiB)':<22} {mine['gpu_pool_mib']:>10.0f}"
        if args.compare and "gpu_pool_mib" in result["torch"]:
            line += f" {result['torch']['gpu_pool_mib']:>10.0f}"
        print_fn(line)
    f32 = mine["float32"]
    verdict = "yes" if f32["ok"] else "NO: " + ", ".join(f32["not_float32"][:5])
    print_fn(f"float32 end to end: {verdict} ({f32['activations']} activations, {f32['gradients']} gradients checked)")
    if args.compare:
        spread = result["round_ratios"]
        print_fn(f"\nminires / torch: {result['ratio']:.2f}x the step time (rounds: {min(spread):.2f}x "
                 f"to {max(spread):.2f}x), {result['rss_ratio']:.2f}x the peak memory")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def add_parser(sub):
    """Register ``bench`` on the CLI's sub-parsers."""
    p = sub.add_parser("bench", help="time the training step per layer; compare with PyTorch",
                       description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--model", default="resnet20", metavar="NAME", help="model name (default resnet20)")
    p.add_argument("--batch", type=_positive_int, default=128)
    p.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    p.add_argument("--repeat", type=_positive_int, default=5, help="timed steps per process (default 5)")
    p.add_argument("--warmup", type=_non_negative_int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--rounds", type=_positive_int,
                   help="processes per library (default 3 with --compare, else 1)")
    p.add_argument("--input", type=_positive_int, nargs=3, default=[3, 32, 32], metavar=("C", "H", "W"),
                   help="input image shape (default 3 32 32)")
    p.add_argument("--compare", choices=["torch"], help="also time the same step in PyTorch")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--worker", choices=["minires", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--layers", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(run=_run)


def _run(args):
    if args.worker:
        work = _minires_worker if args.worker == "minires" else _torch_worker
        print(json.dumps(work(args)))
        return 0
    run_bench(args)
    return 0
