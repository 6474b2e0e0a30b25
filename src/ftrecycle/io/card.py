"""The model card (``README.md``) written with every output: Hub metadata, how to load it, how it was made.

One writer for every kind of output — a transfer or an apply (``merge``), a fine-tune or a recycled
fine-tune (``finetune``), an exported LoRA (``adapter``) and a delta directory — so that the Hub's
model tree, which reads ``base_model`` and ``base_model_relation`` from the card's YAML front matter
(huggingface_hub's ``ModelCardData``), places each output under the model it came from.

The front matter is written by ``yaml.safe_dump``: every value is a scalar or a list of scalars,
quoted where YAML needs it, so a model name such as ``x\\nlicense: mit`` stays one string and cannot
add keys. ``base_model`` only ever holds Hub ids (``org/name``); a model known only by a local path is
left out, never written as a path (the Hub would reject it, and the path would leak on upload).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ftrecycle.errors import FtRecycleError
from ftrecycle.io.jsonfile import read_bytes

CARD = "README.md"
Relation = Literal["merge", "finetune", "adapter", "quantized"]

# the Hub's repo id grammar: one namespace and one name of letters, digits, '-', '_' and '.', no '--' or '..'
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
# an SPDX-like license id, or one of the Hub's ("other", "llama3.1", "apache-2.0"...)
_LICENSE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}$")
# only the front matter of an input's card is read; a hostile card may be huge
_MAX_CARD_BYTES = 1 << 20


def hub_id(value: object) -> str | None:
    """``value`` if it is a Hub repository id (``org/name``), else None.

    Args:
        value: a model reference: a hub id, a path, anything read from a config.

    Returns:
        The id, or None for a local path (absolute, ``./x``, ``~/x``) or anything else.
    """
    if not isinstance(value, str) or not _HUB_ID.match(value) or "--" in value or ".." in value:
        return None
    if value.endswith(".git") or value.startswith(("./", "~")):
        return None
    return value


def _front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a card's text, or {} when there is none or it does not parse."""
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    try:
        meta = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def read_license(model_dir: Path, config: dict[str, Any] | None = None) -> str | None:
    """The license a model declares: its card's front matter ``license``, else its config's.

    A card that is missing, unreadable, not a regular file, too large or malformed declares nothing:
    the license is an optional annotation of the output, not something to fail a transfer over.

    Args:
        model_dir: the model directory.
        config: its parsed ``config.json``.

    Returns:
        A license id (``apache-2.0``, ``llama3.1``, ``other``...), or None.
    """
    value: object = None
    path = model_dir / CARD
    if path.is_file():
        try:
            raw = read_bytes(path, what="model card", max_bytes=_MAX_CARD_BYTES)
            value = _front_matter(raw.decode("utf-8", errors="replace")).get("license")
        except (FtRecycleError, RecursionError):  # a card nested past the parser's depth declares nothing
            value = None
    if value is None and config:
        value = config.get("license")
    return value if isinstance(value, str) and _LICENSE.match(value) else None


@dataclass(frozen=True)
class Card:
    """What a card says about one output.

    Attributes:
        title: the heading.
        summary: a paragraph on what the output is.
        relation: the Hub's ``base_model_relation`` (None for a delta directory, which is no model).
        base_models: Hub ids of the models it derives from, first the one it is loaded on.
        library_name: ``transformers``, ``peft`` (None: not loadable by a library, e.g. a delta).
        tags: tags besides ``ftrecycle``.
        license: the license of the model it derives from, when known.
        load: a code block showing how to load it (language, code).
        command: the command line that reproduces it.
        table: (heading row, rows) of what was adapted, or None.
        table_title: the table's section heading.
        evals: metric name -> value measured on the output.
        notes: more lines (what was left out, what to check).
    """

    title: str
    summary: str
    relation: Relation | None
    base_models: tuple[str, ...] = ()
    library_name: str | None = "transformers"
    tags: tuple[str, ...] = ()
    license: str | None = None
    load: tuple[str, str] | None = None
    command: str | None = None
    table: tuple[Sequence[str], Sequence[Sequence[str]]] | None = None
    table_title: str = "What was adapted"
    evals: dict[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def metadata(self) -> dict[str, Any]:
        """The front matter's mapping (keys of huggingface_hub's ``ModelCardData``)."""
        meta: dict[str, Any] = {}
        if self.library_name:
            meta["library_name"] = self.library_name
        if self.license and _LICENSE.match(self.license):
            meta["license"] = self.license
        ids = [b for b in dict.fromkeys(self.base_models) if hub_id(b)]
        if ids:
            meta["base_model"] = ids[0] if len(ids) == 1 else ids
            if self.relation:
                meta["base_model_relation"] = self.relation
        meta["tags"] = list(dict.fromkeys(("ftrecycle", *self.tags)))
        return meta


def _cell(value: object) -> str:
    """A markdown table cell: pipes and line breaks in a (possibly hostile) value cannot break the table."""
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _line(value: object) -> str:
    """One line of text from a value (a hostile name cannot start a new markdown block)."""
    return str(value).replace("\r", " ").replace("\n", " ")


def render_card(card: Card) -> str:
    """The card's ``README.md`` text: YAML front matter, then the body.

    Args:
        card: what to say.

    Returns:
        The text (ends with a newline).
    """
    front = yaml.safe_dump(card.metadata(), sort_keys=False, allow_unicode=True, default_flow_style=False)
    body = [f"# {_line(card.title)}", "", _line(card.summary.strip()), ""]
    if card.load is not None:
        lang, code = card.load
        body += ["## How to load it", "", f"```{lang}", code.strip(), "```", ""]
    if card.command:
        body += ["## How it was made", "", "Paths are relative to this directory.", ""]
        body += ["```sh", _line(card.command), "```", ""]
    if card.table is not None:
        head, rows = card.table
        body += [f"## {_line(card.table_title)}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        body += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
        body.append("")
    if card.evals:
        body += ["## Evaluation", "", "| metric | value |", "|---|---|"]
        body += [f"| {_cell(k)} | {v:.4g} |" for k, v in card.evals.items()]
        body.append("")
    body += [_line(n) for n in card.notes]
    return f"---\n{front}---\n\n" + "\n".join(body).rstrip() + "\n"


def write_card(directory: Path, card: Card) -> None:
    """Write ``card`` as ``README.md`` into ``directory`` (an output's temporary directory).

    Args:
        directory: where to write.
        card: what to say.
    """
    (directory / CARD).write_text(render_card(card), encoding="utf-8")


def transformers_snippet(where: str) -> tuple[str, str]:
    """How to load a model directory with transformers."""
    return (
        "python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f"model = AutoModelForCausalLM.from_pretrained({where!r})\n"
        f"tokenizer = AutoTokenizer.from_pretrained({where!r})",
    )


def peft_snippet(base: str | None, where: str) -> tuple[str, str]:
    """How to load an adapter on its base with PEFT."""
    base_expr = repr(base) if base else '"PATH/TO/BASE"  # the model this adapter was made for'
    return (
        "python",
        "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
        f"base = AutoModelForCausalLM.from_pretrained({base_expr})\n"
        f"model = PeftModel.from_pretrained(base, {where!r})",
    )


def command_line(record: dict[str, Any], equivalent: list[str] | None = None) -> str | None:
    """The command line that made an output, as one shell line.

    Args:
        record: the output's provenance; its ``command`` when it was run as ``ftrecycle``.
        equivalent: the command that does the same, for an output made through the Python API.

    Returns:
        The line, or None when neither is known.
    """
    argv = record.get("command")
    if not isinstance(argv, list) or not argv:
        argv = equivalent
    if not argv:
        return None
    return " ".join(_quoted(str(a)) for a in argv)


def _quoted(arg: str) -> str:
    if arg and re.fullmatch(r"[A-Za-z0-9_./=:@+,-]+", arg):
        return arg
    return "'" + arg.replace("'", "'\\''") + "'"
