"""bench/bench_fused_step.py on the CPU: smoke runs of each active-set family, the byte
accounting (fused_step_bytes.py), the L2 flush's place in the timing loop and host times
(fused_step_timing.py), the sets (fused_step_sets.py), and the no-CUDA exit."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` lives at the repository root

from bench import bench_fused_step as bfs  # noqa: E402
from bench import fused_step_bytes as nbytes  # noqa: E402
from bench import fused_step_sets as sets  # noqa: E402
from bench import fused_step_timing as timing  # noqa: E402

VARIANTS = ("ours_update", "ours_norm_update", "adamw_fused_step", "adamw_fused_norm_step",
            "adamw_foreach_step", "adamw_foreach_norm_step")
OLD_ROW_KEYS = ("size_m", "params", "tensors", "bytes_per_param", "ours_gbs",
                *(f"{v}_ms" for v in VARIANTS))
NEW_ROW_KEYS = ("family", "label", "adamw_bytes_per_param",
                *(f"{v}_{s}" for v in VARIANTS for s in ("host_ms", "cpu_ms", "bytes_per_param", "gbs", "pct_copy")))
OLD_TOP_KEYS = ("device", "torch", "triton", "commit", "dtype", "backend", "copy_gbs", "rows")
NEW_TOP_KEYS = ("families", "step", "hidden", "warmup", "repeats", "l2_cache_bytes", "flush_bytes",
                "flush_calls", "timing", "adamw_grads", "warnings")
FAST = ["--device", "cpu", "--backend", "torch", "--warmup", "1", "--repeats", "2", "--hidden", "16",
        "--copy-mib", "1", "--flush-mib", "1"]


def _run(tmp_path, *extra: str) -> dict:
    out = tmp_path / "result.json"
    assert bfs.main([*FAST, *extra, "--json", str(out)]) == 0
    return json.loads(out.read_text())


# ----------------------------------------------------------------------------- smoke runs
@pytest.mark.parametrize("family, extra, tensors", [
    ("llama", ["--sizes", "0.01", "0.02"], [2, 2]),  # (2, 4096) + (1808,); (4, 4096) + (3616,)
    ("many", ["--modules", "8", "20"], [8 * 2 + 2 * 2, 20 * 2 + 3 * 2]),  # weight + bias each, 2 norms a layer
    ("lora", ["--lora-layers", "2"], [2 * 7 * 2]),  # A and B of 7 modules a layer
])
def test_cpu_smoke_run_of_each_family_writes_the_new_fields(tmp_path, family, extra, tensors):
    result = _run(tmp_path, "--family", family, *extra)
    for key in OLD_TOP_KEYS + NEW_TOP_KEYS:
        assert key in result, key
    assert result["families"] == [family]
    assert result["flush_bytes"] == 1 << 20
    assert [row["tensors"] for row in result["rows"]] == tensors
    for row in result["rows"]:
        for key in OLD_ROW_KEYS + NEW_ROW_KEYS:
            assert key in row, key
        assert row["family"] == family
        for v in VARIANTS:
            assert row[f"{v}_ms"] > 0 and row[f"{v}_host_ms"] > 0 and row[f"{v}_cpu_ms"] >= 0
            expected_gbs = row["params"] * row[f"{v}_bytes_per_param"] / row[f"{v}_ms"] / 1e6
            assert math.isclose(row[f"{v}_gbs"], expected_gbs, rel_tol=1e-9)
            assert math.isclose(row[f"{v}_pct_copy"], 100 * expected_gbs / result["copy_gbs"], rel_tol=1e-9)
    if family == "lora":
        assert result["rows"][0]["largest_tensor"] == 16 * 43  # B of gate/up: (43, 16) at width 16


def test_default_sets_have_the_sizes_misa_activates():
    args = bfs.parse_args(["--device", "cuda"])
    assert args.family == ["llama", "many", "lora"] and args.hidden == 4096
    assert bfs.parse_args(["--family", "modules", "lora"]).family == ["many", "lora"]
    by_label = {label: shapes for _, label, _, shapes in sets.active_sets(args)}
    # many: 2 tensors a module, 2 norm vectors a layer begun (7 modules a layer).
    assert [len(by_label[f"{n} modules"]) for n in (8, 32, 80)] == [20, 74, 184]
    assert by_label["8 modules"][:4] == [(4096,), (4096,), (4096, 4096), (4096,)]
    # lora: rank-16 A (16, in) and B (out, 16) of 7 modules in each of 32 layers.
    lora = by_label["r16 x 32 layers"]
    assert len(lora) == 448
    assert lora[8:10] == [(16, 4096), (11008, 16)]  # the gate projection of layer 0
    assert sum(a * b for a, b in lora) == 32 * 16 * (4 * 8192 + 3 * (4096 + 11008))


# -------------------------------------------------------------------------- bytes accounting
def test_bytes_per_element_bf16_weights_with_fp32_master(tmp_path):
    shapes = [(3, 5), (7,)]
    n = 3 * 5 + 7
    active = sets.make_active_set(shapes, torch.bfloat16, torch.device("cpu"))
    # Ours, per element: fp32 master read 4 + written 4, bf16 weight written 2 (never read),
    # fp32 m read 4 + written 4, fp32 v read 4 + written 4, bf16 grad read 2 by the update.
    ours_update = 4 + 4 + 2 + 4 + 4 + 4 + 4 + 2
    ours_norm_update = ours_update + 2  # the separate norm pass reads the bf16 grad again
    # AdamW step() on the fp32 masters: weight 4 + 4, ready fp32 grad 4, m 4 + 4, v 4 + 4.
    adamw_step = 4 + 4 + 4 + 4 + 4 + 4 + 4
    # Full step: + copy-back (fp32 master read 4, bf16 weight written 2) + norm pass (bf16 grad 2).
    adamw_full = adamw_step + 4 + 2 + 2
    assert (ours_update, ours_norm_update, adamw_step, adamw_full) == (28, 30, 28, 36)
    assert nbytes.ours_bytes(active, with_norm=False) == n * ours_update
    assert nbytes.ours_bytes(active, with_norm=True) == n * ours_norm_update
    assert nbytes.adamw_bytes(active, full=False) == n * adamw_step
    assert nbytes.adamw_bytes(active, full=True) == n * adamw_full
    assert nbytes.bytes_per_param(active, with_norm=True) == ours_norm_update

    row = _run(tmp_path, "--family", "llama", "--sizes", "0.000022")["rows"][0]  # one (22,) tensor
    assert row["params"] == 22
    assert row["bytes_per_param"] == row["ours_norm_update_bytes_per_param"] == ours_norm_update
    assert row["ours_update_bytes_per_param"] == ours_update
    assert row["adamw_fused_step_bytes_per_param"] == row["adamw_foreach_step_bytes_per_param"] == adamw_step
    assert row["adamw_bytes_per_param"] == row["adamw_fused_norm_step_bytes_per_param"] == adamw_full
    assert math.isclose(row["ours_gbs"], 22 * ours_norm_update / row["ours_norm_update_ms"] / 1e6)
    assert math.isclose(row["adamw_fused_norm_step_gbs"], 22 * adamw_full / row["adamw_fused_norm_step_ms"] / 1e6)


def test_bytes_per_element_fp32_weights_without_master():
    active = sets.make_active_set([(4, 4)], torch.float32, torch.device("cpu"))
    # Ours: fp32 weight 4 + 4, m 4 + 4, v 4 + 4, fp32 grad 4 (+ 4 for the norms).
    assert nbytes.ours_bytes(active, with_norm=False) == 16 * 28
    assert nbytes.ours_bytes(active, with_norm=True) == 16 * 32
    # AdamW: 28 for step(); no copy-back, the norm pass reads the fp32 grad: 32.
    assert nbytes.adamw_bytes(active, full=False) == 16 * 28
    assert nbytes.adamw_bytes(active, full=True) == 16 * 32


# ------------------------------------------------------------------------------- L2 flush
def _log_markers(monkeypatch, log: list) -> None:
    record = timing._Marker.record

    def logged(self):
        log.append("mark")
        record(self)

    monkeypatch.setattr(timing._Marker, "record", logged)


def test_time_call_flushes_before_each_repeat_outside_the_timed_region(monkeypatch):
    log: list[str] = []
    _log_markers(monkeypatch, log)
    timing.time_call(lambda: log.append("call"), torch.device("cpu"), warmup=2, repeats=3,
                  flush=lambda: log.append("flush"))
    assert log == ["call"] * 2 + ["flush", "mark", "call", "mark"] * 3


def test_every_timed_call_of_a_run_is_preceded_by_one_flush_and_never_contains_one(tmp_path, monkeypatch):
    log: list[str] = []
    _log_markers(monkeypatch, log)
    flush = timing.L2Flush.__call__

    def logged(self):
        log.append("flush")
        flush(self)

    monkeypatch.setattr(timing.L2Flush, "__call__", logged)
    result = _run(tmp_path, "--family", "llama", "lora", "--sizes", "0.01", "--lora-layers", "1",
                  "--repeats", "3")
    timed = (1 + len(VARIANTS) * len(result["rows"])) * 3  # the copy, then 6 variants a row
    assert log == ["flush", "mark", "mark"] * timed
    assert result["flush_calls"] == timed


def test_flush_is_sized_from_the_device_l2(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: SimpleNamespace(L2_cache_size=60 * 2**20))
    assert timing.l2_cache_bytes(cuda) == 60 * 2**20
    assert timing.default_flush_bytes(cuda) == 120 * 2**20
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace())
    assert timing.default_flush_bytes(cuda) == 256 * 2**20  # not reported: the safe default
    assert timing.default_flush_bytes(torch.device("cpu")) == 8 * 2**20


def test_flush_writes_one_buffer_and_reads_another_of_the_requested_size():
    flush = timing.L2Flush(torch.device("cpu"), 1 << 20)
    flush._write.fill_(7.0)
    flush()
    assert flush._write.numel() * 4 >= 1 << 20 and flush._read.numel() * 4 >= 1 << 20
    assert bool((flush._write == 0).all())  # written
    assert bool((flush._sink == flush._read.shape[0]).all())  # read (column sums of ones)
    assert flush.calls == 1


# ------------------------------------------------------------------------------ host time
def test_host_times_are_wall_and_process_time_around_the_call():
    def sleepy():
        time.sleep(0.02)  # wall time, almost no CPU time

    timed = timing.time_call(sleepy, torch.device("cpu"), warmup=1, repeats=3)
    assert timed.host_ms >= 20 and timed.gpu_ms >= 20
    assert timed.cpu_ms < 10


# ------------------------------------------------------------------------------- no CUDA
def test_without_cuda_nothing_is_measured_and_it_exits_0(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "result.json"
    assert bfs.main(["--device", "cuda", "--json", str(out)]) == 0
    assert "nothing measured" in capsys.readouterr().out
    assert not out.exists()
