"""The toy demo (python/toy_demo.py, the demo's --toy fallback) in --quick mode: it really trains."""
import json
from types import ModuleType

import pytest

from conftest import load_example


@pytest.fixture(scope="module")
def demo() -> ModuleType:
    return load_example("toy_demo")


@pytest.fixture(scope="module")
def results(demo) -> dict:
    return demo.run_demo(demo.parse_args(["--quick", "--device", "cpu", "--no-progress"]))


def test_result_has_documented_keys(demo, results):
    assert set(results) == set(demo.RESULT_KEYS)
    assert set(results["methods"]) == set(demo.METHODS)
    for metrics in results["methods"].values():
        assert set(metrics) == set(demo.METHOD_KEYS)
        assert set(metrics["memory"]) == {"master_weights", "moments", "gradients", "total"}
    assert results["settings"]["device"] == "cpu"
    assert json.loads(json.dumps(results)) == results  # what --json writes, unchanged


def test_pretraining_lowers_its_val_loss(results):
    pre = results["pretrain"]
    assert pre["val_loss_after"] < pre["val_loss_before"]


@pytest.mark.parametrize("method", ["misa", "adamw"])
def test_finetuning_lowers_val_loss(results, method):
    metrics = results["methods"][method]
    assert metrics["val_loss_after"] < metrics["val_loss_before"]
    assert metrics["val_curve"][0] == [0, metrics["val_loss_before"]]


def test_both_methods_start_from_the_same_base(results):
    misa, adamw = results["methods"]["misa"], results["methods"]["adamw"]
    assert misa["val_loss_before"] == adamw["val_loss_before"]


def test_misa_trains_within_its_budget(results):
    delta, n = results["settings"]["delta"], results["model_params"]
    misa = results["methods"]["misa"]["trained_params_per_step"]
    assert 0 < misa <= delta * n
    assert results["methods"]["adamw"]["trained_params_per_step"] == n


def test_misa_needs_less_optimizer_memory(results):
    misa, adamw = (results["methods"][m]["optimizer_memory_bytes"] for m in ("misa", "adamw"))
    assert 0 < misa < adamw
    # fp32 AdamW: two moments and a gradient per parameter, no master copy.
    assert adamw == 3 * 4 * results["model_params"]


def test_misa_reports_its_sampled_modules(results):
    top = results["misa_top_modules"]
    assert top and all(count >= 1 for _, count in top)
    assert [count for _, count in top] == sorted((count for _, count in top), reverse=True)


def test_report_prints_a_row_per_method(demo, results):
    report = demo.format_report(results)
    assert "| misa |" in report and "| adamw |" in report
