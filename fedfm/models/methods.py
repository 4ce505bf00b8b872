"""Method name -> how a model is wrapped: one registry, as in peft's own tuners.

``full`` leaves the model alone (every parameter trains); ``lora``, ``ia3``,
``prompt`` and ``prefix`` wrap it with :func:`peft.get_peft_model`, which
freezes the base. For ``seq_cls`` the classification head is always added to
``modules_to_save`` so that it trains with the adapter.

Every method is a :class:`Method` registered in :data:`fedfm.registry.METHODS`
with its config section (``model.lora``, ``model.ia3``, ``model.prompt``) and
its capabilities (``PEFT``, ``TARGETS_MODULES``, ``VIRTUAL_TOKENS``,
``MERGES_INTO_BASE``, ``RANKED``).
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import torch
from peft import (
    IA3Config,
    LoraConfig,
    PeftModelForSequenceClassification,
    PrefixTuningConfig,
    PromptTuningConfig,
    PromptTuningInit,
    TaskType,
    get_peft_model,
)

from fedfm.config import schema
from fedfm.config.schema import ModelConfig
from fedfm.errors import FedfmError
from fedfm.models.registry import ENCODER_TYPES, head_modules
from fedfm.registry import MERGES_INTO_BASE, METHODS, PEFT, RANKED, TARGETS_MODULES, VIRTUAL_TOKENS

_TASK_TYPES = {"seq_cls": TaskType.SEQ_CLS, "causal_lm": TaskType.CAUSAL_LM}


class Method:
    """A registered method: ``wrap(model, cfg, task, tokenizer_path)`` returns the model to train.

    The default wraps with peft: :meth:`peft_config` builds the peft config,
    :meth:`after_wrap` fixes what peft and transformers disagree on.
    """

    def peft_config(self, cfg: ModelConfig, task_type, extra: dict, tokenizer_path: Path):
        raise NotImplementedError

    def after_wrap(self, wrapped: torch.nn.Module, model: torch.nn.Module, task: str) -> None:
        """Called after :func:`peft.get_peft_model`; ``model`` is the base model."""

    def wrap(self, model: torch.nn.Module, cfg: ModelConfig, task: str, tokenizer_path: Path) -> torch.nn.Module:
        entry = METHODS.get(cfg.method)
        extra = {"modules_to_save": head_modules(model)} if task == "seq_cls" else {}
        try:
            peft_config = self.peft_config(cfg, _TASK_TYPES[task], extra, tokenizer_path)
            with warnings.catch_warnings():  # peft 0.21 calls a name transformers 5 deprecated
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
                # model.quantize=int8: fedfm merges adapters into a float32 base (fedfm export), never into int8
                warnings.filterwarnings("ignore", message=".*TorchaoLoraLinear was instantiated.*")
                wrapped = get_peft_model(model, peft_config)
        except (ValueError, KeyError, TypeError) as e:
            hint = (
                f" (check model.{cfg.method}.target_modules)"
                if entry.supports(TARGETS_MODULES) and "target_modules" in str(e)
                else ""
            )
            raise FedfmError(
                f"cannot wrap {model.config.model_type} for method {cfg.method!r}: {e}{hint}"
            ) from None
        self.after_wrap(wrapped, model, task)
        return wrapped


@METHODS.register("full", capabilities={MERGES_INTO_BASE}, summary="full fine-tuning: every parameter trains")
class Full(Method):
    def wrap(self, model, cfg, task, tokenizer_path):
        for p in model.parameters():
            p.requires_grad_(True)
        return model


@METHODS.register("lora", config=schema.LoraConfig, capabilities={PEFT, TARGETS_MODULES, MERGES_INTO_BASE, RANKED},
                  summary="LoRA (Hu et al. 2022): low-rank adapters")
class Lora(Method):
    def peft_config(self, cfg, task_type, extra, tokenizer_path):
        c = cfg.lora
        return LoraConfig(
            task_type=task_type,
            r=c.r,
            lora_alpha=c.alpha,
            lora_dropout=c.dropout,
            target_modules=list(c.target_modules) if c.target_modules else None,
            **extra,
        )


@METHODS.register("ia3", config=schema.IA3Config, capabilities={PEFT, TARGETS_MODULES, MERGES_INTO_BASE},
                  summary="IA3 (Liu et al. 2022): learned activation scaling")
class IA3(Method):
    def peft_config(self, cfg, task_type, extra, tokenizer_path):
        c = cfg.ia3
        target = list(c.target_modules) if c.target_modules else None
        feedforward = list(c.feedforward_modules) if c.feedforward_modules is not None else None
        if target is not None and feedforward is None:
            feedforward = []  # custom targets: scale activations (keys/values), not ff inputs
        return IA3Config(
            task_type=task_type, target_modules=target, feedforward_modules=feedforward, **extra
        )


@METHODS.register("prompt", config=schema.PromptConfig, capabilities={PEFT, VIRTUAL_TOKENS},
                  summary="soft prompt tuning (Lester et al. 2021)")
class Prompt(Method):
    def peft_config(self, cfg, task_type, extra, tokenizer_path):
        c = cfg.prompt
        if c.init_text:
            init = dict(
                prompt_tuning_init=PromptTuningInit.TEXT,
                prompt_tuning_init_text=c.init_text,
                tokenizer_name_or_path=str(tokenizer_path),
                tokenizer_kwargs={"local_files_only": True},
            )
        else:
            # Lester et al. (2021): initialising from vocabulary embeddings beats random init.
            init = dict(prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB)
        return PromptTuningConfig(
            task_type=task_type, num_virtual_tokens=c.num_virtual_tokens, **init, **extra
        )

    def after_wrap(self, wrapped, model, task):
        if task == "seq_cls" and model.config.model_type not in ENCODER_TYPES:  # a decoder's classifier
            model.register_forward_pre_hook(_pad_left, with_kwargs=True)


@METHODS.register("prefix", config=schema.PromptConfig, capabilities={PEFT, VIRTUAL_TOKENS},
                  summary="prefix tuning (Li & Liang 2021)")
class Prefix(Method):
    def peft_config(self, cfg, task_type, extra, tokenizer_path):
        return PrefixTuningConfig(
            task_type=task_type, num_virtual_tokens=cfg.prompt.num_virtual_tokens, **extra
        )

    def after_wrap(self, wrapped, model, task):
        if task == "seq_cls":
            wrapped.__class__ = _PrefixSeqCls
        elif "cache" in inspect.signature(model.forward).parameters:
            # peft passes the prefix as ``past_key_values``, which transformers 5 renamed.
            model.register_forward_pre_hook(_past_key_values_to_cache, with_kwargs=True)


class _PrefixSeqCls(PeftModelForSequenceClassification):
    """Prefix tuning for sequence classification on transformers 5.

    peft 0.21 looks for a ``past_key_values`` argument that transformers 5
    models renamed to ``cache``, and refuses. Here the prefix goes in as the
    cache of the backbone; for bidirectional encoders (BERT) the real tokens
    keep positions ``0..L-1`` instead of being shifted by the prefix length.
    """

    def _prefix_tuning_forward(self, input_ids=None, inputs_embeds=None, **kwargs):
        ref = input_ids if input_ids is not None else inputs_embeds
        batch_size, seq_len = ref.shape[0], ref.shape[1]
        prefix = self.get_prompt(batch_size)
        backbone = self.base_model.get_submodule(self.transformer_backbone_name)
        params = inspect.signature(backbone.forward).parameters
        kwargs["cache" if "cache" in params else "past_key_values"] = prefix
        config = self.base_model.config
        bidirectional = config.model_type in ENCODER_TYPES and not getattr(config, "is_decoder", False)
        if bidirectional and kwargs.get("position_ids") is None:
            kwargs["position_ids"] = torch.arange(seq_len, device=ref.device).expand(batch_size, -1)
        return self.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)


def _past_key_values_to_cache(module, args, kwargs):
    """Forward pre-hook: hand peft's ``past_key_values`` (the prefix) over as ``cache``."""
    if "past_key_values" in kwargs and "cache" not in kwargs:
        kwargs["cache"] = kwargs.pop("past_key_values")
    return args, kwargs


def _pad_left(module, args, kwargs):
    """Forward pre-hook for soft prompts on a decoder's sequence classifier.

    Soft prompts reach the model as ``inputs_embeds``, so the classifier cannot
    find the last non-pad token and pools the last position. Moving each row's
    padding to the left (order of real tokens kept) and counting positions over
    real tokens only (as ``generate`` does) makes the last position real and
    the logits independent of padding side and batch composition.
    """
    embeds, mask = kwargs.get("inputs_embeds"), kwargs.get("attention_mask")
    if embeds is None or mask is None or kwargs.get("position_ids") is not None:
        return args, kwargs
    order = torch.sort(mask.to(torch.int8), dim=1, stable=True).indices  # pads first
    mask = mask.gather(1, order)
    kwargs["inputs_embeds"] = embeds.gather(1, order.unsqueeze(-1).expand_as(embeds))
    kwargs["attention_mask"] = mask
    kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_(min=0)
    return args, kwargs


def wrap(model: torch.nn.Module, cfg: ModelConfig, task: str, tokenizer_path: Path) -> torch.nn.Module:
    """Wrap ``model`` for ``cfg.method`` (a registered :class:`Method`); ``full`` makes every parameter trainable."""
    return METHODS.get(cfg.method).obj().wrap(model, cfg, task, tokenizer_path)
