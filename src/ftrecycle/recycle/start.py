"""Recycling-then-fine-tuning (paper §5): FT(target + alpha * (finetuned - base)) in one call."""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ftrecycle.diagnose.verdict import check_alpha_request, resolve_alpha
from ftrecycle.distributed import is_main, on_main
from ftrecycle.errors import ConfigError
from ftrecycle.finetune.config import FinetuneConfig
from ftrecycle.finetune.train import RUN_SETTINGS, FinetuneResult, finetune, run_settings, work_dir
from ftrecycle.io.checkpoint import open_checkpoint
from ftrecycle.io.jsonfile import read_json_object
from ftrecycle.io.output import check_no_overlap, check_output, output_lock, sibling_name
from ftrecycle.io.provenance import PROVENANCE, describe_input
from ftrecycle.io.state import check_settings, read_settings, write_settings
from ftrecycle.ops.transfer import transfer
from ftrecycle.options import Inputs, Scaling, TransferOptions
from ftrecycle.recycle.keys import (
    OUTPUT_FIELDS,
    RECORDED,
    WEIGHT_FIELDS,
    alpha_key,
    changed,
    complete,
    model_key,
    refuse_output_options,
    step_options,
)


def recycle_finetune(
    source_base: str,
    source_finetuned: str,
    target_base: str,
    data: str | Path,
    output: str | Path,
    *,
    transfer: TransferOptions | None = None,
    alpha: float | str | None = None,
    config: FinetuneConfig | None = None,
    eval_data: str | Path | None = None,
    resume: bool = False,
    force: bool = False,
    progress: bool = False,
    allow_pickle: bool = False,
) -> FinetuneResult:
    """FT(target + alpha * (finetuned - base)) in one call.

    The merged start is kept in ``.OUT.ftrecycle-start`` beside the output until fine-tuning completes, so
    ``resume`` skips a finished transfer and continues from the last checkpoint — only when the models,
    alpha, transfer options, data and settings are the ones the unfinished run was made with. The output's
    provenance (``operation: recycle-finetune``) records the sources, target, alpha and transfer options.

    Args:
        source_base: the source version's base model (directory or hub id).
        source_finetuned: its fine-tuned model.
        target_base: the new base model.
        data: training data (JSONL or hub dataset id).
        output: directory to create when fine-tuning completes.
        transfer: the merge's options, as :func:`ftrecycle.transfer`'s (``vocab="overlap"``, ``alpha="auto"``
            with ``calibration``, ...); not ``shard_size``/``fsync`` (the start is temporary); ``force`` is ``force=``.
        alpha: scale of the diff, a number or ``"auto"`` (overrides ``transfer.scaling.alpha``).
        config: fine-tuning hyperparameters (``lora``: an adapter whose base, the start, is kept in ``OUT/start``).
        eval_data: GSM8K-format data scored during fine-tuning.
        resume: continue an unfinished run made with the same inputs and settings.
        force: replace an existing output, and discard an unfinished run.
        progress: show the Trainer's progress bar.
        allow_pickle: accept ``.bin``/``.pt`` source and target weights (also ``transfer.inputs.allow_pickle``).

    Returns:
        What fine-tuning did.

    Raises:
        ConfigError: ``resume`` of another run (without ``force``); ``alpha="auto"`` without calibration data.
        As :func:`ftrecycle.ops.transfer.transfer`, :func:`~ftrecycle.diagnose.verdict.resolve_alpha`, finetune.
    """
    start = _Start.plan(source_base, source_finetuned, target_base, _options(transfer, alpha, allow_pickle))
    force = force or start.options.output.force
    inputs = [source_base, source_finetuned, target_base, data, eval_data, start.options.scaling.calibration]
    # The main process holds OUT's lock from its checks to the end (finetune takes it again, re-entrantly),
    # and refuses a resume of another run before redoing any transfer; the others wait for its start model.
    with contextlib.ExitStack() as held:
        out, start.path = on_main(lambda: _claim(output, inputs, force, held))
        if resume and not force:
            on_main(lambda: start.check_resume(out, work_dir(out), data, eval_data, config))
        used_alpha = on_main(lambda: start.make(reuse=resume))
        try:
            result = finetune(
                str(start.path),
                data,
                out,
                config=config,
                eval_data=eval_data,
                resume=resume,
                force=force,
                progress=progress,
                allow_pickle=False,  # the start is written by transfer, as safetensors
                operation="recycle-finetune",
                model_key=start.key,
                extra_provenance=start.provenance(used_alpha),
                record_paths=start.options.output.record_paths,
                keep_start=True,
            )
        except BaseException:
            # no work directory yet: nothing to resume, the start goes too (else --resume reuses it)
            if is_main() and not os.path.lexists(work_dir(out)):
                start.remove()
            raise
        on_main(start.remove)
        return result


def _options(given: TransferOptions | None, alpha: float | str | None, allow_pickle: bool) -> TransferOptions:
    """The transfer options with the keyword conveniences applied (they win over ``given``).

    Raises:
        ConfigError: output options set in ``given``, a bad alpha, or alpha/calibration that do not go together.
    """
    if given is not None and not isinstance(given, TransferOptions):
        raise ConfigError(f"recycle_finetune(transfer=...) must be a TransferOptions, got a {type(given).__name__}")
    options = given if given is not None else TransferOptions()
    # force is recycle_finetune's own (it replaces OUT); how the temporary start is written is not an option
    refuse_output_options(
        set(changed(options, tuple(OUTPUT_FIELDS - {"force"}))),
        "recycle_finetune(transfer=...)",
        "the merged start is a temporary directory",
    )
    if options.storage.delta_dtype != TransferOptions().storage.delta_dtype:
        raise ConfigError("recycle_finetune(transfer=...): delta_dtype does not apply (no diff is stored)")
    if options.masking.mask is not None:  # not part of the recycle keys: refused rather than ignored by them
        raise ConfigError("recycle_finetune(transfer=...): mask is not supported; transfer with the mask first")
    if alpha is not None:
        # Scaling checks the value (a finite number or "auto") as it is made
        scaling = Scaling(alpha=alpha, calibration=options.scaling.calibration)  # type: ignore[arg-type]
        options = replace(options, scaling=scaling)
    if allow_pickle:
        options = replace(options, inputs=Inputs(allow_pickle=True))
    check_alpha_request(options.scaling.alpha, options.scaling.calibration)
    return options


def _claim(output: str | Path, inputs: list[Any], force: bool, held: contextlib.ExitStack) -> tuple[Path, Path]:
    """Check the output and the start's place beside it, and take OUT's lock into ``held``."""
    out = check_output(output, inputs, force=force)
    held.enter_context(output_lock(out))
    start = out.parent / sibling_name(out, ".ftrecycle-start")
    return out, check_no_overlap(start, inputs, what="work directory")


@dataclass
class _Start:
    """The merged starting point of a recycle-finetune run: its sources, options, key and place."""

    source_base: str
    source_finetuned: str
    target_base: str
    options: TransferOptions
    settings: dict[str, Any]
    key: dict[str, Any]
    path: Path = Path()

    @classmethod
    def plan(cls, source_base: str, source_finetuned: str, target_base: str, options: TransferOptions) -> _Start:
        """The start's key: everything that decides its weights (the models' content, alpha, the options)."""
        # Passed to transfer as they are recorded, so the provenance says what ran.
        flat = options.flat()
        settings = {**{k: flat[k] for k in RECORDED}, **changed(options, WEIGHT_FIELDS)}
        key = {
            "recycled_from": {
                "source_base": model_key(source_base),
                "source_finetuned": model_key(source_finetuned),
                "target_base": model_key(target_base),
                **alpha_key(options.scaling),
                "transfer": settings,
            }
        }
        return cls(source_base, source_finetuned, target_base, options, settings, key)

    @property
    def key_file(self) -> Path:
        """Where the key of the start on disk is kept (beside it)."""
        return self.path.parent / f"{self.path.name}.json"

    def check_resume(
        self, out: Path, run: Path, data: str | Path, eval_data: str | Path | None, config: FinetuneConfig | None
    ) -> None:
        """Refuse to continue an unfinished run made from another start, data or settings.

        Raises:
            ConfigError: naming what changed.
        """
        if not run.exists():
            return
        check_settings(
            read_settings(run / RUN_SETTINGS),
            run_settings(self.key, data, eval_data, (config or FinetuneConfig()).validate()),
            what=f"the unfinished run for {out} in {run}",
            fix="rerun with its settings, or pass --force to start over",
        )

    def make(self, *, reuse: bool) -> float:
        """Write the start (unless ``reuse`` and the one on disk has this key); returns the alpha it used."""
        if reuse and complete(self.path) and read_settings(self.key_file) == self.key:
            return float(read_json_object(self.path / PROVENANCE, what="the merged start's record")["alpha"])
        self.remove()
        scaling = self.options.scaling
        chosen = resolve_alpha(
            self.source_base, self.source_finetuned, self.target_base, scaling.alpha, scaling.calibration
        )
        transfer(
            self.source_base,
            self.source_finetuned,
            self.target_base,
            self.path,
            options=step_options(TransferOptions, self.options, chosen.alpha),
        )
        write_settings(self.key_file, self.key)
        return chosen.alpha

    def remove(self) -> None:
        """Delete the start and its key."""
        shutil.rmtree(self.path, ignore_errors=True)
        self.key_file.unlink(missing_ok=True)

    def provenance(self, alpha: float) -> dict[str, Any]:
        """What the fine-tuned output records about how its start was made."""
        allow_pickle = self.options.inputs.allow_pickle
        given = self.options.scaling.alpha
        record: dict[str, Any] = {
            "inputs": {
                "model": None,  # the merged start is temporary: the sources below identify it
                "source_base": _describe(self.source_base, allow_pickle),
                "source_finetuned": _describe(self.source_finetuned, allow_pickle),
                "target_base": _describe(self.target_base, allow_pickle),
            },
            "alpha": alpha,
            "transfer": self.settings,
            "recycled_from": {  # as given (kept for readers of earlier records)
                "source_base": self.source_base,
                "source_finetuned": self.source_finetuned,
                "target_base": self.target_base,
                "alpha": given,
            },
        }
        if given == "auto":
            record["alpha_auto"] = self.key["recycled_from"]["calibration"]
        return record


def _describe(ref: str, allow_pickle: bool) -> dict[str, Any]:
    with open_checkpoint(ref, allow_pickle=allow_pickle) as ck:
        return describe_input(ck)
