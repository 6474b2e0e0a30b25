"""The lab's experiments as jobs, and the collection of their results into one record.

Naming (directories under ``seed-S/models`` and job ids):

* ``pretrain/M1`` .. ``pretrain/M5``: the versions;
* ``ft-Mi``: direct fine-tuning of Mi (experiment a);
* ``Mj+di``: Mj + Δi with Δi = ft-Mi − Mi (experiment b);
* ``ft-Mj+di``: fine-tuning started from Mj + Δi (experiment c; with j = i + 1 it is the
  paper's direct recycling-then-fine-tuning Δ^dir of experiment d);
* ``iterative``: Algorithm 1 over M1..M5 (experiment d), run by ``ftrecycle.recycle.iterate`` into
  ``iterative/`` (``delta-1``, ``M2-plus-delta-1``, ``M2-star``, ...), starting from ``ft-M1`` as M*1
  and fine-tuning with the recycling runs' settings; its Mi + Δ^iter_{i-1} and M*i are scored for i ≥ 3;
* ``diag-Mj+di``: ``diagnose`` of the pair; ``Mj+diauto``: Mj + α·Δi with α chosen on calibration
  data (experiment f, for the diagnostics);
* ``Mj+di@SPEC``: Mj + Δi with Δi stored as a bf16 delta compressed by SPEC (``none``: dense bf16;
  ``SPEC+cal``: then calibrated on the fine-tuning set), on the stage-2 pairs (experiment g);
* ``lang-ft-M4``: the instruction-tuned M4 (ft-M4) fine-tuned on the second language;
  ``ft-M5+dlang``: ft-M5 + (lang-ft-M4 − ft-M4) (experiment e);
* ``ft-Mi@lrS``, ``Mj+di@lrS`` and ``Mj+di@lrS@SPEC``: experiment (h) at ``S`` × ``ft_lr`` (i, j in M4, M5);
  scale 1 is (a)'s ``ft-Mi``, (b)'s ``Mj+di`` and (g)'s ``Mj+di@SPEC``, never run twice;
* ``Mj+di@maskN``: Mj + (mask ⊙ Δi), the mask the sign of Mj's descent direction on the first N training
  problems (``transfer --mask grad-sign``, GradFix), for every pair and each N of ``MASK_EXAMPLES`` (experiment i);
  ``Mj+di@maskNmaj``: the mask a majority vote of the N examples' own signs, each N of ``MASK_MAJORITY``;
* ``sizes``: ‖Δ‖/‖W‖ of every fine-tune and version step (one job per seed, after all of them).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import permutations
from pathlib import Path
from typing import Any

from ftrecycle.lab import world
from ftrecycle.lab.config import CALIBRATED, COMPRESSIONS, MASK_EXAMPLES, MASK_MAJORITY, LabConfig
from ftrecycle.lab.jobs import (
    auto_alpha_job,
    compressed_job,
    diagnose_job,
    eval_job,
    finetune_job,
    iterative_job,
    masked_job,
    pretrain_job,
    transfer_job,
    update_sizes_job,
)
from ftrecycle.lab.pretrain import VERSIONS
from ftrecycle.lab.scheduler import Job, JobFn
from ftrecycle.lab.sizes import PUBLISHED, lr_ratios, noise_points, safe_dir, scale_tag, sweep_pair

__all__ = ["COMPRESSIONS", "GROUPS", "STAGE2_PAIRS", "collect_seed", "pairs", "seed_jobs"]

GROUPS = (("M1", "M2", "M3"), ("M4", "M5"))
STAGE2_PAIRS = (("M4", "M5"), ("M5", "M4"))


def pairs() -> list[tuple[str, str]]:
    """Ordered (source i, target j) pairs over the versions, i ≠ j."""
    return list(permutations(VERSIONS, 2))


def same_group(a: str, b: str) -> bool:
    """Whether two versions come from the same pretraining stage."""
    return any(a in g and b in g for g in GROUPS)


#: Torch threads of every lab job, whatever the machine's cores, seeds or --workers: a result must not
#: depend on them, and a thread count changes float sums (two threads against one moved 20 AdamW steps
#: of a small MLP by 3e-7 here, and pretraining runs 2,100 of them). Parallelism comes from workers.
JOB_THREADS = 1


@dataclass(frozen=True)
class _Seed:
    """One seed's run directory, data and fine-tuning settings: what every job of the seed is made from."""

    cfg: LabConfig
    seed: int
    models: Path
    data: dict[str, Path]

    @property
    def prefix(self) -> str:
        return f"s{self.seed}:"

    @property
    def test(self) -> str:
        return str(self.data["test"])

    @property
    def train(self) -> str:
        return str(self.data["train"])

    def base(self, v: str) -> str:
        """The pretrained version ``v``."""
        return str(self.models / "pretrain" / v)

    def model(self, name: str) -> str:
        """The model directory a job named ``name`` writes."""
        return str(self.models / name)

    def settings(self, lr: float) -> dict[str, Any]:
        """Every fine-tuning job's settings (see :func:`ftrecycle.lab.jobs.finetune_config`) at peak rate ``lr``."""
        cfg = self.cfg
        return {
            "batch_size": cfg.ft_batch,
            "learning_rate": lr,
            "warmup_ratio": cfg.warmup_ratio,
            "eval_every": cfg.eval_every,
            "eval_batch_size": 128,
            "eval_max_new_tokens": cfg.max_new_tokens,
            "max_length": 256,
            "save_every": max(cfg.eval_every, 100),
            "logging_every": cfg.eval_every,
            "bf16": "off",
        }

    def job(self, name: str, fn: JobFn, kwargs: dict[str, Any], deps: tuple[str, ...]) -> Job:
        """A job of this seed (its id and its dependencies' ids carry the seed's prefix), on :data:`JOB_THREADS`."""
        return Job(self.prefix + name, fn, kwargs, tuple(self.prefix + d for d in deps), threads=JOB_THREADS)

    def ft(self, name: str, start: str, steps: int, deps: tuple[str, ...], *, train: str = "", test: str = "") -> Job:
        """Fine-tune ``start`` into ``name`` (recycling runs, named ``...+...``, at the recycling rate)."""
        lr = self.cfg.recycle_lr if "+" in name else self.cfg.ft_lr
        kwargs = {
            "start": start,
            "train": train or self.train,
            "test": test or self.test,
            "out": self.model(name),
            "steps": steps,
            "settings": self.settings(lr),
            "seed": self.seed,
        }
        return self.job(name, finetune_job, kwargs, deps)

    def pair(self, i: str, j: str) -> dict[str, str]:
        """The models of Mj + Δi: Δi = ft-Mi − Mi (direct fine-tuning), carried to Mj."""
        return {"source_base": self.base(i), "source_finetuned": self.model(f"ft-{i}"), "target_base": self.base(j)}

    def xfer(self, name: str, models: dict[str, str], deps: tuple[str, ...], *, test: str = "") -> Job:
        """Write ``target_base + (source_finetuned - source_base)`` of ``models`` into ``name`` and score it."""
        kwargs = {
            **models,
            "out": self.model(name),
            "test": test or self.test,
            "max_new_tokens": self.cfg.max_new_tokens,
        }
        return self.job(name, transfer_job, kwargs, deps)


def _pretrain(s: _Seed) -> list[Job]:
    cfg = s.cfg
    kwargs = {
        "out": s.model("pretrain"),
        "model": vars(cfg.model),
        "spec": vars(cfg.pretrain),
        "seed": s.seed,
        "world_id": world.fingerprint(),
    }
    return [s.job("pretrain", pretrain_job, kwargs, ())]


def _iterative(s: _Seed) -> list[Job]:
    """(d) Algorithm 1 over M1..M5 by ``iterate``: M*1 is (a)'s ``ft-M1``, later M*i use the recycling settings."""
    cfg = s.cfg
    kwargs = {
        "versions": [s.base(v) for v in VERSIONS],
        "first": s.model("ft-M1"),
        "train": s.train,
        "test": s.test,
        "out": s.model("iterative"),
        "steps": cfg.recycle_steps,
        "settings": s.settings(cfg.recycle_lr),
        "seed": s.seed,
        "max_new_tokens": cfg.max_new_tokens,
    }
    return [s.job("iterative", iterative_job, kwargs, ("pretrain", "ft-M1"))]


def _direct(s: _Seed) -> list[Job]:
    """(a) direct fine-tuning of every version."""
    return [s.ft(f"ft-{v}", s.base(v), s.cfg.ft_steps, ("pretrain",)) for v in VERSIONS]


def _transfers(s: _Seed) -> list[Job]:
    """(b) Mj + Δi for every pair."""
    return [s.xfer(f"{j}+d{i[1]}", s.pair(i, j), (f"ft-{i}",)) for i, j in pairs()]


def _recycled(s: _Seed) -> list[Job]:
    """(c) fine-tuning from Mj + Δi for every pair (with j = i + 1, the direct recycling of d)."""
    return [
        s.ft(f"ft-{j}+d{i[1]}", s.model(f"{j}+d{i[1]}"), s.cfg.recycle_steps, (f"{j}+d{i[1]}",)) for i, j in pairs()
    ]


def _language(s: _Seed) -> list[Job]:
    """(e) ft-M4 fine-tuned on the second language, and that diff carried to ft-M5."""
    lt, lte = str(s.data["language_train"]), str(s.data["language_test"])
    eval_m5 = {"model": s.model("ft-M5"), "test": lte, "max_new_tokens": s.cfg.max_new_tokens}
    carried = {
        "source_base": s.model("ft-M4"),
        "source_finetuned": s.model("lang-ft-M4"),
        "target_base": s.model("ft-M5"),
    }
    return [
        s.ft("lang-ft-M4", s.model("ft-M4"), s.cfg.language_steps, ("ft-M4",), train=lt, test=lte),
        s.job("lang-eval-ft-M5", eval_job, eval_m5, ("ft-M5",)),
        s.xfer("ft-M5+dlang", carried, ("lang-ft-M4", "ft-M5"), test=lte),
    ]


def _diagnostics(s: _Seed) -> list[Job]:
    """(f) ``diagnose`` of every pair (calibration: the first training problems)."""
    return [
        s.job(
            f"diag-{j}+d{i[1]}",
            diagnose_job,
            {**s.pair(i, j), "calibration": s.train, "max_new_tokens": s.cfg.max_new_tokens},
            (f"ft-{i}",),
        )
        for i, j in pairs()
    ]


def _auto_alpha(s: _Seed) -> list[Job]:
    """(f) ``transfer --alpha auto`` on the stage-2 pairs."""
    jobs = []
    for i, j in STAGE2_PAIRS:
        name = f"{j}+d{i[1]}auto"
        kwargs = {
            **s.pair(i, j),
            "out": s.model(name),
            "test": s.test,
            "calibration": s.train,
            "max_new_tokens": s.cfg.max_new_tokens,
        }
        jobs.append(s.job(name, auto_alpha_job, kwargs, (f"ft-{i}",)))
    return jobs


#: experiment (i)'s mask settings: (the key of its numbers in the results, N, the vote, the job-name suffix)
MASK_SETTINGS: tuple[tuple[str, int, str, str], ...] = (
    *((str(n), n, "sum", f"@mask{n}") for n in MASK_EXAMPLES),
    *((f"{n} majority", n, "majority", f"@mask{n}maj") for n in MASK_MAJORITY),
)


def _masked(s: _Seed) -> list[Job]:
    """(i) Mj + (mask ⊙ Δi) for every pair, the gradient-sign mask on the first N training problems."""
    jobs = []
    for _, n, vote, suffix in MASK_SETTINGS:
        for i, j in pairs():
            name = f"{j}+d{i[1]}{suffix}"
            kwargs = {
                **s.pair(i, j),
                "out": str(s.models / "masked" / safe_dir(name)),
                "test": s.test,
                "calibration": s.train,
                "examples": n,
                "max_new_tokens": s.cfg.max_new_tokens,
            }
            if vote != "sum":  # the sum's jobs keep the key they were first cached under
                kwargs["vote"] = vote
            jobs.append(s.job(name, masked_job, kwargs, (f"ft-{i}",)))
    return jobs


def _compressed(s: _Seed) -> list[Job]:
    """(g) Δ stored compressed by each of :data:`COMPRESSIONS`, on the stage-2 pairs."""
    jobs = []
    for i, j in STAGE2_PAIRS:
        for spec in COMPRESSIONS:
            name = f"{j}+d{i[1]}@{spec}"
            kwargs = {
                **s.pair(i, j),
                "out": str(s.models / "compressed" / safe_dir(name)),
                **_compress_kwargs(s, spec),
            }
            jobs.append(s.job(name, compressed_job, kwargs, (f"ft-{i}",)))
    return jobs


def _compress_kwargs(s: _Seed, spec: str) -> dict[str, Any]:
    """A compressed job's setting, test and, for a ``+cal`` spec, its calibration (the fine-tuning set)."""
    kwargs: dict[str, Any] = {"spec": spec, "test": s.test, "max_new_tokens": s.cfg.max_new_tokens}
    if spec.endswith(CALIBRATED):
        kwargs |= {"spec": spec.removesuffix(CALIBRATED), "calibration": s.train}
        kwargs["calibration_steps"] = s.cfg.calibration_steps
    return kwargs


def _sweep_finetunes(s: _Seed) -> list[Job]:
    """(h) M4 and M5 fine-tuned directly at each sweep scale other than 1 (that is (a)'s ft-M4, ft-M5)."""
    cfg, jobs = s.cfg, []
    for scale in cfg.sweep_lr_scales:
        if not scale_tag(scale):
            continue
        for v in ("M4", "M5"):
            name = f"ft-{v}{scale_tag(scale)}"
            kwargs = {
                "start": s.base(v),
                "train": s.train,
                "test": s.test,
                "out": s.model(name),
                "steps": cfg.ft_steps,
                # the direct recipe with only the peak rate changed: the size of Δ is the variable. Only the
                # final accuracy is used, so the periodic evaluations are skipped (they do not touch training).
                "settings": {**s.settings(round(scale * cfg.ft_lr, 12)), "eval_every": cfg.ft_steps},
                "seed": s.seed,
            }
            jobs.append(s.job(name, finetune_job, kwargs, ("pretrain",)))
    return jobs


def _sweep_pair(s: _Seed, i: str, j: str, scale: float) -> dict[str, str]:
    """The models of Mj + Δi(scale): Δi from Mi fine-tuned at ``scale`` × ``ft_lr``."""
    return {**s.pair(i, j), "source_finetuned": s.model(f"ft-{i}{scale_tag(scale)}")}


def _sweep_transfers(s: _Seed) -> list[Job]:
    """(h) Mj + Δi(scale) on the stage-2 pairs, dense and with each sweep compression.

    Scale 1's dense transfers are (b)'s, and its compressed ones are (g)'s where (g) has the spec.
    """
    cfg, jobs = s.cfg, []
    for scale in cfg.sweep_lr_scales:
        tag = scale_tag(scale)
        for i, j in STAGE2_PAIRS:
            models, source = _sweep_pair(s, i, j, scale), f"ft-{i}{tag}"
            name = f"{j}+d{i[1]}{tag}"
            if tag:
                jobs.append(s.xfer(name, models, (source,)))
            for spec in cfg.sweep_compressions:
                if not tag and spec in COMPRESSIONS:
                    continue
                kwargs = {
                    **models,
                    "out": str(s.models / "compressed" / safe_dir(f"{name}@{spec}")),
                    **_compress_kwargs(s, spec),
                }
                jobs.append(s.job(f"{name}@{spec}", compressed_job, kwargs, (source,)))
    return jobs


def _version_steps() -> list[tuple[str, str]]:
    """Every (older, newer) pair of versions."""
    return [(a, b) for k, a in enumerate(VERSIONS) for b in VERSIONS[k + 1 :]]


def _sizes(s: _Seed) -> list[Job]:
    """‖Δ‖/‖W‖ of every direct fine-tune, version step, the language fine-tune and (h)'s fine-tunes."""
    entries = {f"ft-{v}": [s.base(v), s.model(f"ft-{v}")] for v in VERSIONS}
    entries |= {f"{a}->{b}": [s.base(a), s.base(b)] for a, b in _version_steps()}
    entries["lang-ft-M4"] = [s.model("ft-M4"), s.model("lang-ft-M4")]
    sweep = {f"ft-{v}{scale_tag(x)}": v for x in s.cfg.sweep_lr_scales if scale_tag(x) for v in ("M4", "M5")}
    entries |= {name: [s.base(v), s.model(name)] for name, v in sweep.items()}
    deps = ("pretrain", *[f"ft-{v}" for v in VERSIONS], "lang-ft-M4", *sweep)
    return [s.job("sizes", update_sizes_job, {"entries": entries}, deps)]


def seed_jobs(cfg: LabConfig, seed: int, root: Path, data: dict[str, Path]) -> list[Job]:
    """Every job of one seed, in a good submission order (longest dependency chains first)."""
    s = _Seed(cfg, seed, root / "models", data)
    # Algorithm 1 is the longest chain: queued first, it overlaps everything else.
    steps = (
        _pretrain,
        _iterative,
        _direct,
        _sweep_finetunes,
        _transfers,
        _recycled,
        _language,
        _diagnostics,
        _compressed,
        _auto_alpha,
        _sweep_transfers,
        _masked,
        _sizes,
    )
    return [job for step in steps for job in step(s)]


def collect_seed(cfg: LabConfig, seed: int, res: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One seed's numbers, in the experiments' terms (accuracies in percent)."""
    p = f"s{seed}:"
    r = {k[len(p) :]: v for k, v in res.items() if k.startswith(p)}
    base = {v: r[f"ft-{v}"]["start"] for v in VERSIONS}
    direct = {v: {"final": r[f"ft-{v}"]["final"], "curve": r[f"ft-{v}"]["curve"]} for v in VERSIONS}
    transfer = {j: {i: r[f"{j}+d{i[1]}"]["accuracy"] for i in VERSIONS if i != j} for j in VERSIONS}
    recycle = {
        j: {
            i: {"final": r[f"ft-{j}+d{i[1]}"]["final"], "curve": r[f"ft-{j}+d{i[1]}"]["curve"]}
            for i in VERSIONS
            if i != j
        }
        for j in VERSIONS
    }
    iterative: dict[str, Any] = {}
    for k in range(2, len(VERSIONS)):
        v, prev = VERSIONS[k], VERSIONS[k - 1]
        iterative[v] = {
            "base": base[v],
            "dir_no_ft": transfer[v][prev],
            "iter_no_ft": r["iterative"][v]["accuracy"],
            "dir_ft": recycle[v][prev]["final"],
            "iter_ft": r["iterative"][v]["final"],
            "direct_ft": direct[v]["final"],
            "dir_curve": recycle[v][prev]["curve"],
            "iter_curve": r["iterative"][v]["curve"],
            "direct_curve": direct[v]["curve"],
        }
    lang = r["lang-ft-M4"]
    multilingual = {
        "M4_instruct": lang["start"],
        "M4_instruct_ft": lang["final"],
        "M5_instruct": r["lang-eval-ft-M5"]["accuracy"],
        "M5_instruct_plus_delta": r["ft-M5+dlang"]["accuracy"],
        "curve": lang["curve"],
    }
    diagnostics = {j: {i: r[f"diag-{j}+d{i[1]}"] for i in VERSIONS if i != j} for j in VERSIONS}
    alpha_auto = {
        f"{j}+Δ{i[1]}": {
            "alpha": r[f"{j}+d{i[1]}auto"]["alpha"],
            "accuracy": r[f"{j}+d{i[1]}auto"]["accuracy"],
            "accuracy_alpha_1": transfer[j][i],
            # how α was chosen (runs before issue 15 chose by loss and did not record it)
            "alpha_method": r[f"{j}+d{i[1]}auto"].get("alpha_method", "loss"),
        }
        for i, j in (("M4", "M5"), ("M5", "M4"))
    }
    compressed = {
        spec: {
            f"{j}+Δ{i[1]}": {k: r[f"{j}+d{i[1]}@{spec}"][k] for k in ("accuracy", "ratio", "median_error")}
            for i, j in STAGE2_PAIRS
        }
        for spec in COMPRESSIONS
        if _feasible(r, [f"{j}+d{i[1]}@{spec}" for i, j in STAGE2_PAIRS])
    }
    masked = {
        key: {j: {i: _masked_numbers(r[f"{j}+d{i[1]}{suffix}"]) for i in VERSIONS if i != j} for j in VERSIONS}
        for key, _, _, suffix in MASK_SETTINGS
    }
    pre = r["pretrain"]
    return {
        "masked": masked,
        "update_sizes": _collect_sizes(cfg, r),
        "sweep": _collect_sweep(cfg, r, base),
        "compressed": compressed,
        "compressed_infeasible": sorted(set(COMPRESSIONS) - set(compressed)),
        "diagnostics": diagnostics,
        "alpha_auto": alpha_auto,
        "base": base,
        "direct_ft": direct,
        "transfer": transfer,
        "recycle_ft": recycle,
        "iterative": iterative,
        "multilingual": multilingual,
        "pretrain_loss": pre["loss"],
    }


def _masked_numbers(job: dict[str, Any]) -> dict[str, Any]:
    """(i)'s numbers of one masked transfer: its accuracy and the share of Δ the mask kept."""
    return {"accuracy": job["accuracy"], "kept_fraction": job["kept_fraction"]}


def _feasible(r: dict[str, Any], names: list[str]) -> bool:
    """Whether every one of these compressed jobs ran (none was a setting the model cannot take)."""
    return all(r[n]["accuracy"] is not None for n in names)


def _collect_sizes(cfg: LabConfig, r: dict[str, Any]) -> dict[str, Any]:
    """‖Δ‖/‖W‖ in percent: direct fine-tunes, version steps, the language and (h)'s fine-tunes; rates, published."""
    sizes = r["sizes"]
    return {
        "finetunes": {f"ft-{v}": sizes[f"ft-{v}"] for v in VERSIONS},
        "version_steps": {f"{a}->{b}": sizes[f"{a}->{b}"] for a, b in _version_steps()},
        "language": sizes["lang-ft-M4"],
        "sweep_finetunes": {
            f"ft-{v}{scale_tag(x)}": sizes[f"ft-{v}{scale_tag(x)}"]
            for x in cfg.sweep_lr_scales
            if scale_tag(x)
            for v in ("M4", "M5")
        },
        "lr": lr_ratios(cfg.ft_lr, cfg.pretrain.lr, cfg.pretrain.stage2_lr),
        "published": PUBLISHED,
    }


def _collect_sweep(cfg: LabConfig, r: dict[str, Any], base: dict[str, float]) -> dict[str, Any]:
    """(h): per scale (keyed ``%g``), its rate and per stage-2 pair the sizes, accuracies and shares."""
    out: dict[str, Any] = {}
    for scale in cfg.sweep_lr_scales:
        tag = scale_tag(scale)
        rows = {}
        for i, j in STAGE2_PAIRS:
            name = f"{j}+d{i[1]}{tag}"
            compressed = {
                spec: {k: r[f"{name}@{spec}"][k] for k in ("accuracy", "ratio")}
                for spec in cfg.sweep_compressions
                if _feasible(r, [f"{name}@{spec}"])
            }
            size = r["sizes"][f"ft-{i}{tag}"]["total"]
            rows[f"{j}+Δ{i[1]}"] = sweep_pair(
                size,
                base[j],
                r[f"ft-{j}{tag}"]["final"],
                r[name]["accuracy"],
                compressed,
                floor=noise_points(base[j], cfg.test_items),
            )
        out[f"{scale:g}"] = {"scale": scale, "lr": round(scale * cfg.ft_lr, 12), "pairs": rows}
    return out
