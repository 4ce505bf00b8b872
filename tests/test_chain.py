"""Chained runs (``model.start_from``): pre-train -> fine-tune -> continue, on a tiny Llama."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file

import fedfm
from fedfm.config.schema import ModelConfig
from fedfm.errors import FedfmError
from fedfm.models import load_state
from fedfm.models.chain import export_run, resolve_start

pytestmark = pytest.mark.usefixtures("one_thread")

LINES = ["to be or not to be that is the question", "all the world is a stage and all the men players",
         "now is the winter of our discontent made glorious summer"]


def records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def lm_run(tmp, name, *extra):
    text = tmp / "lines.jsonl"
    if not text.exists():
        rng = random.Random(0)
        with text.open("w") as fh:
            for i in range(120):
                fh.write(json.dumps({"text": LINES[i % 3], "speaker": f"r{rng.randrange(4)}"}) + "\n")
    overrides = [
        "model.task=causal_lm", "model.max_length=16", f"data.dataset={text}", "data.label_column=null",
        "data.group_column=speaker", "federation.num_clients=4", "federation.clients_per_round=2",
        "federation.rounds=2", "federation.partition.scheme=natural", "train.local_steps=4", "train.lr=0.01",
        "eval.every=2", "eval.clients=false", "progress=false", f"out={tmp / name}", *extra,
    ]
    return fedfm.run(None, overrides)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """pretrain (full, from random init) -> finetune (LoRA on the pre-trained model)."""
    tmp = tmp_path_factory.mktemp("chain")
    lm_run(tmp, "pretrain", "model.name=tiny-llama", "model.method=full")
    lm_run(tmp, "finetune", "model.method=lora", "model.lora.r=2", "model.lora.alpha=4",
           "model.lora.target_modules=[q_proj,v_proj]", f"model.start_from={tmp / 'pretrain'}", "train.lr=0.05")
    return tmp


def test_a_new_method_starts_from_the_earlier_model_merged_into_its_base(chain):
    pre, fine = records(chain / "pretrain"), records(chain / "finetune")
    # LoRA's B starts at zero: round 0 of the fine-tuning run scores exactly the pre-trained model
    assert fine[0]["test_perplexity"] == pytest.approx(pre[-1]["test_perplexity"], rel=1e-5)
    assert fine[-1]["test_perplexity"] != pytest.approx(fine[0]["test_perplexity"], rel=1e-3)  # and it trained
    # the exported base holds exactly the pre-trained weights (the full model was the trainable state)
    base = load_file(str(chain / "pretrain" / "export" / "model.safetensors"))
    trained, _ = load_state(chain / "pretrain" / "final_state.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(base[key], trained[key])


def test_merging_lora_folds_b_a_times_scale_into_the_weight(chain):
    folder = export_run(chain / "finetune")
    merged = load_file(str(folder / "model.safetensors"))
    base = load_file(str(chain / "pretrain" / "export" / "model.safetensors"))
    lora, _ = load_state(chain / "finetune" / "final_state.safetensors")
    a = next(v for k, v in lora.items() if "layers.1.self_attn.v_proj.lora_A" in k)
    b = next(v for k, v in lora.items() if "layers.1.self_attn.v_proj.lora_B" in k)
    key = "model.layers.1.self_attn.v_proj.weight"
    expected = base[key] + (4 / 2) * (b @ a)  # W + (alpha / r) B A, Hu et al. 2021
    assert (b @ a).abs().max() > 1e-4  # the adapter did move
    torch.testing.assert_close(merged[key], expected, rtol=1e-5, atol=1e-6)
    # unchanged export: the cached folder is reused, not written again
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert export_run(chain / "finetune") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_the_same_method_continues_from_the_earlier_trainable_state(chain):
    s = lm_run(chain, "continue", "model.method=lora", "model.lora.r=2", "model.lora.alpha=4",
               "model.lora.target_modules=[q_proj,v_proj]", f"model.start_from={chain / 'finetune'}",
               "train.lr=0.05")
    fine, cont = records(chain / "finetune"), records(chain / "continue")
    assert cont[0]["test_perplexity"] == pytest.approx(fine[-1]["test_perplexity"], rel=1e-6)
    # the same base: the continuation is built on the pre-trained export, not on a re-export of the fine-tune
    resolved = resolve_start(ModelConfig(task="causal_lm", method="lora", start_from=str(chain / "finetune")))
    assert resolved.name == str(chain / "pretrain" / "export")
    assert resolved.init_state == str(chain / "finetune" / "final_state.safetensors")
    assert s["start_from"] == str(chain / "finetune") and s["model"] == str(chain / "pretrain" / "export")


def test_prompt_tuning_builds_on_a_merged_lora_run_but_cannot_itself_be_merged(chain):
    lm_run(chain, "prompt", "model.method=prompt", "model.prompt.num_virtual_tokens=2",
           f"model.start_from={chain / 'finetune'}", "federation.rounds=1")
    assert (chain / "finetune" / "export" / "model.safetensors").is_file()
    with pytest.raises(FedfmError, match="cannot be merged into a base model"):
        resolve_start(ModelConfig(task="causal_lm", method="lora", start_from=str(chain / "prompt")))


def test_start_from_errors_are_one_line(tmp_path, chain):
    with pytest.raises(FedfmError, match="is not a finished fedfm run"):
        resolve_start(ModelConfig(start_from=str(tmp_path / "nowhere")))
    with pytest.raises(FedfmError, match="only one of model.start_from and model.init_state"):
        resolve_start(ModelConfig(start_from=str(chain / "finetune"), init_state="x.safetensors"))
    with pytest.raises(FedfmError, match="differs from the base"):
        resolve_start(ModelConfig(name="minilm", task="causal_lm", method="lora", start_from=str(chain / "finetune")))
