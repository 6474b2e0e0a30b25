"""Commands that write or read model weights and deltas: transfer, diff, apply, inspect, export-lora.

Their option flags are generated from :mod:`ftrecycle.options`' groups; this module names
only the positional models, the output and the flags that belong to one command.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ftrecycle.cli.args import add_group, bundle_from_args, positive_int
from ftrecycle.cli.calibration import add_diff_calibration, diff_calibrated
from ftrecycle.cli.common import (
    MODEL_HELP,
    Command,
    add_models,
    add_quiet,
    add_resources,
    add_source_pair,
    resolve_alpha,
    resources,
    write_progress,
)
from ftrecycle.cli.masking import add_mask_arguments, check_mask_request, resolved_mask
from ftrecycle.engine import default_threads
from ftrecycle.errors import ConfigError
from ftrecycle.ops import inspect as inspect_ops  # looked up per call: tests substitute inspect_delta
from ftrecycle.ops.apply import apply_delta
from ftrecycle.ops.diff import diff
from ftrecycle.ops.export import export_lora
from ftrecycle.ops.transfer import transfer
from ftrecycle.options import (
    ApplyOptions,
    Checks,
    DeltaStorage,
    DiffOptions,
    Inputs,
    Masking,
    ModelFiles,
    Output,
    Policies,
    Precision,
    Resources,
    Scaling,
    TokenRows,
    TransferOptions,
)


def report(result: Any) -> None:
    """One line about a written model or delta."""
    adapted = [r for r in result.records if r.get("action") not in ("tied",)]
    print(
        f"wrote {result.output} ({result.bytes_written / 2**30:.2f} GiB of tensors) in {result.seconds:.1f} s"
        + (f"; {len(adapted)} tensor records (see ftrecycle.json)" if adapted else "")
    )
    for warning in getattr(result, "warnings", []):
        print(f"ftrecycle: warning: {warning}", file=sys.stderr)


def add_write_groups(p: argparse.ArgumentParser) -> None:
    """Resources, output and inputs: the same on every command that writes a model or a delta."""
    add_resources(p)
    add_group(p, Output)
    add_group(p, Inputs)
    add_quiet(p)


# --------------------------------------------------------------------------------------------- transfer


def _transfer_arguments(p: argparse.ArgumentParser) -> None:
    add_models(p, adapter=True)
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="the directory to create")
    add_group(p, Scaling)
    add_group(p, Precision)
    add_group(p, DeltaStorage, only=("compress",))
    add_group(p, Policies)
    add_group(p, ModelFiles)
    add_mask_arguments(p, grad_sign=True)
    add_group(p, TokenRows)
    add_group(p, Checks)
    add_write_groups(p)


def _transfer(ns: argparse.Namespace) -> None:
    check_mask_request(ns)
    alpha = resolve_alpha(ns)  # first: the budget below counts the memory the search held
    with resolved_mask(ns) as mask:  # --mask grad-sign: made on the target now, removed after
        options = bundle_from_args(
            TransferOptions, ns, scaling=Scaling(alpha=alpha), resources=resources(ns), masking=Masking(mask=mask)
        )
        result = transfer(
            ns.source_base,
            ns.source_finetuned,
            ns.target_base,
            ns.output,
            options=options,
            progress=write_progress(ns.quiet),
        )
    report(result)


# --------------------------------------------------------------------------------------------- diff, apply


def _diff_arguments(p: argparse.ArgumentParser) -> None:
    add_source_pair(
        p,
        required=True,
        base_help=f"the base model: {MODEL_HELP}",
        finetuned_help="the fine-tuned model, or a PEFT LoRA adapter directory over A",
    )
    p.add_argument("-o", "--output", required=True, metavar="DELTA", help="the delta directory to create")
    add_group(p, Precision, exclude=("out_dtype",))
    add_group(p, DeltaStorage)
    add_group(p, Policies, exclude=("tie_mismatch",))
    add_group(p, Checks, only=("ignore_provenance",))
    add_write_groups(p)
    add_diff_calibration(p)


def _diff(ns: argparse.Namespace) -> None:
    if ns.calibration is not None:
        diff_calibrated(ns)
        return
    options = bundle_from_args(DiffOptions, ns, resources=resources(ns))
    result = diff(
        ns.base,
        ns.finetuned,
        ns.output,
        options=options,
        progress=write_progress(ns.quiet),
    )
    report(result)


def _apply_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--delta", required=True, metavar="DELTA", help="a delta directory made by `ftrecycle diff`")
    p.add_argument("--target-base", required=True, metavar="C", help=f"the new base model: {MODEL_HELP}")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="the directory to create")
    p.add_argument(
        "--no-verify", action="store_true", help="skip checking the delta's SHA-256 checksums (one read of the delta)"
    )
    add_group(p, Scaling, only=("alpha",))
    add_group(p, Precision)
    add_group(p, Policies)
    add_group(p, ModelFiles)
    add_mask_arguments(p, grad_sign=False)
    add_group(p, TokenRows)
    add_write_groups(p)


def _apply(ns: argparse.Namespace) -> None:
    if ns.alpha == "auto":
        raise ConfigError("--alpha auto needs the source models: use `ftrecycle transfer`")
    check_mask_request(ns)
    options = bundle_from_args(ApplyOptions, ns, resources=resources(ns))
    result = apply_delta(
        ns.delta,
        ns.target_base,
        ns.output,
        options=options,
        verify=not ns.no_verify,
        progress=write_progress(ns.quiet),
    )
    report(result)


# --------------------------------------------------------------------------------------------- inspect, export


def _inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("delta", metavar="DELTA", nargs="?", default=None, help="a delta directory")
    p.add_argument("--delta", dest="delta_flag", default=None, metavar="DELTA", help="the same, as apply names it")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--all", action="store_true", help="list every tensor (default: the first 40)")
    p.add_argument("--no-verify", action="store_true", help="skip the checksums")


def _inspect(ns: argparse.Namespace) -> None:
    if (ns.delta is None) == (ns.delta_flag is None):
        raise ConfigError("inspect takes one delta directory: DELTA or --delta DELTA (see `ftrecycle inspect --help`)")
    ns.delta = ns.delta or ns.delta_flag
    found = inspect_ops.inspect_delta(ns.delta, check=not ns.no_verify, threads=default_threads())
    if ns.json:
        print(json.dumps(found, indent=2))
    else:
        print(inspect_ops.format_inspection(found, limit=None if ns.all else 40), end="")


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--delta", required=True, metavar="DELTA", help="a delta directory made by `ftrecycle diff`")
    p.add_argument("--rank", required=True, type=positive_int, metavar="R", help="the LoRA rank")
    p.add_argument("-o", "--output", required=True, metavar="ADAPTER", help="the adapter directory to create")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="factor dtype")
    p.add_argument(
        "--target-base",
        metavar="C",
        help="the new base model the adapter is for: written as its base_model_name_or_path (its hub id, else its "
        "path), so that PEFT's auto-loader builds C + LoRA (default: the delta's base A, with a warning)",
    )
    p.add_argument(
        "--full-modules",
        action="store_true",
        help="also store the modules a LoRA cannot hold (embeddings, output head, norms) whole, as PEFT "
        "modules_to_save holding C's weight + the diff, and the adapted layers' bias diffs as lora_B.bias "
        "(lora_bias): PEFT on C then equals the dense transfer; needs --target-base",
    )
    add_group(p, Resources, only=("threads",))
    add_group(p, Output, only=("force", "record_paths"))


def _export(ns: argparse.Namespace) -> None:
    res = export_lora(
        ns.delta,
        ns.output,
        rank=ns.rank,
        dtype=ns.dtype,
        threads=ns.threads,
        force=ns.force,
        target_base=ns.target_base,
        full_modules=ns.full_modules,
        record_paths=ns.record_paths,
    )
    for warning in res.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(
        f"wrote {res.output}: LoRA rank {ns.rank} on {res.modules} modules"
        + (f", {len(res.carried)} modules stored whole" if res.carried else "")
        + f", {res.bytes_written / 2**20:.2f} MiB in {res.seconds:.1f} s; left out {len(res.left_out)} tensors, "
        f"{100 * res.left_out_share:.1f} % of the diff's squared norm (see ftrecycle.json)"
    )


COMMANDS = (
    Command(
        "transfer",
        "write target + alpha * (finetuned - base)",
        "Write TARGET + alpha * (FINETUNED - BASE) as a new Hugging Face model directory, tensor by tensor "
        "with bounded memory. The output appears only when complete; ftrecycle.json in it records inputs, "
        "options and every adapted tensor.",
        _transfer_arguments,
        _transfer,
    ),
    Command(
        "diff",
        "store finetuned - base as a delta directory",
        "Write the diff vector FINETUNED - BASE as a delta directory (safetensors shards + "
        "ftrecycle-delta.json manifest) for `ftrecycle apply`.",
        _diff_arguments,
        _diff,
    ),
    Command(
        "apply",
        "write target + alpha * delta",
        "Write TARGET + alpha * DELTA as a new model directory, for a delta made by `ftrecycle diff`. "
        "--config-from/--tokenizer-from finetuned use the fine-tuned model's files stored in the delta.",
        _apply_arguments,
        _apply,
    ),
    Command(
        "inspect",
        "describe a delta: provenance, compression, sizes, per-tensor norms and errors",
        "Print a delta directory's manifest: the base and fine-tuned models (ids, revisions, architecture), "
        "dtype, compression and size ratio, and each tensor's shape, storage, norm and relative "
        "reconstruction error. Every tensor's checksum is verified first.",
        _inspect_arguments,
        _inspect,
    ),
    Command(
        "export-lora",
        "write a delta's linear-layer updates as a PEFT LoRA adapter",
        "Factorise each linear weight's diff at RANK (truncated SVD) and write a PEFT LoRA adapter directory "
        "that peft.PeftModel.from_pretrained(target, ADAPTER) loads, so target + delta can be served as an "
        "adapter (vLLM, lm-eval peft=). Embeddings, the output head and 1-D tensors cannot be held by a "
        "LoRA: they are left out and listed, with their share of the diff's squared norm, in ftrecycle.json, "
        "or, with --target-base C --full-modules, stored whole as PEFT modules_to_save (C + diff). Without "
        "--target-base the adapter names the delta's base A, and PEFT's auto-loader would load A + LoRA.",
        _export_arguments,
        _export,
    ),
)
