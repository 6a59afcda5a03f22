"""Benchmarks of the jitted train / eval / test steps (issue 6).

Usage::

    python benchmarks/bench_steps.py [--quick] [--out FILE.json]
    python benchmarks/bench_steps.py --gpu --out benchmarks/results/gpu-h100.json   # on a GPU host

What it measures (every timing is wall time after a warm-up call, each call ended
with ``block_until_ready``; median and spread over ``--runs`` calls):

* base point (default ``ModelConfig``, B=8, T=365, M=12, f32): ``model.init`` and the
  forward pass, then ``train_step`` / ``eval_step`` / ``test_step`` from
  ``han_jax.training.devices.SingleDevice().steps``: run time, samples/s, compile time (``lower`` +
  ``compile``, ahead of time), XLA's memory analysis of each executable, peak host RSS
  and device memory where the backend reports it;
* work per step from XLA's cost analysis (FLOPs of the compiled train step) and the
  achieved FLOP/s as a fraction of a matmul peak measured in the same run (f32 on
  CPU, bf16 on GPU): the roofline ratio;
* sweeps of the train step: batch size, daily window, f32 vs bf16, remat on/off,
  dense attention (``attention_block=0``) and the other daily-stack layout
  (``vmap_sources``),
  sharded jit and pmap over 1, 2, 4 host devices at a fixed global batch (each
  device count in a subprocess, because ``--xla_force_host_platform_device_count``
  must be set before JAX starts; both layouts in it), and the sharded step over 2
  processes on this machine (``jax.distributed``, one CPU device each, gloo)
  against the 1-device point;
* the cost of the shared aggregation: ``eval_step`` against a variant that stops at
  the raw task losses (model -> ``compute_losses``).

Output: a markdown table on stdout and, with ``--out``, a JSON file.
``--quick`` (CI smoke check, well under 2 minutes on 2 CPU cores) uses the tiny
test model ``ModelConfig.small(d_model=16, nhead=2)`` at T=60, M=3, few runs, one
sweep point per axis and XLA's backend optimisation level 0 (faster compiles;
its timings are not comparable with a full run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"


def _csv_ints(s):
    return tuple(int(x) for x in s.split(",") if x.strip())


def _csv(s):
    return tuple(x.strip() for x in s.split(",") if x.strip())


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, few runs: a CI smoke check")
    ap.add_argument("--gpu", action="store_true",
                    help="GPU settings: bf16 base policy, policies f32+bf16, batches up to 64, bf16 matmul peak")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--batch", type=int, default=None, help="base batch size (default 8)")
    ap.add_argument("--days", type=int, default=None, help="base daily window (default 365)")
    ap.add_argument("--months", type=int, default=None, help="months per sample (default 12)")
    ap.add_argument("--policy", default=None, help="base policy (default f32; bf16 with --gpu)")
    ap.add_argument("--runs", type=int, default=None, help="timed calls per measurement")
    ap.add_argument("--sweep-runs", type=int, default=None, help="timed calls per sweep point")
    ap.add_argument("--batches", type=_csv_ints, default=None, help="batch sweep, e.g. 1,8,32")
    ap.add_argument("--windows", type=_csv_ints, default=None, help="daily window sweep, e.g. 90,180,365")
    ap.add_argument("--policies", type=_csv, default=None, help="policy sweep, e.g. f32,bf16")
    ap.add_argument("--devices", type=_csv_ints, default=None,
                    help="device sweep (host devices), sharded jit and pmap, e.g. 1,2,4")
    ap.add_argument("--processes", type=_csv_ints, default=None,
                    help="process sweep (one CPU device each, jax.distributed), e.g. 2; 1 is the 1-device point")
    ap.add_argument("--no-impl-sweeps", "--no-remat-sweep", dest="no_impl_sweeps", action="store_true",
                    help="skip the implementation sweeps (remat, dense attention, vmapped sources)")
    ap.add_argument("--no-sweeps", action="store_true", help="base point and aggregation cost only")
    ap.add_argument("--matmul-n", type=int, default=None, help="size of the square peak matmul")
    ap.add_argument("--fast-compile", action="store_true", help=f"XLA_FLAGS {FAST_COMPILE_FLAG} (default in --quick)")
    ap.add_argument("--sweep-step", choices=("train", "eval", "test"), default=None,
                    help="the step the sweeps time (default train; eval in --quick): eval gives the evaluate "
                         "path's samples/s by batch size")
    ap.add_argument("--worker-spec", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    q, g = args.quick, args.gpu
    d = lambda v, quick, gpu, full: v if v is not None else (quick if q else (gpu if g else full))
    args.batch = d(args.batch, 8, 8, 8)
    args.days = d(args.days, 60, 365, 365)
    args.months = d(args.months, 3, 12, 12)
    args.policy = d(args.policy, "f32", "bf16", "f32")
    args.runs = d(args.runs, 3, 20, 7)
    args.sweep_runs = d(args.sweep_runs, 2, 10, 3)
    args.batches = d(args.batches, (1, 8), (1, 8, 32, 64), (1, 8, 32))
    args.windows = d(args.windows, (60,), (90, 180, 365), (90, 180, 365))
    args.policies = d(args.policies, ("f32",), ("f32", "bf16"), ("f32", "bf16"))
    args.devices = d(args.devices, (2,), (1,), (1, 2, 4))
    args.processes = d(args.processes, (), (), (2,))
    args.matmul_n = d(args.matmul_n, 1024, 8192, 2048)
    args.fast_compile = args.fast_compile or q
    # quick: the sweeps time eval_step (a train compile per point would not fit in 2 minutes)
    args.sweep_step = args.sweep_step or ("eval" if q else "train")
    args.no_impl_sweeps = args.no_impl_sweeps or q
    return args


def _set_xla_flags(args, n_devices=None):
    flags = os.environ.get("XLA_FLAGS", "")
    if args.fast_compile and FAST_COMPILE_FLAG not in flags:
        flags += " " + FAST_COMPILE_FLAG
    if n_devices is not None:
        flags += f" --xla_force_host_platform_device_count={n_devices}"
    os.environ["XLA_FLAGS"] = flags.strip()


# ---------------------------------------------------------------------------------
# Measurement helpers (jax imported lazily: XLA_FLAGS must be set first).


def peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 2**20


def device_memory():
    import jax

    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        stats = None
    if not stats:
        return None
    return {k: int(v) for k, v in stats.items() if k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")}


def timed(fn, runs: int):
    """(median, min, max, all) of ``runs`` calls of fn() (fn blocks)."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "iqr_s": (statistics.quantiles(times, n=4)[2] - statistics.quantiles(times, n=4)[0]) if runs >= 2 else 0.0,
            "runs": runs}


def matmul_peak(n: int, dtype_name: str, runs: int = 5) -> dict:
    """FLOP/s of a jitted n x n x n matmul in ``dtype_name``: the roofline's peak."""
    import jax
    import jax.numpy as jnp

    dtype = jnp.dtype(dtype_name)
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(f(a, b))
    t = timed(lambda: jax.block_until_ready(f(a, b)), runs)
    return {"n": n, "dtype": dtype_name, "best_s": t["min_s"], "flops_per_s": 2.0 * n**3 / t["min_s"]}


def cost_flops(compiled):
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    if not ca:
        return None
    f = ca.get("flops")
    return float(f) if f is not None and f >= 0 else None


def hlo_instructions(compiled):
    from han_jax.testing import hlo_counts

    try:
        return hlo_counts(compiled.as_text())
    except Exception:  # noqa: BLE001 - a backend without the text form
        return None


def memory_analysis(compiled):
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return None
    if m is None:
        return None
    out = {}
    for k in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "generated_code_size_in_bytes"):
        v = getattr(m, k, None)
        if v is not None:
            out[k] = int(v)
    return out


def release_compiled():
    """Drop every cached executable between sweep points.

    The steps and the init are cached per specification, and each point is a new
    one: a full CPU run kept every point's executables (a few GiB) and ran out of
    host memory compiling the ninth.
    """
    import gc

    import jax

    from han_jax.training import devices, steps

    devices._compiled_steps.cache_clear()
    steps._init_fn.cache_clear()
    jax.clear_caches()
    gc.collect()


def compile_aot(fn, *args):
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return compiled, {"trace_lower_s": t1 - t0, "compile_s": t2 - t1}


def step_config(model_kw: dict, policy: str, quick: bool):
    """The step specification of a benchmark point (the default preset's, or a tiny one with ``--quick``)."""
    from han_jax.config import Config, ModelConfig, StepConfig
    from han_jax.core.precision import Policy
    from han_jax.training.spec import StepSpec

    model = ModelConfig.small(d_model=16, nhead=2, **model_kw) if quick else ModelConfig(**model_kw)
    return StepSpec.of(Config(model=model, step=StepConfig(policy=Policy.from_string(policy))))


def schedule():
    from han_jax.config import OptimConfig
    from han_jax.training.schedule import Schedule

    return Schedule.of(OptimConfig(), epochs=200)


def synthetic_batch(model_config, b, t, m, seed=0):
    """The tests' random batch (inputs and targets for every task), as device arrays."""
    import jax
    import jax.numpy as jnp

    from han_jax.testing import random_batch

    inputs, targets = random_batch(model_config, b=b, t=t, m=m, seed=seed, n_real=b)
    return jax.tree_util.tree_map(jnp.asarray, (inputs, targets))


def raw_losses_fn(spec):
    """eval without the shared aggregation: model -> compute_losses -> raw task losses."""
    import jax

    from han_jax.objective import compute_losses
    from han_jax.training.steps import make_model

    model = make_model(spec)

    def f(state, inputs, targets):
        outputs = model.apply({"params": state.params}, inputs, deterministic=True)
        return compute_losses(outputs, targets, spec.objective.loss, tasks=spec.objective.tasks)

    return jax.jit(f)


def bench_point(spec, b, t, m, runs, which=("train", "eval", "test"), extras=False):
    """Compile and time the requested steps at one (specification, shape) point."""
    import jax

    from han_jax.training.devices import SingleDevice
    from han_jax.training.steps import create_train_state, make_model

    inputs, targets = synthetic_batch(spec.model, b, t, m)
    res = {"batch": b, "days": t, "months": m, "policy": spec.policy.name, "remat": spec.model.remat}
    t0 = time.perf_counter()
    state = create_train_state(jax.random.PRNGKey(0), spec, inputs, schedule())
    jax.block_until_ready(state)
    res["create_state_s"] = time.perf_counter() - t0  # includes the init compile
    res["n_params"] = int(sum(x.size for x in jax.tree_util.tree_leaves(state.params)))
    steps = SingleDevice().steps(spec, schedule())

    if extras:
        model = make_model(spec)
        fwd = jax.jit(lambda p, x: model.apply({"params": p}, x, deterministic=True))
        compiled, ct = compile_aot(fwd, state.params, inputs)
        jax.block_until_ready(compiled(state.params, inputs))
        res["forward"] = {**ct, **timed(lambda: jax.block_until_ready(compiled(state.params, inputs)), runs),
                          "flops": cost_flops(compiled)}

    executables = {}
    for name in which:
        args = (state, inputs, targets) + ((steps.schedule,) if name == "train" else ())
        compiled, ct = compile_aot(getattr(steps.compiled, name), *args)
        executables[name] = compiled
        r = {**ct, "flops": cost_flops(compiled), "memory": memory_analysis(compiled),
             "instructions": hlo_instructions(compiled)}
        if name == "train":
            holder = [state]

            def call(compiled=compiled, holder=holder):
                new_state, out = compiled(holder[0], inputs, targets, steps.schedule)  # state is donated
                jax.block_until_ready(out)
                holder[0] = new_state

            call()
            r.update(timed(call, runs))
            state = holder[0]
        else:
            call = lambda compiled=compiled, state=state: jax.block_until_ready(compiled(state, inputs, targets))
            call()
            r.update(timed(call, runs))
        r["samples_per_s"] = b / r["median_s"]
        res[name] = r

    if extras:
        raw = raw_losses_fn(spec)
        compiled, ct = compile_aot(raw, state, inputs, targets)
        call = lambda: jax.block_until_ready(compiled(state, inputs, targets))  # noqa: E731
        call()
        res["eval_raw_losses"] = {**ct, **timed(call, runs), "flops": cost_flops(compiled)}
        # Interleave the two so that drift on a shared machine hits both alike.
        ev_c = executables.get("eval") or steps.compiled.eval.lower(state, inputs, targets).compile()
        a, r_ = [], []
        for _ in range(max(runs, 5)):
            for fn, acc in ((ev_c, a), (compiled, r_)):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(state, inputs, targets))
                acc.append(time.perf_counter() - t0)
        res["aggregation_overhead"] = {
            "eval_median_s": statistics.median(a), "raw_losses_median_s": statistics.median(r_),
            "overhead_s": statistics.median(a) - statistics.median(r_),
            "overhead_frac": statistics.median(a) / statistics.median(r_) - 1.0,
        }
    res["peak_rss_mb"] = peak_rss_mb()
    res["device_memory"] = device_memory()
    return res


def devices_point(args, n_devices: int, layout: str, model_kw: dict, policy: str, b: int, t: int, m: int,
                  runs: int, step: str = "train") -> dict:
    """A step (train by default) over ``n_devices`` at global batch ``b`` in one layout of
    ``han_jax.training.devices`` ("sharded" jit over a mesh, or "pmap"), in this process (and, after
    ``start_distributed``, its peers: then the devices are every process's)."""
    import jax

    from han_jax.training.devices import make_devices
    from han_jax.training.steps import create_train_state

    spec = step_config(model_kw, policy, args.quick)
    parallel = make_devices(n_devices, layout)
    parallel.process_rows(b)
    host_inputs, host_targets = synthetic_batch(spec.model, b, t, m)
    state = parallel.put_state(create_train_state(jax.random.PRNGKey(0), spec, host_inputs, schedule()))
    inputs, targets = parallel.put_batch((host_inputs, host_targets))
    fn = getattr(parallel.steps(spec, schedule()), step)
    holder = [state]

    def call():
        if step == "train":
            new_state, out = fn(holder[0], inputs, targets)
            jax.block_until_ready(out)
            holder[0] = new_state
        else:
            jax.block_until_ready(fn(holder[0], inputs, targets))

    t0 = time.perf_counter()
    call()
    first = time.perf_counter() - t0
    call()
    r = timed(call, runs)
    r.update(step=step, layout=parallel.kind, devices=n_devices, processes=jax.process_count(), global_batch=b,
             first_call_s=first, compile_s_est=first - r["median_s"], samples_per_s=b / r["median_s"],
             peak_rss_mb=peak_rss_mb())
    return r


def _worker_env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))
    return env


def _worker_cmd(args, spec: dict) -> list:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker-spec", json.dumps(spec)]
    return cmd + (["--quick"] if args.quick else []) + (["--fast-compile"] if args.fast_compile else [])


def _worker_result(proc_stdout: str, proc_stderr: str, spec: dict):
    for line in reversed(proc_stdout.splitlines()):
        if line.startswith("WORKER_RESULT "):
            return json.loads(line[len("WORKER_RESULT "):])
    return [{**spec, "error": (proc_stderr or proc_stdout)[-2000:]}]


def run_devices_subprocess(args, n: int, spec: dict) -> list:
    """Every layout of ``spec`` over n host devices, in one fresh process (XLA reads the device count once)."""
    spec = {**spec, "host_devices": n}
    proc = subprocess.run(_worker_cmd(args, spec), capture_output=True, text=True, env=_worker_env(), cwd=REPO)
    return _worker_result(proc.stdout, proc.stderr, spec)


def run_processes(args, num_processes: int, spec: dict) -> list:
    """The sharded step over ``num_processes`` processes on this machine (one CPU device each, gloo)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [subprocess.Popen(_worker_cmd(args, {**spec, "distributed": [f"127.0.0.1:{port}", num_processes, i]}),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_worker_env(), cwd=REPO)
             for i in range(num_processes)]
    outs = [p.communicate() for p in procs]
    return _worker_result(*outs[0], spec)


def worker(args, spec: dict) -> list:
    """A benchmark subprocess: the layouts of ``spec`` over its devices (and processes)."""
    distributed = spec.pop("distributed", None)
    if distributed:
        from han_jax.training.distributed import start_distributed

        address, n, pid = distributed
        start_distributed(coordinator_address=address, num_processes=n, process_id=pid, timeout_s=120)
    import jax

    n_devices = jax.device_count() if distributed else spec.pop("host_devices")
    spec.pop("host_devices", None)
    layouts = spec.pop("layouts")
    out = []
    for layout in layouts:
        try:
            out.append(devices_point(args, n_devices, layout, **spec))
        except Exception as e:  # noqa: BLE001 - a failed point is reported, not fatal
            out.append({"layout": layout, "devices": n_devices, "error": f"{type(e).__name__}: {e}"})
        release_compiled()
    return out


# ---------------------------------------------------------------------------------
# Report.


def _fmt(x, nd=3):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def markdown(result: dict) -> str:
    base = result["base"]
    lines = [f"Machine: {result['machine']['cpu_model']} ({result['machine']['cpu_count']} cores), "
             f"backend {result['machine']['backend']}, jax {result['machine']['jax']}; "
             f"model {result['model']} ({base['n_params']:,} params), B={base['batch']} T={base['days']} "
             f"M={base['months']} {base['policy']}" + ("; XLA opt level 0 (quick)" if result["fast_compile"] else ""),
             "",
             "| step | median (s) | min-max (s) | samples/s | compile (s) | GFLOP/step | achieved GFLOP/s | roofline |",
             "|---|---|---|---|---|---|---|---|"]
    peak = result["peak"]["flops_per_s"]
    rows = [("forward", base.get("forward"))] + [(k, base.get(k)) for k in ("train", "eval", "test")] + \
        [("eval, raw losses only", base.get("eval_raw_losses"))]
    for name, r in rows:
        if not r:
            continue
        fl = r.get("flops")
        ach = fl / r["median_s"] if fl else None
        sps = base["batch"] / r["median_s"]
        lines.append(
            f"| {name} | {r['median_s']:.4f} | {r['min_s']:.4f}-{r['max_s']:.4f} | {sps:.1f} | "
            f"{r['compile_s']:.1f} | {_fmt(fl / 1e9 if fl else None, 2)} | {_fmt(ach / 1e9 if ach else None, 2)} | "
            f"{_fmt(ach / peak if ach else None, 3)} |")
    lines.append("")
    lines.append(f"Peak matmul ({result['peak']['dtype']}, n={result['peak']['n']}, same run): "
                 f"{peak / 1e9:.1f} GFLOP/s. Init+state creation: {base['create_state_s']:.1f} s. "
                 f"Peak host RSS: {base['peak_rss_mb']:.0f} MB. Device memory: {base['device_memory'] or 'n/a'}.")
    tm = (base.get("train") or {}).get("memory")
    if tm:
        lines.append(f"XLA memory of train step: temp {tm.get('temp_size_in_bytes', 0) / 2**20:.1f} MiB, "
                     f"arguments {tm.get('argument_size_in_bytes', 0) / 2**20:.1f} MiB, "
                     f"outputs {tm.get('output_size_in_bytes', 0) / 2**20:.1f} MiB.")
    ao = base.get("aggregation_overhead")
    if ao:
        lines.append(f"Shared aggregation: eval_step {ao['eval_median_s'] * 1e3:.2f} ms vs raw task losses "
                     f"{ao['raw_losses_median_s'] * 1e3:.2f} ms: overhead {ao['overhead_s'] * 1e3:+.2f} ms "
                     f"({100 * ao['overhead_frac']:+.1f}%, interleaved runs).")
    sw = result.get("sweeps") or {}
    if sw:
        lines += ["", f"{result['sweep_step'].capitalize()}-step sweeps (other settings at the base point):", "",
                  "| sweep | value | median (s) | samples/s | compile (s) | GFLOP/step | cost vs base |",
                  "|---|---|---|---|---|---|---|"]
        ref = base[result["sweep_step"]]["median_s"]
        for axis, pts in sw.items():
            for p in pts:
                if "error" in p:
                    lines.append(f"| {axis} | {p.get('value')} | error: {p['error'][-80:]!r} | | | | |")
                    continue
                tr = p.get(result["sweep_step"], p)
                lines.append(
                    f"| {axis} | {p['value']} | {tr['median_s']:.4f} | {tr['samples_per_s']:.1f} | "
                    f"{_fmt(tr.get('compile_s', tr.get('compile_s_est')), 1)} | "
                    f"{_fmt(tr['flops'] / 1e9 if tr.get('flops') else None, 2)} | {tr['median_s'] / ref:.2f}x |")
    return "\n".join(lines)


def machine_info() -> dict:
    import jax

    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu_model": model, "cpu_count": os.cpu_count(), "backend": jax.default_backend(),
            "device": str(jax.devices()[0]), "jax": jax.__version__, "python": platform.python_version(),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker_spec is not None:
        spec = json.loads(args.worker_spec)
        _set_xla_flags(args, spec.get("host_devices"))
        r = worker(args, spec)
        print("WORKER_RESULT " + json.dumps(r), flush=True)
        return r
    _set_xla_flags(args)
    import jax

    t_start = time.perf_counter()
    on_gpu = jax.default_backend() == "gpu"
    peak_dtype = "bfloat16" if (on_gpu or args.gpu) else "float32"
    log = lambda s: print(f"[{time.perf_counter() - t_start:6.1f}s] {s}", file=sys.stderr, flush=True)  # noqa: E731
    peak = matmul_peak(args.matmul_n, peak_dtype)
    log(f"peak matmul {peak['flops_per_s'] / 1e9:.1f} GFLOP/s")
    b, t, m = args.batch, args.days, args.months
    base_cfg = step_config({}, args.policy, args.quick)
    base = bench_point(base_cfg, b, t, m, args.runs, extras=True)
    log(f"base point done: train {base['train']['median_s']:.4f}s")
    result = {"model": "ModelConfig.small(d_model=16, nhead=2)" if args.quick else "ModelConfig()",
              "quick": args.quick, "fast_compile": args.fast_compile, "machine": machine_info(), "peak": peak,
              "base": base, "sweep_step": args.sweep_step, "sweeps": {}}
    tr = base["train"]
    if tr.get("flops"):
        tr["achieved_flops_per_s"] = tr["flops"] / tr["median_s"]
        tr["roofline_ratio"] = tr["achieved_flops_per_s"] / peak["flops_per_s"]
    def dump():  # after every point, so that an interrupted full run leaves its results
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as fh:
                json.dump(result, fh, indent=2, default=str)

    dump()
    if not args.no_sweeps:
        sw = result["sweeps"]
        sr = args.sweep_runs

        def point(axis, value, model_kw, policy, bb, tt):
            try:
                cfg = step_config(model_kw, policy, args.quick)
                p = bench_point(cfg, bb, tt, m, sr, which=(args.sweep_step,))
                p["value"] = value
            except Exception as e:  # noqa: BLE001 - a failed point is reported, not fatal
                p = {"value": value, "error": f"{type(e).__name__}: {e}"}
            sw.setdefault(axis, []).append(p)
            dump()
            log(f"sweep {axis}={value}: {p.get(args.sweep_step, {}).get('median_s', p.get('error'))}")
            release_compiled()

        for bb in args.batches:
            if bb != b:
                point("batch", bb, {}, args.policy, bb, t)
        for tt in args.windows:
            if tt != t:
                point("days", tt, {}, args.policy, b, tt)
        for pol in args.policies:
            if pol != args.policy:
                point("policy", pol, {}, pol, b, t)
        if not args.no_impl_sweeps:
            import jax

            point("remat", True, {"remat": True}, args.policy, b, t)
            # The speed choices of han_jax.model, each undone once: dense [T, T]
            # attention instead of key blocks, and the other daily-stack layout.
            point("attention_block", 0, {"attention_block": 0}, args.policy, b, t)
            vmapped = jax.default_backend() != "cpu"  # what vmap_sources=None picks
            point("vmap_sources", not vmapped, {"vmap_sources": not vmapped}, args.policy, b, t)
        spec = {"model_kw": {}, "policy": args.policy, "b": b, "t": t, "m": m, "runs": sr, "step": args.sweep_step}
        for n in args.devices:
            if b % n:
                continue
            # One fresh process per device count, both layouts in it: compared in the same run, same machine.
            layouts = ["sharded", "pmap"] if n > 1 else ["sharded"]  # one device is one layout: plain jit
            for layout, p in zip(layouts, run_devices_subprocess(args, n, {**spec, "layouts": layouts})):
                p["value"] = n
                for name in ("sharded", "pmap") if n == 1 else (layout,):  # the 1-device point heads both rows
                    sw.setdefault(f"{name}_devices", []).append(p)
                log(f"sweep {layout} devices={n}: {p.get('median_s', p.get('error'))}")
            dump()
        for n in args.processes:
            if b % n:
                continue
            for p in run_processes(args, n, {**spec, "layouts": ["sharded"]}):
                p["value"] = n
                sw.setdefault("processes", []).append(p)
                log(f"sweep processes={n}: {p.get('median_s', p.get('error'))}")
            dump()
    result["total_wall_s"] = time.perf_counter() - t_start
    print(markdown(result))
    dump()
    return result


if __name__ == "__main__":
    main()
