"""Command line of the framework.

Single stages (any LightningModule / LightningDataModule chosen by ``class_path`` in YAML)::

    python cli.py fit --config configs/ml100k/sasrec.yaml --trainer.devices 2 --trainer.strategy ddp
    python cli.py test --config configs/ml100k/sasrec.yaml --ckpt_path runs/.../best.ckpt

The whole method, stage after stage, into one run directory::

    python cli.py pipeline --config configs/ml100k/pipeline.yaml --run_dir runs/ml100k

``pipeline`` skips stages whose artifacts are complete (a killed run resumes), passes any
``--trainer.*``/``--model.*``/``--data.*`` flag through to every stage, and writes
``metrics.json`` and ``report.md`` into the run directory.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.model_helpers import is_overridden

from callbacks.progress import PlainProgress
from callbacks.resume import LAST_FILE, PARTIAL_FILE, RNGState, last_checkpoint
from callbacks.selfplay import SelfPlayCallback
from callbacks.timing import StageTimer
from lightning_modules.components.artifacts import (
    copy_stage,
    find_stage,
    fingerprint,
    mark_stage_complete,
    read_json,
    stage_complete,
    stage_dir,
    stage_lock,
    upstream_digest,
    write_ranks,
)
from lightning_modules.components.report import write_reports

log = logging.getLogger("align3gr")


class ConfigError(ValueError):
    """An option of a stage config that its class refused (the message names the option)."""


class Align3CLI(LightningCLI):
    """LightningCLI in subclass mode for model and data; exports stage artifacts after fit."""

    def __init__(self, *args, parse_only: bool = False, in_pipeline: bool = False,
                 **kwargs) -> None:
        # parse_only: resolve the config (``self.config``) without building trainer/model/data.
        # in_pipeline: a stage of ``pipeline``/``experiment``, whose flags go to every stage.
        self._parse_only = parse_only
        self._in_pipeline = in_pipeline
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf"})
        super().__init__(L.LightningModule, L.LightningDataModule, *args, **kwargs)

    def parse_arguments(self, parser, args) -> None:
        self._raw_args = list(sys.argv[1:] if args is None else args)
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """With ``--ckpt_path``, Lightning puts the checkpoint's hyperparameters over the
        config; the command's own arguments are applied again after them, so the checkpoint
        supplies what was trained and the command line still wins (run_dir, num_beams,
        predict_top_k, batch sizes, ...)."""
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt and Path(ckpt).is_file():
            import torch

            from lightning_modules.components.artifacts import _stage_of, check_checkpoint

            check_checkpoint(ckpt, _stage_of(Path(ckpt).resolve()))
            hparams = torch.load(ckpt, weights_only=True, map_location="cpu").get(
                "hyper_parameters") or {}
            if "_class_path" not in hparams:
                # Not written through this CLI (a plain Trainer): the command's config stands,
                # the checkpoint gives the weights only.
                return
        before = self.config
        super()._parse_ckpt_path()
        if self.config is before or not self.config.get("subcommand"):
            return
        self.config = self.parser.parse_args(self._raw_args, namespace=self.config)

    def instantiate_classes(self) -> None:
        if self._parse_only:
            return
        try:
            super().instantiate_classes()
        except ValueError as err:
            # jsonargparse wraps a constructor's own message in a dump of the whole config;
            # the constructor's message (it names the option) is the error.
            root = err
            while root.__cause__ is not None:
                root = root.__cause__
            if root is err or not isinstance(root, (ValueError, TypeError)):
                raise
            raise ConfigError(str(root)) from err

    def after_instantiate_classes(self) -> None:
        if not self._parse_only:
            super().after_instantiate_classes()

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--output", type=str | None, default=None,
                            help="predict: the JSONL file to write (default: beside the "
                                 "checkpoint, else <run_dir>/sft/predictions.jsonl)")
        parser.add_argument("--patience", type=int | None, default=None,
                            help="early stopping: stop after this many validations without a "
                                 "better value of the metric the stage's ModelCheckpoint "
                                 "monitors (replaces the config's EarlyStopping; 0 turns early "
                                 "stopping off). Validation frequency is "
                                 "--trainer.check_val_every_n_epoch")

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        sub = self.config.get("subcommand")
        patience = (self.config[sub] if sub else self.config).get("patience")
        if patience is not None:
            set_patience(trainer, patience, strict=not self._in_pipeline)
        return trainer

    def _output(self) -> str | None:
        sub = self.config.get("subcommand") if self.config is not None else None
        return self.config[sub].get("output") if sub else None

    def before_fit(self) -> None:
        self._only_for_predict()

    def before_validate(self) -> None:
        self._only_for_predict()

    def before_test(self) -> None:
        self._only_for_predict()

    def _only_for_predict(self) -> None:
        if self._output():
            raise ConfigError("--output applies to predict only")

    def before_predict(self) -> None:
        if self._output():
            if not hasattr(self.model, "predict_output"):
                raise ConfigError(f"--output: {type(self.model).__name__} does not predict")
            self.model.predict_output = self._output()

    def after_predict(self) -> None:
        path = getattr(self.model, "last_predictions_path", None)
        if path is not None:
            print(f"predictions: {path}")

    def after_fit(self) -> None:
        export_stage(self.trainer, self.model, seconds=None)


def set_patience(trainer: L.Trainer, patience: int, strict: bool = True) -> None:
    """Early stopping with ``patience`` on the metric of the trainer's monitoring
    ModelCheckpoint, in place of any EarlyStopping the config lists (``0``: none).

    A stage without a monitored metric (the tokenizer keeps its newest weights) is an error
    when ``strict``; otherwise (a flag the pipeline gives every stage) it is left as it is."""
    from lightning.pytorch.callbacks import EarlyStopping

    if patience < 0:
        raise ConfigError(f"--patience must be >= 0, got {patience}")
    monitored = [cb for cb in trainer.checkpoint_callbacks if cb.monitor]
    if not monitored:
        if strict:
            raise ConfigError("--patience: this stage's ModelCheckpoint monitors no metric, "
                              "so there is nothing to stop early on")
        log.info("--patience %d: no monitored metric in this stage; it trains its schedule",
                 patience)
        return
    ckpt = monitored[0]
    kept = [cb for cb in trainer.callbacks if not isinstance(cb, EarlyStopping)]
    if patience > 0:
        stop = EarlyStopping(monitor=ckpt.monitor, mode=ckpt.mode, patience=patience)
        kept.insert(kept.index(ckpt), stop)  # before the checkpoints, as Lightning orders them
    trainer.callbacks = kept


def _stage_name(model: L.LightningModule) -> str:
    return getattr(model, "stage_name", type(model).__name__.lower())


def export_stage(trainer: L.Trainer, model: L.LightningModule, seconds: float | None,
                 valid: dict | None = None, test: dict | None = None,
                 timer: StageTimer | None = None, provenance: dict | None = None) -> dict | None:
    """Write the stage's artifacts and, last, its ``stage.json`` (rank 0 only).

    With a ``timer``, the record gets ``timing`` (seconds per phase, throughput, export time);
    ``provenance`` (the stage fingerprint and its inputs, see :func:`stage_fingerprint`) is
    recorded as is."""
    run_dir = getattr(model, "run_dir", None)
    if not trainer.is_global_zero or run_dir is None:
        return None
    start = time.perf_counter()
    if getattr(model, "exports_stage_marker", False):
        info = model.export_artifacts(mark_complete=False)  # stage.json is written below, last
    else:
        info = model.export_artifacts() if hasattr(model, "export_artifacts") else {}
    record = {**(info or {})}
    data = trainer.datamodule
    if getattr(model, "last_ranks", None) and getattr(data, "split", None) is not None:
        ids = data.dataset.user_ids
        users = data.split.users
        record["ranks"] = write_ranks(run_dir, _stage_name(model), model.last_ranks,
                                      [ids[int(u)] for u in users])
        record["evaluated_users"] = evaluated_users(model.last_ranks, len(users),
                                                    data.dataset.meta.get("max_users"))
    if timer is not None:
        extra = {"export": time.perf_counter() - start}
        selfplay = [cb for cb in trainer.callbacks if isinstance(cb, SelfPlayCallback)]
        if selfplay:
            extra["selfplay"] = sum(float(h.get("seconds", 0.0)) for cb in selfplay
                                    for h in cb.history)
        record["timing"] = timer.summary(extra)
    record.setdefault("protocol", _protocol(trainer, model))
    if valid is None:
        valid = {k.split("/", 1)[1]: float(v) for k, v in trainer.callback_metrics.items()
                 if k.startswith("val/")}
    if valid:
        record["valid"] = valid
    if test:
        record["test"] = test
    if seconds is not None:
        if timer is not None:
            seconds += record["timing"]["seconds"]["export"]  # a stage's time includes export
        record["seconds"] = round(seconds, 2)
    if provenance:
        record.update(provenance)
    record.setdefault("commit", _commit_once())  # the code that made it (not in the fingerprint)
    record.setdefault("packages", package_versions())  # and the installed libraries it ran on
    folder = stage_dir(run_dir, _stage_name(model))
    for leftover in (LAST_FILE, PARTIAL_FILE):  # resume state, done with
        (folder / "checkpoints" / leftover).unlink(missing_ok=True)
    mark_stage_complete(run_dir, _stage_name(model), record)
    (folder / RESUME_MARKER).unlink(missing_ok=True)
    return record


def evaluated_users(last_ranks: dict, of: int, sliced: int | None = None) -> dict:
    """How many users each reported split covers: ``{"valid": n, "test": n, "of": U}`` (the
    split's users), with ``"partial": true`` when a split covers fewer (``limit_val_batches``,
    ``limit_test_batches``) or the data are a slice (``data.max_users``, kept as ``"slice"``)."""
    out: dict = {split: int(len(last_ranks[split][0])) for split in ("valid", "test")
                 if last_ranks.get(split) is not None}
    out["of"] = int(of)
    if sliced is not None:
        out["slice"] = int(sliced)
    out["partial"] = sliced is not None or any(
        out[s] < of for s in ("valid", "test") if s in out)
    return out


def _protocol(trainer: L.Trainer, model: L.LightningModule) -> dict:
    """The evaluation settings a stage ran with (recorded in metrics.json)."""
    hp, out = model.hparams, {}
    data = trainer.datamodule
    if data is not None and hasattr(data, "max_history"):
        out["max_history"] = data.max_history
    for key in ("exclude_history", "num_beams", "ks"):
        if key in hp:
            out[key] = list(hp[key]) if key == "ks" else hp[key]
    return out


# -- pipeline ---------------------------------------------------------------------------------

def _metrics_from(results: list[dict], prefix: str) -> dict:
    out = {}
    for res in results or []:
        for k, v in res.items():
            if k.startswith(prefix + "/"):
                out[k.split("/", 1)[1]] = float(v)
    return out


def _has_step(model: L.LightningModule, name: str) -> bool:
    return is_overridden(name, model)


def stage_args(name: str, config: str, run_dir: Path, extra: list[str]) -> list[str]:
    """The LightningCLI arguments of one pipeline stage in ``run_dir``."""
    return ["--config", config,
            f"--model.init_args.run_dir={run_dir}", f"--data.init_args.run_dir={run_dir}",
            f"--trainer.default_root_dir={run_dir / name}",
            "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
            f"--trainer.logger.save_dir={run_dir / 'logs'}", f"--trainer.logger.name={name}",
            *extra]


def stage_cli(args: list[str], **kwargs) -> Align3CLI:
    """An :class:`Align3CLI` built from ``args`` alone (the command line of ``pipeline`` or
    ``experiment`` is not LightningCLI's, so it is hidden from it)."""
    argv, sys.argv = sys.argv, sys.argv[:1]
    # Resolving a config (fingerprints) seeds nothing that is used: no "Seed set to" for it.
    quiet = _DropMessages("Seed set to") if kwargs.get("parse_only") else None
    seed_log = logging.getLogger("lightning.fabric.utilities.seed")
    if quiet:
        seed_log.addFilter(quiet)
    try:
        return Align3CLI(args=args, run=False, **kwargs)
    finally:
        sys.argv = argv
        if quiet:
            seed_log.removeFilter(quiet)


def _relative_to_run(value, run_dir: str):
    """``value`` with every string path under ``run_dir`` rewritten as ``<run_dir>/...``."""
    if isinstance(value, dict):
        return {k: _relative_to_run(v, run_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative_to_run(v, run_dir) for v in value]
    if isinstance(value, str) and (value == run_dir or value.startswith(run_dir + os.sep)):
        return "<run_dir>" + value[len(run_dir):]
    return value


# <section>.init_args options whose value here leaves the computation as it was before the
# option.
NEUTRAL_OPTIONS = {
    "model": {"train_precision": "32", "user_scid_refresh": "False", "decode_prior": "0.0"},
    "data": {"collaborative_smoothing": "0.0", "task_draws": "fixed",
             "task_schedule": "mixed"},
}


def resolved_stage_config(name: str, config: str, run_dir: Path, extra: list[str]) -> dict:
    """The stage's fully resolved LightningCLI config (every default, every override), with
    paths inside ``run_dir`` made relative to it and the config-file list dropped: two stages
    with equal resolved configs run the same computation."""
    cli = stage_cli(stage_args(name, config, run_dir, extra), parse_only=True)
    try:  # jsonargparse >= 4.49 names the options so; older versions know the first names
        dumped = cli.parser.dump(cli.config, skip_validation=True, skip_unset=False)
    except TypeError:
        dumped = cli.parser.dump(cli.config, skip_check=True, skip_none=False)
    resolved = yaml.safe_load(dumped)
    resolved.pop("config", None)
    if resolved.get("patience") is None:  # unset: the config's callbacks stand (and
        resolved.pop("patience", None)    # fingerprints stay those of earlier versions)
    # Options added later, at the value that computes what the code did before them: dropped,
    # so that stages made before the option existed keep their fingerprints.
    for section, options in NEUTRAL_OPTIONS.items():
        init_args = (resolved.get(section) or {}).get("init_args") or {}
        for option, neutral in options.items():
            if option in init_args and str(init_args[option]) == neutral:
                init_args.pop(option)
    return _relative_to_run(resolved, str(run_dir))


def stage_fingerprint(name: str, config: str, run_dir: Path, extra: list[str],
                      upstream: dict[str, str]) -> dict:
    """``{"stage_fingerprint": hash, "upstream": {...}, "data_digest": ...}`` of a stage: a
    hash of its resolved config (seed included), of the contents of its dataset's source
    files, and of the digests (fingerprint + exported contents) of the earlier stages it reads
    (``reads_stages`` of its classes; all earlier ones when they do not say), so that equal
    fingerprints mean equal inputs and equal computation."""
    resolved = resolved_stage_config(name, config, run_dir, extra)
    reads = _declared_reads(resolved)
    version = _class_attribute(resolved, "model", "artifacts_version")
    if version is not None:  # what the stage writes changed: stages made before are not it
        resolved = {**resolved, "artifacts_version": version}
    if reads is not None:  # only what the stage reads (so unrelated stages never differ it)
        upstream = {k: v for k, v in upstream.items() if k in reads}
    data = (resolved.get("data") or {}).get("init_args") or {}
    digest = None
    if data.get("dataset"):
        from datamodules.sources import dataset_digest

        def real(path):  # the resolved config writes paths inside the run as <run_dir>/...
            return str(run_dir) + path[len("<run_dir>"):] if isinstance(path, str) and \
                path.startswith("<run_dir>") else path

        digest = dataset_digest(data["dataset"], data.get("source") or "auto",
                                real(data.get("data_dir")), real(data.get("cache_dir")))
    return {"stage_fingerprint": fingerprint(name, resolved, upstream, digest),
            "upstream": dict(upstream), "data_digest": digest}


def _class_attribute(resolved: dict, key: str, name: str):
    """Attribute ``name`` of the class of the resolved config's ``key`` (``model``/``data``),
    or ``None`` when the class or the attribute is not there."""
    import importlib

    path = (resolved.get(key) or {}).get("class_path")
    if not path:
        return None
    module, _, cls = path.rpartition(".")
    try:
        return getattr(getattr(importlib.import_module(module), cls), name, None)
    except (ImportError, AttributeError):
        return None


def _declared_reads(resolved: dict) -> set[str] | None:
    """The run-directory stages a stage's model and DataModule declare they read
    (``reads_stages``), or ``None`` when either class does not say (then every earlier
    stage counts)."""
    out: set[str] = set()
    for key in ("model", "data"):
        reads = _class_attribute(resolved, key, "reads_stages")
        if reads is None:
            return None
        out.update(reads)
    return out


RESUME_MARKER = ".resume.json"  # in a stage folder while the stage runs: what it computes


def _prepare_resume(folder: Path, fp: str | None, resumable: bool,
                    rank0: bool) -> tuple[str, int] | None:
    """``(last.ckpt, its epoch)`` to continue from when an interrupted run of the same stage
    (same fingerprint) left one; otherwise ``None``, after clearing the stage's old
    checkpoints (no stale ``best.ckpt`` survives a fresh start)."""
    import json
    import shutil

    import torch

    ckdir, marker = folder / "checkpoints", folder / RESUME_MARKER
    last = ckdir / LAST_FILE
    if resumable and marker.exists() and last.exists():
        try:
            same = json.loads(marker.read_text()).get("stage_fingerprint") == fp
        except (OSError, ValueError):
            same = False
        if same:
            try:
                epoch = int(torch.load(last, map_location="cpu", weights_only=False)["epoch"])
                log.info("stage %s: resuming the interrupted run from %s (epoch %s)",
                         folder.name, last, epoch)
                return str(last), epoch
            except Exception as err:  # noqa: BLE001 - a torn write; start over
                log.warning("stage %s: %s is unreadable (%s); the stage starts over",
                            folder.name, last, err)
    if rank0:
        if ckdir.exists():
            shutil.rmtree(ckdir)
        folder.mkdir(parents=True, exist_ok=True)
        from lightning_modules.components.artifacts import atomic_write_json

        atomic_write_json(marker, {"stage_fingerprint": fp})
    return None


def run_stage(name: str, config: str, run_dir: Path, extra: list[str],
              provenance: dict | None = None) -> dict | None:
    """Fit, validate and test one stage with its best checkpoint; export its artifacts."""
    cli = stage_cli(stage_args(name, config, run_dir, extra), in_pipeline=True)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    timer = StageTimer()
    trainer.callbacks.append(timer)
    if not sys.stderr.isatty():  # logs to a file: plain progress lines instead of a bar
        trainer.callbacks.append(PlainProgress(name))
    folder = run_dir / name
    for cb in trainer.callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath is None:
            cb.dirpath = str(folder / "checkpoints")
    fp = (provenance or {}).get("stage_fingerprint")
    resumable = bool(fp) and trainer.checkpoint_callbacks and getattr(model, "resumable", True)
    if resumable:
        trainer.callbacks.extend([RNGState(), last_checkpoint(folder / "checkpoints")])
    resume = _prepare_resume(folder, fp, resumable, trainer.is_global_zero)
    if resume:
        resume, epoch = resume
        provenance = {**provenance, "resumed_from": epoch}
    timer.begin_stage()
    validates = _has_step(model, "validation_step") and trainer.limit_val_batches != 0
    start_valid = start_ranks = None
    if validates and getattr(model, "keep_start", False) and trainer.checkpoint_callback:
        # The policy the stage starts from is a candidate too (before fit, the model holds it
        # also when the fit below resumes from a checkpoint).
        start_valid = _metrics_from(trainer.validate(model, datamodule=data), "val")
        start_ranks = (getattr(model, "last_ranks", None) or {}).get("valid")
    trainer.fit(model, datamodule=data, ckpt_path=resume)
    ckpt = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    ckpt = ckpt or None
    valid = test = None
    if validates:
        valid = _metrics_from(trainer.validate(model, datamodule=data, ckpt_path=ckpt), "val")
        if start_valid is not None:
            valid = _select_start(trainer, model, start_valid, start_ranks, valid, ckpt)
        ckpt = None  # weights of the best checkpoint (or the start) are loaded now
    if _has_step(model, "test_step") and trainer.limit_test_batches != 0:
        test = _metrics_from(trainer.test(model, datamodule=data, ckpt_path=ckpt), "test")
    if timer.seconds_before_resume:
        before = round(timer.seconds_before_resume, 2)
        provenance = {**(provenance or {}), "seconds_before_resume": before}
    return export_stage(trainer, model, timer.stage_seconds(), valid, test, timer, provenance)


def _select_start(trainer: L.Trainer, model: L.LightningModule, start_valid: dict,
                  start_ranks, trained_valid: dict, ckpt: str | None) -> dict:
    """Keep the starting policy when the trained one does not beat it on the full validation
    set, by the metric the stage's checkpoint monitors (a tie keeps the start). Returns the
    validation of the kept policy; records the choice in ``model.selection``."""
    monitor = trainer.checkpoint_callback.monitor or "val/ndcg@10"
    key = monitor.split("/", 1)[-1]
    if key not in start_valid or key not in trained_valid:
        raise ConfigError(f"keep_start: the validation has no {key!r} (the checkpoint's "
                          f"monitor {monitor!r}); got {sorted(trained_valid)}")
    maximize = getattr(trainer.checkpoint_callback, "mode", "max") == "max"
    a, b = start_valid[key], trained_valid[key]
    keep = a >= b if maximize else a <= b
    model.selection = {"policy": "start" if keep else "trained", "metric": key,
                       "start_valid": start_valid, "trained_valid": trained_valid}
    log.info("%s: the %s policy is kept (valid %s: start %.4f, trained %.4f)",
             _stage_name(model), "starting" if keep else "trained", key, a, b)
    if not keep:
        return trained_valid
    model.restore_start()
    if start_ranks is not None:
        model.last_ranks["valid"] = start_ranks
    if ckpt:  # the stage's checkpoint holds what it reports
        trainer.save_checkpoint(ckpt)
    return start_valid


def _why_not_complete(marker: Path, fp: str) -> str | None:
    """Why a finished stage must run again (``None``: it is complete and up to date)."""
    from lightning_modules.components.artifacts import artifact_problems

    try:
        record = read_json(marker)
    except ValueError as err:
        return str(err)
    recorded = record.get("stage_fingerprint")
    if recorded is None:
        return "it records no fingerprint (written by an older version)"
    if recorded != fp:
        return f"its config, seed or upstream changed (fingerprint {recorded} -> {fp})"
    problems = artifact_problems(marker.parent, record)
    return "; ".join(problems) if problems else None


def check_stage_flags(parser: argparse.ArgumentParser, passthrough: list[str], command: str,
                      allow_seed: bool) -> None:
    """Every pass-through ``--`` flag must be a stage flag (``--trainer.``, ``--model.``,
    ``--data.``, and ``--seed_everything`` where ``allow_seed``); otherwise a parser error."""
    prefixes = ("--trainer.", "--model.", "--data.", "--patience") + (
        ("--seed_everything",) if allow_seed else ())
    bad = [a for a in passthrough
           if a.startswith("--") and not a.split("=")[0].startswith(prefixes)]
    if bad:
        parser.error(f"unknown {command} arguments {bad}; stage flags must start with "
                     "--trainer., --model. or --data. (or be --patience)")


def load_spec(parser: argparse.ArgumentParser, path: Path, keys: frozenset, kind: str) -> dict:
    """A pipeline/experiment YAML as a dict; a parser error naming the file for a missing file,
    a non-mapping or keys outside ``keys``."""
    if not path.exists():
        parser.error(f"{path}: no such {kind} config")
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict):
        parser.error(f"{path}: expected a mapping with {sorted(keys)}")
    unknown = sorted(set(spec) - keys)
    if unknown:
        parser.error(f"{path}: unknown key(s) {unknown}; a {kind} YAML accepts {sorted(keys)}")
    return spec


PASSTHROUGH_HELP = (
    "Any other flag goes to every stage's LightningCLI and must start with --trainer., "
    "--model. or --data. or be --patience (plus --seed_everything for pipeline), e.g. "
    "--trainer.max_epochs=1 --patience=3 --trainer.check_val_every_n_epoch=1 "
    "--data.init_args.max_users=100 --trainer.devices=2 --trainer.strategy=ddp; "
    "`python cli.py fit --config configs/ml100k/<stage>.yaml --help` lists a stage's options.")
PIPELINE_KEYS = frozenset({"dataset", "run_dir", "overrides", "stages"})
DATASET_KEYS = {"name": "dataset", "source": "source", "data_dir": "data_dir",
                "kcore": "kcore", "item_text_fields": "item_text_fields",
                "user_text_fields": "user_text_fields", "templates": "templates"}


def _dataset_block(parser: argparse.ArgumentParser, path: Path, value) -> tuple[str, dict]:
    """``dataset:`` of a pipeline YAML: a label (a string), or a block that configures the
    data of every stage (``name``, ``source``, ``data_dir``, ``kcore``, text fields,
    ``templates``). Returns the label and the block (empty for a label)."""
    if value is None or isinstance(value, str):
        return value or "", {}
    if not isinstance(value, dict) or "name" not in value:
        parser.error(f"{path}: 'dataset' must be a name or a mapping with 'name' (and "
                     f"optionally {sorted(set(DATASET_KEYS) - {'name'})})")
    unknown = sorted(set(value) - set(DATASET_KEYS))
    if unknown:
        parser.error(f"{path}: dataset has unknown key(s) {unknown}; it accepts "
                     f"{sorted(DATASET_KEYS)}")
    return str(value["name"]), dict(value)


def _dataset_flags(block: dict, accepted: dict) -> list[str]:
    """The block as ``--data.init_args.*`` flags; text fields and templates go only to the
    stages whose DataModule takes them (the tokenizer's text, the sft prompts)."""
    import json

    flags = []
    for key, arg in DATASET_KEYS.items():
        if key not in block or (key not in ("name", "source", "data_dir") and
                                arg not in accepted):
            continue
        value = block[key]
        text = json.dumps(value) if isinstance(value, (list, dict)) or value is None else value
        flags.append(f"--data.init_args.{arg}={text}")
    return flags
STAGE_KEYS = frozenset({"name", "config", "overrides"})


def pipeline_stage_extra(stage: dict, run_dir: Path, block: dict, shared: list[str],
                         stage_configs: list[str], passthrough: list[str]) -> list[str]:
    """The flags after a pipeline stage's own config: the ``--stage_config`` files, the
    dataset block's data flags (those the stage's DataModule takes), the pipeline's and the
    stage's overrides, then the command line's (later flags win)."""
    composed = [x for extra in stage_configs for x in ("--config", extra)]
    extra = composed + shared + [str(a) for a in stage.get("overrides", [])] + passthrough
    if block:
        accepted = resolved_stage_config(stage["name"], stage["config"], run_dir, extra).get(
            "data", {}).get("init_args", {})
        # The dataset block goes first: the stage's overrides and the command line win.
        extra = composed + _dataset_flags(block, accepted) + extra[len(composed):]
    return extra


def pipeline(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cli.py pipeline",
        description="Run the stages of a pipeline YAML into one run directory.",
        epilog=PASSTHROUGH_HELP)
    parser.add_argument("--config", required=True,
                        help="pipeline YAML (configs/<dataset>/pipeline.yaml)")
    parser.add_argument("--run_dir", default=None, help="run directory (default: from the YAML)")
    parser.add_argument("--stages", default=None,
                        help="comma-separated subset of stages to run (default: all in the YAML)")
    parser.add_argument("--stage_config", action="append", default=[],
                        help="extra YAML composed after every stage's config, e.g. "
                             "configs/trainer/gpu.yaml (repeatable)")
    parser.add_argument("--force", action="store_true",
                        help="re-run stages even when their artifacts are complete")
    parser.add_argument("--reuse", action="append", default=[], metavar="DIR",
                        help="copy a stage from a run under DIR whose fingerprint (resolved "
                             "config, seed, upstream stages) is the same instead of "
                             "recomputing it (repeatable)")
    parser.add_argument("--lock_dir", default=None, metavar="DIR",
                        help="lock each stage's fingerprint under DIR while it is computed, so "
                             "that pipelines running at the same time with the same --reuse "
                             "compute an equal stage once (experiment --workers sets it)")
    args, passthrough = parser.parse_known_args(argv)
    check_stage_flags(parser, passthrough, "pipeline", allow_seed=True)
    cfg_path = Path(args.config)
    spec = load_spec(parser, cfg_path, PIPELINE_KEYS, "pipeline")
    stages = spec.get("stages")
    if not stages or not isinstance(stages, list):
        parser.error(f"{cfg_path}: expected a non-empty 'stages' list")
    for i, entry in enumerate(stages):
        if not isinstance(entry, dict) or "name" not in entry or "config" not in entry:
            parser.error(f"{cfg_path}: stages[{i}] must be a mapping with 'name' and 'config'")
        bad = sorted(set(entry) - STAGE_KEYS)
        if bad:
            parser.error(f"{cfg_path}: stage '{entry['name']}' has unknown key(s) {bad}; a "
                         f"stage entry accepts {sorted(STAGE_KEYS)}")
    run_dir = Path(args.run_dir or spec.get("run_dir") or "runs/default")
    wanted = set(args.stages.split(",")) if args.stages else None
    label, block = _dataset_block(parser, cfg_path, spec.get("dataset"))
    shared = [str(a) for a in spec.get("overrides", [])]
    names = [s["name"] for s in stages]
    if wanted and not wanted <= set(names):
        parser.error(f"--stages {sorted(wanted - set(names))} not in {cfg_path} ({names})")
    run_dir.mkdir(parents=True, exist_ok=True)
    # Under DDP the children re-run this command; only the first process writes reports.
    rank0 = os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"
    upstream: dict[str, str] = {}  # fingerprints of the stages before, by name
    for stage in stages:
        name = stage["name"]
        config = stage["config"]
        marker = stage_dir(run_dir, name) / "stage.json"
        if wanted and name not in wanted:
            if stage_complete(run_dir, name):  # not run now, but it feeds the later stages
                upstream[name] = upstream_digest(read_json(marker))
            continue
        if not Path(config).exists():
            raise FileNotFoundError(f"{cfg_path}: stage '{name}' config {config} does not exist")
        extra = pipeline_stage_extra(stage, run_dir, block, shared, args.stage_config,
                                     passthrough)
        provenance = stage_fingerprint(name, config, run_dir, extra, upstream)
        fp = provenance["stage_fingerprint"]
        if marker.exists() and not args.force:
            why = _why_not_complete(marker, fp)
            if why is None:
                log.info("stage %s: complete in %s, skipped", name, stage_dir(run_dir, name))
                upstream[name] = upstream_digest(read_json(marker))
                continue
            log.warning("stage %s: complete in %s, but %s; re-running", name,
                        stage_dir(run_dir, name), why)
        if marker.exists() and rank0:
            # Re-run: the stage is not complete again until its new stage.json.
            marker.unlink()
        # With --lock_dir, a concurrent pipeline computing the same stage finishes it first
        # and this one copies it (only rank 0 locks: DDP children join the computation).
        waiting = functools.partial(log.info, "stage %s: another pipeline is computing the same "
                                    "stage (fingerprint %s); waiting to reuse it", name, fp)
        with stage_lock(args.lock_dir if rank0 else None, name, fp, on_wait=waiting):
            source = None if args.force else find_stage(args.reuse, name, fp)
            if source is not None:
                if rank0:
                    copy_stage(source, stage_dir(run_dir, name))
                    log.info("stage %s: same config, seed and upstream as %s; copied, not "
                             "recomputed", name, source)
                    write_reports(run_dir, label, names)
                upstream[name] = upstream_digest(read_json(stage_dir(source.parent, name)
                                                           / "stage.json"))
                continue
            log.info("stage %s: running %s", name, config)
            record = run_stage(name, config, run_dir, extra, provenance)
            if record is not None:  # rank 0; the other ranks only help compute the stage
                upstream[name] = upstream_digest(read_json(marker))
            if rank0:
                write_reports(run_dir, label, names)
    if rank0:
        path = write_reports(run_dir, label, names)
        print(f"metrics: {path}\nreport:  {run_dir / 'report.md'}\n"
              f"logs:    tensorboard --logdir {run_dir / 'logs'}")
        for name in names:
            if stage_complete(run_dir, name):
                rec = read_json(stage_dir(run_dir, name) / "stage.json")
                if "test" in rec:
                    print(f"{name:10s} test " + "  ".join(f"{k}={v:.4f}"
                                                          for k, v in rec["test"].items()))
    return 0


def default_threads() -> int:
    """Torch CPU threads of a run: ``$ALIGN3GR_THREADS``, else ``$OMP_NUM_THREADS``, else half
    the usable cores (at most 4).

    On an idle 2-core machine a second intra-op thread made an sft step 1.8x faster, but
    threads that spin on cores shared with other processes made steps up to 5x slower on a
    busy one (README "CPU note"). Half the cores is the compromise that leaves room for other
    jobs; set either variable to use more.
    """
    for var in ("ALIGN3GR_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var)
        if value:
            try:
                n = int(value)
            except ValueError:
                raise SystemExit(f"{var}={value!r}: expected a positive integer") from None
            if n < 1:
                raise SystemExit(f"{var}={value!r}: expected a positive integer")
            return n
    return max(1, min(4, _usable_cores() // 2))


def _usable_cores() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1


USAGE = """usage: cli.py SUBCOMMAND [options]

subcommands:
  fit        train one stage from a YAML (--config configs/<dataset>/<stage>.yaml)
  validate   evaluate a stage's model on the validation split (--ckpt_path ...)
  test       evaluate a stage's model on the test split (--ckpt_path ...)
  predict    write top-k recommendations with a stage's model (--ckpt_path ...)
  pipeline   run every stage of a pipeline YAML into one run directory (the main job)
  experiment run the rows of an experiment YAML with several seeds; intervals, paired tests
  breakdown  where stages differ: per group of users (target popularity, history length)
  serve      serve a trained model over HTTP with LitServe (POST /predict, GET /health)

examples:
  python cli.py pipeline --config configs/ml100k/pipeline.yaml --run_dir runs/ml100k
  python cli.py fit --config configs/ml100k/sasrec.yaml --trainer.devices 2 --trainer.strategy ddp
  python cli.py SUBCOMMAND --help     options of one subcommand

CPU threads: half the usable cores (at most 4) unless ALIGN3GR_THREADS or OMP_NUM_THREADS is set.
"""


EXPERIMENT_KEYS = frozenset({"name", "seeds", "reference", "rows", "resamples", "steps"})
ROW_KEYS = frozenset({"name", "pipeline", "stages", "compare", "flags", "stage_flags", "skip"})


# The libraries whose versions can move a stage's numbers (the sft stage's did between two
# installs of the same commit; README "Reproducibility across installs").
RECORDED_PACKAGES = ("torch", "transformers", "tokenizers", "peft", "lightning", "numpy",
                     "sentence-transformers", "faiss-gpu", "faiss-cpu")


@functools.cache
def package_versions() -> dict[str, str]:
    """``{name: version}`` of :data:`RECORDED_PACKAGES` that are installed."""
    from importlib import metadata

    out = {}
    for name in RECORDED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


@functools.cache
def _commit_once() -> str | None:
    """:func:`git_commit` (short, dirty marked) of this process, asked once."""
    return git_commit(short=True, mark_dirty=True)


def _add_invocation(out: Path, seconds: float, report_only: bool) -> float:
    """Append this invocation to ``<out>/invocations.json`` (a killed experiment resumes in
    several) and return the wall seconds of all of them that ran stages."""
    from lightning_modules.components.artifacts import atomic_write_json

    path = out / "invocations.json"
    done = read_json(path) if path.exists() else []
    if not report_only:
        done.append({"finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "seconds": round(seconds, 1), "commit": _commit_once()})
        atomic_write_json(path, done)
    return round(sum(float(i["seconds"]) for i in done), 1)


def git_commit(short: bool = False, mark_dirty: bool = False) -> str | None:
    """The checkout's commit (``short``: abbreviated; ``mark_dirty``: ``+dirty`` when tracked
    files differ from it), or ``None`` outside a git checkout."""
    import subprocess

    root = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", *(["--short"] if short else []), "HEAD"],
                                cwd=root, check=True, capture_output=True,
                                text=True).stdout.strip()
        if mark_dirty and subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                capture_output=True, text=True).stdout.strip():
            commit += "+dirty"
        return commit
    except (OSError, subprocess.CalledProcessError):
        return None


def experiment(argv: list[str]) -> int:
    """Rows x seeds of pipeline runs, then intervals over seeds and paired tests (see
    ``lightning_modules.components.experiment``)."""
    from lightning_modules.components.artifacts import atomic_write_json, atomic_write_text
    from lightning_modules.components.experiment import (
        collect_results,
        plot_means,
        render_markdown,
        run_dir_of,
    )

    parser = argparse.ArgumentParser(
        prog="cli.py experiment", epilog=PASSTHROUGH_HELP,
        description="Run every row of an experiment YAML with several seeds; write "
                    "results.json, results.md and a plot. Killed runs resume.")
    parser.add_argument("--config", required=True, help="experiment YAML")
    parser.add_argument("--out", required=True, help="experiment directory")
    parser.add_argument("--seeds", type=int, default=None,
                        help="number of seeds (default: the YAML's, else 3)")
    parser.add_argument("--seed_list", default=None, metavar="S1,S2,...",
                        help="run and report exactly these seeds instead of 0..N-1, e.g. 3,4 "
                             "to add two seeds to a 3-seed experiment in another directory")
    parser.add_argument("--rows", default=None, help="comma-separated subset of rows")
    parser.add_argument("--report_only", action="store_true",
                        help="run nothing: write results.json/.md/.png from the runs already "
                             "in --out (unfinished ones are listed as incomplete)")
    parser.add_argument("--reuse", action="append", default=[], metavar="DIR",
                        help="also reuse equal stages (same fingerprint) from runs under DIR, "
                             "e.g. another experiment (repeatable; this experiment's own runs "
                             "are always searched)")
    parser.add_argument("--workers", type=int, default=1,
                        help="runs computed at the same time, each a separate process with "
                             "its share of the CPU threads (default 1: one after the other in "
                             "this process); stages shared by rows are still computed once")
    args, passthrough = parser.parse_known_args(argv)
    check_stage_flags(parser, passthrough, "experiment", allow_seed=False)
    if args.workers < 1:
        parser.error(f"--workers {args.workers}: expected a positive integer")
    path = Path(args.config)
    spec = load_spec(parser, path, EXPERIMENT_KEYS, "experiment")
    rows = spec.get("rows") or []
    if not rows or not isinstance(rows, list):
        parser.error(f"{path}: expected a non-empty 'rows' list")
    pipelines = {}
    for row in rows:
        extra = sorted(set(row) - ROW_KEYS) if isinstance(row, dict) else []
        if not isinstance(row, dict) or extra or "name" not in row or "pipeline" not in row:
            parser.error(f"{path}: row {row.get('name', '?') if isinstance(row, dict) else row!r}"
                         f" needs 'name' and 'pipeline' (accepted keys {sorted(ROW_KEYS)}; "
                         f"unknown: {extra})")
        pipe = load_spec(parser, Path(row["pipeline"]), PIPELINE_KEYS, "pipeline")
        names = [s["name"] for s in pipe.get("stages") or []]
        row.setdefault("stages", names)
        for key, listed in (("stages", row["stages"]), ("stage_flags", row.get("stage_flags"))):
            unknown = sorted(set(listed or []) - set(names))
            if unknown:
                parser.error(f"{path}: row {row['name']!r} {key} {unknown} are not stages of "
                             f"{row['pipeline']} ({names})")
        row["compare"] = row.get("compare") or row["stages"][-1]
        pipelines[row["name"]] = pipe
    if args.rows:
        wanted = args.rows.split(",")
        missing = sorted(set(wanted) - {r["name"] for r in rows})
        if missing:
            parser.error(f"--rows {missing} not in {path}")
        rows = [r for r in rows if r["name"] in wanted]
    if args.seed_list is not None:
        if args.seeds is not None:
            parser.error("--seeds and --seed_list: give one of them")
        try:
            seeds = sorted({int(s) for s in args.seed_list.split(",")})
        except ValueError:
            seeds = []
        if not seeds or min(seeds) < 0:
            parser.error(f"--seed_list {args.seed_list!r}: expected comma-separated "
                         "non-negative integers, e.g. 3,4")
    else:
        seeds = list(range(args.seeds or int(spec.get("seeds", 3))))
    reference = spec.get("reference") or rows[0]["name"]
    out = Path(args.out)
    started = time.perf_counter()
    jobs: list[tuple[str, int, list[str]]] = []  # (row, seed, pipeline argv), row after row
    for row in [] if args.report_only else rows:
        if row.get("skip"):
            log.info("experiment: row %s skipped: %s", row["name"], row["skip"])
            continue
        config = row["pipeline"]
        if row.get("stage_flags"):
            # The row's own pipeline: the named stages get the row's extra flags.
            pipe = dict(pipelines[row["name"]])
            pipe["stages"] = [{**st, "overrides": [*st.get("overrides", []),
                                                   *row["stage_flags"].get(st["name"], [])]}
                              for st in pipe["stages"]]
            config = str(out / "pipelines" / f"{row['name']}.yaml")
            atomic_write_text(config, f"# row {row['name']} of {path}: {row['pipeline']} "
                                      "with the row's stage_flags\n"
                              + yaml.safe_dump(pipe, sort_keys=False))
        for seed in seeds:
            jobs.append((row["name"], seed, [
                "--config", config, "--run_dir", str(run_dir_of(out, row["name"], seed)),
                "--stages", ",".join(row["stages"]), f"--seed_everything={seed}",
                "--reuse", str(out / "runs"), *[x for d in args.reuse for x in ("--reuse", d)],
                f"--data.init_args.seed={seed}",
                *[str(f) for f in row.get("flags", [])], *passthrough]))
    failed = []
    if args.workers == 1:
        for name, seed, argv_ in jobs:
            log.info("experiment: row %s, seed %d -> %s", name, seed, run_dir_of(out, name, seed))
            pipeline(argv_)
    elif jobs:
        failed = run_workers(jobs, args.workers, out)
    results = collect_results(out, {**spec, "reference": reference}, rows, seeds,
                              resamples=int(spec.get("resamples", 1000)))
    ran = [r["name"] for r in rows if not r.get("skip")]
    first = run_dir_of(out, ran[0], seeds[0]) / "metrics.json" if ran else None
    results["protocol"] = read_json(first).get("protocol") if first and first.exists() else None
    results["wall_seconds"] = _add_invocation(out, time.perf_counter() - started,
                                              args.report_only)
    # The commit the runs were made with; a report of earlier runs cannot know it.
    results["commit"] = None if args.report_only else git_commit()
    if args.report_only:
        results["reported_with_commit"] = git_commit()
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", render_markdown(results))
    plot = plot_means(results, out / "results.png")
    print(f"results: {out / 'results.json'}\nreport:  {out / 'results.md'}"
          + (f"\nplot:    {plot}" if plot else ""))
    if failed:
        print("failed runs (the report lists them as incomplete; run the command again to "
              "resume them):\n" + "\n".join(f"  {f}" for f in failed), file=sys.stderr)
        return 1
    return 0


BREAKDOWN_KEYS = ("popularity", "history")


def breakdown(argv: list[str]) -> int:
    """Per group of users (by the target's popularity or the history's length), each stage's
    mean metric and its paired difference against a reference stage, seeds pooled."""
    import re

    import numpy as np

    from datamodules.base import RecDataModule
    from datamodules.sources import dataset_digest
    from lightning_modules.components.artifacts import atomic_write_json, read_json
    from lightning_modules.components.breakdown import (
        breakdown_table,
        quantile_groups,
        render_breakdown,
    )
    from lightning_modules.components.experiment import run_dir_of
    from lightning_modules.components.statistics import per_user_metrics

    parser = argparse.ArgumentParser(
        prog="cli.py breakdown",
        description="Where stages differ: the users of a split in groups of about equal size "
                    "by how often their target item occurs in the training sequences "
                    "(--by popularity) or by the length of their history (--by history); "
                    "per group each stage's mean metric and its paired difference against "
                    "the reference stage (bootstrap 95%% interval over the users, the runs' "
                    "seeds pooled).")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--runs", nargs="+", metavar="RUN_DIR",
                       help="run directories holding the stages (one per seed), e.g. "
                            "runs/exp/runs/shipped/seed0 runs/exp/runs/shipped/seed1")
    where.add_argument("--experiment", metavar="OUT",
                       help="an experiment directory: --stages then names ROW:STAGE columns, "
                            "e.g. layers_4:sft,shipped:sft, paired seed by seed over the "
                            "seeds that every column has")
    parser.add_argument("--stages", required=True,
                        help="comma-separated stages to compare, e.g. sasrec,sft,dpo (with "
                             "--experiment: ROW:STAGE, e.g. shipped:sasrec,shipped:sft)")
    parser.add_argument("--reference", default=None,
                        help="stage the others are compared with (default: the first)")
    parser.add_argument("--config", default="configs/ml100k/pipeline.yaml",
                        help="pipeline YAML whose dataset the runs were made from")
    parser.add_argument("--data_dir", default=None,
                        help="the dataset's folder, if not the pipeline YAML's")
    parser.add_argument("--split", default="test", choices=("valid", "test"))
    parser.add_argument("--by", default="popularity", choices=BREAKDOWN_KEYS)
    parser.add_argument("--groups", type=int, default=5,
                        help="groups of about equal size (default 5)")
    parser.add_argument("--metric", default="ndcg@10", help="recall@K or ndcg@K (default ndcg@10)")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--out", default=None, help="also write the table as JSON here")
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    if len(set(stages)) != len(stages):
        parser.error(f"--stages {stages}: a column is named twice")
    reference = args.reference or stages[0]
    if reference not in stages:
        parser.error(f"--reference {reference!r} is not in --stages {stages}")
    try:
        kind, k = args.metric.split("@")
        ks = (int(k),)
    except ValueError:
        kind, ks = "", ()
    if kind not in ("recall", "ndcg") or not ks or ks[0] < 1:
        parser.error(f"--metric {args.metric!r}: expected recall@K or ndcg@K, e.g. ndcg@10")
    if args.groups < 1 or args.resamples < 1:
        parser.error("--groups and --resamples must be positive integers")
    # columns[stage][j]: the stage folder of the j-th seed (run) of that column.
    if args.runs:
        runs = [str(r) for r in args.runs]
        columns = {st: [Path(r) / st for r in runs] for st in stages}
    else:
        out = Path(args.experiment)
        pairs = [st.split(":") for st in stages]
        if any(len(p) != 2 or not all(p) for p in pairs):
            parser.error(f"--stages {stages}: with --experiment each column is ROW:STAGE, "
                         "e.g. shipped:sft")
        seeds = None
        for row, stage in pairs:
            found = {int(m.group(1)) for d in run_dir_of(out, row, 0).parent.glob("seed*")
                     if (m := re.fullmatch(r"seed(\d+)", d.name))
                     and (d / stage / "stage.json").exists()}
            if not found:
                parser.error(f"{run_dir_of(out, row, 0).parent}: no completed stage "
                             f"{stage!r} of row {row!r} in the experiment {out}")
            seeds = found if seeds is None else seeds & found
        if not seeds:
            parser.error(f"the rows of --stages {stages} have no seed in common in {out}")
        runs = [f"seed {k}" for k in sorted(seeds)]
        columns = {st: [run_dir_of(out, row, k) / stage for k in sorted(seeds)]
                   for st, (row, stage) in zip(stages, pairs)}
    cfg_path = Path(args.config)
    label, block = _dataset_block(parser, cfg_path, load_spec(
        parser, cfg_path, PIPELINE_KEYS, "pipeline").get("dataset"))
    name = block.get("name") or label or "ml-100k"
    source = block.get("source") or "auto"
    data_dir = args.data_dir or block.get("data_dir")
    digest = dataset_digest(name, source, data_dir)
    sliced = set()
    for folders in columns.values():
        for folder in folders:
            marker = folder / "stage.json"
            if not marker.exists():
                raise FileNotFoundError(f"{folder}: no completed stage {folder.name!r} here "
                                        f"(stage.json missing)")
            record = read_json(marker)
            if record.get("data_digest") not in (None, digest):
                parser.error(f"{folder} was made from other data (digest "
                             f"{record['data_digest']}) than the dataset {name!r} of "
                             f"{cfg_path} (digest {digest}); pass the pipeline YAML (or "
                             f"--data_dir) the run was made with")
            if f"ranks_{args.split}.npy" not in record.get("ranks", []):
                parser.error(f"{folder}: the stage wrote no ranks_{args.split}.npy (it has "
                             f"{record.get('ranks') or 'no per-user ranks'})")
            sliced.add((record.get("evaluated_users") or {}).get("slice"))
    if len(sliced) > 1:
        parser.error("the stages were evaluated on different slices of users "
                     f"{sorted(sliced, key=str)}")
    data = RecDataModule(dataset=name, source=source, data_dir=data_dir,
                         kcore=block.get("kcore"), max_users=sliced.pop())
    data.prepare_data()
    data.setup()
    split = data.split
    row_of = {str(data.dataset.user_ids[u]): i for i, u in enumerate(split.users.tolist())}
    if args.by == "popularity":
        per_row = split.train_item_counts()[split.target(args.split)]
    else:
        per_row = np.array([len(s) for s in split.train_items]) + (args.split == "test")
    keys, metrics = [], {s: [] for s in stages}
    for j in range(len(runs)):
        users, first = None, columns[stages[0]][j]
        for stage in stages:
            folder = columns[stage][j]
            ids = read_json(folder / "ranks_users.json").get(args.split) or []
            if users is None:
                users = ids
            elif ids != users:
                parser.error(f"{folder}: its {args.split} users differ from those of "
                             f"{first}; the stages must be evaluated on the same users")
            ranks = np.load(folder / f"ranks_{args.split}.npy")
            if len(ranks) != len(ids):
                parser.error(f"{folder}: ranks_{args.split}.npy has {len(ranks)} ranks for "
                             f"{len(ids)} users in ranks_users.json")
            metrics[stage].append(per_user_metrics(ranks, ks)[args.metric])
        unknown = [u for u in users if u not in row_of]
        if unknown:
            parser.error(f"{first}: {len(unknown)} evaluated users are not in the dataset's "
                         f"split (e.g. {unknown[0]!r})")
        keys.append(per_row[[row_of[u] for u in users]])
    keys = np.concatenate(keys)
    metrics = {s: np.concatenate(v) for s, v in metrics.items()}
    table = breakdown_table(keys, metrics, reference, quantile_groups(keys, args.groups),
                            resamples=args.resamples)
    label = {"popularity": "target's training interactions",
             "history": f"{args.split} history length"}[args.by]
    print(f"{args.split} {args.metric} by {label}: {len(runs)} run(s), "
          f"{keys.size:,} user rows, difference against {reference} (95% bootstrap interval)")
    print(render_breakdown(table, reference, label, args.metric))
    if args.out:
        atomic_write_json(args.out, {
            "runs": runs, "columns": {s: [str(f) for f in v] for s, v in columns.items()},
            "reference": reference, "split": args.split, "by": args.by,
            "metric": args.metric, "table": table})
    return 0


def run_workers(jobs: list[tuple[str, int, list[str]]], workers: int, out: Path) -> list[str]:
    """Run the experiment's pipelines as ``workers`` concurrent ``cli.py pipeline`` processes,
    each with its share of the CPU threads and a log file under ``<out>/logs/``; returns the
    failed runs. Jobs are taken in row-then-seed order, so the workers start on different
    seeds; stages that several rows share wait on a lock (``--lock_dir``) and are computed
    once, then copied."""
    import subprocess
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from lightning_modules.components.experiment import run_dir_of

    if any(os.environ.get(v) for v in ("ALIGN3GR_THREADS", "OMP_NUM_THREADS")):
        threads = default_threads()  # the user's choice, per worker
    else:  # the cores shared out (2 workers on 2 cores: one thread each)
        threads = max(1, min(4, _usable_cores() // workers))
    env = {**os.environ, "ALIGN3GR_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    script = str(Path(__file__).resolve())
    failed: list[str] = []
    done = [0]
    guard = threading.Lock()
    log.info("experiment: %d runs on %d workers, %d torch thread(s) each; logs in %s",
             len(jobs), workers, threads, logs)

    def one(job: tuple[str, int, list[str]]) -> None:
        name, seed, argv_ = job
        path = logs / f"{name}_seed{seed}.log"
        log.info("experiment: row %s, seed %d started -> %s (log %s)", name, seed,
                 run_dir_of(out, name, seed), path)
        start = time.perf_counter()
        with open(path, "a") as handle:
            rc = subprocess.run([sys.executable, script, "pipeline", *argv_,
                                 "--lock_dir", str(out / "locks")], env=env, stdout=handle,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
        with guard:
            done[0] += 1
            if rc != 0:
                failed.append(f"row {name}, seed {seed}: exit {rc}, see {path}")
            log.log(logging.INFO if rc == 0 else logging.ERROR,
                    "experiment: [%d/%d] row %s, seed %d %s in %.0f s", done[0], len(jobs),
                    name, seed, "finished" if rc == 0 else f"FAILED (exit {rc}, log {path})",
                    time.perf_counter() - start)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, jobs))
    return failed


class _LevelFormatter(logging.Formatter):
    """``align3gr: message`` for information, ``WARNING align3gr: message`` above it."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"{record.levelname} " if record.levelno >= logging.WARNING else ""
        return f"{prefix}{record.name}: {record.getMessage()}" + (
            "\n" + self.formatException(record.exc_info) if record.exc_info else "")


class _DropMessages(logging.Filter):
    def __init__(self, *needles: str) -> None:
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(n in message for n in self.needles)


def quiet_third_party_logs() -> None:
    """Drop the noise of normal runs: faiss's CPU-feature probing at import, the TensorBoard
    reader's file-watcher lines (the plots read the logs), a deprecation inside Lightning and
    Lightning's advertisement for its cloud logger."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # its reader, for the plots
    # Lightning's own use of a torch API that torch has since deprecated (not ours to fix).
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # Short epochs (the tokenizer's 25 steps, slices) log at their end anyway.
    warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropMessages("litlogger", "LitLogger"))


def end_distributed() -> None:
    """Leave a finished multi-process run cleanly: wait for every rank, then close the process
    group. A rank that exits while its peers still talk to it through gloo can abort at
    interpreter shutdown ("terminate called without an active exception"), and Lightning's
    launcher then kills the whole run. A no-op in one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    handler = logging.StreamHandler()
    handler.setFormatter(_LevelFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    quiet_third_party_logs()
    import torch

    threads = default_threads()
    torch.set_num_threads(threads)
    log.info("torch CPU threads: %d (ALIGN3GR_THREADS or OMP_NUM_THREADS to change)", threads)
    if argv and argv[0] == "pipeline":
        code = pipeline(argv[1:])
        end_distributed()
        return code
    if argv and argv[0] == "experiment":
        return experiment(argv[1:])
    if argv and argv[0] == "breakdown":
        return breakdown(argv[1:])
    if argv and argv[0] == "serve":
        from lightning_modules.serve import serve

        return serve(argv[1:])
    # From the command line LightningCLI reads sys.argv itself (passing it too makes it warn).
    Align3CLI(args=None if from_command_line else argv)
    end_distributed()
    return 0


def console_main() -> int:
    """``main`` for the command line: errors the user can fix (a refused option, bad data, an
    unreadable artifact) end with their message as the last line, not under a traceback."""
    from datamodules.schema import DataError
    from lightning_modules.components.artifacts import ArtifactError

    try:
        return main()
    except (ConfigError, DataError, ArtifactError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(console_main())
