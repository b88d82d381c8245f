"""``python -m bench.quality_report``: pieces of the quality benchmark merged into one table
(synthetic results: no model is trained here)."""
import json

import pytest

from bench import quality_report

SETTINGS = dict(tasks=["code"], methods=[], seq_len=128, batch_size=4, steps=40, eval_rows=16, eval_points=4,
                seeds=3, lrs={"misa": [3e-4]}, ablations=[], ablation_lr=None, device="cpu", dtype="float32",
                inner_steps=20, peers=dict(lora_rank=16), max_grad_norm=1.0, seed=0)


def row(method, sweep, losses, state_mib=30.0):
    best = min(sweep, key=sweep.get)
    mean = sum(losses) / len(losses)
    return dict(method=method, status="ok", sweep=[dict(lr=lr, final_val_loss=v) for lr, v in sweep.items()],
                best_lr=best, val_loss_before=2.8, losses=losses, mean=mean, std=0.01, seeds=[0, 1, 2],
                curve=[[0, 0.0, 2.8], [40, 9.0, mean]], state_bytes=int(state_mib * 2**20), ms_per_step=1500.0,
                sample_counts=None)


def piece(rows, ablations=(), task="code", **changed):
    return dict(settings={**SETTINGS, **changed}, model={}, wall_seconds=1.0,
                tasks={task: dict(corpus="python-stdlib-code", rows=list(rows), ablations=list(ablations))})


def test_sweeps_are_united_and_the_row_at_the_best_rate_is_kept():
    first = piece([row("misa-3%", {1e-3: 2.70, 3e-4: 2.66}, [2.66, 2.65, 2.64])])
    second = piece([row("misa-3%", {1e-4: 2.71, 3e-4: 2.66}, [2.66, 2.65, 2.64]),
                    row("bottomk-3%", {1e-3: 2.64}, [2.64, 2.66, 2.65])])
    third = piece([row("bottomk-3%", {3e-3: 2.68}, [2.68, 2.69, 2.70])])
    merged = quality_report.merge_results({"a.json": first, "b.json": second, "c.json": third})
    rows = {r["method"]: r for r in merged["tasks"]["code"]["rows"]}
    assert [(p["lr"], p["final_val_loss"]) for p in rows["misa-3%"]["sweep"]] == [(1e-4, 2.71), (3e-4, 2.66),
                                                                                 (1e-3, 2.70)]
    bottomk = rows["bottomk-3%"]
    assert bottomk["best_lr"] == 1e-3 and bottomk["source"] == "b.json"  # c.json's rate was worse on seed 0
    assert bottomk["losses"] == [2.64, 2.66, 2.65] and [p["lr"] for p in bottomk["sweep"]] == [1e-3, 3e-3]


def test_rows_are_ranked_best_first_with_failed_rows_last():
    failed = dict(method="galore", status="galore-torch is not installed")
    merged = quality_report.merge_results({"a.json": piece([
        failed, row("uniform-3%", {1e-3: 2.67}, [2.67, 2.66, 2.665]), row("lora-r16", {2e-3: 2.62}, [2.62] * 3)])})
    assert [r["method"] for r in merged["tasks"]["code"]["rows"]] == ["lora-r16", "uniform-3%", "galore"]
    table = quality_report.format_merged(merged)
    assert "| galore | - | - | - | galore-torch is not installed | - | a.json |" in table
    assert "| lora-r16 | 0.002: 2.620 | 0.002 | 2.800 | 2.620 ± 0.010 (n=3) | 30.0 | a.json |" in table


def test_pieces_that_trained_differently_are_refused():
    with pytest.raises(ValueError, match="setting 'steps' is 300 there and 40 here"):
        quality_report.merge_results({"a.json": piece([]), "b.json": piece([], steps=300)})
    with pytest.raises(ValueError, match="'peers'"):
        quality_report.merge_results({"a.json": piece([]), "b.json": piece([], peers=dict(lora_rank=8))})
    merged = quality_report.merge_results({"a.json": piece([]), "b.json": piece([], lrs={"lora": [1e-3]},
                                                                                 methods=["lora-r16"])})
    assert merged["settings"]["steps"] == 40  # what each piece ran may differ


def test_ablations_are_compared_with_misa_at_the_same_rate():
    default = row("misa-3%", {3e-4: 2.652}, [2.652, 2.650, 2.654])
    ablations = [row("misa-3% T=10", {3e-4: 2.70}, [2.70, 2.69, 2.71]),
                 row("misa-3% eta=3", {1e-3: 2.60}, [2.60, 2.61, 2.59])]
    merged = quality_report.merge_results({"a.json": piece([default]), "b.json": piece([], ablations)})
    table = quality_report.format_merged(merged)
    assert "| T=10 | 0.0003 | 2.700 ± 0.010 (n=3) | +0.048 | b.json |" in table
    assert "| eta=3 | 0.001 | 2.600 ± 0.010 (n=3) | - (other lr) | b.json |" in table


def test_the_command_merges_files_and_writes_the_table(tmp_path, capsys):
    paths = []
    for name, results in {"code.json": piece([row("misa-3%", {3e-4: 2.65}, [2.65] * 3)]),
                          "prose.json": piece([row("lora-r16", {2e-3: 2.53}, [2.53] * 3)], task="prose")}.items():
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(results))
    assert quality_report.main([*map(str, paths), "--out", str(tmp_path / "merged"), "--no-plots"]) == 0
    written = json.loads((tmp_path / "merged" / "quality.json").read_text())
    assert set(written["tasks"]) == {"code", "prose"} and written["sources"] == ["code.json", "prose.json"]
    assert "#### prose (python-stdlib-code): methods, best first" in (tmp_path / "merged" / "quality.md").read_text()
    (tmp_path / "other.json").write_text(json.dumps({"records": []}))
    with pytest.raises(SystemExit):
        quality_report.main([str(tmp_path / "other.json"), "--out", str(tmp_path / "x")])
    assert "is not a bench.quality result" in capsys.readouterr().err
