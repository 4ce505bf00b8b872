"""``device``: the model trains and evaluates on a GPU when asked; everything that travels stays on the CPU."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import fedfm
from fedfm.cli import app
from fedfm.errors import FedfmError
from fedfm.models import resolve_device

from test_end_to_end import tiny_cls_overrides

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")


def test_device_cpu_runs_and_is_recorded(tmp_path):
    s = fedfm.run(None, tiny_cls_overrides(tmp_path, **{"federation.rounds": 1, "device": "cpu"}))
    assert s["device"] == "cpu"
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["device"] == "cpu"
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_one_error_line(tmp_path, device):
    out = tmp_path / "never"
    res = CliRunner().invoke(app, ["run", "model.name=tiny-bert", f"device={device}", f"out={out}", "-q"])
    assert res.exit_code == 2, res.output
    lines = [x for x in res.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and f"device={device}" in lines[0], res.output
    assert not out.exists()  # fails before writing anything
    with pytest.raises(FedfmError, match="no CUDA GPU"):
        resolve_device(device)


def test_bad_device_name_is_a_config_error():
    res = CliRunner().invoke(app, ["run", "device=tpu", "-q"])
    assert res.exit_code == 2 and "'device'" in res.output and "Traceback" not in res.output, res.output


def _dropout_free_tiny_bert(path):
    """tiny-bert without dropout, as a local folder: CPU and GPU draw different dropout masks."""
    from transformers import BertConfig, BertModel

    from fedfm.models.registry import load_tokenizer, minilm_dir

    tok = load_tokenizer(minilm_dir())
    cfg = BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@cuda
@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox", "scaffold"])
def test_cuda_round_matches_cpu(tmp_path, algorithm):
    model = _dropout_free_tiny_bert(tmp_path / "tiny")
    states, summaries = {}, {}
    for device in ("cpu", "cuda"):
        over = {
            "model.name": str(model), "federation.rounds": 2, "algorithm.name": algorithm,
            "device": device, "out": str(tmp_path / device),
            "data.dataset": "bbc_news", "data.max_examples": 400,  # a built-in: needs no `datasets` there
            # SGD: Adam's normalisation blows float rounding in near-zero gradients up to ~1e-3
            # (as between 1 and 2 CPU threads); with SGD the runs agree to ~1e-8.
            "train.optimizer": "sgd", "train.lr": 0.05,
        }
        summaries[device] = fedfm.run(None, tiny_cls_overrides(tmp_path, **over))
        states[device] = load_file(tmp_path / device / "final_state.safetensors")
    assert summaries["cuda"]["device"].startswith("cuda:") and summaries["cuda"]["device_name"]
    assert summaries["cuda"]["bytes_down_total"] == summaries["cpu"]["bytes_down_total"]  # up: loss digits vary
    assert states["cpu"].keys() == states["cuda"].keys()
    for k, v in states["cpu"].items():
        assert states["cuda"][k].device.type == "cpu"
        torch.testing.assert_close(states["cuda"][k], v, rtol=1e-4, atol=1e-4, msg=k)
    assert abs(summaries["cuda"]["final_accuracy"] - summaries["cpu"]["final_accuracy"]) <= 0.02
