"""han-jax's default train step against the original PyTorch model's, timed in one process.

Usage::

    python benchmarks/bench_original.py --analysis PATH/TO/ML-OSINT/analysis [--runs 5] [--out FILE.json]

``--analysis`` is the original's ``analysis/`` folder at commit 75d6392
(``multi_resolution_han.py``, ``multi_resolution_modules.py``,
``training_improvements.py``); the original is not part of this repository, so the
script needs a checkout of it. Its data module is replaced by a stub: the model
does not use it.

Both models are built with han-jax's default configuration (the same 8,192,006
parameters; the script checks the count) and trained on the same random batch at
B=8, T=365, M=12 in float32 on every core:

* the original: ``model.train()``, forward, a loss, ``backward()``, gradient
  clipping to 1.0 and ``torch.optim.AdamW`` (eager, as its trainer runs it).
  The loss is the sum of the means of the model's tensor outputs, not the
  original's multi-task loss: a few element-wise passes over small head outputs
  against a model forward and backward of seconds, so the comparison favours
  the original slightly;
* han-jax: ``han_jax.training.steps.train_step`` jitted (model, the shared loss path,
  optax), compiled before timing.

Two ways, both by default (``--mode``), because they measure different things:

* ``together``: both in one process, timed alternately run by run, so a shared machine's
  slow spell hits both; torch's allocations and han-jax's then share one heap (han-jax's
  glibc settings, ``han_jax.core.allocator``, apply to both);
* ``separate``: each in its own fresh process, the processes alternated (``--rounds``),
  each with the heap its users have: the original with the C library's as it is,
  han-jax with what its command sets (tcmalloc where installed, else glibc's settings).
  han-jax's processes load their compiled step from a shared compilation cache after
  the first.

Prints a table and, with ``--out``, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

N_PARAMS = 8_192_006


def original_model(analysis: str, model_config):
    """The original ``MultiResolutionHAN`` with han-jax's default sizes and sources."""
    for name in ("multi_resolution_han.py", "multi_resolution_modules.py", "training_improvements.py"):
        if not os.path.exists(os.path.join(analysis, name)):
            raise SystemExit(f"--analysis {analysis}: no {name}; expected the original's analysis/ folder "
                             "(github.com/justdtip/ML-OSINT at 75d6392)")
    stub = types.ModuleType("multi_resolution_data")  # the data pipeline: imported, never used by the model
    stub.MultiResolutionDataset = stub.MultiResolutionConfig = object
    sys.modules.setdefault("multi_resolution_data", stub)
    sys.path.insert(0, os.path.abspath(analysis))
    import multi_resolution_han as mrh

    def sources(pairs, resolution):
        return {name: mrh.SourceConfig(name, n, resolution) for name, n in pairs}

    c = model_config
    model = mrh.MultiResolutionHAN(
        daily_source_configs=sources(c.daily_sources, "daily"),
        monthly_source_configs=sources(c.monthly_sources, "monthly"),
        d_model=c.d_model, nhead=c.nhead, num_daily_layers=c.num_daily_layers,
        num_monthly_layers=c.num_monthly_layers, num_fusion_layers=c.num_fusion_layers,
        num_temporal_layers=c.num_temporal_layers, dropout=c.dropout, causal=c.causal,
        use_latent_forecast=c.use_latent_forecast,
    )
    # At 75d6392 the forward hands the whole [B, M, D] sequence to the LatentStatePredictor, which expects
    # the context state [B, D] and fails in torch.cat; the head is fed the last month's state, as the model
    # description has it (c = temporal_encoded[:, -1]) and han-jax does.
    head = getattr(model, "daily_forecast_head", None)
    if head is not None and type(head).__name__ == "LatentStatePredictor":
        forward = head.forward
        head.forward = lambda x, *a, **k: forward(x[:, -1] if x.dim() == 3 else x, *a, **k)
    return model


def torch_batch(inputs):
    import numpy as np
    import torch

    t = lambda a: torch.from_numpy(np.asarray(a))  # noqa: E731
    return dict(
        daily_features={k: t(v).float() for k, v in inputs.daily_features.items()},
        daily_masks={k: t(v).bool() for k, v in inputs.daily_masks.items()},
        monthly_features={k: t(v).float() for k, v in inputs.monthly_features.items()},
        monthly_masks={k: t(v).bool() for k, v in inputs.monthly_masks.items()},
        month_boundaries=t(inputs.month_boundaries).long(),
    )


def build_original(analysis: str, batch: int):
    """The original's eager train step on a random batch: ``step() -> loss``."""
    import torch

    from han_jax.config import Config, ModelConfig, TrainConfig
    from han_jax.testing import random_batch
    from han_jax.training.spec import StepSpec

    torch.set_num_threads(os.cpu_count())
    spec = StepSpec.of(Config(train=TrainConfig(batch_size=batch)))
    model = original_model(analysis, ModelConfig())
    n_torch = sum(p.numel() for p in model.parameters())
    if n_torch != N_PARAMS:
        raise SystemExit(f"the original built here has {n_torch:,} parameters; expected {N_PARAMS:,}")
    inputs, _ = random_batch(spec.model, b=batch, t=365, m=12, seed=0)
    tensors = torch_batch(inputs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    model.train()

    def step():
        optimizer.zero_grad()
        out = model(**tensors)
        loss = sum(v.float().mean() for v in out.values() if torch.is_tensor(v) and v.is_floating_point())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return float(loss.detach())

    return step


def build_han_jax(batch: int):
    """han-jax's jitted train step on the same random batch, run once: ``(step, first_call_s)``."""
    import jax

    from han_jax.config import Config, TrainConfig
    from han_jax.testing import random_batch
    from han_jax.training.devices import SingleDevice
    from han_jax.training.schedule import Schedule
    from han_jax.training.spec import StepSpec
    from han_jax.training.steps import create_train_state

    config = Config(train=TrainConfig(batch_size=batch))
    spec = StepSpec.of(config)  # the default model on the original's default sources
    inputs, targets = random_batch(spec.model, b=batch, t=365, m=12, seed=0)
    schedule = Schedule.of(config.step.optim, epochs=config.train.epochs)
    holder = {"state": create_train_state(jax.random.PRNGKey(0), spec, inputs, schedule)}
    train = SingleDevice().steps(spec, schedule).train

    def step():
        holder["state"], metrics = train(holder["state"], inputs, targets)
        return float(jax.block_until_ready(metrics.metrics["weighted_total"]))

    t = time.perf_counter()
    step()
    return step, time.perf_counter() - t


def _timed(step) -> float:
    t = time.perf_counter()
    step()
    return time.perf_counter() - t


def together(args) -> dict:
    """Both steps in this process, alternating run by run."""
    original_step = build_original(args.analysis, args.batch)
    han_jax_step, first_s = build_han_jax(args.batch)
    original_step()  # warm-up (allocator, autograd graph caches)
    times = {"original": [], "han_jax": []}
    for _ in range(args.runs):
        times["original"].append(_timed(original_step))
        times["han_jax"].append(_timed(han_jax_step))
    from han_jax.core import allocator

    heap = allocator.configure()
    return {"times_s": times, "han_jax_first_call_s": first_s, "heap": {"original": heap, "han_jax": heap}}


def worker(which: str, args) -> dict:
    """One side alone in this (fresh) process: a warm-up, then ``--runs`` timed steps."""
    if which == "original":
        step = build_original(args.analysis, args.batch)
        step()
    else:
        from han_jax.training.compilation_cache import enable_compilation_cache

        enable_compilation_cache(args.cache_dir)
        step, _ = build_han_jax(args.batch)
    from han_jax.core import allocator

    return {"times_s": [_timed(step) for _ in range(args.runs)], "heap": allocator.configure()}


def _worker_env(which: str) -> dict:
    """Each side's heap as its users have it: the original's C library as it is (importing han_jax for the
    configuration would otherwise set glibc's allocator for torch too); han-jax's as its command sets it."""
    from han_jax.core import allocator

    if which == "original":
        return {**os.environ, allocator.ENV: allocator.SYSTEM}
    return allocator.preload_environment() or dict(os.environ)


def separate(args) -> dict:
    """Each side in its own process, alternated ``--rounds`` times; han-jax's processes share one cache."""
    times, heaps = {"original": [], "han_jax": []}, {}
    with tempfile.TemporaryDirectory(prefix="han-jax-xla-") as cache_dir:
        for _ in range(args.rounds):
            for which in times:
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", which, "--analysis", args.analysis,
                       "--runs", str(args.runs), "--batch", str(args.batch), "--cache-dir", cache_dir]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=_worker_env(which))
                lines = [x for x in proc.stdout.splitlines() if x.startswith("WORKER ")]
                if proc.returncode or not lines:
                    raise SystemExit(f"{which} worker failed: {proc.stderr[-2000:]}")
                result = json.loads(lines[-1][len("WORKER "):])
                times[which] += result["times_s"]
                heaps[which] = result["heap"]
                print(f"separate {which}: {statistics.median(times[which]):.3f} s", file=sys.stderr, flush=True)
    return {"times_s": times, "heap": heaps}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--analysis", required=True, help="the original's analysis/ folder (ML-OSINT at 75d6392)")
    ap.add_argument("--runs", type=int, default=5, help="timed runs of each per process, after a warm-up (default 5)")
    ap.add_argument("--rounds", type=int, default=2, help="processes of each side in --mode separate (default 2)")
    ap.add_argument("--mode", choices=("both", "together", "separate"), default="both")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--worker", choices=("original", "han_jax"), help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print("WORKER " + json.dumps(worker(args.worker, args)))
        return {}

    import jax
    import torch

    from han_jax.core import allocator

    modes = ("together", "separate") if args.mode == "both" else (args.mode,)
    runs = {mode: {"together": together, "separate": separate}[mode](args) for mode in modes}
    for r in runs.values():
        r["median_s"] = {k: statistics.median(v) for k, v in r["times_s"].items()}
        r["speedup"] = r["median_s"]["original"] / r["median_s"]["han_jax"]
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__, "jax": jax.__version__, "batch": args.batch, "parameters": N_PARAMS,
        "heap": allocator.configure(), "modes": runs,
    }
    print(f"Machine: {result['machine']}; torch {torch.__version__}, jax {jax.__version__}; heap {result['heap']}; "
          f"default model ({N_PARAMS:,} parameters), B={args.batch}, T=365, f32, {args.runs} runs per process\n")
    print("| train step | processes | median (s) | min-max (s) | han-jax faster |\n|---|---|---|---|---|")
    for mode, r in runs.items():
        for k, label in (("original", "original (PyTorch eager)"), ("han_jax", "han-jax (jit)")):
            t = r["times_s"][k]
            where = "one, alternating runs" if mode == "together" else f"own, {args.rounds} alternated"
            where += f"; heap {r['heap'][k]}"
            print(f"| {label} | {where} | {r['median_s'][k]:.3f} | {min(t):.3f}-{max(t):.3f} | "
                  f"{r['speedup']:.2f}x |")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
