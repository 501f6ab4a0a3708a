"""quality: DEFT vs PaRa vs LoRA personalisation of ``shapes-sdxl``, DreamBench-style, read by the parser.

For each new concept (a shape the base never saw: heart, ring, crescent, cross) and training seed,
every method trains a rank-4 adapter with ``deft train``'s own trainer on the concept's 5 rendered
images (captions ``a {colour} sks on a {colour} background, {where}``) with prior preservation
(rendered base scenes), the same number of steps for all, each at its tuned learning rate. Then:

- **fidelity**: soft IoU of generated ``sks`` images with the concept's template (CLIP-I / DINO's role);
- **following**: prompted colours and position right in new contexts (CLIP-T's role);
- **prior**: the base's all-four-right accuracy on prompts without ``sks`` (prior preservation).

Mean ± std over concepts × seeds per method; JSON + markdown + a bar plot + a grid of samples.

    python -m benchmarks quality [--quick] [--sweep]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    RESULTS_DIR,
    machine_info,
    markdown_table,
    run_suite,
    string_params,
    write_report,
)
from benchmarks.quality_base import save_grid
from deft_runtime.adapter import AdapterKind, Decomposition
from deft_runtime.scenes.concept_quality import adapted, concept_contexts, evaluate_concept, evaluate_prior
from deft_runtime.scenes.concepts import CONCEPTS, write_class_images, write_concept_dataset

METRICS = ("fidelity", "recognised", "prompt_following", "prior")


@dataclass(frozen=True)
class Method:
    label: str
    kind: AdapterKind
    decomposition: Decomposition | None
    gate: bool = False


METHODS: tuple[Method, ...] = (
    *(Method(f"deft-{d.value}", AdapterKind.DEFT, d) for d in (Decomposition.PLAIN, Decomposition.RELU)),
    *(Method(f"deft-{d.value}", AdapterKind.DEFT, d) for d in (Decomposition.QR, Decomposition.SVD)),
    Method("deft-qr-gated", AdapterKind.DEFT, Decomposition.QR, gate=True),
    *(
        Method(f"para-{d.value}", AdapterKind.PARA, d)
        for d in (Decomposition.QR, Decomposition.TSVD, Decomposition.NMF, Decomposition.EIG)
    ),
    Method("lora", AdapterKind.LORA, None),
)
FAMILIES = ("deft", "para", "lora")
#: Learning rates per family, chosen by ``--sweep`` (on heart, seed 0; see benchmarks/README.md).
TUNED_LR: dict[str, float] = {"deft": 3e-3, "para": 3e-3, "lora": 3e-3}
SWEEP_LRS = (3e-3, 1e-2)


def family(method: Method) -> str:
    return method.kind.value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks quality", description=__doc__)
    parser.add_argument("--concepts", nargs="+", default=list(CONCEPTS), choices=CONCEPTS)
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per concept")
    parser.add_argument("--methods", nargs="+", default=[m.label for m in METHODS])
    parser.add_argument("--steps", type=int, default=100, help="training steps (equal for every method)")
    parser.add_argument("--batch-size", type=int, default=1, help="instance (and class) images per step")
    parser.add_argument("--prompts", type=int, default=12, help="sks prompts per run (new contexts)")
    parser.add_argument(
        "--prior-weight",
        type=float,
        default=1.0,
        help="weight of the class (prior preservation) loss; 0 trains without class images",
    )
    parser.add_argument("--prior-prompts", type=int, default=12, help="base prompts per run")
    parser.add_argument("--inference-steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sweep", action="store_true", help="first tune each family's lr on one concept")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 concept, 1 seed, 3 methods")
    parser.add_argument("--out", default=None, help="report name (default quality, or quality-quick)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the reports go")
    parser.add_argument("--runs-log", type=Path, default=None, help="append each run here (JSON lines)")
    parser.add_argument(
        "--from-runs",
        type=Path,
        default=None,
        help="only write the report of a --runs-log (e.g. a cut-short run)",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.methods) - {m.label for m in METHODS})
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {[m.label for m in METHODS]}")
    if args.prior_weight < 0:
        parser.error(f"--prior-weight must be 0 or more, not {args.prior_weight}")
    if args.quick:
        args.concepts, args.seeds, args.methods = args.concepts[:1], 1, ["deft-qr", "para-qr", "lora"]
        args.steps, args.prompts, args.prior_prompts, args.inference_steps = 20, 4, 4, 8
    return args


class Bench:
    """The base pipeline, the datasets and the evaluation settings shared by every run."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        from deft_runtime.models import load_pipeline

        self.args, self.workdir = args, workdir
        self.pipe = load_pipeline("shapes-sdxl")
        self.class_dir = workdir / "class"
        write_class_images(self.class_dir, 50)
        for concept in args.concepts:
            write_concept_dataset(concept, workdir / concept)

    def evaluation(self) -> dict[str, Any]:
        return {"steps": self.args.inference_steps, "guidance_scale": self.args.guidance}

    def prior(self) -> Any:
        from deft_runtime.train.config import PriorPreservation

        weight = self.args.prior_weight
        return (
            PriorPreservation(self.class_dir, "a shape", num_images=50, loss_weight=weight)
            if weight
            else None
        )

    def train(self, concept: str, method: Method, seed: int, lr: float, steps: int) -> Any:
        from deft_runtime.train import train
        from deft_runtime.train.config import Concept, TrainConfig, train_defaults

        defaults = train_defaults("shapes-sdxl")
        config = TrainConfig(
            model="shapes-sdxl",
            concepts=(Concept(self.workdir / concept, "a sks"),),
            out=self.workdir / "out",
            overwrite=True,
            method=method.kind,
            decomposition=method.decomposition,
            gate=method.gate,
            rank=4,
            lr=lr,
            steps=steps,
            batch_size=self.args.batch_size,
            latents=defaults["latents"],
            prior=self.prior(),
            seed=seed,
        )
        return train(config, pipe=self.pipe).adapter

    def run(self, concept: str, method: Method, seed: int, lr: float, steps: int) -> dict[str, Any]:
        """Train one adapter and score it; ``samples`` are its first four sks images."""
        started = time.perf_counter()
        adapter = self.train(concept, method, seed, lr, steps)
        trained = time.perf_counter() - started
        scenes = concept_contexts(concept, self.args.prompts, seed=seed)
        with adapted(self.pipe, adapter) as pipe:
            scores, images = evaluate_concept(pipe, scenes, seed=seed, **self.evaluation())
            prior = evaluate_prior(pipe, self.args.prior_prompts, seed=1000 + seed, **self.evaluation())
        return {
            "concept": concept,
            "method": method.label,
            "seed": seed,
            "lr": lr,
            "steps": steps,
            "prior_weight": self.args.prior_weight,
            **scores.summary(),
            "prior": prior,
            "train_seconds": round(trained, 1),
            "samples": images[:4],
        }


def _spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def summarise(runs: list[dict[str, Any]], labels: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for label in labels:
        mine = [r for r in runs if r["method"] == label]
        row: dict[str, Any] = {"method": label, "runs": len(mine), "lr": mine[0]["lr"] if mine else None}
        for metric in METRICS:
            row[f"{metric}_mean"], row[f"{metric}_std"] = _spread([float(r[metric]) for r in mine])
        rows.append(row)
    return rows


def sweep(bench: Bench, methods: Sequence[Method]) -> dict[str, Any]:
    """Each family's lr on the first concept, seed 0: the one with the best fidelity + following."""
    chosen, trials = {}, []
    for fam in FAMILIES:
        representative = next((m for m in methods if family(m) == fam), None)
        if representative is None:
            continue
        scored = []
        for lr in SWEEP_LRS:
            result = bench.run(bench.args.concepts[0], representative, 0, lr, bench.args.steps)
            result.pop("samples")
            trials.append(result)
            _log_run(bench.args, {**result, "method": f"sweep {result['method']}"})
            scored.append((result["fidelity"] + result["prompt_following"], lr))
        chosen[fam] = max(scored)[1]
    return {"chosen": chosen, "trials": trials}


def measure(args: argparse.Namespace, workdir: Path, grid_path: Path | None) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    bench = Bench(args, workdir)
    methods = [m for m in METHODS if m.label in args.methods]
    tuning: dict[str, Any] = sweep(bench, methods) if args.sweep else {"chosen": dict(TUNED_LR), "trials": []}
    contexts = concept_contexts(args.concepts[0], args.prompts)
    base_scores, _ = evaluate_concept(bench.pipe, contexts, **bench.evaluation())
    base_prior = evaluate_prior(bench.pipe, args.prior_prompts, seed=1000, **bench.evaluation())
    runs, grid = [], []
    for seed in range(args.seeds):  # seeds outermost: a run cut short still covers every method and concept
        for concept in args.concepts:
            for method in methods:
                result = bench.run(concept, method, seed, tuning["chosen"][family(method)], args.steps)
                samples = result.pop("samples")
                if seed == 0:
                    grid.append(samples)
                runs.append(result)
                _log_run(args, result)
    if grid_path is not None:
        save_grid(grid_path, [image for row in grid for image in row], columns=4)
    return {
        "summary": summarise(runs, [m.label for m in methods]),
        "base": {**base_scores.summary(), "prior": base_prior},
        "learning_rates": tuning,
        "runs": runs,
        "grid_rows": [f"{c} / {m.label}" for c in args.concepts for m in methods],
    }


def _log_run(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """Print the run and append it to ``--runs-log`` (JSON lines: what a cut-short run leaves)."""
    scores = ", ".join(f"{k} {result[k]:.3f}" for k in METRICS)
    print(f"{result['concept']} seed {result['seed']} {result['method']}: {scores}", flush=True)
    if args.runs_log is not None:
        with args.runs_log.open("a", encoding="utf-8") as log:
            log.write(json.dumps(result) + "\n")


def ordering(summary: list[dict[str, Any]], metric: str = "prompt_following") -> dict[str, float]:
    """The best mean of ``metric`` per family (deft, para, lora)."""
    best: dict[str, float] = {}
    for row in summary:
        fam = row["method"].split("-")[0]
        best[fam] = max(best.get(fam, 0.0), row[f"{metric}_mean"])
    return best


PAIRED_METRICS = ("recognised", "prompt_following", "prior")


def paired(runs: list[dict[str, Any]], a: str, b: str, metric: str) -> dict[str, float] | None:
    """``a − b`` over the (concept, seed) runs both methods have: mean, standard error, wins, losses."""
    by = {(r["method"], r["concept"], r["seed"]): float(r[metric]) for r in runs}
    keys = sorted({(c, s) for m, c, s in by if m == a} & {(c, s) for m, c, s in by if m == b})
    if not keys:
        return None
    diffs = [by[(a, *k)] - by[(b, *k)] for k in keys]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    return {"mean": statistics.fmean(diffs), "se": se, "wins": wins, "losses": losses, "n": len(diffs)}


def paired_rows(runs: list[dict[str, Any]], labels: Sequence[str]) -> list[dict[str, str]]:
    """Every method against LoRA, and every DEFT method against every PaRa method, paired by run."""
    pairs = [(m, "lora") for m in labels if m != "lora" and "lora" in labels]
    pairs += [(d, p) for d in labels if d.startswith("deft") for p in labels if p.startswith("para")]
    rows = []
    for a, b in pairs:
        row = {"a − b": f"{a} − {b}"}
        for metric in PAIRED_METRICS:
            d = paired(runs, a, b, metric)
            row[metric] = "" if d is None else f"{d['mean']:+.3f} ± {d['se']:.3f} ({d['wins']}/{d['losses']})"
        rows.append(row)
    return rows


def report(name: str, payload: dict[str, Any]) -> str:
    params, summary = payload["params"], payload["summary"]
    rows = [
        {"method": r["method"], "lr": r["lr"], "runs": r["runs"]}
        | {m: f"{r[f'{m}_mean']:.3f} ± {r[f'{m}_std']:.3f}" for m in METRICS}
        for r in summary
    ]
    base = payload["base"] or {
        "fidelity": float("nan"),
        "prompt_following": float("nan"),
        "prior": float("nan"),
    }
    best = ordering(summary)
    order = " > ".join(sorted(best, key=best.__getitem__, reverse=True))
    return (
        f"# {name}\n\nconcepts {params['concepts']}, {params['seeds']} seeds, {params['steps']} training "
        f"steps, rank 4, prior weight {params.get('prior_weight', '1.0')}, {params['prompts']} sks + "
        f"{params['prior_prompts']} base prompts per run, "
        f"{params['inference_steps']} inference steps, guidance {params['guidance']}\n\n"
        + markdown_table(rows, ["method", "lr", "runs", *METRICS])
        + f"\n\nbase model, no adapter: fidelity {base['fidelity']:.3f}, following {base['prompt_following']:.3f} "
        f"on sks prompts; prior {base['prior']:.3f}.\n\nprompt following, best method per family: "
        + ", ".join(f"{k} {v:.3f}" for k, v in best.items())
        + f" (order here: {order}; paper, CLIP-T on SDXL: deft 0.361 > para 0.354 > lora 0.341).\n\n"
        "Paired by run (same concept, seed, prompts): mean of a − b ± its standard error (a's wins/losses "
        "over the runs; the rest are ties):\n\n"
        + markdown_table(
            paired_rows(payload["runs"], [r["method"] for r in summary]), ["a − b", *PAIRED_METRICS]
        )
        + f"\n\nRows of the sample grid ({name}-grid.png, seed 0, 4 prompts each): {', '.join(payload['grid_rows'])}\n"
    )


def figure(path: Path, payload: dict[str, Any]) -> None:
    from benchmarks.suites import pyplot

    plt = pyplot()
    summary = payload["summary"]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(summary)), 4))
    width = 0.8 / len(METRICS)
    x = np.arange(len(summary))
    for i, metric in enumerate(METRICS):
        means = [r[f"{metric}_mean"] for r in summary]
        stds = [r[f"{metric}_std"] for r in summary]
        ax.bar(x + (i - 1.5) * width, means, width, yerr=stds, capsize=2, label=metric)
    ax.set_xticks(x, [r["method"] for r in summary], rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("mean ± std over concepts × seeds")
    ax.legend(ncol=4, fontsize=8, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def from_runs(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """The report of the runs a ``--runs-log`` holds (no training): what a cut-short full run measured."""
    rows = [json.loads(line) for line in args.from_runs.read_text(encoding="utf-8").splitlines() if line]
    runs = [r for r in rows if not r["method"].startswith("sweep ")]
    labels = [m.label for m in METHODS if any(r["method"] == m.label for r in runs)]
    payload = {
        "suite": "quality",
        "partial": True,
        "machine": {**machine_info(torch.device("cpu")), "threads": args.threads},
        "params": {**string_params(args), "seeds": str(sorted({r["seed"] for r in runs}))},
        "summary": summarise(runs, labels),
        "base": None,
        "learning_rates": {"trials": [r for r in rows if r["method"].startswith("sweep ")]},
        "runs": runs,
        "grid_rows": [],
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    figure(args.results_dir / f"{name}.png", payload)
    write_report(name, payload, report(name, payload), args.results_dir)
    return payload


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    name = args.out or ("quality-quick" if args.quick else "quality")
    if args.from_runs is not None:
        return from_runs(args, name)
    # the grid is saved before run_suite writes the report (and makes the folder)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    grid = args.results_dir / f"{name}-grid.png"
    return run_suite(
        "quality",
        name,
        lambda workdir: measure(args, workdir, grid),
        machine=lambda: {**machine_info(torch.device("cpu")), "threads": args.threads},
        params=string_params(args),
        report=report,
        figure=figure,
        out_dir=args.results_dir,
    )


if __name__ == "__main__":
    main()
