"""One :class:`FedModel` from a concrete base: load it, wrap it for the method, collect its trainable state.

This is the bottom half of :func:`fedfm.models.build.build_model`, which first
resolves ``model.start_from`` (:mod:`fedfm.models.chain`, which itself builds
earlier runs' models with :func:`assemble_model`). Import order inside the
models layer: ``state`` <- ``assemble`` <- ``chain`` <- ``build``.

One :class:`FedModel` per process. The runtime swaps clients' trainable states
in and out of ``FedModel.params`` with :func:`fedfm.models.state.set_state_`
and :func:`~fedfm.models.state.get_state`; the frozen base is never copied.
Moving the model with ``model.to(device)`` keeps the ``params`` objects valid.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from fedfm.config.schema import ModelConfig
from fedfm.errors import FedfmError
from fedfm.models.memory import check_fits
from fedfm.models.methods import wrap
from fedfm.models.pooling import install_pooling, resolve_pooling
from fedfm.models.quantize import own_memory_, quantize_base_
from fedfm.models.registry import (
    ENCODER_TYPES,
    ModelSource,
    auto_class,
    base_config,
    head_modules,
    load_base_model,
    load_tokenizer,
    quiet_transformers,
    resolve,
)
from fedfm.models.state import check_start_state, load_state, set_state_
from fedfm.registry import METHODS, VIRTUAL_TOKENS

_ADAPTER = "default"  # peft's adapter name; dropped from the state names


@dataclass
class FedModel:
    """A wrapped model plus the named trainable tensors that travel."""

    model: torch.nn.Module  # ready to train, peft-wrapped when method != full
    tokenizer: PreTrainedTokenizerBase  # with a pad token set
    params: "OrderedDict[str, torch.nn.Parameter]"  # trainable tensors by stable name
    task: str  # "seq_cls" | "causal_lm"
    method: str
    pooling: str = "cls"  # how a seq_cls encoder pools: model.pooling made concrete (fedfm.models.pooling)

    @property
    def device(self) -> torch.device:
        """Where the model (and so its trainable parameters) lives."""
        return next(iter(self.params.values())).device


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` (cuda when available, else cpu), ``cpu``, ``cuda`` or ``cuda:N`` as a torch device.

    Raises :class:`FedfmError` with one line when the asked-for GPU is absent.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FedfmError(f"unknown device {name!r} (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FedfmError(f"device={name} asked for, but torch sees no CUDA GPU here (use device=cpu or auto)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise FedfmError(f"device={name} asked for, but torch sees only {count} CUDA GPU(s)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise FedfmError(f"unsupported device {name!r} (auto, cpu, cuda or cuda:N)")
    return device


def short_name(name: str, adapter: str = _ADAPTER) -> str:
    """A parameter name without peft's wrapping.

    ``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight``
    -> ``bert.encoder.layer.0.attention.self.query.lora_A.weight``;
    ``base_model.model.classifier.modules_to_save.default.weight`` -> ``classifier.weight``;
    ``prompt_encoder.default.embedding.weight`` -> ``prompt_encoder.embedding.weight``.
    """
    parts = name.split(".")
    if parts[:2] == ["base_model", "model"]:
        parts = parts[2:]
    elif parts[:1] == ["base_model"]:
        parts = parts[1:]
    out = []
    for i, part in enumerate(parts):
        if part == adapter:
            continue
        if part == "modules_to_save" and i + 1 < len(parts) and parts[i + 1] == adapter:
            continue
        out.append(part)
    return ".".join(out)


def trainable_params(model: torch.nn.Module) -> "OrderedDict[str, torch.nn.Parameter]":
    """The parameters with ``requires_grad`` under short, stable names (model order).

    Frozen copies (peft's ``original_module`` of a ``modules_to_save`` head) are
    not trainable, so only the trainable copy is included. Falls back to the
    raw names should shortening ever make two names collide.
    """
    raw = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    short = [short_name(n) for n, _ in raw]
    if len(set(short)) != len(short):
        short = [n for n, _ in raw]
    return OrderedDict((s, p) for s, (_, p) in zip(short, raw))


def _check_length(cfg: ModelConfig, config) -> None:
    virtual = cfg.prompt.num_virtual_tokens if METHODS.supports(cfg.method, VIRTUAL_TOKENS) else 0
    limit = getattr(config, "max_position_embeddings", None)
    if limit and cfg.max_length + virtual > limit:
        extra = f" + {virtual} virtual tokens" if virtual else ""
        raise FedfmError(
            f"model.max_length={cfg.max_length}{extra} exceeds the {limit} positions of {cfg.name}"
        )


def _uses_token_types(cfg: ModelConfig, model: torch.nn.Module) -> bool:
    """Whether the model reads ``token_type_ids``: BERT-like encoders do, unless peft
    drops them (prompt learning for causal_lm); a Llama with BERT's vocab does not."""
    if model.config.model_type not in ENCODER_TYPES:
        return False
    return not (cfg.task == "causal_lm" and METHODS.supports(cfg.method, VIRTUAL_TOKENS))


def _wrapped_model(source: ModelSource, cfg: ModelConfig, num_labels: int | None, tokenizer) -> torch.nn.Module:
    """The model :func:`assemble_model` trains, without loading weights (for :func:`check_fits` on meta)."""
    config = base_config(source, cfg.task, num_labels, tokenizer)
    with quiet_transformers():
        model = auto_class(cfg.task).from_config(config, dtype=torch.float32)
    install_pooling(model, resolve_pooling(cfg.pooling, cfg.task, source.path))
    return wrap(model, cfg, cfg.task, source.tokenizer_path)


def assemble_model(
    cfg: ModelConfig, num_labels: int | None = None, seed: int = 0, device: str | torch.device = "cpu",
    dequantize_base: bool = False,
) -> FedModel:
    """Load ``cfg.name``, wrap it for ``cfg.method`` and collect its trainable state.

    ``cfg.start_from`` must already be resolved (:func:`fedfm.models.chain.resolve_start`);
    everything else is as documented on :func:`fedfm.models.build.build_model`.
    ``dequantize_base``: with ``cfg.quantize``, hold the base as the float32 values of its
    quantized weights (the same model, mergeable: :func:`fedfm.models.chain.export_run`).
    """
    device = resolve_device(device) if isinstance(device, str) else device
    if cfg.start_from:
        raise FedfmError("internal: resolve model.start_from before assemble_model (use build_model)")
    if cfg.task == "seq_cls":
        if num_labels is None or num_labels < 2:  # one label: transformers would train a regression head
            raise FedfmError(f"task seq_cls needs num_labels >= 2, got {num_labels}")
    else:
        num_labels = None
    source = resolve(cfg.name, scratch=cfg.scratch)
    tokenizer = load_tokenizer(source.tokenizer_path)
    what = f"{cfg.name} with method {cfg.method}"
    check_fits(lambda: _wrapped_model(source, cfg, num_labels, tokenizer), what, device)  # before allocating
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = load_base_model(source, cfg.task, num_labels, tokenizer)
        model.config.pad_token_id = tokenizer.pad_token_id
        _check_length(cfg, model.config)
        heads = head_modules(model) if cfg.task == "seq_cls" else []
        pooling = resolve_pooling(cfg.pooling, cfg.task, source.path)
        install_pooling(model, pooling)
        quantize_base_(model, cfg.quantize, skip=heads, dequantize=dequantize_base)  # model.quantize, layer by layer
        own_memory_(model)  # release the checkpoint's memory map: resident memory is what the model holds
        model = wrap(model, cfg, cfg.task, source.tokenizer_path)
    model.to(device).train()
    params = trainable_params(model)
    if not params:
        raise FedfmError(f"method {cfg.method!r} left no trainable parameter in {cfg.name}")
    if heads and not any(k.split(".")[0] in heads for k in params):
        raise FedfmError(f"the classification head {heads} of {cfg.name} is not trainable")
    if "token_type_ids" in tokenizer.model_input_names and not _uses_token_types(cfg, model):
        tokenizer.model_input_names = [n for n in tokenizer.model_input_names if n != "token_type_ids"]
    if cfg.init_state:
        state, _ = load_state(cfg.init_state)
        check_start_state(state, cfg.init_state)
        set_state_(params, state)
    return FedModel(model=model, tokenizer=tokenizer, params=params, task=cfg.task, method=cfg.method,
                    pooling=pooling)
