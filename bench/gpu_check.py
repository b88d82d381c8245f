"""``python -m bench.gpu_check``: everything a lent GPU must show, in one run of at most 8 minutes.

Sections ``tests`` (``pytest -m gpu``), ``fused_step`` (``bench/bench_fused_step.py``),
``latency`` (paper Table 8, ~1B bf16 LLaMA) and ``memory`` (Fig. 2 beside ``estimate_memory``),
each with its own time budget and, by default, its own process: a crash, hang or timeout loses
none of the others. Each is written as it ends between its ``bench:gpu-check-*`` markers of
RESULTS.md, headed by device, driver, versions, commit and date; one that did not run says
"not measured" and why. ``--dry-run``: the same code on the CPU at tiny sizes. See bench/README.md.

This file holds the command line and the orchestration (child processes, budgets, writing);
the sections themselves, with their budgets, are in ``gpu_sections.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import torch

# first: it sets TRITON_INTERPRET on a machine without a GPU, before any kernel is imported
from .gpu_sections import REPO, SECTIONS, Plan
from .report import update_results_md

RESULTS_MD = REPO / "bench" / "RESULTS.md"
DEFAULT_OUT = REPO / "bench" / "results" / "gpu_check"
TOTAL_BUDGET_S = 480  # the 8 minutes on one H200; the section budgets sum to 460
GROUP_HEADING = "## GPU check (`python -m bench.gpu_check`)"


# ---------------------------------------------------------------------------- running a section
def run_here(name: str, plan: Plan) -> dict[str, Any]:
    """Section ``name`` in this process; its record, partial ones too, goes to ``<out>/<name>.json``."""
    path, start = plan.out / f"{name}.json", time.perf_counter()
    path.unlink(missing_ok=True)  # no stale partial data from an earlier run
    def save(data: Any) -> None:
        _write(path, dict(status="running", data=data))

    try:
        record = dict(status="ok", data=SECTIONS[name].run(plan, save))
    except Exception as err:  # noqa: BLE001 - the error is the section's result
        record = dict(status="failed", data=(_read(path) or {}).get("data"), error=f"{type(err).__name__}: {err}",
                      traceback=traceback.format_exc())
    record["wall_s"] = time.perf_counter() - start
    _write(path, record)
    return record


def child_command(name: str, plan: Plan) -> list[str]:
    dry = ["--dry-run"] if plan.dry_run else []
    return [sys.executable, "-m", "bench.gpu_check", "--child", name, "--out", str(plan.out), *dry]


def run_in_child(name: str, plan: Plan, timeout: float) -> dict[str, Any]:
    """In a child process in a session of its own, killed with its whole group (pytest too) at
    ``timeout``: a crash, a CUDA hang or a leaked process cannot take the next sections along."""
    path, log_path, start = plan.out / f"{name}.json", plan.out / f"{name}.log", time.perf_counter()
    path.unlink(missing_ok=True)
    with open(log_path, "w") as log:
        # a dry run's child sees no GPU (so it also takes the Triton interpreter), on a GPU machine too
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(dict(CUDA_VISIBLE_DEVICES="") if plan.dry_run else {}))
        proc = subprocess.Popen(child_command(name, plan), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
        try:
            proc.wait(timeout)
            status, error = "failed", f"its process exited with code {proc.returncode}"
        except subprocess.TimeoutExpired:
            status, error = "timed out", f"timed out after its budget of {timeout:.0f} s"
        finally:  # late, or this process interrupted: the child's whole group goes, so no GPU work runs on
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    record = _read(path) or dict(status="running", data=None)
    if record["status"] == "running":  # the child died or was killed before it finished
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:]
        record.update(status=status, error=error + (f"; its last output: {tail[0][:200]}" if tail else ""),
                      wall_s=time.perf_counter() - start)
    return record


# ---------------------------------------------------------------------------- output
def environment_header(plan: Plan) -> dict[str, Any]:
    """``bench.env``'s device, versions, commit and date, plus the GPU driver and CUDA versions."""
    from .env import environment
    env = environment(plan.device)
    return dict(env, date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), cuda=torch.version.cuda or "none",
                commit=plan.commit or env["commit"], driver="none (CPU)" if plan.dry_run else _driver())


def _driver() -> str:
    """The NVIDIA driver's version, from nvidia-smi (torch does not report it)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        out = []
    return out[0] if out else "unknown"


def section_body(name: str, record: dict[str, Any], env: dict[str, Any], plan: Plan, budget: float) -> str:
    """Environment header, the section's status, then its table (or why there is none)."""
    mode = ("**dry run** on the CPU at tiny sizes: a check that the script runs end to end, not a measurement"
            if plan.dry_run else "measured on the device")
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    lines = [f"- {mode}", f"- device: {env['device']} ({env['device_name']}), driver: {env['driver']}, "
             f"CUDA: {env['cuda']}", f"- versions: python {env['python']}, {versions}",
             f"- commit: {env['commit']}, date: {env['date']}",
             f"- section: {record['status']}, {record.get('wall_s', 0):.0f} s of a {budget:.0f} s budget", ""]
    if record["status"] != "ok":
        partial = "; the rows below were measured before that" if record.get("data") else ""
        lines += [f"not measured: {record.get('error')}{partial}.", ""]
    if record.get("data"):
        try:
            lines += SECTIONS[name].render(record["data"])
        except Exception as err:  # noqa: BLE001 - a rendering bug must not hide the status above
            lines.append(f"(the data could not be rendered: {type(err).__name__}: {err}; see gpu_check.json)")
    return "\n".join(lines).rstrip()


def write_section(path: Path, key: str, title: str, body: str) -> None:
    """Replace the section between its markers (as ``python -m bench --results-md`` does); append it,
    markers and all, when the file has none yet."""
    if not path.exists():
        path.write_text("# Benchmark results\n")
    if update_results_md(path, key, body):
        return
    text = path.read_text().rstrip("\n")
    if GROUP_HEADING not in text:
        text += f"\n\n{GROUP_HEADING}\n\nEach section below is replaced by the next run of that section."
    path.write_text(f"{text}\n\n### {title}\n\n<!-- bench:{key}:start -->\n{body}\n<!-- bench:{key}:end -->\n")


def _write(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(path)  # a reader, or a kill, never meets half a file


def _read(path: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------- command line
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the same code on the CPU at tiny sizes")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the logs and JSON")
    parser.add_argument("--results-md", type=Path, metavar="PATH",
                        help="Markdown file to write (default: bench/RESULTS.md; <out>/RESULTS.md with --dry-run)")
    parser.add_argument("--commit", help="the commit to record where the tree is no git checkout (a device copy)")
    parser.add_argument("--isolation", choices=("process", "inline"), default="process",
                        help="process (default): each section in its own process, killed at its budget; "
                             "inline: in this process, without time limits (debugging, tests)")
    parser.add_argument("--child", choices=tuple(SECTIONS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    if not args.sections or set(args.sections) - set(SECTIONS):
        parser.error(f"--sections: choose from {','.join(SECTIONS)}, got {','.join(args.sections)!r}")
    if args.results_md is None:  # a dry run never touches bench/RESULTS.md unless asked to
        args.results_md = args.out / "RESULTS.md" if args.dry_run else RESULTS_MD
    return args


def main(argv: Optional[list[str]] = None) -> int:
    """Run the chosen sections; 0 when each ran to its end, 1 otherwise, 2 without a GPU (real run)."""
    args = parse_args(argv)
    if not (args.dry_run or args.child or torch.cuda.is_available()):  # nothing to measure: write nothing
        print("gpu_check: no CUDA device here; nothing measured (--dry-run runs the same code on the CPU)")
        return 2
    plan = Plan(args.dry_run, args.out.resolve(), args.commit)
    plan.out.mkdir(parents=True, exist_ok=True)
    if args.child:
        return 0 if run_here(args.child, plan)["status"] == "ok" else 1
    env, records, deadline = environment_header(plan), {}, time.monotonic() + TOTAL_BUDGET_S
    names = [n for n in SECTIONS if n in args.sections]
    for i, name in enumerate(names, 1):
        section = SECTIONS[name]
        budget = max(1.0, min(section.budget_s, deadline - time.monotonic()))
        print(f"[gpu_check] {i}/{len(names)} {name}: running (budget {budget:.0f} s)", flush=True)
        inline = args.isolation == "inline"
        records[name] = record = run_here(name, plan) if inline else run_in_child(name, plan, budget)
        write_section(args.results_md, section.key, section.title, section_body(name, record, env, plan, budget))
        _write(plan.out / "gpu_check.json", dict(environment=env, dry_run=plan.dry_run, sections=records))
        error = f" ({record.get('error')})" if record["status"] != "ok" else ""
        print(f"[gpu_check] {i}/{len(names)} {name}: {record['status']} in {record.get('wall_s', 0):.0f} s{error}",
              flush=True)
    print(f"[gpu_check] wrote {args.results_md} and {plan.out / 'gpu_check.json'}")
    return 0 if all(r["status"] == "ok" for r in records.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
