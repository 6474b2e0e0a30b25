"""LoRA and QLoRA for ``finetune``: wrap the start model with PEFT, and write an adapter or the merged model.

An adapter output is PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors``) and loads with
``PeftModel.from_pretrained(base, OUT)``; its ``base_model_name_or_path`` names the model it was trained on.
A recycled start (C + Δ, from ``recycle-finetune``) exists nowhere else, so it is kept inside the output,
in ``OUT/start`` (see :data:`START`), and the adapter's config names that directory.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftrecycle.errors import ConfigError
from ftrecycle.finetune.config import FinetuneConfig

START = "start"
"""The subdirectory of a recycled adapter's output that holds its base, C + Δ (a full model)."""


@dataclass(frozen=True)
class LoraInfo:
    """What the LoRA wrapping did, for the provenance.

    Attributes:
        targets: the module names adapted.
        trainable: trainable parameters (the adapter's).
        total: all parameters of the wrapped model.
    """

    targets: tuple[str, ...]
    trainable: int
    total: int

    def record(self) -> dict[str, Any]:
        """The provenance's ``lora`` entry."""
        return {"targets": list(self.targets), "trainable_parameters": self.trainable, "parameters": self.total}


def check_available(cfg: FinetuneConfig) -> FinetuneConfig:
    """Refuse settings this machine cannot run, before anything loads.

    Returns:
        ``cfg``.

    Raises:
        ConfigError: ``qlora`` without bitsandbytes or a CUDA GPU; ``report_to`` tensorboard without tensorboard.
    """
    if cfg.qlora:
        import torch  # heavy: kept off the transfer path

        missing = [
            what
            for what, ok in (
                ("the bitsandbytes package", importlib.util.find_spec("bitsandbytes") is not None),
                ("a CUDA GPU", torch.cuda.is_available()),
            )
            if not ok
        ]
        if missing:
            raise ConfigError(
                f"--qlora needs {' and '.join(missing)}, not found here; use --lora (full-precision base)"
            )
    if cfg.report_to == "tensorboard" and not any(
        importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX")
    ):
        raise ConfigError("--report-to tensorboard needs the tensorboard package (pip install tensorboard)")
    return cfg


def default_targets(net: Any) -> list[str]:
    """The names of the linear layers of the model's blocks (attention and MLP projections), sorted.

    The output layer (``lm_head``) and the embeddings are left out: they are not projections inside blocks.
    """
    import torch  # heavy: kept off the transfer path
    from transformers.pytorch_utils import Conv1D  # heavy: kept off the transfer path

    out_layer = net.get_output_embeddings()
    names = {
        name.rsplit(".", 1)[-1]
        for name, m in net.named_modules()
        if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not out_layer and "." in name
    }
    return sorted(names)


def wrap(net: Any, cfg: FinetuneConfig) -> tuple[Any, LoraInfo]:
    """``net`` as a PEFT model with fresh LoRA layers (initialised from ``cfg.seed``), and what was adapted.

    Raises:
        ConfigError: a ``lora_targets`` name matches no module of the model, or the model has no linear layers.
    """
    from peft import LoraConfig, get_peft_model  # heavy: kept off the transfer path
    from transformers import set_seed  # heavy: kept off the transfer path

    found = default_targets(net)
    targets = [t for t in cfg.lora_targets.split(",") if t] or found
    leaves = {name.rsplit(".", 1)[-1] for name, _ in net.named_modules()}
    unknown = [t for t in targets if t.rsplit(".", 1)[-1] not in leaves]
    if unknown or not targets:
        raise ConfigError(
            f"--lora-targets: {', '.join(unknown) or '(none found)'} not in the model; "
            f"its projections: {', '.join(found)}"
        )
    if cfg.qlora:
        from peft import prepare_model_for_kbit_training  # heavy: kept off the transfer path

        net = prepare_model_for_kbit_training(net, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:
        net.enable_input_require_grads()  # the frozen embeddings' output must carry grad for checkpointed blocks
    # the adapter's initial weights are random: seed them, so a run's result depends on its settings only
    set_seed(cfg.seed)
    config = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
        fan_in_fan_out=_conv1d(net, targets),  # GPT-2's Conv1D stores its weight transposed
    )
    peft_net = get_peft_model(net, config)
    trainable = sum(p.numel() for p in peft_net.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_net.parameters())
    return peft_net, LoraInfo(tuple(targets), trainable, total)


def _conv1d(net: Any, targets: list[str]) -> bool:
    """Whether the targets are transformers' ``Conv1D`` layers (GPT-2's projections)."""
    from transformers.pytorch_utils import Conv1D  # heavy: kept off the transfer path

    return any(isinstance(m, Conv1D) and name.rsplit(".", 1)[-1] in targets for name, m in net.named_modules())


def load_4bit(path: Path, *, trust_remote_code: bool) -> Any:
    """The model at ``path`` with its linear layers quantized to 4-bit NF4 (QLoRA's base), compute in bfloat16."""
    import torch  # heavy: kept off the transfer path
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # heavy: kept off the transfer path

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    # quantized weights are made on the GPU as they load: this process's device (its rank's under accelerate)
    return AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=quant,
        device_map={"": torch.cuda.current_device()},
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
    )


def base_reference(model: str, record_paths: str = "relative") -> str | None:
    """What an adapter's config names as its base: the hub id as given; a local directory only by its absolute
    path, and only with ``record_paths="absolute"`` (PEFT resolves a relative path against the working
    directory of whoever loads it, and an output names no absolute path of the machine by default): else None,
    and the card says to load the adapter on the base yourself."""
    if Path(model).expanduser().exists():
        return str(Path(model).expanduser().resolve()) if record_paths == "absolute" else None
    return model


def save_adapter(peft_net: Any, directory: Path, base: str | None) -> None:
    """Write the adapter (PEFT's layout) into ``directory``, naming ``base`` as the model it loads on."""
    for config in peft_net.peft_config.values():
        config.base_model_name_or_path = base
    # LoRA never trains the embeddings: no need for PEFT to look up the base to check its vocabulary
    peft_net.save_pretrained(directory, safe_serialization=True, save_embedding_layers=False)
    if base is None:  # PEFT fills an empty base with the model's own (local, absolute) path: empty it again
        path = directory / "adapter_config.json"
        written = json.loads(path.read_text())
        written["base_model_name_or_path"] = None
        path.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")


def merged(peft_net: Any) -> Any:
    """The base model with the trained adapter added into its weights (the adapter layers removed)."""
    return peft_net.merge_and_unload()
