"""The lab's experiments as jobs, and the collection of their results into one record.

Naming (directories under ``seed-S/models`` and job ids):

* ``pretrain/M1`` .. ``pretrain/M5``: the versions;
* ``ft-Mi``: direct fine-tuning of Mi (experiment a);
* ``Mj+di``: Mj + Δi with Δi = ft-Mi − Mi (experiment b);
* ``ft-Mj+di``: fine-tuning started from Mj + Δi (experiment c; with j = i + 1 it is the
  paper's direct recycling-then-fine-tuning Δ^dir of experiment d);
* ``Mi+iter`` / ``ft-Mi+iter``: Algorithm 1's Mi + Δ^iter_{i-1} before and after fine-tuning,
  for i ≥ 3 (for i = 2 it is ``ft-M2+d1``, as in the paper);
* ``diag-Mj+di``: ``diagnose`` of the pair; ``Mj+diauto``: Mj + α·Δi with α chosen on calibration
  data (experiment f, for the diagnostics);
* ``Mj+di@SPEC``: Mj + Δi with Δi stored as a bf16 delta compressed by SPEC (``none``: dense bf16),
  on the stage-2 pairs (experiment g);
* ``lang-ft-M4``: the instruction-tuned M4 (ft-M4) fine-tuned on the second language;
  ``ft-M5+dlang``: ft-M5 + (lang-ft-M4 − ft-M4) (experiment e).
"""

from __future__ import annotations

import os
from itertools import permutations
from pathlib import Path
from typing import Any

from ftrecycle.lab.config import LabConfig
from ftrecycle.lab.jobs import (
    auto_alpha_job,
    compressed_job,
    diagnose_job,
    eval_job,
    finetune_job,
    pretrain_job,
    transfer_job,
)
from ftrecycle.lab.pretrain import VERSIONS
from ftrecycle.lab.scheduler import Job

GROUPS = (("M1", "M2", "M3"), ("M4", "M5"))
STAGE2_PAIRS = (("M4", "M5"), ("M5", "M4"))
#: experiment (g): dense bf16, then settings near 2x, 4x, 8x, 16x and 64x smaller than it
COMPRESSIONS = (
    "none",
    "int8",
    "sign",
    "lowrank:ratio=4",
    "lowrank:ratio=8",
    "lowrank:ratio=16",
    "lowrank:ratio=64",
    "sparse:ratio=4",
    "sparse:ratio=8",
    "sparse:ratio=16",
    "sparse:ratio=64",
)


def pairs() -> list[tuple[str, str]]:
    """Ordered (source i, target j) pairs over the versions, i ≠ j."""
    return list(permutations(VERSIONS, 2))


def same_group(a: str, b: str) -> bool:
    """Whether two versions come from the same pretraining stage."""
    return any(a in g and b in g for g in GROUPS)


def _pretrain_threads(cfg: LabConfig) -> int:
    # Every job waits for pretraining, so with one seed it takes every core; with several seeds the
    # pretrainings overlap, and more threads than cores makes OpenMP spin (one oversubscribed pretraining
    # took 395 s here instead of 128 s).
    cores = os.cpu_count() or 1
    return cores if len(cfg.seeds) == 1 else max(1, cores // max(1, cfg.workers))


def seed_jobs(cfg: LabConfig, seed: int, root: Path, data: dict[str, Path]) -> list[Job]:
    """Every job of one seed, in a good submission order (longest dependency chains first)."""
    m = root / "models"
    base = {v: str(m / "pretrain" / v) for v in VERSIONS}
    test, train = str(data["test"]), str(data["train"])
    prefix = f"s{seed}:"
    settings = {
        "batch_size": cfg.ft_batch,
        "learning_rate": cfg.ft_lr,
        "warmup_ratio": cfg.warmup_ratio,
        "eval_every": cfg.eval_every,
        "eval_batch_size": 128,
        "eval_max_new_tokens": cfg.max_new_tokens,
        "max_length": 256,
        "save_every": max(cfg.eval_every, 100),
        "logging_every": cfg.eval_every,
        "bf16": "off",
    }

    def ft(name: str, start: str, steps: int, deps: tuple[str, ...], *, tr: str = train, te: str = test) -> Job:
        lr = cfg.recycle_lr if "+" in name else cfg.ft_lr
        return Job(
            prefix + name,
            finetune_job,
            {
                "start": start,
                "train": tr,
                "test": te,
                "out": str(m / name),
                "steps": steps,
                "settings": {**settings, "learning_rate": lr},
                "seed": seed,
            },
            tuple(prefix + d for d in deps),
        )

    def xfer(name: str, sb: str, sf: str, tb: str, deps: tuple[str, ...], *, te: str = test) -> Job:
        return Job(
            prefix + name,
            transfer_job,
            {
                "source_base": sb,
                "source_finetuned": sf,
                "target_base": tb,
                "out": str(m / name),
                "test": te,
                "max_new_tokens": cfg.max_new_tokens,
            },
            tuple(prefix + d for d in deps),
        )

    jobs = [
        Job(
            prefix + "pretrain",
            pretrain_job,
            {"out": str(m / "pretrain"), "model": vars(cfg.model), "spec": vars(cfg.pretrain), "seed": seed},
            threads=_pretrain_threads(cfg),
        ),
    ]
    jobs += [ft(f"ft-{v}", base[v], cfg.ft_steps, ("pretrain",)) for v in VERSIONS]
    # Algorithm 1 is a chain: queue it early so it overlaps the all-pairs runs.
    chain = [
        xfer("M2+d1", base["M1"], str(m / "ft-M1"), base["M2"], ("ft-M1",)),
        ft("ft-M2+d1", str(m / "M2+d1"), cfg.recycle_steps, ("M2+d1",)),
    ]
    prev_star, prev_job = str(m / "ft-M2+d1"), "ft-M2+d1"
    for k in range(2, len(VERSIONS)):
        prev, cur = VERSIONS[k - 1], VERSIONS[k]
        chain.append(xfer(f"{cur}+iter", base[prev], prev_star, base[cur], (prev_job,)))
        chain.append(ft(f"ft-{cur}+iter", str(m / f"{cur}+iter"), cfg.recycle_steps, (f"{cur}+iter",)))
        prev_star, prev_job = str(m / f"ft-{cur}+iter"), f"ft-{cur}+iter"
    jobs += chain
    for i, j in pairs():
        if (i, j) == ("M1", "M2"):
            continue
        jobs.append(xfer(f"{j}+d{i[1]}", base[i], str(m / f"ft-{i}"), base[j], (f"ft-{i}",)))
    for i, j in pairs():
        if (i, j) != ("M1", "M2"):
            jobs.append(ft(f"ft-{j}+d{i[1]}", str(m / f"{j}+d{i[1]}"), cfg.recycle_steps, (f"{j}+d{i[1]}",)))
    lt, lte = str(data["language_train"]), str(data["language_test"])
    jobs.append(ft("lang-ft-M4", str(m / "ft-M4"), cfg.language_steps, ("ft-M4",), tr=lt, te=lte))
    jobs.append(
        Job(
            prefix + "lang-eval-ft-M5",
            eval_job,
            {"model": str(m / "ft-M5"), "test": lte, "max_new_tokens": cfg.max_new_tokens},
            (prefix + "ft-M5",),
        )
    )
    jobs.append(
        xfer("ft-M5+dlang", str(m / "ft-M4"), str(m / "lang-ft-M4"), str(m / "ft-M5"), ("lang-ft-M4", "ft-M5"), te=lte)
    )
    # (f) diagnostics of every pair (calibration: the first training problems), --alpha auto on stage 2
    for i, j in pairs():
        args = {"source_base": base[i], "source_finetuned": str(m / f"ft-{i}"), "target_base": base[j]}
        jobs.append(
            Job(f"{prefix}diag-{j}+d{i[1]}", diagnose_job, {**args, "calibration": train}, (f"{prefix}ft-{i}",))
        )
    # (g) compressed deltas on the stage-2 pairs
    for i, j in STAGE2_PAIRS:
        for spec in COMPRESSIONS:
            name = f"{j}+d{i[1]}@{spec}"
            args = {"source_base": base[i], "source_finetuned": str(m / f"ft-{i}"), "target_base": base[j]}
            jobs.append(
                Job(
                    prefix + name,
                    compressed_job,
                    {
                        **args,
                        "out": str(m / "compressed" / name.replace(":", "-").replace("=", "")),
                        "spec": spec,
                        "test": test,
                        "max_new_tokens": cfg.max_new_tokens,
                    },
                    (f"{prefix}ft-{i}",),
                )
            )
    for i, j in STAGE2_PAIRS:
        args = {"source_base": base[i], "source_finetuned": str(m / f"ft-{i}"), "target_base": base[j]}
        jobs.append(
            Job(
                f"{prefix}{j}+d{i[1]}auto",
                auto_alpha_job,
                {
                    **args,
                    "out": str(m / f"{j}+d{i[1]}auto"),
                    "test": test,
                    "calibration": train,
                    "max_new_tokens": cfg.max_new_tokens,
                },
                (f"{prefix}ft-{i}",),
            )
        )
    return jobs


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
            "iter_no_ft": r[f"{v}+iter"]["accuracy"],
            "dir_ft": recycle[v][prev]["final"],
            "iter_ft": r[f"ft-{v}+iter"]["final"],
            "direct_ft": direct[v]["final"],
            "dir_curve": recycle[v][prev]["curve"],
            "iter_curve": r[f"ft-{v}+iter"]["curve"],
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
        }
        for i, j in (("M4", "M5"), ("M5", "M4"))
    }
    compressed = {
        spec: {
            f"{j}+Δ{i[1]}": {k: r[f"{j}+d{i[1]}@{spec}"][k] for k in ("accuracy", "ratio", "median_error")}
            for i, j in STAGE2_PAIRS
        }
        for spec in COMPRESSIONS
    }
    pre = r["pretrain"]
    return {
        "compressed": compressed,
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
