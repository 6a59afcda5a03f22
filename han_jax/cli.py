"""``han-jax train``, ``backtest``, ``audit``, ``evaluate``, ``predict`` and ``import-torch``.

Any configuration value can be overridden with ``--set section.field=value``
(e.g. ``--set model.d_model=64 --set step.optim.learning_rate=3e-4``); the
common ones also have their own flags.

Every command checks its configuration (``han_jax.app.validation.validate_config``)
before it builds data or compiles anything. A user error (a bad value, bad data, a
missing file) is printed as one line, ``han-jax <command>: error: ...``, with exit
status 2 and no traceback; ``--debug`` (before or after the command) shows it.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import sys
import typing

import jax
import numpy as np

from han_jax.app.backtest import REFITS, backtest
from han_jax.app.evaluate import evaluate_run
from han_jax.app.predict import predict_run
from han_jax.app.run_folder import CONFIG_FILE, RunLocked, read_run_config
from han_jax.app.runs import prepare
from han_jax.app.torch_import import CheckpointFormatError, CheckpointMismatch, import_run, read_torch_checkpoint
from han_jax.app.train import NoFiniteValidation, train
from han_jax.app.validation import check_int, validate_config
from han_jax.config import PRESETS, ConfigError, DataConfig, get_config
from han_jax.core.precision import Policy
from han_jax.data import SOURCES, DataError, iterate_batches
from han_jax.tasks import loss_key
from han_jax.training.checkpoints import CHECKPOINTS, CHECKPOINTS_DIR, CheckpointDamaged, checkpoint_epoch
from han_jax.training.compilation_cache import default_cache_dir, enable_compilation_cache
from han_jax.training.devices import PARALLEL_KINDS, SingleDevice, check_batch
from han_jax.training.distributed import (
    DEFAULT_DISTRIBUTED_TIMEOUT,
    DistributedStartError,
    cluster_detected,
    start_distributed,
)
from han_jax.training.schedule import Schedule
from han_jax.training.spec import StepSpec
from han_jax.training.steps import create_train_state

DEFAULT_PRESET = "small"


class CommandError(Exception):
    """A user error of a command that is not a configuration value (a missing or unreadable input file)."""


# What a command reports in one line (exit status 2) instead of a traceback: the user's to fix, not a bug.
USER_ERRORS = (ConfigError, DataError, CommandError, FileNotFoundError, FileExistsError, RunLocked,
               DistributedStartError, CheckpointDamaged, NoFiniteValidation)


def _coerce(value: str, annotation, current):
    """Parses a command-line string into the type of a config field."""
    text = value.strip()
    if isinstance(current, Policy) or annotation is Policy:
        return Policy.from_string(text)
    if isinstance(current, bool) or annotation in (bool, "bool"):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true/false, got {value!r}")
    if text.lower() == "none":
        return None
    if isinstance(current, int) and not isinstance(current, bool):
        return int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, tuple) or text.startswith(("[", "(")):
        parsed = json.loads(text.replace("(", "[").replace(")", "]"))
        return tuple(tuple(x) if isinstance(x, list) else x for x in parsed)
    if current is None and annotation is not None:
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
    return text


def apply_overrides(config, overrides):
    """Applies ``section.field=value`` strings to a frozen config tree."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.field=value")
        path, value = item.split("=", 1)
        parts = path.strip().split(".")
        config = _set_path(config, parts, value, path)
    return config


def _set_path(node, parts, value, full):
    fields = {f.name: f for f in dataclasses.fields(node)}
    name = parts[0]
    if name not in fields:
        raise ConfigError(f"--set {full}: {type(node).__name__} has no field {name!r}; fields are {sorted(fields)}")
    current = getattr(node, name)
    if len(parts) > 1:
        if not dataclasses.is_dataclass(current) or isinstance(current, Policy):
            raise ConfigError(f"--set {full}: {name!r} is not a section")
        return dataclasses.replace(node, **{name: _set_path(current, parts[1:], value, full)})
    try:
        hints = typing.get_type_hints(type(node))
    except Exception:  # forward references we cannot resolve: fall back to the value's type
        hints = {}
    try:
        return dataclasses.replace(node, **{name: _coerce(value, hints.get(name), current)})
    except ValueError as e:
        raise ConfigError(f"--set {full}: {e}") from None


def _resumed_config(args):
    """With ``--resume``, the run's saved configuration (None for a new run or a folder without one)."""
    run_dir = getattr(args, "run_dir", None)
    if not getattr(args, "resume", False) or not run_dir or not os.path.exists(os.path.join(run_dir, CONFIG_FILE)):
        return None
    return read_run_config(run_dir)[0]


def build_config(args):
    """The starting configuration with the command's flags and ``--set`` overrides applied, validated.

    A new run starts from ``--preset`` (default ``small``). ``--resume`` starts from the
    run's own ``config.json``, and everything this command line states is a request
    that ``train`` checks against it (equal is fine, different is refused unless
    named with ``--resume-override``): a typed ``--preset`` starts from that preset, as
    a new run would, so every field it sets is compared; ``--data``, ``--policy``,
    ``--devices`` and the other flags and ``--set`` change their fields. No data is read
    and no JAX work is done here.
    """
    saved = _resumed_config(args)
    preset = getattr(args, "preset", None)
    config = saved if saved is not None and preset is None else get_config(preset or DEFAULT_PRESET)
    data_kind = getattr(args, "data", None)
    if data_kind == "synthetic" and config.data.source != "synthetic":
        d = config.data
        config = config.replace(data=dataclasses.replace(DataConfig(), daily_seq_len=d.daily_seq_len,
                                                         monthly_seq_len=d.monthly_seq_len))
    # Absolute paths: config.json must find the data again from any working directory; none: the bundled
    # snapshot, found on any machine.
    losses_dir = os.path.abspath(args.losses_dir) if getattr(args, "losses_dir", None) else None
    monthly_csv_dir = os.path.abspath(args.monthly_csv_dir) if getattr(args, "monthly_csv_dir", None) else None
    if data_kind == "losses" and config.data.source != "losses":
        d = config.data
        config = config.replace(data=DataConfig.losses(
            losses_dir, monthly_csv_dir, daily_seq_len=d.daily_seq_len, monthly_seq_len=d.monthly_seq_len))
    elif losses_dir or monthly_csv_dir:
        if config.data.source != "losses":
            flag = "--losses-dir" if losses_dir else "--monthly-csv-dir"
            raise ConfigError(f"{flag}: real-data folders are read with --data losses; expected --data losses too")
        paths = {k: v for k, v in (("losses_dir", losses_dir), ("monthly_csv_dir", monthly_csv_dir)) if v}
        config = config.replace(data=dataclasses.replace(config.data, **paths))
    train_kw = {}
    for flag, field in (("epochs", "epochs"), ("batch_size", "batch_size"), ("patience", "patience"),
                        ("seed", "seed"), ("devices", "num_devices"), ("parallel", "parallel")):
        if getattr(args, flag, None) is not None:
            train_kw[field] = getattr(args, flag)
    if getattr(args, "no_tensorboard", False):
        train_kw["tensorboard"] = False
    if train_kw:
        config = config.replace(train=dataclasses.replace(config.train, **train_kw))
    if getattr(args, "policy", None):
        try:
            policy = Policy.from_string(args.policy)
        except ValueError as e:
            raise ConfigError(f"--policy={args.policy!r}: {e}") from None
        config = config.replace(step=dataclasses.replace(config.step, policy=policy))
    config = apply_overrides(config, args.set or [])
    validate_config(config)
    return config


def _common(p):
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help=f"{DEFAULT_PRESET} (default): the README's main job; tiny: tests; default: the original's "
                        "full-size model and data (with --resume: compared with the run's configuration)")
    p.add_argument("--data", choices=SOURCES,
                   help="embedded synthetic world (default) or the real public loss data")
    p.add_argument("--losses-dir", help="directory of russia_losses_*.json (default: the snapshot bundled with "
                                        "han-jax, to 2025-12-31; see docs/usage.md)")
    p.add_argument("--monthly-csv-dir",
                   help="optional monthly source / target CSVs for real data (see docs/usage.md)")
    p.add_argument("--policy", help="precision policy: f32, bf16, f16 or params=..,compute=..,output=..")
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="override any config value")


def cmd_train(args) -> int:
    config = build_config(args)
    if args.stop_after_epoch is not None:
        check_int("--stop-after-epoch", args.stop_after_epoch, minimum=0)
    overrides = _resume_overrides(args)
    if _start_distributed(args):
        config = _all_devices(config, args)
    else:
        _force_host_devices(config.train.num_devices)
    train(config, args.run_dir, resume=args.resume, resume_overrides=overrides, quiet=args.quiet,
          stop_after_epoch=args.stop_after_epoch)
    return 0


def _start_distributed(args) -> bool:
    """Starts JAX's distributed runtime when asked (the three flags, ``--distributed``, or a multi-task
    SLURM / Open MPI job); True when this is a multi-process run. Nothing else has touched JAX yet."""
    flags = (args.coordinator_address, args.num_processes, args.process_id)
    if all(v is None for v in flags) and not args.distributed and not cluster_detected():
        return False
    start_distributed(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                      process_id=args.process_id, timeout_s=args.distributed_timeout, command="han-jax train")
    return jax.process_count() > 1


def _all_devices(config, args):
    """A multi-process run shares each step among every device of every process."""
    n = jax.device_count()
    if args.devices is not None and args.devices != n:
        raise ConfigError(f"--devices={args.devices}: a run over {jax.process_count()} processes uses all {n} of "
                          f"their devices; expected {n}, or leave --devices out")
    check_batch(config.train.batch_size, n, devices=f"the {n} devices of the {jax.process_count()} processes")
    return config.replace(train=dataclasses.replace(config.train, num_devices=n))


def _resume_overrides(args) -> list:
    """The dotted field names of every ``--resume-override FIELD[,FIELD]``, which only ``--resume`` reads."""
    names = [name.strip() for item in args.resume_override or [] for name in item.split(",") if name.strip()]
    if names and not args.resume:
        raise ConfigError(f"--resume-override {','.join(names)}: expected with --resume (a new run has nothing to "
                          "override)")
    return names


def cmd_backtest(args) -> int:
    """A rolling-origin backtest: a run per origin on the data known then, scored on the month after."""
    config = build_config(args)
    # One folder per origin already; event files for each would only fill the disk.
    config = config.replace(train=dataclasses.replace(config.train, tensorboard=False))
    _force_host_devices(config.train.num_devices)
    backtest(config, args.run_dir, origins=args.origins, refit=args.refit, quiet=args.quiet)
    return 0


def cmd_audit(args) -> int:
    """One batch through train_step (dropout off), eval_step and test_step, side by side."""
    config = build_config(args)
    datasets, resolved = prepare(config)
    inputs, targets = next(iterate_batches(datasets.train, config.train.batch_size, shuffle=True,
                                           seed=config.train.seed))
    spec = StepSpec.of(config, resolved)
    state = create_train_state(jax.random.PRNGKey(config.train.seed), spec, inputs,
                               log_var_priors=config.step.log_var_priors)
    steps = SingleDevice().steps(spec, Schedule.of(config.step.optim, epochs=config.train.epochs,
                                                   steps_per_epoch=resolved.steps_per_epoch))
    state = steps.start_epoch(state, 0)
    _, train_out = steps.train_deterministic(state, inputs, targets)
    eval_m = steps.eval(state, inputs, targets).metrics
    test_m = steps.test(state, inputs, targets).metrics
    rows = {"train": jax.device_get(train_out.metrics), "eval": jax.device_get(eval_m), "test": jax.device_get(test_m)}

    keys = [k for k in eval_m if np.ndim(eval_m[k]) == 0]
    print(f"han-jax audit: one batch of {int(np.sum(targets.sample_mask))} rows, policy {spec.policy.name}")
    print(f"{'metric':30s} {'train_step':>14s} {'eval_step':>14s} {'test_step':>14s}")
    mismatches = []
    for k in keys:
        vals = [float(rows[p][k]) for p in ("train", "eval", "test")]
        same = np.allclose(vals, vals[1], rtol=1e-5, atol=1e-7, equal_nan=True)
        if not same:
            mismatches.append(k)
        print(f"{k:30s} " + " ".join(f"{v:14.6f}" for v in vals) + ("" if same else "   <-- DIFFERS"))
    missing = sorted(set(eval_m) ^ set(test_m)) + sorted(set(eval_m) - set(train_out.metrics))
    e = {k: float(rows["eval"][k]) for k in keys}
    print("\nWhy the Kendall total and the plain mean differ (identical in all three phases):")
    print(f"  weighted_total = data_term + uncertainty_term + reg_term = {e['data_term']:.6f} + "
          f"{e['uncertainty_term']:.6f} + {e['reg_term']:.6f} = {e['weighted_total']:.6f}")
    for t in spec.objective.weighted:
        if loss_key(t) not in e:
            continue
        # The aggregate's own numbers: weight = exp(-clipped log_var), and its contribution.
        loss, w, inc, contribution = (e[f"{part}/{t}"] for part in ("loss", "weight", "included", "contribution"))
        print(f"    {t:15s} 0.5 x weight {w:.4f} x raw {loss:9.6f} + 0.5 x log_var {-np.log(w):+.4f} "
              f"= {contribution:9.6f}" + ("" if bool(inc) else "  (excluded)"))
    print(f"  simple_total   = mean of included raw losses = {e['simple_total']:.6f}")
    if mismatches or missing:
        print(f"\nAUDIT FAILED: the shared path disagrees on {mismatches}; key mismatch {missing}")
        return 1
    print("\nAUDIT PASSED: train_step, eval_step and test_step agree on every shared metric.")
    return 0


def _force_host_devices(n) -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if n and n > 1 and "xla_force_host_platform_device_count" not in flags:
        # On CPU, pmap needs host devices; XLA reads this flag once, before jax starts.
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def _data_overrides(args) -> dict:
    """``DataConfig`` fields that ``evaluate``/``predict`` change from the run's own data flags."""
    overrides = {}
    data = getattr(args, "data", None)  # evaluate has no --data: the run's kind unless --losses-dir is given
    if data == "losses":
        overrides.update(source="losses", losses_dir=os.path.abspath(args.losses_dir) if args.losses_dir else None)
    elif data == "synthetic":
        overrides.update(source="synthetic")
    elif args.losses_dir:
        overrides.update(source="losses", losses_dir=os.path.abspath(args.losses_dir))
    if args.monthly_csv_dir:
        overrides.update(monthly_csv_dir=os.path.abspath(args.monthly_csv_dir))
    return overrides


def cmd_evaluate(args) -> int:
    """Scores a saved run on train, val and test with exact split metrics, baselines and skill."""
    if args.batch_size is not None:
        check_int("--batch-size", args.batch_size)
    if args.devices is not None:
        check_int("--devices", args.devices)
        if args.batch_size is not None:
            check_batch(args.batch_size, args.devices, field="--batch-size", devices=f"--devices={args.devices}")
    _force_host_devices(args.devices)
    evaluate_run(args.run_dir, checkpoint=args.checkpoint, batch_size=args.batch_size, num_devices=args.devices or 1,
                 parallel=args.parallel or "sharded", data_overrides=_data_overrides(args), out=args.out,
                 force=args.force)
    return 0


def cmd_predict(args) -> int:
    """A saved run's predictions for every anchor in a date range of (new) data, with its saved normalisation."""
    if args.batch_size is not None:
        check_int("--batch-size", args.batch_size)
    overrides = _data_overrides(args)
    for item in args.set or []:
        # Only the data section: the model, the steps and the windows are the run's.
        path, sep, value = item.partition("=")
        parts = path.strip().split(".")
        if len(parts) != 2 or parts[0] != "data" or not sep:
            raise ConfigError(f"--set {item!r}: expected data.field=value (predict changes only where the data is)")
        overrides[parts[1]] = getattr(_set_path(DataConfig(), parts[1:], value, path), parts[1])
    predict_run(args.run_dir, checkpoint=args.checkpoint, data_overrides=overrides, date_from=args.date_from,
                date_to=args.date_to, out=args.out, plot=args.plot, batch_size=args.batch_size, force=args.force)
    return 0


def cmd_import_torch(args) -> int:
    """A run folder from a checkpoint of the original PyTorch trainer."""
    if not os.path.isfile(args.checkpoint):
        raise FileNotFoundError(f"{args.checkpoint}: no such file; expected a .pt written by the original")
    if os.path.exists(os.path.join(args.run_dir, CHECKPOINTS_DIR)):
        raise FileExistsError(f"{args.run_dir} already holds checkpoints; expected a new run folder")
    config = build_config(args)
    try:
        checkpoint = read_torch_checkpoint(args.checkpoint, trust_pickle=args.trust_pickle)
        import_run(checkpoint, args.run_dir, config)
    except ImportError as e:
        raise CommandError(str(e)) from e
    except CheckpointFormatError as e:  # its message names the file
        raise CommandError(str(e)) from e
    except CheckpointMismatch as e:
        raise CommandError(f"{args.checkpoint}: {e}") from e
    print(f"evaluate it with: han-jax evaluate --run-dir {args.run_dir}")
    return 0


def _cache_flags(p) -> None:
    p.add_argument("--compilation-cache", metavar="DIR",
                   help="the compilation cache (JAX's persistent cache, and han-jax's compiled steps under "
                        "executables/): a later start of the same configuration loads its steps from here instead "
                        "of tracing and compiling them (default $HAN_JAX_COMPILATION_CACHE, else "
                        "~/.cache/han-jax/xla; delete it at any time)")
    p.add_argument("--no-compilation-cache", action="store_true",
                   help="compile without the persistent cache (HAN_JAX_COMPILATION_CACHE=off does the same)")


def _device_flags(p, note: str = "") -> None:
    p.add_argument("--devices", type=int,
                   help="local devices that share each step (on CPU: host devices; default 1)" + note)
    p.add_argument("--parallel", choices=PARALLEL_KINDS,
                   help="how they share it: jit over a device mesh with the batch sharded (default) or jax.pmap")


def _distributed_flags(p) -> None:
    g = p.add_argument_group("several processes (JAX's distributed runtime; see docs/usage.md)")
    g.add_argument("--coordinator-address", metavar="HOST:PORT",
                   help="process 0's address, the same in every process")
    g.add_argument("--num-processes", type=int, help="how many processes take part")
    g.add_argument("--process-id", type=int, help="this process's id, 0 .. num-processes-1 (0 writes the reports)")
    g.add_argument("--distributed", action="store_true",
                   help="start jax.distributed with the cluster's own settings (SLURM, Open MPI, TPU; automatic "
                        "in a SLURM or Open MPI job of several tasks)")
    g.add_argument("--distributed-timeout", type=int, default=DEFAULT_DISTRIBUTED_TIMEOUT, metavar="SECONDS",
                   help=f"give up when the processes have not all met by then (default {DEFAULT_DISTRIBUTED_TIMEOUT})")


def _one_line(error: BaseException) -> str:
    """The error's message on one line (an OS error's own text when it has no message of ours)."""
    text = str(error) or type(error).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _interrupted(args) -> str:
    """What an interrupted command leaves: a training run resumes from its last complete checkpoint."""
    if args.command == "backtest":
        return "interrupted; the same command resumes the backtest where it stopped"
    if args.command != "train":
        return "interrupted"
    if checkpoint_epoch(args.run_dir) is None:
        return "interrupted before the run's first checkpoint; start it again (without --resume)"
    return "interrupted; resume with --resume"


def _user_message(error: BaseException, args) -> str:
    """One line for a user error; an OS error (permissions, a full disk, a file where a folder was expected) names
    its file and what the user can do."""
    if not isinstance(error, OSError) or isinstance(error, USER_ERRORS) and error.strerror is None:
        return _one_line(error)
    where = error.filename or getattr(args, "run_dir", None) or "a file"
    if error.errno == errno.ENOSPC:
        tail = "; the run folder is resumable with --resume once there is space" if args.command == "train" else ""
        return f"no space left on the device while writing {where}{tail}"
    hint = {errno.EACCES: "expected a file or folder you may read and write",
            errno.EPERM: "expected a file or folder you may read and write",
            errno.EISDIR: "expected a file, not a folder",
            errno.ENOTDIR: "expected a folder, or a path through folders",
            errno.EROFS: "expected a writable file system"}.get(error.errno, "")
    return f"{where}: {error.strerror or _one_line(error)}" + (f"; {hint}" if hint else "")


def main(argv=None) -> int:
    """Runs one command; a user error (:data:`USER_ERRORS`) is one line on stderr and exit status 2."""
    parser = argparse.ArgumentParser(prog="han-jax", description=__doc__.splitlines()[0])
    debug_help = "on an error, show the traceback instead of one line"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train, early-stop on val, score the best checkpoint on test")
    _common(p)
    p.add_argument("--run-dir", default="runs/latest")
    p.add_argument("--epochs", type=int)
    p.add_argument("--patience", type=int)
    _device_flags(p)
    _distributed_flags(p)
    p.add_argument("--resume", action="store_true",
                   help="continue from run-dir's latest checkpoint with the run's saved configuration (--preset is "
                        "ignored; flags and --set given now are changes to it, checked)")
    p.add_argument("--resume-override", action="append", metavar="FIELD[,FIELD]",
                   help="with --resume: allow these fields (e.g. step.optim.learning_rate) to differ from the run's "
                        "config.json (epochs, patience and reporting may differ without it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (CI)")
    p.add_argument("--stop-after-epoch", type=int, help="end after this epoch's checkpoint (resume later)")
    p.add_argument("--no-tensorboard", action="store_true",
                   help="no TensorBoard event files (written to RUN_DIR/tensorboard when tensorboardX is installed)")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("backtest", help="rolling-origin backtest: train at each origin on the data known then, score "
                                        "the month after with proper scores against baselines")
    _common(p)
    p.add_argument("--run-dir", required=True, help="the backtest's folder (the same command resumes it)")
    p.add_argument("--origins", required=True, metavar="FIRST:LAST[:STEP_MONTHS]",
                   help="origin months, e.g. 2025-01:2025-12 (each origin forecasts its own month from the data "
                        "known before it)")
    p.add_argument("--refit", choices=REFITS, default="full",
                   help="full: train each origin from scratch (default); warm: continue from the previous origin's "
                        "best state")
    p.add_argument("--epochs", type=int)
    p.add_argument("--patience", type=int)
    p.add_argument("--quiet", action="store_true", help="no progress bar (CI)")
    p.set_defaults(func=cmd_backtest)
    p = sub.add_parser("audit", help="prove train/eval/test share one loss path on one batch")
    _common(p)
    p.add_argument("--epochs", type=int, help="as for train (the learning-rate schedule of the train step shown)")
    p.set_defaults(func=cmd_audit)
    p = sub.add_parser("evaluate", help="score a saved run on every split (exact split metrics, baselines, skill)")
    p.add_argument("--run-dir", required=True, help="a folder written by 'han-jax train'")
    p.add_argument("--checkpoint", choices=CHECKPOINTS, default="best")
    p.add_argument("--batch-size", type=int, help="rows per step (default: the run's); no number depends on it")
    _device_flags(p, note="; no number depends on it")
    p.add_argument("--out", help="write {split: {metric: value}} JSON here")
    p.add_argument("--force", action="store_true", help="write --out even over a run folder's own file")
    p.add_argument("--losses-dir", help="score on these loss records instead of the run's data (same layout)")
    p.add_argument("--monthly-csv-dir", help="monthly source / target CSVs for real data (default: the run's)")
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("predict", help="a saved run's predictions for every anchor in a date range of (new) data")
    p.add_argument("--run-dir", required=True, help="a folder written by 'han-jax train'")
    p.add_argument("--checkpoint", choices=CHECKPOINTS, default="best")
    p.add_argument("--data", choices=SOURCES, help="the kind of data (default: the run's)")
    p.add_argument("--losses-dir", help="directory of russia_losses_*.json (with --data losses: default "
                                        "the snapshot bundled with han-jax)")
    p.add_argument("--monthly-csv-dir", help="monthly source / target CSVs for real data (default: the run's)")
    p.add_argument("--set", action="append", metavar="data.FIELD=VALUE",
                   help="change where the data comes from, e.g. data.n_days=400 (data fields only)")
    p.add_argument("--from", dest="date_from", metavar="DATE", help="first anchor day YYYY-MM-DD (default: --to)")
    p.add_argument("--to", dest="date_to", metavar="DATE", help="last anchor day (default: the data's last day)")
    p.add_argument("--out", help="the CSV to write (default RUN_DIR/predict/predictions.csv)")
    p.add_argument("--plot", help="the picture to write (default forecast.png beside --out)")
    p.add_argument("--batch-size", type=int, help="rows per forward call (default: the run's)")
    p.add_argument("--force", action="store_true", help="write --out/--plot even over a run folder's own files")
    p.set_defaults(func=cmd_predict)
    p = sub.add_parser("import-torch", help="a run folder from a checkpoint of the original PyTorch trainer")
    p.add_argument("checkpoint", help="the .pt file (model_state_dict, multi_task_loss_state_dict, ...)")
    p.add_argument("--run-dir", required=True, help="the new run folder to write")
    _common(p)
    p.set_defaults(preset="default")
    p.add_argument("--trust-pickle", action="store_true",
                   help="load with weights_only=False (only for files you trust; needed when the history holds "
                        "numpy scalars)")
    p.set_defaults(func=cmd_import_torch)
    for name in ("train", "backtest", "evaluate", "predict"):
        _cache_flags(sub.choices[name])
    for command in sub.choices.values():
        # Also accepted after the command; SUPPRESS keeps a flag given before it.
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    args = parser.parse_args(argv)
    try:
        if hasattr(args, "compilation_cache"):
            enable_compilation_cache(None if args.no_compilation_cache else
                                     os.path.abspath(args.compilation_cache) if args.compilation_cache
                                     else default_cache_dir())
        return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"han-jax {args.command}: {_interrupted(args)}", file=sys.stderr)
        return 130  # the shell's status for a process ended by SIGINT
    except (*USER_ERRORS, OSError) as e:
        if args.debug:
            raise
        print(f"han-jax {args.command}: error: {_user_message(e, args)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
