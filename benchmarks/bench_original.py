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

The two are timed alternately, run by run, so a shared machine's slow spell hits
both. Prints a table and, with ``--out``, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
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


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--analysis", required=True, help="the original's analysis/ folder (ML-OSINT at 75d6392)")
    ap.add_argument("--runs", type=int, default=5, help="timed runs of each, after one warm-up (default 5)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)

    import jax
    import torch

    from han_jax.config import Config, ModelConfig, TrainConfig
    from han_jax.testing import random_batch
    from han_jax.training.devices import SingleDevice
    from han_jax.training.schedule import Schedule
    from han_jax.training.spec import StepSpec
    from han_jax.training.steps import create_train_state

    torch.set_num_threads(os.cpu_count())
    config = Config(train=TrainConfig(batch_size=args.batch))
    spec = StepSpec.of(config)  # the default model on the original's default sources
    model = original_model(args.analysis, ModelConfig())
    n_torch = sum(p.numel() for p in model.parameters())
    if n_torch != N_PARAMS:
        raise SystemExit(f"the original built here has {n_torch:,} parameters; expected {N_PARAMS:,}")
    inputs, targets = random_batch(spec.model, b=args.batch, t=365, m=12, seed=0)
    batch = torch_batch(inputs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    model.train()

    def original_step():
        optimizer.zero_grad()
        out = model(**batch)
        loss = sum(v.float().mean() for v in out.values() if torch.is_tensor(v) and v.is_floating_point())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return float(loss.detach())

    schedule = Schedule.of(config.step.optim, epochs=config.train.epochs)
    state = create_train_state(jax.random.PRNGKey(0), spec, inputs, schedule)
    train = SingleDevice().steps(spec, schedule).train
    t = time.perf_counter()
    state, metrics = train(state, inputs, targets)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t
    original_step()  # warm-up (allocator, autograd graph caches)

    times = {"original": [], "han_jax": []}
    for _ in range(args.runs):
        t = time.perf_counter()
        original_step()
        times["original"].append(time.perf_counter() - t)
        t = time.perf_counter()
        state, metrics = train(state, inputs, targets)
        jax.block_until_ready(metrics)
        times["han_jax"].append(time.perf_counter() - t)

    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__, "jax": jax.__version__, "batch": args.batch, "parameters": n_torch,
        "han_jax_compile_s": compile_s, "times_s": times, "median_s": med,
        "speedup": med["original"] / med["han_jax"],
    }
    print(f"Machine: {result['machine']}; torch {torch.__version__}, jax {jax.__version__}; "
          f"default model ({n_torch:,} parameters), B={args.batch}, T=365, f32, {args.runs} alternating runs\n")
    print("| train step | median (s) | min-max (s) |\n|---|---|---|")
    for k, label in (("original", "original (PyTorch eager)"), ("han_jax", "han-jax (jit)")):
        print(f"| {label} | {med[k]:.3f} | {min(times[k]):.3f}-{max(times[k]):.3f} |")
    print(f"\nhan-jax is {result['speedup']:.2f}x faster (han-jax compile {compile_s:.0f} s, not in the medians)")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
