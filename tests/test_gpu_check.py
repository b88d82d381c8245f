"""``python -m bench.gpu_check``: its dry run end to end (so that the device script cannot rot),
and that a failing, crashing or late section loses none of the others."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bench import gpu_check, gpu_sections

REPO = Path(__file__).resolve().parents[1]
HEADER = ("device: ", "driver: ", "torch ", "triton ", "commit: ", "date: ")
DRY = "**dry run** on the CPU"


def section(text: str, key: str) -> str:
    """The body between the markers of ``key``, which must be there exactly once."""
    start, end = f"<!-- bench:{key}:start -->", f"<!-- bench:{key}:end -->"
    assert text.count(start) == 1 and text.count(end) == 1, f"markers of {key!r}"
    return text.split(start)[1].split(end)[0]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run of every section, as the command line runs it (each section in a child process)."""
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    return proc, out


def test_dry_run_writes_every_section_marked_as_a_dry_run(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (out / "RESULTS.md").read_text()
    for name, sec in gpu_check.SECTIONS.items():
        body = section(text, sec.key)
        assert DRY in body and "not a measurement" in body, name
        assert all(word in body for word in HEADER), (name, body[:600])
        assert "- section: ok" in body and "not measured" not in body, (name, body)
        assert f"{name}: running" in proc.stdout and f"{name}: ok in" in proc.stdout  # one progress line each way


def test_dry_run_sections_hold_their_tables(dry_run):
    text = (dry_run[1] / "RESULTS.md").read_text()
    assert "pytest -m gpu tests bench/test_kernel_microbench.py" in section(text, "gpu-check-tests")
    assert " skipped** (pytest exit code 0)" in section(text, "gpu-check-tests")  # no GPU: every gpu test skips
    fused = section(text, "gpu-check-fused-step")
    assert "speedup vs AdamW fused+norm" in fused
    for family in ("llama", "lora", "many"):  # one call each, with the PyTorch twin, every family in the table
        assert f"--family {family} " in fused and f"--json <out>/fused_step_{family}.json" in fused, family
        assert f"| {family} | " in fused, family
    assert fused.count("--backend torch") == 3 and "--backend triton" not in fused
    latency = section(text, "gpu-check-latency")
    for label in ("adamw (fused) | ok", "misa δ=1% (triton) | ok", "misa δ=3% (triton, sparse_backward) | ok",
                  "misa δ=1% (triton, step_in_backward) | ok", "lora r=16 | ", "badam (switch every", "galore r="):
        assert label in latency, label
    memory = section(text, "gpu-check-memory")
    for method in gpu_sections.MEMORY_METHODS:
        assert f"| 32 | {method} | " in memory, method
    assert "estimate worst" in memory


def test_the_device_run_of_fused_step_covers_every_family(tmp_path):
    """What the real section passes: all families at their LLaMA-7B sizes, Triton, 5 + 20 calls."""
    plan = gpu_check.Plan(dry_run=False, out=tmp_path)
    argvs = {f: " ".join(gpu_sections.fused_step_argv(plan, f, tmp_path / "x.json")) for f in gpu_sections.FUSED_SETS}
    assert list(argvs) == ["llama", "lora", "many"]  # the large `many` sets last: a timeout keeps the others
    assert "--sizes 1 4 16 64 256 512 " in argvs["llama"]
    assert "--lora-layers 32 --lora-rank 16 --hidden 4096 " in argvs["lora"]
    assert "--modules 8 32 80 --hidden 4096 " in argvs["many"]
    for argv in argvs.values():
        assert "--device cuda --backend triton --warmup 5 --repeats 20" in argv and "--step tensor" in argv
        assert "--flush-mib" not in argv  # the script sizes the flush from the device's L2


def test_dry_run_never_touches_bench_results_md(dry_run):
    assert DRY not in (REPO / "bench" / "RESULTS.md").read_text()
    args = gpu_check.parse_args(["--dry-run", "--out", "/tmp/x"])
    assert args.results_md == Path("/tmp/x/RESULTS.md")
    assert gpu_check.parse_args([]).results_md == REPO / "bench" / "RESULTS.md"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_a_real_run_without_a_gpu_measures_nothing(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path), "--results-md", str(tmp_path / "R.md")]) == 2
    assert "no CUDA device" in capsys.readouterr().out and not (tmp_path / "R.md").exists()


def test_a_failing_section_is_isolated(tmp_path, monkeypatch):
    def boom(plan, save):
        raise RuntimeError("broken on purpose")

    monkeypatch.setitem(gpu_check.SECTIONS, "latency", replace(gpu_check.SECTIONS["latency"], run=boom))
    md = tmp_path / "R.md"
    argv = ["--dry-run", "--isolation", "inline", "--sections", "latency,memory", "--out", str(tmp_path),
            "--results-md", str(md)]
    assert gpu_check.main(argv) == 1
    text = md.read_text()
    assert "gpu-check-tests" not in text and "gpu-check-fused-step" not in text  # --sections ran only those two
    failed = section(text, "gpu-check-latency")
    assert "- section: failed" in failed and "not measured: RuntimeError: broken on purpose" in failed
    assert all(word in failed for word in HEADER)
    later = section(text, "gpu-check-memory")
    assert "- section: ok" in later and "| 32 | misa-3% | " in later
    record = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["latency"]
    assert "broken on purpose" in record["traceback"]


PARTIAL = dict(dtype="bfloat16", config=dict(num_hidden_layers=22, hidden_size=2048), rows=[dict(
    method="misa-1%", seq_len=512, estimate=dict(worst=2 << 30, expected=2 << 30), total_bytes=1 << 30,
    peak_bytes=1 << 30)])
# a child that saves a partial result, starts a grandchild and hangs; or one that crashes
HANG = ("import json, subprocess, sys, time; from pathlib import Path; out = Path(sys.argv[1]);"
        "(out / 'memory.json').write_text(json.dumps(dict(status='running', data=json.loads(sys.argv[2]))));"
        "p = subprocess.Popen(['sleep', '60']); (out / 'grandchild').write_text(str(p.pid)); time.sleep(60)")
CRASH = "import sys; print('segfault, say'); sys.exit(3)"


@pytest.mark.parametrize("script", [HANG, CRASH], ids=["timeout", "crash"])
def test_a_late_or_crashing_child_is_recorded(tmp_path, monkeypatch, script):
    plan = gpu_check.Plan(dry_run=False, out=tmp_path)
    monkeypatch.setattr(gpu_check, "child_command",
                        lambda name, plan: [sys.executable, "-c", script, str(plan.out), json.dumps(PARTIAL)])
    record = gpu_check.run_in_child("memory", plan, timeout=3)
    body = gpu_check.section_body("memory", record, dict(device="cuda", device_name="GPU", driver="1", cuda="1",
                                                         python="3", versions={}, commit="c", date="d"), plan, 3)
    if script is CRASH:
        assert record["status"] == "failed" and record["data"] is None
        assert "not measured: its process exited with code 3; its last output: segfault, say" in body
        return
    assert record["status"] == "timed out" and "not measured: timed out after its budget of 3 s" in body
    assert "rows below were measured before that" in body and "| 512 | misa-1% | 1024.00 MiB |" in body
    grandchild = (tmp_path / "grandchild").read_text()
    state = Path(f"/proc/{grandchild}/status")
    assert not state.exists() or "zombie" in state.read_text()  # killed with the child's process group


def test_sections_are_written_between_markers_and_replaced(tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\nkept\n")
    gpu_check.write_section(md, "gpu-check-tests", "pytest -m gpu", "first")
    gpu_check.write_section(md, "gpu-check-memory", "memory", "other")
    gpu_check.write_section(md, "gpu-check-tests", "pytest -m gpu", "second")
    text = md.read_text()
    assert "kept" in text and text.count(gpu_check.GROUP_HEADING) == 1
    assert section(text, "gpu-check-tests").strip() == "second" and section(text, "gpu-check-memory").strip() == "other"


def test_sections_option(capsys):
    assert gpu_check.parse_args(["--sections", "memory,tests"]).sections == ["memory", "tests"]
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--sections", "latency,nope"])
