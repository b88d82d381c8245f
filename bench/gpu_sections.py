"""The four sections of ``python -m bench.gpu_check``: what each runs (``run(plan, save)``, its
JSON-ready data) and how it reads in RESULTS.md (``render(data)``, Markdown lines), with the
plan they are given and their budgets in :data:`SECTIONS`. ``gpu_check.py`` runs them.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from .report import latency_table, mib

if TYPE_CHECKING:
    from .common import LatencySettings
    from .peers import MethodSpec
if not torch.cuda.is_available():  # Triton's kernels then run only under its interpreter, read when they are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The rest is imported where it is used: a child process imports only its own section's modules
# (transformers is slow to import), and a module broken mid-edit fails only the sections that use it.

REPO = Path(__file__).resolve().parents[1]
Save = Callable[[Any], None]


@dataclass(frozen=True)
class Plan:
    """A device run or a CPU dry run, and the folder for its logs and JSON."""
    dry_run: bool
    out: Path
    commit: Optional[str] = None

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"


@dataclass(frozen=True)
class Section:
    key: str  # RESULTS.md marker key
    title: str
    budget_s: float
    run: Callable[[Plan, Save], Any]  # JSON-ready data; save(data) on the way keeps partial results
    render: Callable[[Any], list[str]]


# ---------------------------------------------------------------------------- 1. pytest -m gpu
def run_tests(plan: Plan, save: Save) -> dict[str, Any]:
    """``pytest -m gpu`` in a subprocess; counts and failures from its JUnit XML (pytest-benchmark's
    timings of bench/test_kernel_microbench.py are in ``<out>/tests.log``)."""
    junit = plan.out / "pytest.xml"
    junit.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests", "bench/test_kernel_microbench.py", "-q", "-rfE",
           "-p", "no:cacheprovider", f"--junitxml={junit}"]
    # a dry run keeps the tests off the GPU even when called in-process on a GPU machine
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1") if plan.dry_run else None
    # less than the section's budget, so that the report is read before the section is killed
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=SECTIONS["tests"].budget_s - 15)
    print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n")
    if not junit.exists():
        raise RuntimeError(f"pytest wrote no report (exit code {proc.returncode}): {proc.stderr.strip()[-300:]}")
    return dict(command=" ".join(["python", *cmd[1:]]).replace(str(plan.out), "<out>"), returncode=proc.returncode,
                **junit_counts(junit))


def junit_counts(path: Path) -> dict[str, Any]:
    """passed / failed / errors / skipped, and each failure's test id with its first message line."""
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failures = [f"{case.get('classname')}::{case.get('name')}: {(p.get('message') or '').strip()[:200]}"
                for case in root.iter("testcase") for p in [*case.findall("failure"), *case.findall("error")]]
    return dict(passed=n["tests"] - n["failures"] - n["errors"] - n["skipped"], failed=n["failures"],
                errors=n["errors"], skipped=n["skipped"], failures=failures)


def render_tests(data: dict[str, Any]) -> list[str]:
    lines = [f"`{data['command']}`: **{data['passed']} passed, {data['failed']} failed, {data['errors']} errors, "
             f"{data['skipped']} skipped** (pytest exit code {data['returncode']})."]
    return lines + (["", "Failures:", ""] + [f"- `{f.splitlines()[0]}`" for f in data["failures"]]
                    if data["failures"] else [])


# ---------------------------------------------------------------------------- 2. fused step
# Every family of bench_fused_step.py, one call each, cheapest first: a timeout or an out-of-memory
# in the large `many` sets keeps the rows measured before it. Budget (80 s on an H200, ~4 TB/s): one
# set is alive at a time (bench_set frees it); the largest, 80 modules (2.28B parameters), holds
# 16 B/param of ours (36 GB) and AdamW's fp32 gradients and moments (12 B/param, 27 GB), ~75 GB with
# foreach's temporaries, and its 6 variants x 25 calls move 70-180 GB a call: ~6 s. All sets, with
# start-up and Triton compilation, ~30-40 s.
FUSED_SETS = {
    "llama": ["--sizes", "1", "4", "16", "64", "256", "512"],
    "lora": ["--lora-layers", "32", "--lora-rank", "16", "--hidden", "4096"],
    "many": ["--modules", "8", "32", "80", "--hidden", "4096"],
}
# dry run: tiny sets of every family and the PyTorch twin (the interpreter takes ~50 s over 400+
# tensors); --hidden 64 crosses a layer boundary at 8 modules (norms of a second layer)
FUSED_DRY_SETS = {
    "llama": ["--sizes", "0.01"],
    "lora": ["--lora-layers", "2", "--lora-rank", "4", "--hidden", "64"],
    "many": ["--modules", "8", "--hidden", "64"],
}


def fused_step_argv(plan: Plan, family: str, path: Path) -> list[str]:
    """``bench_fused_step.py``'s arguments for ``family``: bf16, per-tensor step counts as MISA
    passes them; on the device Triton and the L2 flush the script sizes from the device."""
    if plan.dry_run:
        sets, timing = FUSED_DRY_SETS[family], ["--backend", "torch", "--warmup", "1", "--repeats", "1",
                                                "--copy-mib", "1", "--flush-mib", "1"]
    else:
        sets, timing = FUSED_SETS[family], ["--backend", "triton", "--warmup", "5", "--repeats", "20"]
    return ["--family", family, *sets, "--dtype", "bf16", "--step", "tensor", "--device", plan.device, *timing,
            "--json", str(path)]


def run_fused_step(plan: Plan, save: Save) -> dict[str, Any]:
    """``bench_fused_step.main`` once per family; each call's JSON is kept as it ends."""
    from . import bench_fused_step  # here: a broken script (it is being changed) fails this section only

    data: dict[str, Any] = dict(runs=[])
    for family in (FUSED_DRY_SETS if plan.dry_run else FUSED_SETS):
        path = plan.out / f"fused_step_{family}.json"
        path.unlink(missing_ok=True)
        argv = fused_step_argv(plan, family, path)
        rc = bench_fused_step.main(argv)
        if not path.exists():
            raise RuntimeError(f"bench_fused_step.main returned {rc} and wrote no JSON for {family}")
        data["runs"].append(dict(family=family, argv=" ".join(argv).replace(str(plan.out), "<out>"),
                                 result=json.loads(path.read_text())))
        save(data)
    return data


# the columns shown when the script's JSON has them (its schema grows); all of them are in gpu_check.json
FUSED_COLUMNS = ("family", "label", "params", "tensors", "ours_norm_update_ms", "ours_norm_update_host_ms",
                 "ours_norm_update_pct_copy", "ours_gbs", "adamw_fused_norm_step_ms", "adamw_fused_norm_step_host_ms",
                 "adamw_fused_norm_step_pct_copy", "adamw_foreach_norm_step_ms", "ours_update_ms",
                 "adamw_fused_step_ms")


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else f"{value:,}" if type(value) is int else str(value)


def _scalars(result: dict[str, Any], keep: Callable[[str], bool]) -> str:
    return "; ".join(f"{k}: {_cell(v)}" for k, v in result.items() if k != "rows" and keep(k))


def render_fused_step(data: dict[str, Any]) -> list[str]:
    """Each call with the scalars of its own (copy bandwidth, flush calls, warnings), the scalars
    they share on one line, then one table of all rows (speedup = AdamW fused+norm / ours)."""
    results = [run["result"] for run in data["runs"]]
    if not results:
        return []
    shared = {k for k, v in results[0].items() if all(r.get(k) == v for r in results)}
    lines = [f"- `python bench/bench_fused_step.py {run['argv']}`: {_scalars(run['result'], lambda k: k not in shared)}"
             for run in data["runs"]]
    rows = [r for result in results for r in result.get("rows", [])]
    columns = [c for c in FUSED_COLUMNS if any(c in r for r in rows)]
    columns = columns if len(columns) >= 4 else list(dict.fromkeys(k for r in rows for k in r))
    lines += ["", _scalars(results[0], lambda k: k in shared), "",
              "| " + " | ".join([*columns, "speedup vs AdamW fused+norm"]) + " |", "|" + "---|" * (len(columns) + 1)]
    for r in rows:
        try:
            speedup = f"{r['adamw_fused_norm_step_ms'] / r['ours_norm_update_ms']:.2f}x"
        except (KeyError, TypeError, ZeroDivisionError):
            speedup = ""
        lines.append("| " + " | ".join([_cell(r.get(c, "")) for c in columns] + [speedup]) + " |")
    return lines


# ---------------------------------------------------------------------------- 3. latency (Table 8)
def latency_settings(plan: Plan):
    """The "cuda" preset (TinyLlama-1.1B shape, bf16, batch 4 x 1024), or a tiny fp32 model."""
    from .common import PRESETS, LatencySettings, ModelShape, PeerSettings
    if not plan.dry_run:
        return PRESETS["cuda"].latency
    return LatencySettings(shape=ModelShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=172, vocab=256),
                           dtype="float32", seq_len=32, batch_size=2, warmup=1, repeats=2, inner_steps=2,
                           peers=PeerSettings(galore_rank=8, badam_switch_every=2))


def latency_specs(s: LatencySettings) -> list[MethodSpec]:
    """Fused AdamW; MISA (Triton) per delta with autograd, sparse and in-backward gradients; the peers."""
    from .peers import MethodSpec
    variants = {"": {}, ", sparse_backward": dict(sparse_backward=True),
                ", step_in_backward": dict(step_in_backward=True)}
    misa = [MethodSpec(f"misa δ={d:.0%} (triton{suffix})", "misa",
                       dict(delta=d, inner_steps=s.inner_steps, backend="triton", sweep=False, **extra))
            for d in s.deltas for suffix, extra in variants.items()]
    return [MethodSpec("adamw (fused)", "adamw"), *misa,
            MethodSpec(f"badam (switch every {s.peers.badam_switch_every})", "badam"),
            MethodSpec(f"lora r={s.peers.lora_rank}", "lora", dict(rank=s.peers.lora_rank)),
            MethodSpec(f"galore r={s.peers.galore_rank}", "galore", dict(rank=s.peers.galore_rank))]


def latency_row(spec: MethodSpec, s: LatencySettings, rows: torch.Tensor, device: str) -> dict[str, Any]:
    """One row timed by ``bench.latency.run_timed``; a failing row says why and the next one runs."""
    import misa_kernels as mk
    from .common import batch_stream, build_model, n_params
    from .latency import run_timed
    from .peers import Method, PeerUnavailable, make_method
    row: dict[str, Any] = dict(method=spec.label, kind=spec.kind, options=spec.options)
    try:
        model = build_model(s.shape, s.dtype, device, max_len=s.seq_len)
        row["model_params"] = n_params(model)
        # MISA directly: bench.peers.make_method does not pass sparse_backward / step_in_backward
        method = (Method(spec, model, mk.MISA(model, lr=1e-5, **spec.options)) if spec.kind == "misa"
                  else make_method(spec, model, lr=1e-5, peers=s.peers))
        timed = run_timed(method, batch_stream(rows, s.batch_size, device, seed=0), device, s.warmup, s.repeats)
        timed.pop("steps")
        row.update(status="ok", **timed)
    except PeerUnavailable as err:
        row["status"] = str(err)
    except torch.cuda.OutOfMemoryError:
        row["status"] = "out of memory"
    except Exception as err:  # noqa: BLE001 - one broken method must not lose the other rows
        row["status"] = f"failed: {type(err).__name__}: {str(err)[:200]}"
    method = model = None  # this row's model goes before the next one is built
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def run_latency(plan: Plan, save: Save) -> dict[str, Any]:
    from misa_kernels.data import lm_splits
    from .common import PRETRAIN_CORPUS
    s = latency_settings(plan)
    text = lm_splits(PRETRAIN_CORPUS, s.seq_len)[0]
    data: dict[str, Any] = dict(settings=dict(latency=asdict(s)), rows=[])
    for spec in latency_specs(s):
        data["rows"].append(latency_row(spec, s, text, plan.device))
        save(data)
    return data


def render_latency(data: dict[str, Any]) -> list[str]:
    peaks = "; ".join(f"{r['method']} {mib(r['peak_bytes'])}" for r in data["rows"] if r.get("peak_bytes"))
    return latency_table(data["rows"], data["settings"]) + [
        "", "With `step_in_backward` the update runs inside backward; its optimizer ms is what is left for "
        "`step()`." + (f" Peak allocated memory: {peaks}." if peaks else "")]


# ---------------------------------------------------------------------------- 4. memory (Fig. 2)
MEMORY_METHODS = ("lora-r16", "lora-r128", "misa-1%", "misa-3%")
TINY_CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def memory_setup(plan: Plan):
    """bench_memory's 1.1B bf16 model at seq 512-4096, one MISA draw (each draw rebuilds the
    model on the host: three would not fit the budget); a tiny CPU model for a dry run."""
    from .bench_memory import FULL, Setup

    if plan.dry_run:
        return Setup(TINY_CONFIG, torch.float32, torch.device("cpu"), 1, (16, 32), measured=1)
    return Setup(FULL, torch.bfloat16, torch.device("cuda"), 1, (512, 1024, 2048, 4096), measured=1)


def predicted(name: str, seq: int, setup) -> dict[str, int]:
    """``estimate_memory``'s total for what bench_memory runs (worst and expected placement)."""
    import misa_kernels as mk
    common = dict(batch=setup.batch_size, seq=seq, dtype=str(setup.dtype).removeprefix("torch."))
    if name.startswith("lora"):
        total = mk.estimate_memory(setup.config, method="lora", lora_rank=int(name[6:]), **common).total
        return dict(worst=total, expected=total)
    misa = dict(method="misa", delta=float(name[5:-1]) / 100, sparse_backward=True, **common)
    return {p: mk.estimate_memory(setup.config, placement=p, **misa).total for p in ("worst", "expected")}


def run_memory(plan: Plan, save: Save) -> dict[str, Any]:
    from .bench_memory import measure_or_error

    setup = memory_setup(plan)
    data: dict[str, Any] = dict(dtype=str(setup.dtype).removeprefix("torch."), config=setup.config, rows=[])
    for seq in setup.seq_lens:  # shortest first: a timeout keeps whole sequence lengths
        for name in MEMORY_METHODS:
            row: dict[str, Any] = dict(method=name, seq_len=seq, estimate=predicted(name, seq, setup))
            try:
                row.update(measure_or_error(name, seq, setup))
            except Exception as err:  # noqa: BLE001 - one failing point must not lose the others
                row["error"] = f"failed: {type(err).__name__}: {str(err)[:200]}"
            data["rows"].append(row)
            save(data)
    return data


def render_memory(data: dict[str, Any]) -> list[str]:
    c = data["config"]
    lines = [f"`bench/bench_memory.py`'s `measure_one`: {data['dtype']}, batch 1, {c['num_hidden_layers']} layers, "
             f"hidden {c['hidden_size']}; MISA with sparse backward, one sampling draw. Measured: peak allocated "
             "memory (CUDA only) and the sum of the measured parts; estimate: `estimate_memory(...).total`, worst "
             "and expected placement; last column: measured peak (parts on the CPU) / worst estimate.", "",
             "| seq | method | measured peak | measured parts | estimate worst | estimate expected "
             "| measured / worst |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        est = f"{mib(r['estimate']['worst'])} | {mib(r['estimate']['expected'])}"
        if "error" in r:
            lines.append(f"| {r['seq_len']} | {r['method']} | not measured: {r['error']} | | {est} | |")
            continue
        measured = r.get("peak_bytes") or r["total_bytes"]
        lines.append(f"| {r['seq_len']} | {r['method']} | {mib(r.get('peak_bytes'))} | {mib(r['total_bytes'])} "
                     f"| {est} | {measured / r['estimate']['worst']:.2f} |")
    return lines


SECTIONS: dict[str, Section] = {
    "tests": Section("gpu-check-tests", "pytest -m gpu", 100, run_tests, render_tests),
    "fused_step": Section("gpu-check-fused-step", "Fused step vs AdamW(fused=True) + norm pass", 80, run_fused_step,
                          render_fused_step),
    "latency": Section("gpu-check-latency", "Step latency, ~1B LLaMA, bf16 (paper Table 8)", 140, run_latency,
                       render_latency),
    "memory": Section("gpu-check-memory", "Peak memory vs sequence length (paper Fig. 2)", 140, run_memory,
                      render_memory),
}
