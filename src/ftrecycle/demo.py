"""``ftrecycle demo``: the transfer on three tiny models made on the spot."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

from ftrecycle.errors import OutputError

#: What a demo directory holds; --force replaces only a directory that holds nothing else.
DEMO_ENTRIES = frozenset({"models", "recycled"})


def run_demo(out: str | Path, *, force: bool = False) -> Iterator[str]:
    """Make tiny versions, transfer, load the result with transformers and generate.

    Yields:
        Lines describing each step, for the command line to print.

    Raises:
        OutputError: ``out`` exists and ``force`` is not set, or it is not a demo directory.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from ftrecycle.io.output import check_output, os_error, output_lock
    from ftrecycle.tiny import make_versions
    from ftrecycle.transfer import transfer

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
        models = make_versions("llama", root / "models", max_shard_size="40KB")
        yield f"made tiny Llama versions under {root / 'models'}: " + ", ".join(models)
        result = transfer(
            str(models["source_base"]), str(models["source_finetuned"]), str(models["target_base"]), root / "recycled"
        )
    yield f"transfer: wrote {result.output} in {result.seconds:.2f} s"
    model = AutoModelForCausalLM.from_pretrained(result.output)
    ids = model.generate(torch.tensor([[1, 5, 6, 7]]), max_new_tokens=8, do_sample=False)
    yield f"transformers loaded it and generated token ids {ids[0].tolist()}"
    yield f"provenance: {result.output / 'ftrecycle.json'}"
