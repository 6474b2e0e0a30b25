"""The operations take option bundles; flat keywords override their fields."""

from __future__ import annotations

import pytest
import torch

import ftrecycle
from ftrecycle import (
    ApplyOptions,
    ConfigError,
    DiffOptions,
    DiffResult,
    Scaling,
    TransferOptions,
    TransferResult,
    apply_delta,
    diff,
    transfer,
)
from ftrecycle.io import provenance
from ftrecycle.version import __version__

from conftest import bits, load_dir


def _sources(versions):
    v = versions["llama"]
    return str(v["source_base"]), str(v["source_finetuned"]), str(v["target_base"])


def test_keywords_override_the_bundle_and_give_the_same_bits(versions, tmp_path):
    a, b, c = _sources(versions)
    flat = transfer(a, b, c, tmp_path / "flat", alpha=0.25, vocab="overlap")
    grouped = transfer(
        a, b, c, tmp_path / "grouped", options=TransferOptions.of(alpha=0.5, vocab="overlap"), alpha=0.25
    )
    assert isinstance(grouped, TransferResult)
    assert grouped.provenance["alpha"] == 0.25 and grouped.provenance["policies"]["vocab"] == "overlap"
    one, two = load_dir(flat.output), load_dir(grouped.output)
    assert all(torch.equal(bits(one[n]), bits(two[n])) for n in one)


def test_diff_returns_its_own_result_and_apply_takes_apply_options(versions, tmp_path):
    a, b, _ = _sources(versions)
    d = diff(a, b, tmp_path / "d", options=DiffOptions.of(delta_dtype="float32"))
    assert isinstance(d, DiffResult) and d.provenance["format"] == "ftrecycle-delta"
    back = apply_delta(d.output, a, tmp_path / "back", options=ApplyOptions(scaling=Scaling(alpha=1.0)), verify=False)
    want, got = load_dir(versions["llama"]["source_finetuned"]), load_dir(back.output)
    assert all(torch.equal(bits(got[n]), bits(want[n])) for n in want)


def test_auto_alpha_must_be_resolved_before_an_operation(versions, tmp_path):
    a, b, c = _sources(versions)
    with pytest.raises(ConfigError, match="resolved"):
        transfer(a, b, c, tmp_path / "o", alpha="auto")
    with pytest.raises(ConfigError, match="resolved"):
        apply_delta(tmp_path / "no-delta", c, tmp_path / "o", options=ApplyOptions.of(alpha="auto"))
    assert not (tmp_path / "o").exists()


def test_bad_bundles_and_keywords_are_refused_before_any_work(versions, tmp_path):
    a, b, c = _sources(versions)
    with pytest.raises(ConfigError, match="TransferOptions"):
        transfer(a, b, c, tmp_path / "o", options=DiffOptions())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="alhpa"):
        transfer(a, b, c, tmp_path / "o", alhpa=0.5)
    with pytest.raises(ConfigError, match="tie_mismatch"):
        diff(a, b, tmp_path / "d", tie_mismatch="untie")
    with pytest.raises(ConfigError, match="--threads"):
        diff(a, b, tmp_path / "d", options=DiffOptions(), threads=0)


def test_version_and_provenance_names_have_one_home():
    assert ftrecycle.__version__ == __version__
    assert provenance.base_record("x")["ftrecycle_version"] == __version__
    assert provenance.PROVENANCE == "ftrecycle.json" and provenance.DELTA_MANIFEST == "ftrecycle-delta.json"
