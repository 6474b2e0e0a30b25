"""Every option of every command, declared once: typed groups whose fields carry their default,
choices or range, and help.

The command line is generated from these declarations (:mod:`ftrecycle.cli`), the public API
takes the same groups, and both validate a value the same way, where it enters — the API in
``__post_init__``, the CLI while parsing. A group is a frozen dataclass; a command takes a set
of groups (sometimes a subset of a group's fields, e.g. ``diff`` has no ``--tie-mismatch``).

Field metadata (see :func:`option`):

- ``help``: the CLI help and the API documentation of the field;
- ``choices``: allowed values (a ``Literal`` type says the same to the type checker);
- ``bound``: an int/float range (:class:`Bound`);
- ``check``: a function ``(value, flag) -> value`` for values with a grammar (sizes, dtypes,
  compression specs), raising :class:`~ftrecycle.errors.ConfigError`;
- ``flag``/``metavar``: the CLI spelling when it is not ``--field-name``;
- ``path``: the value names a file, directory or model (never empty).
"""

from __future__ import annotations

import math
import numbers
import os
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from typing import Any, ClassVar, Literal, TypeVar

from ftrecycle.codecs import Compression, parse_compression
from ftrecycle.errors import ConfigError
from ftrecycle.io.output import parse_size
from ftrecycle.io.provenance import RECORD_PATHS, RecordPaths

MAX_THREADS = 1024
MAX_COUNT = 2**31 - 1
MAX_TOKENS = 131072
MAX_SEED = 2**32 - 1
DEFAULT_MAX_MEMORY = "512MiB"
DEFAULT_SHARD_SIZE = "5GB"


# --------------------------------------------------------------------------------------------- ranges


@dataclass(frozen=True)
class Bound:
    """An int or float option's allowed range.

    Attributes:
        kind: ``int`` or ``float``.
        lo: smallest allowed value (``None``: no lower bound).
        hi: largest allowed value (``None``: no upper bound; floats must still be finite).
        lo_open: ``lo`` itself is refused (``x > lo``).
        hi_open: ``hi`` itself is refused (``x < hi``).
        also: values allowed outside the range (``-1`` for "unset").
    """

    kind: type
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    also: tuple[float, ...] = ()

    def describe(self) -> str:
        """The range in words, for messages and help."""
        what = "an integer" if self.kind is int else "a finite number"

        def num(x: float) -> str:
            return str(int(x)) if self.kind is int else f"{x:g}"

        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {num(self.lo)}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {num(self.hi)}")
        text = what + (" " + " and ".join(parts) if parts else "")
        if self.also:
            text += " (or " + ", ".join(num(a) for a in self.also) + ")"
        return text

    def check(self, value: object, name: str) -> int | float:
        """``value`` (already a number, or text) as ``kind``, within the range.

        Raises:
            ConfigError: not a number of the kind, not finite, or out of range; names ``name``.
        """
        got = _number(value, self, name)
        if got in self.also:
            return got
        too_low = self.lo is not None and (got <= self.lo if self.lo_open else got < self.lo)
        too_high = self.hi is not None and (got >= self.hi if self.hi_open else got > self.hi)
        if too_low or too_high:
            raise ConfigError(f"{name} must be {self.describe()}, got {shown(value)}")
        return got


def _number(value: object, bound: Bound, name: str) -> int | float:
    bad = ConfigError(f"{name} must be {bound.describe()}, got {shown(value)}")
    if isinstance(value, bool):
        raise bad
    got: object = value
    if isinstance(value, str):
        try:
            got = int(value.strip(), 10) if bound.kind is int else float(value)
        except ValueError:
            raise bad from None
    elif isinstance(value, numbers.Integral) and not isinstance(value, int):
        got = int(value)  # numpy's integers, as the keywords took them before the option groups
    elif isinstance(value, numbers.Real) and not isinstance(value, float | int):
        try:
            got = float(value)  # numpy's floats, fractions
        except OverflowError:
            raise bad from None
    if bound.kind is int:
        if isinstance(got, float) and math.isfinite(got) and got.is_integer():
            got = int(got)
        if not isinstance(got, int):
            raise bad
        return got
    if not isinstance(got, int | float):
        raise bad
    try:
        number = float(got)
    except OverflowError:  # an int too large for a float (10**400 in a config file)
        raise bad from None
    if not math.isfinite(number):
        raise bad
    return number


def shown(value: object, limit: int = 60) -> str:
    """``repr(value)`` for a one-line message: cut at ``limit`` characters (a config file's value may be huge)."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's digit limit for str()
        return f"an integer of {value.bit_length() if isinstance(value, int) else '?'} bits"
    return text if len(text) <= limit else text[: limit - 3] + "..."


POSITIVE_INT = Bound(int, lo=1, hi=MAX_COUNT)
NONNEGATIVE_INT = Bound(int, lo=0, hi=MAX_COUNT)
THREADS = Bound(int, lo=1, hi=MAX_THREADS)
TOKENS = Bound(int, lo=1, hi=MAX_TOKENS)
SEED = Bound(int, lo=0, hi=MAX_SEED)
FINITE = Bound(float)
POSITIVE_FLOAT = Bound(float, lo=0, lo_open=True)
NONNEGATIVE_FLOAT = Bound(float, lo=0)
FRACTION = Bound(float, lo=0, hi=1, hi_open=True)


# --------------------------------------------------------------------------------------------- fields

Check = Callable[[Any, str], Any]


def option(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    bound: Bound | None = None,
    check: Check | None = None,
    flag: str | None = None,
    metavar: str | None = None,
    path: bool = False,
) -> Any:
    """A dataclass field that is also a command-line option (see the module docstring)."""
    meta = {
        "help": help,
        "choices": choices,
        "bound": bound,
        "check": check,
        "flag": flag,
        "metavar": metavar,
        "path": path,
    }
    return field(default=default, metadata=meta)


def flag_of(f: Field[Any]) -> str:
    """The command-line flag of a field: ``compute_dtype`` -> ``--compute-dtype``."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def check_value(f: Field[Any], value: Any) -> Any:
    """One field's value, checked against its declared choices, range, grammar or bool type.

    Raises:
        ConfigError: naming the field's flag and what it must be.
    """
    name = flag_of(f)
    bound: Bound | None = f.metadata.get("bound")
    choices: tuple[str, ...] | None = f.metadata.get("choices")
    check: Check | None = f.metadata.get("check")
    default = f.default if f.default is not MISSING else None
    if value is None and default is None:
        return None  # "not set" is always allowed where the default is unset
    if bound is not None:
        return bound.check(value, name)
    if choices is not None:
        if value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {shown(value)}")
        return value
    if check is not None:
        return check(value, name)
    if f.metadata.get("path"):
        return check_path(value, name)
    if isinstance(default, bool) and not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {shown(value)}")
    return value


class OptionGroup:
    """Base of the option groups: checks every field once, when the group is made."""

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            object.__setattr__(self, f.name, check_value(f, getattr(self, f.name)))


G = TypeVar("G", bound=OptionGroup)


def group_from(cls: type[G], values: Mapping[str, Any], *, where: str = "options") -> G:
    """A group from a mapping (a YAML section, a namespace's dict), refusing unknown keys.

    Raises:
        ConfigError: an unknown key, a wrong type or a value out of range, prefixed by ``where``.
    """
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}: expected a mapping of settings, got a {type(values).__name__}")
    known = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(str(k) for k in set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
    try:
        return cls(**values)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e


# --------------------------------------------------------------------------------------------- value grammars


def check_size(value: Any, flag: str) -> int:
    """A byte size (``5GB``, ``512MiB`` or a count) as bytes."""
    return parse_size(value, flag=flag)


def check_path(value: Any, flag: str) -> str:
    """A file, directory or model named by a non-empty path (a number or a mapping is no path)."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{flag} must be a non-empty path, got {value!r:.60}")
    return value


def check_alpha(value: Any, flag: str) -> float | str:
    """A finite scale, or ``auto`` (chosen on calibration data by the layer that has it)."""
    if value == "auto":
        return "auto"
    try:
        return float(FINITE.check(value, flag))
    except ConfigError:
        raise ConfigError(f"{flag} must be a finite number or 'auto', got {shown(value)}") from None


def check_compression(value: Any, flag: str) -> str:
    """A compression SPEC (``lowrank:rank=R``, ``int8``, ...), kept as text.

    A parsed :class:`~ftrecycle.codecs.Compression` (which ``diff(compress=...)`` has always taken) is
    written back as its spec, exactly (``repr`` of each number), so that keys and records stay JSON.
    """
    if isinstance(value, Compression):
        params = ",".join(f"{k}={v!r}" for k, v in value.options().items())
        value = value.method + (":" + params if params else "")
    if not isinstance(value, str):
        raise ConfigError(f"{flag} must be a compression spec such as lowrank:rank=16, got {shown(value)}")
    parse_compression(value)
    return value


# --------------------------------------------------------------------------------------------- groups

ComputeDtype = Literal["float32", "float64"]
StoreDtype = Literal["float32", "float64", "bfloat16", "float16"]
VocabPolicy = Literal["error", "overlap"]
MissingPolicy = Literal["error", "keep-target"]
TiePolicy = Literal["error", "untie", "embed-only"]
FilesFrom = Literal["target", "finetuned"]
TokenRowPolicy = Literal["delta", "target", "finetuned"]
COMPUTE_DTYPES = ("float32", "float64")
STORE_DTYPES = ("float32", "float64", "bfloat16", "float16")


@dataclass(frozen=True)
class Scaling(OptionGroup):
    """How much of the diff is added."""

    alpha: float | Literal["auto"] = option(
        1.0,
        "scale of the diff: out = target + alpha * diff (default 1.0); 'auto': chosen on --calibration "
        "data: the alpha of highest accuracy on its first 64 items when they carry '#### N' answers (among "
        "the 3 of lowest loss, ties by loss), else the alpha of lowest loss (see `ftrecycle diagnose`)",
        check=check_alpha,
    )
    calibration: str | None = option(
        None,
        "with --alpha auto or --mask grad-sign: JSONL examples of the task (fine-tuning formats) to choose "
        "alpha on, or whose first --mask-examples make the mask",
        metavar="CALIB",
        path=True,
    )

    def resolved_alpha(self) -> float:
        """``alpha`` as a number, for an operation that adds the diff.

        Raises:
            ConfigError: ``alpha`` is still ``auto``: the layer that has calibration data chooses it
                first (``ftrecycle.best_alpha``, or the command line's ``--alpha auto``).
        """
        if self.alpha == "auto":
            raise ConfigError(
                "--alpha auto must be resolved to a number before the operation runs: choose it with "
                "ftrecycle.best_alpha on calibration data (as `ftrecycle transfer --alpha auto` does)"
            )
        return float(self.alpha)


@dataclass(frozen=True)
class Masking(OptionGroup):
    """Which entries of the diff are added: all, or those a sign mask keeps (GradFix)."""

    mask: str | None = option(
        None,
        "a sign mask file made by `ftrecycle mask` on the target: each diff entry is kept only where its sign "
        "equals the mask's (the target's descent direction), the rest dropped; tensors the mask lacks are "
        "added whole and recorded. `transfer --mask grad-sign --calibration FILE` makes the mask first "
        "(default: no mask, the whole diff)",
        metavar="MASK",
        path=True,
    )


@dataclass(frozen=True)
class Precision(OptionGroup):
    """The arithmetic and the dtype of what is written."""

    compute_dtype: ComputeDtype = option(
        "float32", "dtype of the arithmetic; each operation is rounded to it (default float32)", choices=COMPUTE_DTYPES
    )
    out_dtype: StoreDtype | None = option(
        None, "dtype of floating output tensors (default: each target tensor's own dtype)", choices=STORE_DTYPES
    )
    allow_nonfinite: bool = option(False, "write results containing NaN or infinity instead of failing")


@dataclass(frozen=True)
class DeltaStorage(OptionGroup):
    """How a diff vector is stored (or, for `transfer --compress`, shipped)."""

    delta_dtype: StoreDtype = option(
        "float32",
        "dtype the diff is stored in; float32 makes `apply` to the base give back the fine-tuned bf16/fp16 "
        "model bit for bit (default float32)",
        choices=STORE_DTYPES,
    )
    compress: str | None = option(
        None,
        "compress each 2-D tensor: lowrank:rank=R, lowrank:energy=E (smallest rank keeping that share of "
        "the squared norm), lowrank:ratio=X or sparse:ratio=X (X times smaller than dense), sparse:density=D "
        "(largest-magnitude entries), int8 (per-row scale), kbit:bits=K[,group=G] (K-bit codes, a scale per "
        "G values), sign or sign:axis=row|col (1 bit + a scale per matrix/row/column, as BitDelta), "
        "mpsvd:ratio=X[,rank=K] (singular vectors at mixed precision, as Delta-CoMe), signlr:ratio=X (low rank "
        "plus the sign of the rest), lossless (exact, entropy-coded); 1-D "
        "tensors stay dense. `diff` stores it so; `transfer` applies the diff as it would be shipped (bf16 "
        "parts), to show what a compressed delta costs before you share one (default: dense). auto:ratio=R "
        "or auto:bits=B: a size budget (2-D tensors R times smaller than dense, or B bits per element), each "
        "tensor's method and parameters chosen by rate-distortion (see --weights)",
        check=check_compression,
        metavar="SPEC",
    )
    weights: str | None = option(
        None,
        "with --compress auto:ratio=R or auto:bits=B: a JSON object of tensor name -> non-negative weight "
        "(a sensitivity, e.g. a diagonal-Fisher mean squared gradient), one for every 2-D tensor; the budget "
        "minimises the weighted sum of squared errors (default: every weight 1)",
        metavar="FILE",
        path=True,
    )


@dataclass(frozen=True)
class Policies(OptionGroup):
    """What to do where the models do not match; every adaptation is recorded."""

    vocab: VocabPolicy = option(
        "error",
        "when embedding/lm_head rows differ (a vocabulary that grew): 'error' (default) or 'overlap': apply "
        "the diff to the shared rows and keep the target's other rows; recorded",
        choices=("error", "overlap"),
    )
    on_missing: MissingPolicy = option(
        "error",
        "when tensor names differ: 'error' (default, lists them) or 'keep-target': copy target-only tensors, "
        "drop diff-only ones; recorded",
        choices=("error", "keep-target"),
    )
    tie_mismatch: TiePolicy = option(
        "error",
        "when the source has its own lm_head but the target ties it to the embedding: 'untie' writes "
        "lm_head = target embedding + its diff and sets tie_word_embeddings false; 'embed-only' keeps the "
        "target tied and drops lm_head's diff (default: error)",
        choices=("error", "untie", "embed-only"),
    )


@dataclass(frozen=True)
class ModelFiles(OptionGroup):
    """Where the output's non-weight files come from."""

    config_from: FilesFrom = option(
        "target",
        "copy config.json and generation_config.json from the target (default: right rope and context "
        "settings of the new version) or from the fine-tuned model",
        choices=("target", "finetuned"),
    )
    tokenizer_from: FilesFrom = option(
        "target",
        "copy tokenizer files from the target (default) or the fine-tuned model; for an instruct source, "
        "'finetuned' brings its chat template, which is often what you want",
        choices=("target", "finetuned"),
    )


@dataclass(frozen=True)
class Resources(OptionGroup):
    """Memory and threads."""

    max_memory: str | int = option(
        DEFAULT_MAX_MEMORY,
        f"memory the operation's buffers may use, e.g. 512MiB (default {DEFAULT_MAX_MEMORY}); the command "
        "line reads it as the command's peak resident memory and passes what is left after what the process "
        "already holds",
        check=check_size,
    )
    threads: int | None = option(None, "worker threads (default: available cores, at most 1024)", bound=THREADS)


@dataclass(frozen=True)
class Output(OptionGroup):
    """How the output directory is written."""

    shard_size: str | int = option(
        DEFAULT_SHARD_SIZE,
        f"largest output shard, e.g. 5GB or 500MiB (default {DEFAULT_SHARD_SIZE})",
        check=check_size,
    )
    force: bool = option(False, "replace the output directory if it exists (never an input)")
    fsync: bool = option(False, "flush the output to disk before the final rename")
    record_paths: RecordPaths = option(
        "relative",
        "how ftrecycle.json, manifests and the model card name local inputs: 'relative' to the output "
        "directory (or, outside its tree, by name and SHA-256), so that an uploaded output names no local "
        "directory; 'absolute' keeps full paths, for private use",
        choices=RECORD_PATHS,
    )


@dataclass(frozen=True)
class Inputs(OptionGroup):
    """What kinds of input files are accepted."""

    allow_pickle: bool = option(
        False,
        "accept .bin/.pt weights, loaded with torch.load(weights_only=True); off because pickles can run code",
    )


def check_tokens(value: Any, flag: str) -> tuple[str, ...]:
    """A LIST of tokens: comma-separated text (``<|eot_id|>,128006``) or a list of strings and ids."""
    if isinstance(value, str):
        items: list[Any] = [v.strip() for v in value.split(",")]
    elif isinstance(value, list | tuple):
        items = [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
    else:
        raise ConfigError(f"{flag} must be a comma-separated list of tokens or ids, got {shown(value)}")
    if not items or any(not isinstance(v, str) or not v for v in items):
        raise ConfigError(f"{flag} must name at least one token or id, and no empty one, got {shown(value)}")
    return tuple(items)


@dataclass(frozen=True)
class TokenRows(OptionGroup):
    """What the embedding and output-head rows of chosen tokens become.

    Chat fine-tunes train special tokens (``<|eot_id|>``, header tokens) that base models leave
    untrained; Chat Vector copies those rows from the chat model.
    """

    token_rows: TokenRowPolicy = option(
        "delta",
        "what the chosen token rows of the embedding and untied lm_head become: 'delta' (default: target + "
        "alpha * diff, as every other row), 'target' (the target's own row) or 'finetuned' (the fine-tuned "
        "model's row, as Chat Vector does; transfer only); recorded in ftrecycle.json",
        choices=("delta", "target", "finetuned"),
    )
    tokens: tuple[str, ...] | None = option(
        None,
        "the rows --token-rows decides: token strings or ids, comma-separated (default: the special tokens "
        "whose rows look untrained in the source base; `apply` has no source base and needs the list)",
        check=check_tokens,
        metavar="LIST",
    )


@dataclass(frozen=True)
class Checks(OptionGroup):
    """Refusals of inputs that look mistaken, and the flags that override them."""

    ignore_provenance: bool = option(
        False,
        "transfer even when the fine-tuned model's own record (its ftrecycle.json, or a PEFT "
        "adapter_config.json's base_model_name_or_path) names another base than the source base, or shows "
        "that the source base is a fine-tune of the source fine-tuned model (swapped arguments)",
    )
    allow_tokenizer_mismatch: bool = option(
        False,
        "transfer even when the target's tokenizer maps token ids the source's also has to other tokens "
        "(the diff's rows would land on the wrong tokens)",
    )


# --------------------------------------------------------------------------------------------- bundles


B = TypeVar("B", bound="Bundle")


class Bundle:
    """The groups one operation takes.

    :meth:`of` builds a bundle from flat keywords (the API's conveniences), :meth:`with_` overrides
    fields of one, :meth:`merged` does what an operation does with its ``options`` and keywords,
    :meth:`sharing` takes another operation's groups.

    Attributes:
        not_applicable: fields of the bundle's groups that the operation does not use (its command
            has no such flag, and :meth:`merged` refuses them as keywords).
    """

    not_applicable: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        # a group of the wrong kind would fail far from here, as an AttributeError on one of its fields
        for g in fields(self):  # type: ignore[arg-type]
            want = _group_type(type(self), g.name)
            got = getattr(self, g.name)
            if not isinstance(got, want):
                raise ConfigError(
                    f"{type(self).__name__}.{g.name} must be a {want.__name__} group, got a {type(got).__name__}"
                )

    @classmethod
    def of(cls: type[B], **flat: Any) -> B:
        """A bundle whose groups take ``flat``'s values by field name, e.g. ``TransferOptions.of(alpha=0.5)``.

        Raises:
            ConfigError: a keyword no group of this operation has, or a bad value.
        """
        by_group = _by_group(cls, flat)
        return cls(**{name: _group_type(cls, name)(**values) for name, values in by_group.items()})

    def with_(self: B, **flat: Any) -> B:
        """This bundle with ``flat``'s values replacing fields of its groups, e.g. ``opts.with_(alpha=0.5)``.

        Only the groups named by a keyword are rebuilt (and so checked again).

        Raises:
            ConfigError: a keyword no group of this operation has, or a bad value.
        """
        by_group = _by_group(type(self), flat)
        changed = {name: replace(getattr(self, name), **values) for name, values in by_group.items() if values}
        return replace(self, **changed) if changed else self  # type: ignore[type-var]

    @classmethod
    def merged(cls: type[B], options: B | None, flat: Mapping[str, Any]) -> B:
        """``options`` (default: every default) with the flat keywords ``flat`` overriding its fields.

        Raises:
            ConfigError: ``options`` is another operation's bundle, a keyword no group has, a bad value,
                or an option that does not apply to this operation (as a keyword, or set in ``options``).
        """
        unused = sorted(set(flat) & cls.not_applicable)
        if unused:
            raise ConfigError(f"option(s) {', '.join(unused)} do not apply to {cls.__name__}")
        if options is None:
            return cls.of(**flat)
        if not isinstance(options, cls):
            raise ConfigError(f"options must be a {cls.__name__}, got a {type(options).__name__}")
        # set in a group but never read by this operation: refused, as the same keyword is, not ignored
        defaults = cls().flat()
        ignored = sorted(k for k, v in options.flat().items() if k in cls.not_applicable and v != defaults[k])
        if ignored:
            raise ConfigError(f"option(s) {', '.join(ignored)} do not apply to {cls.__name__}; leave them unset")
        return options.with_(**flat)

    @classmethod
    def sharing(cls: type[B], other: Bundle, **groups: OptionGroup) -> B:
        """A bundle made of ``other``'s groups of the same names, ``groups`` replacing or adding some
        (e.g. the diff and the apply steps of a compressed transfer). The options that do not apply to
        ``cls`` are left at their defaults (``cls`` would refuse them: see :meth:`merged`)."""
        names = [g.name for g in fields(cls)]  # type: ignore[arg-type]
        taken = {n: getattr(other, n) for n in names if n not in groups and hasattr(other, n)}
        made = {**taken, **groups}
        for name, group in made.items():
            reset = {f.name: f.default for f in fields(group) if f.name in cls.not_applicable}
            if any(getattr(group, k) != v for k, v in reset.items()):
                made[name] = replace(group, **reset)
        return cls(**made)

    def flat(self) -> dict[str, Any]:
        """Every field of every group by name (the inverse of :meth:`of`)."""
        out: dict[str, Any] = {}
        for g in fields(self):  # type: ignore[arg-type]
            group = getattr(self, g.name)
            out.update({f.name: getattr(group, f.name) for f in fields(group)})
        return out


def _group_type(bundle: type, name: str) -> type:
    return typing.get_type_hints(bundle)[name]


def _by_group(bundle: type, flat: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``flat`` split by the group each name belongs to (every group present, maybe empty).

    Raises:
        ConfigError: a name no group of ``bundle`` has.
    """
    rest = dict(flat)
    out: dict[str, dict[str, Any]] = {}
    for g in fields(bundle):
        names = {f.name for f in fields(_group_type(bundle, g.name))}
        out[g.name] = {k: rest.pop(k) for k in list(rest) if k in names}
    if rest:
        raise ConfigError(f"unknown option(s) {', '.join(sorted(rest))} for {bundle.__name__}")
    return out


@dataclass(frozen=True)
class TransferOptions(Bundle):
    """What ``transfer`` takes besides its models (``storage``: only ``compress`` applies)."""

    not_applicable: ClassVar[frozenset[str]] = frozenset({"delta_dtype", "calibration", "weights"})

    scaling: Scaling = field(default_factory=Scaling)
    precision: Precision = field(default_factory=Precision)
    storage: DeltaStorage = field(default_factory=DeltaStorage)
    policies: Policies = field(default_factory=Policies)
    files: ModelFiles = field(default_factory=ModelFiles)
    resources: Resources = field(default_factory=Resources)
    output: Output = field(default_factory=Output)
    inputs: Inputs = field(default_factory=Inputs)
    masking: Masking = field(default_factory=Masking)
    token_rows: TokenRows = field(default_factory=TokenRows)
    checks: Checks = field(default_factory=Checks)


@dataclass(frozen=True)
class DiffOptions(Bundle):
    """What ``diff`` takes besides its models (``precision.out_dtype``, ``policies.tie_mismatch`` and
    ``checks.allow_tokenizer_mismatch`` do not apply)."""

    not_applicable: ClassVar[frozenset[str]] = frozenset({"out_dtype", "tie_mismatch", "allow_tokenizer_mismatch"})

    precision: Precision = field(default_factory=Precision)
    storage: DeltaStorage = field(default_factory=DeltaStorage)
    policies: Policies = field(default_factory=Policies)
    resources: Resources = field(default_factory=Resources)
    output: Output = field(default_factory=Output)
    inputs: Inputs = field(default_factory=Inputs)
    checks: Checks = field(default_factory=Checks)


@dataclass(frozen=True)
class ApplyOptions(Bundle):
    """What ``apply`` takes besides its delta and target: those of ``transfer`` but the storage
    (the delta is already stored); ``files`` "finetuned" means the fine-tuned files kept in the delta."""

    not_applicable: ClassVar[frozenset[str]] = frozenset({"calibration"})

    scaling: Scaling = field(default_factory=Scaling)
    precision: Precision = field(default_factory=Precision)
    policies: Policies = field(default_factory=Policies)
    files: ModelFiles = field(default_factory=ModelFiles)
    resources: Resources = field(default_factory=Resources)
    output: Output = field(default_factory=Output)
    inputs: Inputs = field(default_factory=Inputs)
    masking: Masking = field(default_factory=Masking)
    token_rows: TokenRows = field(default_factory=TokenRows)
