"""The benchmark suite (``python -m bench``): its measurements and bookkeeping on tiny models.

No peer package is needed: BAdam, LoRA (peft) and GaLore tests skip when theirs is missing,
and a missing peer is simulated to check that it becomes a row, not an exception.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` lives at the repository root

from bench import convergence, latency, peers, report  # noqa: E402
from bench.__main__ import misa_sample_counts, parse_args, results_md_key, write_outputs  # noqa: E402
from bench.common import (  # noqa: E402
    PRESETS, ConvergenceSettings, LatencySettings, ModelShape, PeerSettings, read_json, resolve_settings,
    write_json,
)
from bench.peers import MethodSpec  # noqa: E402

TINY = ModelShape(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64)
PEERS = PeerSettings(lora_rank=4, galore_rank=8, galore_update_proj_gap=5, badam_switch_every=3)


def tiny_latency(**overrides) -> LatencySettings:
    return replace(LatencySettings(shape=TINY, dtype="float32", seq_len=16, batch_size=2, warmup=2, repeats=9,
                                   inner_steps=5, peers=PEERS), **overrides)


def tiny_convergence(**overrides) -> ConvergenceSettings:
    lrs = {kind: (1e-3, 3e-3) for kind in peers.KINDS}
    return replace(ConvergenceSettings(
        shape=TINY, dtype="float32", seq_len=32, batch_size=4, pretrain_steps=40, finetune_steps=20, eval_rows=8,
        eval_points=2, delta=0.2, inner_steps=4, pretrain_delta=0.25, finetune_lrs=lrs, pretrain_lrs=lrs,
        peers=PEERS), **overrides)


def _specs(*kinds: str, **options) -> list[MethodSpec]:
    return [MethodSpec(kind, kind, dict(options) if kind == "misa" else {}) for kind in kinds]


@pytest.fixture(scope="module")
def latency_rows() -> list[dict]:
    s = tiny_latency()
    specs = _specs("adamw") + [MethodSpec("misa", "misa", dict(delta=0.1, inner_steps=5, sweep=False))]
    return latency.latency_rows(s, "cpu", progress=False, specs=specs)


# ---------------------------------------------------------------------------- latency and memory
def test_each_step_total_is_the_sum_of_its_parts(latency_rows):
    for row in latency_rows:
        assert row["status"] == "ok"
        assert len(row["steps"]) == 9
        for step in row["steps"]:
            parts = [step[k] for k in latency.PARTS]
            assert all(p > 0 for p in parts)
            assert math.isclose(sum(parts), step["total_ms"], rel_tol=1e-9)


def test_median_total_lies_within_the_timed_steps(latency_rows):
    for row in latency_rows:
        totals = [s["total_ms"] for s in row["steps"]]
        assert min(totals) <= row["total_ms"] <= max(totals)
        assert min(totals) <= row["total_mean_ms"] <= max(totals)


def test_breakdown_times_the_parts_and_leaves_out_memory_readings(monkeypatch):
    """With a fake clock (forward 3 ms, backward 5 ms, memory reading 100 ms, optimizer 2 ms)
    the medians are exactly the parts, their sum is the total, warm-up steps are dropped."""
    ticks = []
    for step in range(5):
        scale = 10.0 if step < 3 else 1.0  # the 3 warm-up steps are 10x slower
        ticks += [step + scale * t for t in (0.0, 0.003, 0.008, 0.108, 0.110)]
    clock = iter(ticks)
    monkeypatch.setattr(latency, "perf_counter", lambda: next(clock))
    s = tiny_latency(warmup=3, repeats=2)
    row = latency.latency_rows(s, "cpu", progress=False, specs=_specs("adamw"))[0]
    assert len(row["steps"]) == 2
    for key, expected in (("forward_ms", 3.0), ("backward_ms", 5.0), ("optimizer_ms", 2.0), ("total_ms", 10.0)):
        assert row[key] == pytest.approx(expected)
    assert sum(row[k] for k in latency.PARTS) == pytest.approx(row["total_ms"])


def test_adamw_memory_is_two_moments_and_a_gradient_per_parameter(latency_rows):
    adamw = latency_rows[0]
    n = adamw["model_params"]
    assert adamw["trained_params"] == n
    assert adamw["memory"] == dict(gradients=4 * n, master_weights=0, optimizer_state=8 * n, total=12 * n)


def test_misa_holds_state_only_for_its_active_modules(latency_rows):
    adamw, misa = latency_rows
    n, trained = misa["model_params"], misa["trained_params"]
    assert 0 < trained < n
    assert misa["memory"]["gradients"] == 4 * trained  # fp32 model: no master copy
    assert misa["memory"]["master_weights"] == 0
    assert 8 * trained <= misa["memory"]["optimizer_state"] < adamw["memory"]["optimizer_state"]


def test_triton_rows_are_skipped_without_cuda():
    specs = latency.latency_specs(tiny_latency(), "cpu")
    triton = [s for s in specs if s.options.get("backend") == "triton"]
    assert len(triton) == len(tiny_latency().deltas)
    assert all(latency.unavailable_reason(s, "cpu") == "skipped: the Triton kernels need CUDA" for s in triton)
    assert specs[0].kind == "adamw"  # the reference of the ratios comes first


# ---------------------------------------------------------------------------- missing peers
@pytest.fixture
def no_peers(monkeypatch):
    """Make every peer's import fail as if the package were not installed."""
    for module, _ in peers.PEER_PACKAGES.values():
        monkeypatch.setitem(sys.modules, module, None)


def test_missing_peer_is_a_not_installed_latency_row(no_peers):
    rows = latency.latency_rows(tiny_latency(warmup=1, repeats=1), "cpu", progress=False,
                                specs=[MethodSpec("b", "badam"), MethodSpec("l", "lora"), MethodSpec("g", "galore")])
    assert [r["status"] for r in rows] == [
        "not installed (pip install badam)", "not installed (pip install peft)",
        "not installed (pip install galore-torch)",
    ]
    table = "\n".join(report.latency_table(rows, {"latency": vars(tiny_latency()) | {"shape": vars(TINY)}}))
    assert "| b | not installed (pip install badam) |" in table


def test_missing_peer_is_a_not_installed_convergence_row(no_peers):
    def run(lr):
        peers.import_peer("galore")
        raise AssertionError("unreachable")

    row, artefact = convergence.method_row(MethodSpec("g", "galore"), (1e-3,), run)
    assert row["status"].startswith("not installed") and artefact is None
    assert peers.peer_status("badam").startswith("not installed")
    assert peers.peer_status("adamw") == "ok"


# ---------------------------------------------------------------------------- learning-rate sweep
def _fake_run(losses: dict[float, float | None]):
    def run(lr):
        loss = losses[lr]
        result = dict(final_val_loss=loss, diverged=loss is None, curve=[[0, 0.0, 5.0], [1, 0.1, loss]],
                      train_seconds=0.1, ms_per_step=1.0, details={})
        return result, f"model@{lr:g}"

    return run


def test_sweep_picks_the_lowest_final_loss_and_keeps_its_artefact():
    losses = {1e-3: 2.0, 3e-3: 1.5, 1e-2: None, 3e-2: 1.7}
    summary, artefact = convergence.sweep(_fake_run(losses), tuple(losses))
    assert summary["best_lr"] == 3e-3
    assert summary["val_loss_after"] == 1.5 == min(v for v in losses.values() if v is not None)
    assert artefact == "model@0.003"
    assert [r["lr"] for r in summary["runs"]] == list(losses)


def test_sweep_where_every_run_diverged_has_no_best():
    row, artefact = convergence.method_row(MethodSpec("x", "adamw"), (1e-3, 1e-2), _fake_run({1e-3: None, 1e-2: None}))
    assert row["best_lr"] is None and artefact is None
    assert row["status"] == "diverged at every learning rate"


def test_real_sweeps_lower_the_loss_and_report_their_best_run():
    cs = tiny_convergence()
    one_lr = {kind: (1e-2,) for kind in ("adamw", "misa", "galore")}
    pre, base = convergence.pretrain_rows(replace(cs, pretrain_lrs=one_lr), "cpu", progress=False)
    assert pre[0]["kind"] == "adamw" and pre[0]["val_loss_after"] < pre[0]["val_loss_before"]
    rows = convergence.finetune_rows(base, cs, "cpu", progress=False)
    assert [r["method"] for r in rows] == [s.label for s in convergence.finetune_specs(cs)]
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["options"].get("strategy", "misa") for r in ok if r["kind"] == "misa"} == set(convergence.STRATEGIES)
    assert [r["options"].get("momentum_step") for r in ok if r["kind"] == "misa"][-1] == "proof"
    for row in ok:
        finals = [run["final_val_loss"] for run in row["runs"]]
        assert row["val_loss_after"] == min(finals) and row["best_lr"] == row["lrs"][finals.index(min(finals))]
        assert row["val_loss_before"] == rows[0]["val_loss_before"]  # every method starts from the same base
        assert row["val_loss_after"] < row["val_loss_before"]
        assert [point[0] for point in row["curve"]] == [0, 10, 20]
        seconds = [point[1] for point in row["curve"]]
        assert seconds == sorted(seconds) and seconds[0] == 0.0


def test_eval_steps_are_spread_and_end_at_the_last_step():
    assert convergence.eval_steps(150, 10) == list(range(15, 151, 15))
    assert convergence.eval_steps(3, 10) == [1, 2, 3]


def test_warmup_cosine_warms_up_then_decays_to_the_floor():
    factor = convergence.warmup_cosine(100, warmup_fraction=0.1, floor=0.1)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(100) == pytest.approx(0.1)
    values = [factor(s) for s in range(10, 101)]
    assert values == sorted(values, reverse=True)


# ---------------------------------------------------------------------------- output
def test_json_outputs_round_trip(tmp_path, latency_rows):
    results = dict(environment=dict(device="cpu", device_name="x", python="3", versions={"torch": "2"}, commit="c",
                                    date="2026-11-23"),
                   settings=dict(PRESETS["quick"].as_dict()), latency=latency_rows, notes=[], wall_seconds=1.0)
    paths = write_outputs(results, tmp_path)
    assert read_json(tmp_path / "all.json") == json.loads(json.dumps(results))
    saved = read_json(tmp_path / "latency.json")
    assert saved["rows"][0]["memory"] == latency_rows[0]["memory"]
    assert saved["environment"]["commit"] == "c"
    assert (tmp_path / "report.md").read_text().count("| adamw | ok |") == 2  # latency and memory tables
    assert {p.name for p in paths} == {"latency.json", "all.json", "report.md"}


def test_json_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        write_json(tmp_path / "x.json", {"loss": float("nan")})


def test_results_md_section_is_replaced_between_its_markers(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# R\n<!-- bench:cpu-quick:start -->\nold\n<!-- bench:cpu-quick:end -->\ntail\n")
    assert report.update_results_md(path, "cpu-quick", "| new |")
    assert path.read_text() == "# R\n<!-- bench:cpu-quick:start -->\n| new |\n<!-- bench:cpu-quick:end -->\ntail\n"
    assert not report.update_results_md(path, "cuda-full", "x")
    assert results_md_key(dict(settings=dict(device="cuda", preset="cuda"))) == "cuda-full"


def test_sampling_matrix_places_each_count_in_its_layer_and_module():
    counts = {"model.layers.0.self_attn.q_proj": 3, "model.layers.1.self_attn.q_proj": 1,
              "model.layers.1.mlp.down_proj": 2, "lm_head": 9}
    from bench.plots import sampling_matrix

    layers, modules, matrix = sampling_matrix(counts)
    assert layers == [0, 1] and modules == ["q_proj", "down_proj"]
    assert matrix == [[3, 0], [1, 2]]


def test_heatmap_uses_plain_misa_rows_only():
    rows = [dict(kind="misa", status="ok", options=dict(strategy="uniform"), details=dict(sample_counts={"a": 1})),
            dict(kind="misa", status="ok", options=dict(strategy="misa"), details=dict(sample_counts={"b": 2}))]
    assert misa_sample_counts(rows) == {"b": 2}


def test_unknown_section_is_refused():
    with pytest.raises(SystemExit):
        parse_args(["--sections", "latency,speed"])


def test_quick_preset_is_small_and_full_cuda_preset_is_over_a_billion_parameters():
    from bench.common import build_model

    with torch.device("meta"):
        big = build_model(PRESETS["cuda"].latency.shape, "bfloat16", "meta")
    assert sum(p.numel() for p in big.parameters()) >= 1_000_000_000
    assert PRESETS["quick"].device == "cpu" and PRESETS["quick"].latency.shape.hidden <= 256
    assert resolve_settings(quick=True, device="auto").device == "cpu"  # --quick is a CPU run


# ---------------------------------------------------------------------------- peers, when installed
def test_badam_trains_one_layer_at_a_time_with_an_fp32_copy():
    pytest.importorskip("badam")
    rows = latency.latency_rows(tiny_latency(repeats=3), "cpu", progress=False, specs=[MethodSpec("badam", "badam")])
    row = rows[0]
    layer = row["model_params"] - 2 * 256 * TINY.hidden - TINY.hidden  # minus embeddings, lm_head, final norm
    assert row["trained_params"] == layer // TINY.layers
    assert row["memory"]["master_weights"] == 4 * row["trained_params"]


def test_lora_trains_only_the_adapters():
    pytest.importorskip("peft")
    spec = MethodSpec("lora", "lora", dict(rank=4))
    row = latency.latency_rows(tiny_latency(repeats=3), "cpu", progress=False, specs=[spec])[0]
    per_layer = 4 * ((32 + 32) + (32 + 16) * 2 + (32 + 32) + (32 + 64) * 2 + (64 + 32))  # r * (in + out) per module
    assert row["trained_params"] == TINY.layers * per_layer
    assert row["memory"]["optimizer_state"] == 8 * row["trained_params"]


def test_galore_keeps_smaller_moments_than_adamw(latency_rows):
    pytest.importorskip("galore_torch")
    spec = MethodSpec("galore", "galore", dict(rank=8))
    row = latency.latency_rows(tiny_latency(repeats=3), "cpu", progress=False, specs=[spec])[0]
    assert row["trained_params"] == row["model_params"]
    assert row["memory"]["optimizer_state"] < latency_rows[0]["memory"]["optimizer_state"]
