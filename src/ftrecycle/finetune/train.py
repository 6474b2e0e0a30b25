"""``finetune``: supervised fine-tuning of a causal LM, resumable, with an accuracy-vs-steps log.

Built on transformers' Trainer, so the same command runs under ``accelerate launch``
(FSDP or DeepSpeed configs in ``examples/``). Checkpoints live in a hidden work
directory beside the output (``.OUT.ftrecycle-run``); the output directory appears
only when training is complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ftrecycle.distributed import is_main, on_main, world
from ftrecycle.errors import ConfigError, DataError
from ftrecycle.evaluate import builtin
from ftrecycle.finetune import lora
from ftrecycle.finetune.card import finetune_card
from ftrecycle.finetune.config import FinetuneConfig
from ftrecycle.finetune.data import Collator, encode, load_examples
from ftrecycle.finetune.evalloss import EvalSet, eval_features, eval_loss, read_eval_set
from ftrecycle.io.card import write_card
from ftrecycle.io.checkpoint import Checkpoint, open_checkpoint
from ftrecycle.io.hf_load import check_model_json, load_causal_lm, load_tokenizer
from ftrecycle.io.jsonfile import read_json
from ftrecycle.io.model_files import TOKENIZER_FILES, copy_files
from ftrecycle.io.output import (
    atomic_directory,
    check_no_overlap,
    check_output,
    output_lock,
    sibling_name,
    write_json,
)
from ftrecycle.io.provenance import PROVENANCE, RecordPaths, base_record, check_record_paths, describe_input, portable
from ftrecycle.io.state import (
    check_settings,
    file_identity,
    model_identity,
    read_settings,
    settings_hash,
    write_settings,
)

EVAL_LOG = "eval_log.json"
RUN_SETTINGS = "run-settings.json"


@dataclass
class FinetuneResult:
    """What a fine-tuning run produced.

    Attributes:
        output: the fine-tuned model directory.
        steps: optimizer steps taken in total.
        losses: (step, training loss) as logged.
        eval_log: per evaluation, ``step`` and ``eval_loss``, and ``strict``/``flexible`` accuracy when the
            eval data is GSM8K-format; when eval data was given.
        seconds: wall time of this call.
        seconds_per_step: training wall time per step in this call.
        resumed_from_step: the checkpoint step this call continued from (0: a fresh run).
    """

    output: Path
    steps: int
    losses: list[tuple[int, float]] = field(default_factory=list)
    eval_log: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    seconds_per_step: float = 0.0
    resumed_from_step: int = 0


def work_dir(output: Path) -> Path:
    """Where checkpoints of a run for ``output`` live until it completes."""
    return output.parent / sibling_name(output, ".ftrecycle-run")


def run_settings(
    model: Path | dict[str, Any], data: str | Path, eval_data: str | Path | None, cfg: FinetuneConfig
) -> dict[str, Any]:
    """Everything that decides a fine-tuning run's result: its settings and the identity of its inputs.

    Args:
        model: the start model's directory, or a key that identifies it (for a start made by the caller).
        data: the training data.
        eval_data: the evaluation data (or None).
        cfg: the settings.

    A resumed run continues only when this is unchanged; the output's provenance records it.
    """
    return {
        **cfg.key(),
        "model": model if isinstance(model, dict) else model_identity(model),
        "data": file_identity(data),
        "eval_data": file_identity(eval_data),
    }


def _check_run_dir(run: Path, out: Path, settings: dict[str, Any], *, resume: bool, force: bool) -> bool:
    """Whether an earlier run in the work directory is continued (True) or a new one starts (False).

    Nothing is written here: the new run's directory is made by :func:`_start_run_dir` only once the
    model, tokenizer and data have loaded, so a run that fails before training leaves nothing behind.

    Raises:
        ConfigError: an unfinished run without resume/force, or one made with other settings (naming
            what changed) without force.
    """
    if os.path.lexists(run):
        if resume:
            try:
                check_settings(
                    read_settings(run / RUN_SETTINGS),
                    settings,
                    what=f"the unfinished run for {out} in {run}",
                    fix="rerun with its settings, or pass --force to start over",
                )
                return True
            except ConfigError:
                if not force:
                    raise
        elif not force:
            raise ConfigError(
                f"an unfinished run for {out} is in {run}: pass --resume to continue it, or --force to start over"
            )
    return False


def _start_run_dir(run: Path, out: Path, settings: dict[str, Any], *, replace: bool) -> None:
    """Make a new run's work directory and record its settings.

    Args:
        replace: what was at the work directory's name when the run was checked goes first (the
            run was checked to start over); otherwise nothing may be there now.

    Raises:
        ConfigError: a work directory appeared since the check: another run for ``out`` started.
    """
    if replace:
        if run.is_dir() and not run.is_symlink():
            shutil.rmtree(run)
        elif os.path.lexists(run):  # a file or a link: remove the name, never what it points to
            run.unlink()
    try:
        run.mkdir(parents=True)
    except FileExistsError as e:
        raise ConfigError(
            f"another run for {out} started meanwhile (its work directory {run} appeared); wait for it to end"
        ) from e
    write_settings(run / RUN_SETTINGS, settings)


_DAMAGED = "remove it, or pass --force to start the run over"


def _read_eval_log(run: Path) -> list[dict[str, Any]]:
    """The evaluation log an unfinished run kept (empty when there is none).

    Raises:
        ConfigError: it is not a list of objects (cut short, or edited by hand), naming the file.
    """
    f = run / EVAL_LOG
    if not os.path.lexists(f):
        return []
    log = read_json(f, what="evaluation log", error=ConfigError, fix=_DAMAGED, allow_nan=True)
    if not isinstance(log, list) or not all(isinstance(e, dict) for e in log):
        raise ConfigError(f"{f}: not an evaluation log (a list of objects); {_DAMAGED}")
    return log


def _last_checkpoint(run: Path) -> Path | None:
    """The checkpoint a resumed run continues from: the highest step, checked to be complete.

    Raises:
        ConfigError: a ``checkpoint-*`` entry this run did not write, or a last checkpoint without
            its weights or with an unreadable trainer state (the Trainer would fail deep inside).
    """
    steps: dict[int, Path] = {}
    for p in run.glob("checkpoint-*"):
        tail = p.name[len("checkpoint-") :]
        if not (tail.isascii() and tail.isdigit()) or p.is_symlink() or not p.is_dir():
            raise ConfigError(f"{p}: not a checkpoint of this run (a directory checkpoint-STEP); {_DAMAGED}")
        steps[int(tail)] = p
    if not steps:
        return None
    last = steps[max(steps)]
    weights = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
    if not any((last / w).is_file() for w in weights):
        raise ConfigError(f"{last}: an incomplete checkpoint (no model.safetensors); {_DAMAGED}")
    state = read_json(last / "trainer_state.json", what="trainer state", error=ConfigError, fix=_DAMAGED)
    if not isinstance(state, dict):
        raise ConfigError(f"{last / 'trainer_state.json'}: not a trainer state (a JSON object); {_DAMAGED}")
    return last


def _no_dropout(model: Any) -> list[str]:
    import torch  # heavy: kept off the transfer path

    changed = []
    for key, value in list(model.config.to_dict().items()):
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float) and value > 0:
            setattr(model.config, key, 0.0)
            changed.append(key)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return changed


def _trainer_class() -> Any:
    from transformers import Trainer  # heavy: kept off the transfer path

    class RecycleTrainer(Trainer):
        """Trainer whose weight decay also spares embeddings (as open-instruct does)."""

        def get_decay_parameter_names(self, model: Any) -> list[str]:
            names = super().get_decay_parameter_names(model)
            emb = {
                id(p)
                for m in (model.get_input_embeddings(), model.get_output_embeddings())
                if m is not None
                for p in m.parameters()
            }
            return [n for n, p in model.named_parameters() if n in names and id(p) not in emb]

    return RecycleTrainer


def _eval_callback(
    run: Path, trainer: Any, tok: Any, inputs: _Inputs, cfg: FinetuneConfig, log: list[dict[str, Any]]
) -> Any:
    """A callback scoring the model in training on the held-out data (first, every ``eval_every`` steps, last):
    the loss on every format, accuracy on GSM8K items; appending to ``log`` and keeping it in the work directory."""
    from transformers import TrainerCallback  # heavy: kept off the transfer path

    items = inputs.eval_set.gsm8k if inputs.eval_set is not None else None
    features = inputs.eval_features or []
    shots = [{"question": r["question"], "answer": r["answer"]} for r in inputs.rows if r["_kind"] == "gsm8k"]
    shots = shots[: cfg.eval_shots]

    class EvalEvery(TrainerCallback):
        def _run(self, step: int) -> None:
            if any(e["step"] == step for e in log):
                return
            t = time.perf_counter()
            entry: dict[str, Any] = {"step": step}
            entry["eval_loss"] = eval_loss(trainer.model, features, tok.pad_token_id, cfg.eval_batch_size)
            entry["seconds"] = round(time.perf_counter() - t, 3)  # with the accuracy's: the evaluation's time
            if items is not None:
                rep = builtin.evaluate_gsm8k(
                    trainer.model,
                    tok,
                    items,
                    shots=shots,
                    batch_size=cfg.eval_batch_size,
                    max_gen_toks=cfg.eval_max_new_tokens,
                )
                summary = rep.summary()
                entry.update({**summary, "seconds": round(entry["seconds"] + summary["seconds"], 3)})
            log.append(entry)
            if is_main():
                write_json(run / EVAL_LOG, log)

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self._run(state.global_step)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if cfg.eval_every and state.global_step % cfg.eval_every == 0:
                self._run(state.global_step)

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self._run(state.global_step)

    return EvalEvery()


def _tokenized(inputs: _Inputs, cfg: FinetuneConfig, data: str | Path, trust_remote_code: bool) -> tuple[Any, Any]:
    """The model's tokenizer (padding with EOS when it has no pad token) and the tokenized training rows;
    the held-out rows are tokenized into ``inputs.eval_features`` (a bad file is refused before training)."""
    tok = load_tokenizer(inputs.src.path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if inputs.eval_set is not None:
        inputs.eval_features = eval_features(inputs.eval_set.rows, tok, cfg.max_length, inputs.eval_where)
    return tok, _features(inputs.rows, tok, cfg, data)


def finetune(
    model: str,
    data: str | Path,
    output: str | Path,
    *,
    config: FinetuneConfig | None = None,
    eval_data: str | Path | None = None,
    resume: bool = False,
    force: bool = False,
    progress: bool = False,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    extra_provenance: dict[str, Any] | None = None,
    operation: str = "finetune",
    model_key: dict[str, Any] | None = None,
    record_paths: RecordPaths = "relative",
    keep_start: bool = False,
) -> FinetuneResult:
    """Fine-tune ``model`` on ``data`` into ``output`` (safetensors + provenance; a PEFT adapter with ``config.lora``).

    Args:
        model: a model directory or hub id.
        data: JSONL training data (see :mod:`ftrecycle.finetune.data`).
        output: directory to create when training completes.
        config: hyperparameters (defaults: the paper's recipe).
        eval_data: held-out data, any training format: loss (and GSM8K accuracy) vs steps go to ``eval_log.json``.
        resume: continue an interrupted run from its last checkpoint (refused, naming what changed, if made otherwise).
        force: replace an existing output and discard an unfinished run (also one made with other settings).
        progress: show the Trainer's progress bar.
        trust_remote_code: allow model code from the hub (off by default).
        allow_pickle: accept pickle weights (``pytorch_model.bin``); off because unpickling can run code.
        extra_provenance: fields added to the output's ``ftrecycle.json`` (an ``inputs`` mapping is merged
            into the recorded inputs; an input set to None is left out).
        operation: the ``operation`` recorded in the provenance.
        model_key: what identifies the start model in the resume check, for a start the caller made
            (default: the model directory's identity).
        record_paths: ``relative`` or ``absolute`` paths in the records (:func:`ftrecycle.io.provenance.portable`).
        keep_start: an adapter output moves ``model`` (a temporary C + Δ) into ``OUT/start``, as its base.

    Returns:
        Steps, losses, the evaluation log and timing.

    Raises:
        DataError: a bad data file (naming file and line).
        ConfigError: bad settings, or an unfinished run without ``resume``/``force``; settings this machine
            cannot run (:func:`ftrecycle.finetune.lora.check_available`).
        OutputError: the output exists without ``force``.
    """
    t0 = time.perf_counter()
    cfg = lora.check_available((config or FinetuneConfig()).validate())
    job = _Job(model, data, Path(output).expanduser(), cfg, eval_data, allow_pickle, model_key, keep_start)
    job.record_paths = check_record_paths(record_paths)
    # The main process holds OUT's lock from its checks to the final rename (a second run for OUT is refused
    # at once); it alone checks the output and owns the run directory, the others wait here.
    with contextlib.ExitStack() as held:
        resuming, existed = on_main(lambda: job.claim(held, resume=resume, force=force))
        inputs = job.loaded()
        settings = job.decided()
        tok, features = _tokenized(inputs, job.cfg, data, trust_remote_code)
        net, saved_dtype, dropout_off = _load_model(job, trust_remote_code, progress)
        args, use_bf16 = _training_args(job.run, job.cfg, progress)
        # a new run's directory is made only now, when everything has loaded (on the main process;
        # under `accelerate launch` the others wait for it); a continued one is checked first
        if not resuming:
            on_main(lambda: _start_run_dir(job.run, job.out, settings, replace=existed))
        log = _read_eval_log(job.run) if resuming else []
        trainer = _trainer(net, args, features, tok, progress)
        if inputs.eval_set is not None:
            trainer.add_callback(_eval_callback(job.run, trainer, tok, inputs, job.cfg, log))
        start_step, per_step = _train(trainer, _last_checkpoint(job.run) if resuming else None)
        steps = trainer.state.global_step
        losses = [(int(e["step"]), float(e["loss"])) for e in trainer.state.log_history if "loss" in e]
        record = job.record(operation, trainer, len(features), start_step, losses, dropout_off, use_bf16, log)
        _merge_provenance(record, extra_provenance or {})
        # Under FSDP or ZeRO-3 every process holds a shard: gathering the full state dict is a collective call,
        # so every rank makes it; only the main process receives the tensors (LoRA: from the unwrapped model)
        state = {} if job.cfg.lora else trainer.accelerator.get_state_dict(trainer.model_wrapped)
        on_main(lambda: _write_output(trainer, state, job, saved_dtype, record, log, force=force))
        return FinetuneResult(job.out, steps, losses, log, time.perf_counter() - t0, per_step, start_step)


@dataclass
class _Inputs:
    """A run's loaded inputs: the start model's checkpoint (closed), the training rows, the held-out data."""

    src: Checkpoint
    rows: list[dict[str, Any]]
    eval_set: EvalSet | None
    eval_where: str | Path = ""
    eval_features: list[dict[str, Any]] | None = None


@dataclass
class _Job:
    """One fine-tuning run: what it reads and writes, and what decides its result."""

    model: str
    data: str | Path
    out: Path
    cfg: FinetuneConfig
    eval_data: str | Path | None
    allow_pickle: bool
    model_key: dict[str, Any] | None
    keep_start: bool = False
    record_paths: RecordPaths = "relative"
    inputs: _Inputs | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    lora_info: lora.LoraInfo | None = None

    @property
    def run(self) -> Path:
        """The run's work directory."""
        return work_dir(self.out)

    def loaded(self) -> _Inputs:
        """The inputs, loaded once (the main process loads them while it checks; the others after)."""
        if self.inputs is None:
            src = open_checkpoint(self.model, allow_pickle=self.allow_pickle)
            src.close()
            check_model_json(src.path)  # before the run directory is made
            held_out = read_eval_set(self.eval_data) if self.eval_data is not None else None
            self.inputs = _Inputs(src, load_examples(self.data), held_out, self.eval_data or "")
        return self.inputs

    def decided(self) -> dict[str, Any]:
        """What decides the run's result (:func:`run_settings`), computed once."""
        if not self.settings:
            key = self.model_key if self.model_key is not None else self.loaded().src.path
            self.settings = run_settings(key, self.data, self.eval_data, self.cfg)
        return self.settings

    def claim(self, held: contextlib.ExitStack, *, resume: bool, force: bool) -> tuple[bool, bool]:
        """Check the output and the work directory and take OUT's lock into ``held`` (main process only).

        Returns:
            Whether an earlier run is continued, and whether something is at the work directory's name.

        Raises:
            ConfigError, OutputError: as :func:`finetune`.
        """
        src = self.loaded().src
        inputs: list[str | Path | None] = [src.path, self.model, self.data, self.eval_data]
        check_output(self.out, inputs, force=force)
        held.enter_context(output_lock(self.out))
        check_no_overlap(self.run, inputs, what="work directory")
        # a resume is refused (naming what changed) unless the run was made with these settings and inputs
        resuming = _check_run_dir(self.run, self.out, self.decided(), resume=resume, force=force)
        return resuming, os.path.lexists(self.run)

    def record(
        self,
        operation: str,
        trainer: Any,
        examples: int,
        start_step: int,
        losses: list[tuple[int, float]],
        dropout_off: list[str],
        use_bf16: bool,
        log: list[dict[str, Any]],
    ) -> dict[str, Any]:
        """The output's provenance."""
        record = base_record(operation)
        record.update(
            {
                "inputs": {
                    "model": describe_input(self.loaded().src),
                    "data": self.settings["data"],
                    "examples": examples,
                    "eval_data": self.settings["eval_data"],
                },
                "config": asdict(self.cfg),
                "settings_sha256": settings_hash(self.settings),
                "resumed_from_step": start_step,
                "steps": trainer.state.global_step,
                "processes": world().size,
                "distributed": str(trainer.accelerator.distributed_type.value),
                "global_batch": self.cfg.batch_size * self.cfg.grad_accum * world().size,
                "losses": losses,
                "dropout_disabled": dropout_off,
                "bf16": use_bf16,
                "eval_log": log,
            }
        )
        if self.lora_info is not None:
            record["lora"] = {**self.lora_info.record(), "output": "merged" if self.cfg.merge else "adapter"}
        return record


def _merge_provenance(record: dict[str, Any], extra: dict[str, Any]) -> None:
    """Add a caller's fields (an ``inputs`` mapping is merged; an input set to None is left out)."""
    for key, value in extra.items():
        if key == "inputs":
            merged = {**record["inputs"], **value}
            record["inputs"] = {k: v for k, v in merged.items() if v is not None}
        else:
            record[key] = value


def _features(rows: list[dict[str, Any]], tok: Any, cfg: FinetuneConfig, data: str | Path) -> list[dict[str, Any]]:
    """The tokenized training examples.

    Raises:
        DataError: no example keeps a completion token within ``max_length``.
    """
    features = [f for r in rows if (f := encode(r, tok, cfg.max_length)) is not None]
    if not features:
        raise DataError(f"{data}: no example keeps any completion token within --max-length {cfg.max_length}")
    return features


def _load_model(job: _Job, trust_remote_code: bool, progress: bool) -> tuple[Any, Any, list[str]]:
    """The model to train (float32, dropout off; with LoRA layers when ``cfg.lora``, noted in ``job.lora_info``),
    the dtype it was saved in, and the dropout settings turned off."""
    src, cfg, allow_pickle = job.loaded().src, job.cfg, job.allow_pickle
    import torch  # heavy: kept off the transfer path

    saved_dtype = getattr(
        torch, str(src.config.get("torch_dtype") or src.config.get("dtype") or "float32"), torch.float32
    )
    if cfg.qlora:
        net = lora.load_4bit(src.path, trust_remote_code=trust_remote_code)
    else:
        net = load_causal_lm(
            src.path,
            dtype=torch.float32,
            allow_pickle=allow_pickle,
            trust_remote_code=trust_remote_code,
            progress=progress,
        )
    dropout_off = _no_dropout(net)
    if cfg.gradient_checkpointing:
        net.gradient_checkpointing_enable()
    if cfg.lora:
        net, job.lora_info = lora.wrap(net, cfg)
    return net, saved_dtype, dropout_off


def _training_args(run: Path, cfg: FinetuneConfig, progress: bool) -> tuple[Any, bool]:
    """The Trainer's arguments for ``cfg``, and whether bf16 mixed precision is on."""
    import torch  # heavy: kept off the transfer path
    from transformers import TrainingArguments  # heavy: kept off the transfer path

    use_bf16 = cfg.bf16 == "on" or (cfg.bf16 == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    args = TrainingArguments(
        output_dir=str(run),
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        optim="adamw_torch",
        logging_steps=cfg.logging_every,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.save_every,
        save_total_limit=2,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=use_bf16,
        report_to=cfg.report_to,  # tensorboard: event files in the work directory's runs/, kept in OUT/runs
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,  # a causal LM uses every parameter; skip the extra graph walk
        use_cpu=not torch.cuda.is_available(),
    )
    return args, use_bf16


def _trainer(net: Any, args: Any, features: list[dict[str, Any]], tok: Any, progress: bool) -> Any:
    trainer = _trainer_class()(model=net, args=args, train_dataset=features, data_collator=Collator(tok.pad_token_id))
    if not progress:  # the library does not print: drop the callback that prints loss dicts
        from transformers.trainer_callback import PrinterCallback, ProgressCallback  # heavy: off the transfer path

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    return trainer


def _train(trainer: Any, last: Path | None) -> tuple[int, float]:
    """Train (from checkpoint ``last``, if any); returns the step it started from and the seconds per step."""
    t_train = time.perf_counter()
    start_step = int(last.name.split("-")[1]) if last is not None else 0
    trainer.train(resume_from_checkpoint=str(last) if last is not None else None)
    return start_step, (time.perf_counter() - t_train) / max(1, trainer.state.global_step - start_step)


def _write_output(
    trainer: Any,
    state: dict[str, Any],
    job: _Job,
    saved_dtype: Any,
    record: dict[str, Any],
    log: list[dict[str, Any]],
    *,
    force: bool,
) -> None:
    """Write the fine-tuned model (in its saved dtype) or adapter, its tokenizer and provenance; remove the work
    directory."""
    src = job.loaded().src
    net_out = trainer.accelerator.unwrap_model(trainer.model)
    adapter = job.cfg.lora and not job.cfg.merge
    if job.cfg.lora and job.cfg.merge:
        net_out = lora.merged(net_out)
        state = net_out.state_dict()
    with atomic_directory(job.out, force=force) as tmp:
        if not adapter:
            _write_weights(net_out, state, tmp, saved_dtype)
            if (src.path / "generation_config.json").is_file() and not (tmp / "generation_config.json").exists():
                shutil.copyfile(src.path / "generation_config.json", tmp / "generation_config.json")
        copy_files(src.path, tmp, TOKENIZER_FILES)
        if adapter:  # after the start's files were copied: a kept start is moved away
            _write_adapter(net_out, tmp, job)
        if (job.run / "runs").is_dir():  # --report-to tensorboard's event files
            shutil.copytree(job.run / "runs", tmp / "runs", symlinks=True)
        published = portable(record, job.out, job.record_paths)
        write_json(tmp / PROVENANCE, published)
        if log:
            write_json(tmp / EVAL_LOG, portable(log, job.out, job.record_paths))
        write_card(tmp, finetune_card(published, log, job.out.name))
    shutil.rmtree(job.run, ignore_errors=True)


def _write_weights(net_out: Any, state: dict[str, Any], tmp: Path, saved_dtype: Any) -> None:
    """The full model's weights (cast to the dtype the start was saved in) and config."""
    # the gathered dict holds tied weights (lm_head = embed_tokens) under both names, and the cast
    # copies no longer share storage: drop the tied ones as save_pretrained would
    tied = set(getattr(net_out, "all_tied_weights_keys", None) or {})
    weights = {k: v.detach().to("cpu", saved_dtype) for k, v in state.items() if k not in tied}
    net_out.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
    # save_pretrained records the dtype of the (float32, possibly sharded) training copy
    net_out.config.dtype = str(saved_dtype).removeprefix("torch.")
    net_out.config.save_pretrained(tmp)


def _write_adapter(peft_net: Any, tmp: Path, job: _Job) -> None:
    """The adapter, naming its base: the start model, or (a temporary start) the copy moved into ``OUT/start``."""
    base: str | None
    if job.keep_start:
        os.replace(job.loaded().src.path, tmp / lora.START)
        base = str(job.out.resolve() / lora.START) if job.record_paths == "absolute" else None
    else:
        base = lora.base_reference(job.model, job.record_paths)
    lora.save_adapter(peft_net, tmp, base)
