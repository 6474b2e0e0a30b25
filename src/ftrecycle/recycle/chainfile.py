"""An ``iterate`` chain: the versions, data, fine-tuning settings and transfer options, read from YAML."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ftrecycle.diagnose.verdict import check_alpha_request
from ftrecycle.errors import ConfigError
from ftrecycle.finetune.config import FinetuneConfig
from ftrecycle.io.localpath import looks_local
from ftrecycle.options import Scaling, TransferOptions, check_alpha, check_path
from ftrecycle.recycle.keys import OUTPUT_FIELDS, changed, refuse_output_options

#: Keys of a chain file and the types each takes.
_CHAIN_KEYS: dict[str, tuple[type, ...]] = {
    "versions": (list,),
    "data": (str,),
    "output": (str,),
    "mode": (str,),
    "eval_data": (str, type(None)),
    "alpha": (int, float, str),
    "calibration": (str, type(None)),
    "finetune": (dict, type(None)),
    "transfer": (dict, type(None)),
    "finetuned": (str, type(None)),
}
MAX_CHAIN_BYTES = 1 << 20  # a chain file is a few lines; a bigger one is a mistake or an attack
MAX_CHAIN_DEPTH = 8  # versions and finetune are one level below the top: deeper nesting is never valid
_DEFAULT_SCALING = Scaling()


def _read_bytes(p: Path, what: str) -> bytes:
    try:
        if not p.is_file():
            raise ConfigError(f"{p}: no such {what}" if not p.exists() else f"{p}: not a regular file")
        size = p.stat().st_size
        if size > MAX_CHAIN_BYTES:
            raise ConfigError(f"{p}: {size} bytes; a {what} is at most {MAX_CHAIN_BYTES} bytes")
        return p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the {what} ({e.strerror or e})") from e


def _check_events(yaml: Any, text: str, p: Path, what: str) -> None:
    # Events first: the parser is iterative, so depth and aliases are checked before anything is built.
    depth = 0
    for ev in yaml.parse(text, Loader=yaml.SafeLoader):
        where = f"{p}:{ev.start_mark.line + 1}" if ev.start_mark is not None else str(p)
        if isinstance(ev, yaml.AliasEvent) or getattr(ev, "anchor", None) is not None:
            raise ConfigError(f"{where}: YAML anchors and aliases (&, *) are not accepted in a {what}")
        if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_CHAIN_DEPTH:
                raise ConfigError(f"{where}: nested more than {MAX_CHAIN_DEPTH} levels deep; not a {what}")
        elif isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def _read_chain_yaml(p: Path) -> Any:
    return read_plain_yaml(p, "chain file")


def read_plain_yaml(p: Path, what: str) -> Any:
    """Parse a settings file as plain YAML: no anchors or aliases (no expansion bombs), shallow, small.

    Args:
        p: the file.
        what: what the file is, in messages ("chain file").

    Returns:
        The parsed document.

    Raises:
        ConfigError: naming the file (and line) of what is refused.
    """
    import yaml  # heavy: kept off the transfer path

    raw = _read_bytes(p, what)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"{p}:{line}: not UTF-8 text (byte {e.start}); save the {what} as UTF-8") from e
    try:
        _check_events(yaml, text, p, what)
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({problem})") from e
    except ValueError as e:  # an integer literal past Python's digit limit (int() refuses to parse it)
        raise ConfigError(f"{p}: a number too long to read ({str(e).split(':')[0]})") from e


def _check_keys(p: Path, raw: Any) -> dict[str, Any]:
    """The top-level mapping, with only known keys of the right types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping with versions, data, output")
    known = set(_CHAIN_KEYS)
    unknown = sorted(str(k) for k in set(raw) - known)
    if unknown:
        raise ConfigError(f"{p}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    for key, types in _CHAIN_KEYS.items():
        if key in raw and (not isinstance(raw[key], types) or isinstance(raw[key], bool)):
            want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ConfigError(f"{p}: {key}: expected {want}, got {type(raw[key]).__name__} {raw[key]!r:.60}")
    return raw


def _versions(p: Path, raw: dict[str, Any]) -> list[str]:
    """The versions as given, local ones taken from the chain file's directory."""
    versions = raw.get("versions")
    if not isinstance(versions, list) or len(versions) < 2:
        raise ConfigError(f"{p}: 'versions' must list at least two base models, oldest first")
    for n, v in enumerate(versions, 1):
        if not isinstance(v, str) or not v:
            raise ConfigError(f"{p}: versions[{n}]: expected a model directory or hub id, got {v!r:.60}")
    return [_local(p, v) for v in versions]


def _local(p: Path, v: str, key: str = "version") -> str:
    q = p.parent / v
    if q.exists():
        return str(q)
    if Path(v).expanduser().is_absolute() and Path(v).expanduser().exists():
        return v
    if looks_local(v, p.parent):
        raise ConfigError(f"{p}: {key} {v}: no such model directory ({q}); check the path")
    return v


def _transfer_options(p: Path, raw: dict[str, Any]) -> TransferOptions:
    """The ``transfer:`` section (and the top-level ``alpha``/``calibration``) as validated option groups.

    Raises:
        ConfigError: one line naming the chain file and the key.
    """
    section: dict[str, Any] = dict(raw.get("transfer") or {})
    known = list(TransferOptions().flat())
    unknown = sorted(str(k) for k in set(section) - set(known))
    if unknown:
        usable = ", ".join(k for k in known if k not in OUTPUT_FIELDS)
        raise ConfigError(f"{p}: transfer: unknown option(s) {', '.join(unknown)}; known: {usable}")
    refuse_output_options(
        set(section), f"{p}: transfer", "iterate writes its own outputs (`iterate --force` recomputes)"
    )
    if "mask" in section:  # a mask is made on one target; each step of a chain has its own
        raise ConfigError(f"{p}: transfer: mask cannot be used in a chain (a sign mask is made on one target)")
    for key in ("alpha", "calibration"):
        if key in raw and key in section:
            raise ConfigError(f"{p}: {key} is given both at the top and under transfer; give it once")
        if key in raw:
            section[key] = raw[key]
    if "alpha" in section:
        try:
            section["alpha"] = check_alpha(section["alpha"], "alpha")
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from e
    if isinstance(section.get("calibration"), str):
        section["calibration"] = str(p.parent / section["calibration"])
    try:
        options: TransferOptions = TransferOptions.of(**section)
    except ConfigError as e:
        raise ConfigError(f"{p}: transfer: {e}") from e
    return options


def _same_model(a: str, b: str) -> bool:
    """Whether two model arguments name one model: the same directory (through links), or the same hub id."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b


def _not_a_version(finetuned: str, versions: list[str], source: Path | None) -> None:
    """Refuse ``finetuned`` naming a base version: M*1 would then be a base model, not a fine-tuning of M1.

    Raises:
        ConfigError: naming the version.
    """
    for n, v in enumerate(versions, 1):
        if _same_model(finetuned, str(v)):
            where = f"{source}: " if source is not None else ""
            raise ConfigError(
                f"{where}finetuned {finetuned} is versions[{n}] itself; give a fine-tuning of versions[1] (M1)"
            )


@dataclass
class ChainSpec:
    """An ``iterate`` chain file.

    Attributes:
        versions: base models M1..Mn, oldest first.
        data: training data (JSONL).
        output: directory for every M*i, delta and the summary.
        mode: ``iterative`` (Algorithm 1) or ``direct`` (the paper's Δ^dir baseline).
        eval_data: optional GSM8K-format data; Mi, Mi + Δ and M*i are scored.
        alpha: scale of each carried diff, or ``auto`` (chosen per step on ``transfer``'s calibration data);
            the same as ``transfer.scaling.alpha`` (give either).
        finetune: fine-tuning settings.
        source: the chain file it was read from (for messages).
        transfer: how each diff is computed and applied (the options of ``transfer``, less its output's).
        finetuned: an existing fine-tuning of ``versions[0]`` (a directory or hub id) to use as M*1
            instead of fine-tuning M1 with ``finetune`` (e.g. the model you already have, made with
            other settings than the recycling runs').
    """

    versions: list[str]
    data: Path
    output: Path
    mode: str = "iterative"
    eval_data: Path | None = None
    alpha: float | str = 1.0
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    source: Path | None = None
    transfer: TransferOptions = field(default_factory=TransferOptions)
    finetuned: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.transfer, TransferOptions):
            raise ConfigError(f"ChainSpec.transfer must be a TransferOptions, got a {type(self.transfer).__name__}")
        if self.finetuned is not None:
            self.finetuned = check_path(self.finetuned, "ChainSpec.finetuned")
            _not_a_version(self.finetuned, self.versions, self.source)
        self.alpha = check_alpha(self.alpha, "alpha")  # a bool or an overflowing int is no alpha
        # alpha and transfer.scaling.alpha are one setting: whichever was given is copied to the other
        given = self.transfer.scaling.alpha
        default = _DEFAULT_SCALING.alpha
        if given != default and self.alpha not in (default, given):
            raise ConfigError(f"alpha {self.alpha} and transfer alpha {given} disagree; give alpha once")
        if given == default and self.alpha != default:
            # Scaling checks the value (a finite number or "auto") as it is made
            scaling = replace(self.transfer.scaling, alpha=self.alpha)  # type: ignore[arg-type]
            self.transfer = replace(self.transfer, scaling=scaling)
        self.alpha = self.transfer.scaling.alpha
        check_alpha_request(self.alpha, self.transfer.scaling.calibration)
        refuse_output_options(
            set(changed(self.transfer, tuple(OUTPUT_FIELDS))), "ChainSpec.transfer", "iterate writes its own outputs"
        )

    @classmethod
    def load(cls, path: str | Path, *, output: str | Path | None = None) -> ChainSpec:
        """Read and validate a chain YAML file (relative paths are taken from its directory).

        Anchors and aliases are refused (no expansion bombs), as are deep nesting, unknown keys
        and values of the wrong type; a version or data path that looks local and does not exist
        is reported as missing, not looked up on the hub. The ``transfer:`` section takes the options
        of ``transfer`` by name (``vocab: overlap``, ``compute_dtype: float64``, ...), less the
        output's (``force``, ``shard_size``, ``fsync``); ``alpha: auto`` needs ``calibration: FILE``.

        Raises:
            ConfigError: one line naming the file and the key.
        """
        p = Path(path)
        raw = _check_keys(p, _read_chain_yaml(p))
        versions = _versions(p, raw)
        mode = raw.get("mode", "iterative")
        if mode not in ("iterative", "direct"):
            raise ConfigError(f"{p}: mode must be iterative or direct, got {mode!r:.60}")
        if "data" not in raw or (output is None and "output" not in raw):
            raise ConfigError(f"{p}: 'data' and 'output' are required")
        for key in ("data", "output") if output is None else ("data",):  # "" would be the chain file's directory
            if raw.get(key) == "":
                raise ConfigError(f"{p}: {key} is empty; give a path (use . for the chain file's directory)")
        options = _transfer_options(p, raw)
        scaling = options.scaling
        if (scaling.alpha == "auto") != (scaling.calibration is not None):
            raise ConfigError(f"{p}: alpha: auto needs calibration: FILE (JSONL examples of the task), and only it")
        base = p.parent
        tuning = FinetuneConfig.from_dict(raw.get("finetune") or {}, where=f"{p}: finetune")
        if tuning.lora and not tuning.merge:  # each M*i is diffed against Mi: it must be a full model
            raise ConfigError(f"{p}: finetune: lora needs merge: true in a chain (each fine-tuned version is diffed)")
        return cls(
            versions=versions,
            data=base / str(raw["data"]),
            output=Path(output) if output is not None else base / str(raw["output"]),
            mode=mode,
            eval_data=base / str(raw["eval_data"]) if raw.get("eval_data") else None,
            alpha=scaling.alpha,
            finetune=tuning,
            source=p,
            transfer=options,
            finetuned=_local(p, raw["finetuned"], "finetuned") if raw.get("finetuned") else None,
        )

    def check_files(self) -> None:
        """Check that the data files exist (at run time: an example chain may name files not made yet).

        Raises:
            ConfigError: naming the chain file, the key and the missing path.
        """
        where = f"{self.source}: " if self.source is not None else ""
        calibration = self.transfer.scaling.calibration
        files = (("data", self.data), ("eval_data", self.eval_data), ("calibration", calibration))
        for key, q in files:
            if q is not None and not Path(q).is_file():
                raise ConfigError(
                    f"{where}{key}: no such data file {q}" + (" (not a file)" if Path(q).exists() else "")
                )
