"""``ftrecycle demo``: the transfer on three tiny models made on the spot."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

from ftrecycle.errors import OutputError
from ftrecycle.io.output import check_output, os_error, output_lock
from ftrecycle.io.provenance import PROVENANCE
from ftrecycle.lab.pretrain import ModelSpec, llama_config
from ftrecycle.lab.world import tokenizer
from ftrecycle.ops.transfer import transfer

#: What a demo directory holds; --force replaces only a directory that holds nothing else.
DEMO_ENTRIES = frozenset({"models", "recycled"})


def _make_versions(root: Path) -> dict[str, Path]:
    """A small random Llama (the lab's architecture and tokenizer), a fine-tuned copy and a newer base.

    The copies move every weight by Gaussian noise — what fine-tuning and continued
    pretraining look like in parameter space; the demo shows the mechanics, the lab the effect.
    """
    import torch  # heavy: kept off the transfer path
    from transformers import AutoModelForCausalLM  # heavy: kept off the transfer path

    tok = tokenizer()
    config = llama_config(ModelSpec(hidden=32, layers=2, heads=4, intermediate=64), len(tok))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    paths = {}
    for name, seed, scale in (("source_base", 0, 0.0), ("source_finetuned", 1, 0.01), ("target_base", 2, 0.02)):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for key, p in model.state_dict().items():
                noise = torch.randn(p.shape, generator=gen) * scale
                p.copy_((base[key].float() + noise).to(p.dtype))
        paths[name] = root / name
        model.save_pretrained(paths[name], max_shard_size="40KB")
        tok.save_pretrained(paths[name])
    return paths


def run_demo(out: str | Path, *, force: bool = False) -> Iterator[str]:
    """Make tiny versions, transfer, load the result with transformers and generate.

    Yields:
        Lines describing each step, for the command line to print.

    Raises:
        OutputError: ``out`` exists and ``force`` is not set, or it is not a demo directory.
    """
    import torch  # heavy: kept off the transfer path
    from transformers import AutoModelForCausalLM  # heavy: kept off the transfer path

    root = check_output(out, [], force=force, what="--out")
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(e, root) from e
    with output_lock(root):
        if root.exists():
            other = sorted(p.name for p in root.iterdir() if p.name not in DEMO_ENTRIES)
            if other:
                raise OutputError(
                    f"--out {out} is not a demo directory (it holds {', '.join(other[:5])}); "
                    "--force replaces only an earlier demo: choose another --out"
                )
            shutil.rmtree(root)
        models = _make_versions(root / "models")
        yield f"made tiny Llama versions under {root / 'models'}: " + ", ".join(models)
        result = transfer(
            str(models["source_base"]), str(models["source_finetuned"]), str(models["target_base"]), root / "recycled"
        )
    yield f"transfer: wrote {result.output} in {result.seconds:.2f} s"
    model = AutoModelForCausalLM.from_pretrained(result.output)
    ids = model.generate(torch.tensor([[1, 5, 6, 7]]), max_new_tokens=8, do_sample=False)
    yield f"transformers loaded it and generated token ids {ids[0].tolist()}"
    yield f"provenance: {result.output / PROVENANCE}"
