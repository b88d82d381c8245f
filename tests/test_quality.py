"""``python -m bench.quality --quick`` on the real SmolLM2-135M: every row trains, the
learning-rate sweep and the seeds are summarised, and the outputs are written."""
import json
from dataclasses import replace

import pytest
import torch

from bench import quality
from misa_kernels import smollm2


@pytest.fixture(scope="module")
def results():
    assert smollm2.available(), f"the benchmark model is part of the test environment: {smollm2.INSTALL}"
    torch.set_num_threads(2)
    settings = replace(quality.PRESETS["quick"], methods=("misa-3%", "lora-r16"), seeds=2,
                       lrs={"misa": (3e-4, 1e-3), "lora": (2e-3,)})
    return quality.run_quality(settings, progress=False)


def test_every_method_trains_and_is_summarised_over_its_seeds(results):
    rows = results["tasks"]["code"]["rows"]
    assert [r["method"] for r in rows] == ["misa-3%", "lora-r16"]
    for row in rows:
        assert row["status"] == "ok"
        assert len(row["losses"]) == 2 and row["seeds"] == [0, 1]
        assert row["mean"] == pytest.approx(sum(row["losses"]) / 2)
        assert row["std"] is not None and row["std"] >= 0
        assert row["mean"] < row["val_loss_before"]  # two steps already help
    misa = rows[0]
    assert [s["lr"] for s in misa["sweep"]] == [3e-4, 1e-3]
    assert misa["best_lr"] == min(misa["sweep"], key=lambda s: s["final_val_loss"])["lr"]
    assert misa["state_bytes"] < rows[-1]["state_bytes"] * 10  # the active set only, not the model


def test_misa_rows_keep_named_sampling_counts(results):
    counts = results["tasks"]["code"]["rows"][0]["sample_counts"]
    assert counts and all(name.startswith("model.layers.") for name in counts)


def test_outputs_are_written(results, tmp_path):
    paths = quality.write_outputs(results, tmp_path, plots=False)
    assert json.loads((tmp_path / "quality.json").read_text())["tasks"]["code"]["rows"][0]["method"] == "misa-3%"
    table = (tmp_path / "quality.md").read_text()
    assert "| misa-3% |" in table and "| lora-r16 |" in table and "(n=2)" in table
    assert len(paths) == 2


def test_method_names_are_checked():
    s = quality.PRESETS["quick"]
    assert quality.method_spec("bottomk-1%", s).options["delta"] == pytest.approx(0.01)
    with pytest.raises(ValueError, match="unknown method"):
        quality.method_spec("misa", s)
