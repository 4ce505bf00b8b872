"""The one validated run config.

Every section forbids unknown keys, so a typo such as ``train.lrr=1`` fails
with a one-line error naming the key instead of being silently ignored.

Choices come from the registries (:mod:`fedfm.registry`), not from lists
written here: ``algorithm.name``, ``robust.rule``, ``attack.name``,
``model.method``, ``federation.partition.scheme``, ``algorithm.weighting`` and the codecs of
``compression.upload`` / ``compression.download`` are strings validated
against the names registered for that extension point (discovered lazily,
so this module imports no component above it).

Entry options. The ``algorithm:``, ``robust:`` and ``attack:`` sections
(:class:`EntrySection`) hold a few options every entry shares (declared
below) plus the options of the chosen entry, declared by that entry's own
config class next to its implementation (e.g. ``mu`` by FedProx's
``FedProxOptions``, ``trim_fraction`` by the trimmed mean's). Such a key is
written flat in the section, exactly like a declared one
(``algorithm.mu=0.1``), and:

* a key the chosen entry declares is validated by its config class, and the
  entry's defaults fill the keys not given (``cfg.algorithm.mu`` is 0.01
  for ``name=fedprox``);
* a key only another entry of the same registry declares is validated by
  that entry's class and kept, unused (switching ``algorithm.name`` on a
  config written for another algorithm keeps working);
* any other key is refused as ``unknown key 'algorithm.foo'``;
* a shared option the entry's class re-declares takes the entry's default
  unless it is set (DiLoCo's ``server_lr`` of 0.7).

So a new algorithm with new options is one file: its options class and its
registration; the schema accepts and validates its keys without an edit.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from fedfm.registry import (
    ALGORITHMS,
    ATTACKS,
    CODECS,
    DOWNLOAD_SAFE,
    LEADING,
    METHODS,
    PARTITIONERS,
    QUANTIZERS,
    ROBUST_RULES,
    VALUE,
    WEIGHTINGS,
    Registry,
)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _one_of(names: list[str]) -> str:
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def choice(registry: Registry, *capabilities: str) -> AfterValidator:
    """Validator of a name field: a name registered in ``registry`` with every one of ``capabilities``."""

    def check(value: str) -> str:
        names = registry.names(*capabilities)
        if value not in names:
            raise PydanticCustomError("registry_choice", "Input should be {expected}", {"expected": _one_of(names)})
        return value

    return AfterValidator(check)


def _validated(config: type[BaseModel], data: dict, problems: list[dict]) -> dict | None:
    """``data`` validated by ``config`` (with its defaults), or None after adding its problems."""
    try:
        return config.model_validate(data).model_dump()
    except ValidationError as err:
        for e in err.errors():
            problems.append({"key": ".".join(str(p) for p in e["loc"]), "msg": e["msg"], "input": e.get("input")})
        return None


class EntrySection(Section):
    """A section naming one registry entry (field ``choice_field``) and carrying that entry's options.

    Keys beyond the declared fields are the entries' options (module doc).
    Problems raise one ``entry_options`` error whose context lists them;
    :func:`fedfm.config.load.format_validation_error` prints each on the one line.
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    registry: ClassVar[Registry]
    choice_field: ClassVar[str] = "name"

    @model_validator(mode="after")
    def _entry_options(self):
        fields = type(self).model_fields
        entry = self.registry.get(getattr(self, self.choice_field))
        declared = entry.config.model_fields if entry.config is not None else {}
        given = dict(self.__pydantic_extra__ or {})
        problems: list[dict] = []
        values: dict = {}
        shared = [k for k in declared if k in fields]
        for key in shared:  # a shared option the entry re-declares: the entry's default unless set
            if key not in self.model_fields_set:
                object.__setattr__(self, key, declared[key].get_default(call_default_factory=True))
        if entry.config is not None:
            mine = {k: v for k, v in given.items() if k in declared}
            mine.update((k, getattr(self, k)) for k in shared)
            checked = _validated(entry.config, mine, problems)
            if checked is not None:
                values.update((k, v) for k, v in checked.items() if k not in fields)
        for key, value in given.items():
            if key in declared:
                continue
            owners = self.registry.option_owners(key)
            if not owners:
                problems.append({"key": key, "msg": None, "input": value})
                continue
            checked = _validated(owners[0].config, {key: value}, problems)
            if checked is not None:
                values[key] = checked[key]
        if problems:
            message = "; ".join(
                f"unknown key {p['key']!r}" if p["msg"] is None else f"{p['key'] or 'options'}: {p['msg']}"
                for p in problems
            )
            raise PydanticCustomError("entry_options", "{message}", {"message": message, "problems": problems})
        self.__pydantic_extra__ = values
        return self


Task = Literal["seq_cls", "causal_lm"]


class LoraConfig(Section):
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = None  # None: peft's default for the architecture


class IA3Config(Section):
    target_modules: list[str] | None = None
    feedforward_modules: list[str] | None = None


class PromptConfig(Section):
    """Soft prompt (Lester et al. 2021) and prefix tuning (Li & Liang 2021)."""

    num_virtual_tokens: int = Field(16, ge=1)
    init_text: str | None = None  # prompt tuning only: initialise from this text's embeddings


class ScratchConfig(Section):
    """The shape of ``model.name=llama-scratch``: a random-init Llama-style decoder (pre-training).

    Built from a fixed seed, so every process gets the same initial model without any file.
    ``tokenizer`` picks the vocabulary: MiniLM's WordPiece (30,522 tokens, lower-cased),
    SmolLM2's byte-level BPE (49,152 tokens) or raw UTF-8 bytes (ByT5's tokenizer without
    sentinels: 259 tokens; the output layer is then tiny, the right choice on a CPU).
    """

    layers: int = Field(4, ge=1)
    hidden_size: int = Field(128, ge=8)
    heads: int = Field(4, ge=1)
    kv_heads: int | None = Field(None, ge=1)  # grouped-query attention; None: = heads
    intermediate_size: int | None = Field(None, ge=1)  # SwiGLU width; None: 4 x hidden_size
    max_positions: int = Field(2048, ge=8)
    tie_embeddings: bool = True  # the LM head reuses the input embedding (as in SmolLM2)
    tokenizer: Literal["minilm", "smollm2", "bytes"] = "minilm"

    @model_validator(mode="after")
    def _heads_divide(self) -> "ScratchConfig":
        if self.hidden_size % self.heads:
            raise ValueError(f"model.scratch.hidden_size={self.hidden_size} is not divisible by heads={self.heads}")
        if self.kv_heads is not None and self.heads % self.kv_heads:
            raise ValueError(f"model.scratch.heads={self.heads} is not divisible by kv_heads={self.kv_heads}")
        return self


class ModelConfig(Section):
    name: str = "minilm"  # a packaged alias (minilm, smollm2, tiny-bert, tiny-llama, llama-scratch) or a local path
    task: Task = "seq_cls"
    method: Annotated[str, choice(METHODS)] = "lora"  # full, lora, ia3, prompt, prefix (fedfm.models.methods)
    max_length: int = Field(64, ge=8)
    # seq_cls on a BERT-style encoder: cls = the pooler over the first token (as transformers ships it);
    # mean = the mean of the real tokens' last hidden states (sentence-transformers; fedfm.models.pooling);
    # auto = what the model folder declares in its sentence-transformers modules.json (mean for MiniLM), else cls
    pooling: Literal["auto", "cls", "mean"] = "auto"
    # how each process holds the frozen base (fedfm.models.quantize): none (float32), int8, nf4 (QLoRA's 4-bit);
    # only the adapter and the head train and travel, in float32 as ever
    quantize: Annotated[str, choice(QUANTIZERS)] = "none"
    lora: LoraConfig = LoraConfig()
    ia3: IA3Config = IA3Config()
    prompt: PromptConfig = PromptConfig()
    init_state: str | None = None  # safetensors trainable state of an earlier run to start from
    # an earlier run folder to start from: its trainable state (same method and task) or its merged
    # model as the new frozen base (fedfm.models.chain) -- pre-train -> fine-tune -> prompt-tune chains
    start_from: str | None = None
    scratch: ScratchConfig = ScratchConfig()  # the shape of name=llama-scratch (ignored otherwise)

    @model_validator(mode="after")
    def _scratch_only_for_scratch(self) -> "ModelConfig":
        if self.name != "llama-scratch" and self.scratch != ScratchConfig():
            raise ValueError(f"model.scratch applies to name=llama-scratch, not name={self.name}")
        if self.pooling == "mean" and self.task != "seq_cls":
            raise ValueError(f"model.pooling={self.pooling} applies to task seq_cls, not {self.task}")
        if self.quantize != "none" and self.method == "full":
            raise ValueError(f"model.quantize={self.quantize} quantizes the frozen base, but method full trains "
                             "every weight: use lora, ia3, prompt or prefix, or model.quantize=none")
        return self


class QualityConfig(Section):
    """Client-side data quality (fedfm.data.quality): each client filters its own rows before training.

    Off by default. Static filters run once on each client's training rows (empty, too short / too long,
    missing or invalid labels, exact duplicates of the normalized text, near-duplicates by MinHash with an
    exact word-shingle Jaccard check); ``loss_filter`` also leaves out, at every participation from global
    version ``loss_start_version`` on, the rows whose loss under the broadcast model is above
    ``median + loss_k * MAD`` (or ``loss_max``, when set). Clients report only counts (kept, dropped by reason).
    """

    enabled: bool = False
    dedup: bool = True  # exact duplicates of the normalized text (NFKC, case-folded, whitespace collapsed)
    near_dup: bool = True  # near-duplicates: word-shingle Jaccard >= near_dup_threshold with an earlier kept row
    near_dup_threshold: float = Field(0.8, gt=0, le=1)
    shingle_size: int = Field(3, ge=1)  # words per shingle
    num_perm: int = Field(128, ge=8)  # MinHash permutations (candidate search; every candidate is verified exactly)
    min_chars: int = Field(0, ge=0)  # shorter rows are dropped as "short" (empty rows always are, as "empty")
    max_chars: int | None = Field(None, ge=1)  # longer rows are dropped as "long"; None: no bound
    min_words: int = Field(0, ge=0)  # whitespace-separated words of the normalized text
    max_words: int | None = Field(None, ge=1)
    labels: bool = True  # classification: drop rows whose label is missing or outside the run's label set
    allowed_labels: list[str] | None = None  # the run's label set (names); None: every label name in the data
    loss_filter: bool = False  # drop loss outliers under the current global model (needs the model: client side)
    loss_k: float | None = Field(3.0, gt=0)  # threshold median + loss_k * MAD of the client's per-row losses; None: off
    loss_max: float | None = Field(None, gt=0)  # also drop rows above this loss (e.g. ln C: below chance); None: off
    loss_start_version: int = Field(1, ge=0)  # score only from this global version on (version 0 is untrained)

    @model_validator(mode="after")
    def _bounds(self) -> "QualityConfig":
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise ValueError(f"data.quality.max_chars={self.max_chars} is below min_chars={self.min_chars}")
        if self.max_words is not None and self.max_words < self.min_words:
            raise ValueError(f"data.quality.max_words={self.max_words} is below min_words={self.min_words}")
        return self


class DataConfig(Section):
    dataset: str = "bbc_news"  # bbc_news | shakespeare | a local .csv/.jsonl/.json/.parquet/.txt path or a folder of .txt
    # or a Hugging Face `datasets` folder (Dataset.save_to_disk)
    text_column: str = "text"
    label_column: str | None = "label"
    group_column: str | None = None  # for natural partitions, e.g. "role"
    max_examples: int | None = Field(None, ge=1)
    test_fraction: float = Field(0.2, ge=0, lt=1)  # held-out global test set
    client_test_fraction: float = Field(0.2, ge=0, lt=1)  # each client's local test split
    # Shakespeare only: keep roles with at least this many lines, at most this many roles.
    min_lines_per_role: int = Field(8, ge=1)
    max_roles: int | None = Field(None, ge=1)
    # Plain-text corpora (.txt or a folder of them): one example per paragraph (blank-line separated) or per line.
    text_unit: Literal["paragraph", "line"] = "paragraph"
    # A saved DatasetDict (save_to_disk): the split to read; None: "train" (or its only split).
    split: str | None = Field(None, min_length=1)
    quality: QualityConfig = QualityConfig()  # client-side data quality (fedfm.data.quality), off by default


class PartitionConfig(Section):
    scheme: Annotated[str, choice(PARTITIONERS)] = "dirichlet"  # iid, dirichlet, quantity, natural
    alpha: float = Field(0.5, gt=0)  # Dirichlet concentration (label skew or quantity skew)
    min_examples: int = Field(2, ge=1)  # each client gets at least this many examples


class FederationConfig(Section):
    num_clients: int = Field(20, ge=1)
    clients_per_round: int = Field(5, ge=1)
    rounds: int = Field(15, ge=1)
    partition: PartitionConfig = PartitionConfig()

    @model_validator(mode="after")
    def _cohort_fits(self) -> "FederationConfig":
        if self.clients_per_round > self.num_clients:
            raise ValueError(
                f"clients_per_round={self.clients_per_round} exceeds num_clients={self.num_clients}"
            )
        return self


class AlgorithmConfig(EntrySection):
    """The federated algorithm (fedfm.algorithms): ``name`` and the options every algorithm shares.

    The chosen algorithm's own options sit beside them (module doc): ``mu``
    (fedprox), ``momentum`` (fedavgm, diloco), ``beta1``, ``beta2``, ``tau``
    (fedadam, fedyogi, fedadagrad); diloco's ``server_lr`` defaults to 0.7.
    """

    registry: ClassVar[Registry] = ALGORITHMS

    name: Annotated[str, choice(ALGORITHMS)] = "fedavg"
    server_lr: float = Field(1.0, gt=0)
    weighting: Annotated[str, choice(WEIGHTINGS)] = "examples"  # examples, uniform, quality (fedfm.algorithms.fedavg)
    # > 0: evaluate and release an exponential moving average of the global versions (clients still
    # train from the newest); post-processing, so free under DP (De et al. 2022)
    ema_decay: float = Field(0.0, ge=0, lt=1)


class TrainConfig(Section):
    local_steps: int | None = Field(8, ge=1)  # or local_epochs (setting epochs drops the default steps)
    local_epochs: float | None = Field(None, gt=0)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(3e-3, gt=0)
    optimizer: Literal["sgd", "adamw"] = "adamw"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(None, gt=0)
    # Clients trained together in one batched (vmapped) forward/backward over the frozen base
    # (fedfm.client.batched); 1: one after another.
    batch_clients: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _one_budget(self) -> "TrainConfig":
        if self.local_epochs is not None and self.local_steps is not None:
            if "local_steps" in self.model_fields_set:
                raise ValueError("set only one of train.local_steps and train.local_epochs")
            object.__setattr__(self, "local_steps", None)  # epochs given: the default steps yield
        if self.local_steps is None and self.local_epochs is None:
            raise ValueError("set train.local_steps or train.local_epochs")
        return self


class EvalConfig(Section):
    every: int = Field(5, ge=0)  # evaluate every N rounds (0: only after the last round)
    clients: bool = True  # per-client metrics on local test splits
    batch_size: int = Field(64, ge=1)
    # At most this many rows in the global test set, and at most this many in all clients' local
    # test splits together (the largest clients are trimmed first, fedfm.data.partition.cap_test_rows).
    # The default keeps one evaluation of a large dataset within a few training rounds (README).
    max_test_examples: int | None = Field(2000, ge=1)
    # Clients with fewer local test rows are left out of the client_* fairness statistics (and counted).
    min_client_test_examples: int = Field(5, ge=1)
    # Report backdoor_success_rate (attack.trigger, attack.target_label) even without a
    # backdoor attacker: the clean baseline. Always on when attack.name=backdoor.
    backdoor: bool = False


class GaussianDPConfig(Section):
    """What both DP mechanisms share: the noise multiplier or the budget it is calibrated to."""

    _name = "DP"  # how the one-line error names the section

    enabled: bool = False
    noise_multiplier: float | None = Field(None, ge=0)  # None: derived from target_epsilon
    target_epsilon: float | None = Field(None, gt=0)  # the budget (see each section)
    delta: float | None = Field(None, gt=0, lt=1)  # None: each section's default
    accountant: Literal["rdp", "pld"] = "rdp"

    @model_validator(mode="after")
    def _noise_source(self):
        if self.enabled and self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError(f"{self._name} needs noise_multiplier or target_epsilon")
        return self


class ClientDPConfig(GaussianDPConfig):
    """Client-level DP (DP-FedAvg, McMahan et al. 2018); adaptive clipping (Andrew et al. 2021).

    ``target_epsilon``: training stops before exceeding it; ``delta`` defaults to 1 / num_clients.
    """

    _name = "client DP"

    clip_norm: float = Field(1.0, gt=0)
    adaptive: bool = False
    target_quantile: float = Field(0.5, gt=0, lt=1)
    clip_lr: float = Field(0.2, gt=0)


class SecureAggregationConfig(Section):
    """Secure aggregation (Bonawitz et al. 2017; SecAgg+ neighbourhoods, Bell et al. 2020).

    The server learns only the cohort's sum. Each uploaded coordinate is divided
    by a public range and quantized to ``bits`` bits in [-1, 1], summed mod 2^32:
    the range is ``clip_range`` for the FedAvg family (coordinates of ``r·Δ``
    outside [-R, R] are clipped) and the clip norm C under client-level DP
    (lossless, the server adds the noise to the sum).
    """

    enabled: bool = False
    neighbours: int | None = Field(None, ge=2)  # SecAgg+ degree k; None: complete graph (Bonawitz)
    threshold: int | None = Field(None, ge=2)  # Shamir t; None: a strict majority of the smallest neighbourhood
    clip_range: float = Field(1.0, gt=0)  # R, per coordinate of r·Δ (FedAvg family)
    max_weight: float = Field(1000.0, gt=0)  # example counts above it weigh as max_weight
    bits: int | None = Field(None, ge=1, le=32)  # None: the finest the cohort's sum can hold in 32 bits
    dropout: float = Field(0.0, ge=0, lt=1)  # simulated: chance a client vanishes after sharing keys


class DPSGDConfig(GaussianDPConfig):
    """Local sample-level DP-SGD on every client (Abadi et al. 2016); each client's (epsilon, delta).

    ``target_epsilon`` is a per-client budget: a client that would pass it sits
    out; ``delta`` defaults to min(1e-5, 1 / n_i) for client i.
    """

    _name = "dp_sgd"

    max_grad_norm: float = Field(1.0, gt=0)  # C: every example's gradient is clipped to this L2 norm
    # per_client: each client calibrates its own sigma_i from target_epsilon, its sampling rate and planned
    # steps (a larger silo needs less noise); shared: one sigma for all, set by the most exposed client;
    # distributed: one sigma for the securely aggregated sum, each client adding its share sigma / sqrt(t)
    # (t = privacy.secure_aggregation.threshold; fedfm.privacy.dp_sgd, "Distributed noise")
    noise: Literal["per_client", "shared", "distributed"] = "per_client"
    # q for every client (expected batch q * n_i); None: q_i = min(1, train.batch_size / n_i)
    sampling_rate: float | None = Field(None, gt=0, le=1)


class PrivacyConfig(Section):
    """Client-level DP, local DP-SGD, secure aggregation; where DP noise comes from.

    DP noise (and DP-SGD's Poisson batches) are drawn from OS entropy, fresh every
    round, so the config and checkpoints reveal nothing about them.
    ``reproducible_noise: true`` derives them from ``seed`` instead: bit-identical
    reruns for research, but **not private** against anyone who has the config
    (the run logs a warning; fedfm.privacy.noise).
    """

    client_dp: ClientDPConfig = ClientDPConfig()
    dp_sgd: DPSGDConfig = DPSGDConfig()
    secure_aggregation: SecureAggregationConfig = SecureAggregationConfig()
    reproducible_noise: bool = False


class RobustConfig(EntrySection):
    """Robust server aggregation around the algorithm's fold (fedfm.robustness.aggregators).

    The rule's own options sit beside ``rule`` (module doc): ``trim_fraction``
    (trimmed_mean), ``multi_krum_m`` (multi_krum), ``norm_bound`` (norm_bound),
    ``root_examples`` (fltrust: the server's clean root dataset, carved out of
    the global holdout, data.test_fraction, before the test set is fixed).
    """

    registry: ClassVar[Registry] = ROBUST_RULES
    choice_field: ClassVar[str] = "rule"

    rule: Annotated[str, choice(ROBUST_RULES)] = "mean"
    num_byzantine: int = Field(0, ge=0)  # f, the number of attackers a rule must tolerate per round


class ValidationConfig(Section):
    """Checks on every update the server receives, before any fold (fedfm.robustness.validate).

    Always on: the payload decodes; tensor names, shapes and dtypes match the
    global state and every value is finite; the sender is in the round's cohort
    (asynchronous: it holds a version it was sent) and reports at most once per
    round; ``num_examples`` is a positive integer no larger than the client's
    training rows (simulation: its partition; deployment: the rows its node registered).
    The norm bounds below are configurable. They are skipped under secure aggregation (the
    server sees only masked updates) and under client-level DP (its clipping already bounds
    every update, and a rejection driven by other clients' norms would be outside the accountant).
    With ``train.local_epochs`` on very unequal partitions a large client runs many more steps
    than the median one: raise ``max_norm_factor`` (or set it to null) there.
    Every rejection is logged and counted in the round's record (``rejected``, ``rejected_by_reason``).
    """

    max_norm: float | None = Field(None, gt=0)  # absolute bound on an update's L2 norm; None: none
    max_norm_factor: float | None = Field(10.0, gt=1)  # bound: factor x the median of accepted norms; None: off
    norm_window: int = Field(100, ge=1)  # the median is over the last N accepted norms (of past rounds)
    min_norms: int = Field(5, ge=1)  # accepted norms before the median bound applies (warm-up until then)
    warmup_factor: float | None = Field(100.0, gt=1)  # warm-up bound: factor x the global state's norm; None: off


class AttackConfig(EntrySection):
    """Simulated attackers, for evaluating defenses (fedfm/robustness/attacks.py, poison.py).

    Model poisoning: sign_flip, gaussian, model_replacement, alie, ipm. Data poisoning
    (classification only): label_flip, backdoor (Bagdasaryan et al.'s scaled model replacement).
    The attack's own options sit beside ``name`` (module doc): ``scale`` (sign_flip factor 1;
    model_replacement / backdoor boost, n/eta), ``sigma`` (gaussian), ``epsilon`` (ipm),
    ``z`` (alie), ``flip_mode`` / ``flip_map`` (label_flip), ``poison_fraction`` (backdoor).
    """

    registry: ClassVar[Registry] = ATTACKS

    name: Annotated[str, choice(ATTACKS)] = "none"
    fraction: float = Field(0.0, ge=0, le=1)  # of all clients, chosen once per run
    # The backdoor trigger, also for eval.backdoor without a backdoor attacker:
    target_label: int = Field(0, ge=0)  # the class triggered inputs should land in
    trigger: str = Field("cf", min_length=1)  # the trigger text
    trigger_position: Literal["start", "end", "random"] = "start"  # "end" is cut off past model.max_length


class PersonalizationConfig(Section):
    """Personalization (fedfm/personalization): every client ends with a model that fits its data.

    ``fedper`` (Arivazhagan et al. 2019) and ``fedrep`` (Collins et al. 2021) keep the ``personal``
    tensors (default: the task head) on each client, never sent; ``ditto`` (Li et al. 2021) trains
    the global model as usual plus a private copy pulled toward it with strength ``ditto_lambda``;
    ``local`` trains every client alone (nothing aggregated), the baseline to beat.
    """

    method: Literal["none", "fedper", "fedrep", "ditto", "local"] = "none"
    # trainable-state names (or their dotted prefixes, or fnmatch globs) that stay on the client;
    # None: the task head (fedper / fedrep). Not used by ditto and local (the whole state is personal).
    personal: list[str] | None = None
    head_steps: int = Field(8, ge=1)  # fedrep: steps on the personal part (body frozen) before the body steps
    ditto_lambda: float = Field(0.1, ge=0)  # ditto: strength of (lambda/2)||v_k - w_global||^2

    @model_validator(mode="after")
    def _personal_is_used(self) -> "PersonalizationConfig":
        if self.personal is not None and self.method not in ("fedper", "fedrep"):
            raise ValueError(f"personalization.personal applies to fedper and fedrep, not method={self.method}")
        if self.personal is not None and not self.personal:
            raise ValueError("personalization.personal is empty: name at least one pattern or leave it unset")
        return self


class ReplayConfig(Section):
    """A bounded local replay buffer per client: reservoir sampling over everything it has seen."""

    enabled: bool = False
    capacity: int = Field(64, ge=1)  # examples each client keeps (indices; never leave the client)


class ContinualRegularizerConfig(Section):
    """A pull toward the previous stage's global model: L2, or EWC (Kirkpatrick et al. 2017)."""

    name: Literal["none", "l2", "ewc"] = "none"
    strength: float = Field(1.0, ge=0)  # lambda in (lambda/2) sum_i F_i (theta_i - theta_prev_i)^2 (F = 1 for l2)
    fisher_examples: int = Field(64, ge=1)  # ewc: examples per client for its diagonal Fisher at a stage's end


class ContinualConfig(Section):
    """Federated continual learning (fedfm.continual): clients' data arrives in stages.

    ``stream=tasks``: stage k reveals the examples whose task (label name, or the
    group before ':' -- a Shakespeare play -- for unlabelled data) is in ``tasks[k]``;
    unset: labels in id order, two per task (an odd last label is a task of its own).
    ``stream=windows``: each client's shard (in dataset order) is cut into
    ``num_windows`` consecutive windows; with ``time_column`` the cut is by that
    column's time instead (equal-width windows or ``time_boundaries``).
    """

    enabled: bool = False
    stream: Literal["tasks", "windows"] = "tasks"
    tasks: list[list[str]] | None = None
    num_windows: int = Field(3, ge=2)
    # stream=windows by time: rows are staged by this column's value (numbers or dates, fedfm.data.times),
    # cut into num_windows equal-width time windows, or at time_boundaries (k values -> k+1 stages)
    time_column: str | None = None
    time_boundaries: list[float | str] | None = None
    rounds_per_stage: int | None = Field(None, ge=1)  # None: federation.rounds in every stage
    replay: ReplayConfig = ReplayConfig()
    regularizer: ContinualRegularizerConfig = ContinualRegularizerConfig()
    per_task_adapters: bool = False  # one trainable state per task; the task id picks it at test time
    adapter_init: Literal["previous", "initial"] = "previous"  # where a new task's state starts

    @model_validator(mode="before")
    @classmethod
    def _dates_as_text(cls, data):
        """YAML reads an unquoted 2024-03-01 as a date: keep boundaries as ISO text."""
        import datetime

        if isinstance(data, dict) and isinstance(data.get("time_boundaries"), list):
            data = {**data, "time_boundaries": [b.isoformat() if isinstance(b, (datetime.date, datetime.datetime))
                                                else b for b in data["time_boundaries"]]}
        return data

    @model_validator(mode="after")
    def _time_cut(self) -> "ContinualConfig":
        if self.time_column is not None and self.stream != "windows":
            raise ValueError("continual.time_column cuts time windows: set continual.stream=windows")
        if self.time_boundaries is not None:
            if self.time_column is None:
                raise ValueError("continual.time_boundaries needs continual.time_column")
            if not self.time_boundaries:
                raise ValueError("continual.time_boundaries needs at least one boundary (k boundaries: k+1 stages)")
        return self

    @model_validator(mode="after")
    def _disjoint_tasks(self) -> "ContinualConfig":
        if self.tasks is not None:
            if not self.tasks or any(not t for t in self.tasks):
                raise ValueError("continual.tasks needs at least one task, each naming at least one label or group")
            names = [n for t in self.tasks for n in t]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"continual.tasks: {', '.join(twice)} appear(s) in more than one task")
        return self


class CheckpointConfig(Section):
    """Numbered global-model checkpoints for ``fedfm run --resume RUN_DIR`` (fedfm.server.checkpoint).

    Written atomically to RUN_DIR/checkpoints/ after every ``every``-th round
    (0: never, and the run cannot be resumed); the last ``keep`` are kept.
    """

    every: int = Field(1, ge=0)
    keep: int = Field(1, ge=1)


class CompressionConfig(Section):
    """Codec chains on the wire (fedfm.compression): ``upload`` for client updates, ``download`` for broadcasts.

    Upload codecs: ``topk`` (first, if used), then at most one of ``fp16``, ``bf16``, ``int8``,
    ``int4`` (unbiased stochastic rounding); download: ``fp16`` or ``bf16`` only (lossless
    enough for every client to start from the same state). ``error_feedback`` keeps each
    client's coding error in its private state and adds it to its next upload (Stich et al. 2018).
    """

    upload: list[Annotated[str, choice(CODECS)]] = []
    download: list[Annotated[str, choice(CODECS, DOWNLOAD_SAFE)]] = []
    topk_fraction: float = Field(0.1, gt=0, le=1)  # share of each tensor's entries kept by topk
    chunk_size: int | None = Field(None, ge=1)  # int8/int4: one scale per chunk of values; None: per tensor
    error_feedback: bool = False

    @model_validator(mode="after")
    def _valid_chains(self) -> "CompressionConfig":
        for where, chain in (("upload", self.upload), ("download", self.download)):
            leading = [c for c in chain[1:] if CODECS.supports(c, LEADING)]
            if leading:
                raise ValueError(f"compression.{where}: {leading[0]} must come first in the chain")
            values = [c for c in chain if CODECS.supports(c, VALUE)]
            if len(values) > 1:
                raise ValueError(
                    f"compression.{where}: at most one of {', '.join(CODECS.names(VALUE))} per chain, got {values}"
                )
        if self.error_feedback and not self.upload:
            raise ValueError("compression.error_feedback needs an upload codec chain (compression.upload)")
        return self


class DeviceProfile(Section):
    """One kind of client device (fedfm.drivers.devices): a share of the clients gets it.

    Durations are virtual seconds on the simulation's clock: a local step
    takes ``devices.step_seconds / speed``, a payload ``bytes * 8 / (link_mbps * 1e6)``.
    """

    name: str = Field(min_length=1)
    share: float = Field(gt=0)  # fraction of the clients (shares are normalised to sum to 1)
    speed: float = Field(1.0, gt=0)  # relative compute speed (1 = the reference device)
    link_mbps: float | None = Field(None, gt=0)  # up and down link; None: transfers take no virtual time
    memory_mb: float | None = Field(None, gt=0)  # training memory budget; None: unlimited
    availability: float = Field(1.0, gt=0, le=1)  # chance the client is online when a cohort is drawn
    dropout: float = Field(0.0, ge=0, lt=1)  # chance a started client drops out before it uploads
    lora_rank: int | None = Field(None, ge=1)  # HetLoRA: this device's LoRA rank (<= model.lora.r)


class DevicesConfig(Section):
    """Heterogeneous clients on a virtual clock (empty ``profiles``: all clients alike, no clock)."""

    profiles: list[DeviceProfile] = []
    step_seconds: float = Field(1.0, gt=0)  # virtual seconds one local step takes at speed 1
    deadline_s: float | None = Field(None, gt=0)  # sync rounds: updates arriving later are dropped

    @model_validator(mode="after")
    def _unique_names(self) -> "DevicesConfig":
        names = [p.name for p in self.profiles]
        if len(set(names)) != len(names):
            raise ValueError(f"devices.profiles: names must be unique, got {names}")
        return self


class AsyncConfig(Section):
    """Buffered asynchronous training on the virtual clock (fedfm.drivers.asynchronous).

    ``fedbuff`` (Nguyen et al. 2022): the server folds updates as they arrive
    and takes a step every ``buffer_size`` of them, each weighted by
    ``staleness``; ``fedasync`` (Xie et al. 2019): every arrival is mixed in
    at once, ``x <- x + mixing * s(tau) * (x_client - x)``.
    ``federation.rounds`` counts server steps (global versions).
    """

    enabled: bool = False
    method: Literal["fedbuff", "fedasync"] = "fedbuff"
    buffer_size: int = Field(10, ge=1)  # K: updates per server step (fedasync: always 1)
    concurrency: int = Field(20, ge=1)  # clients training at once
    staleness: Literal["polynomial", "constant", "hinge"] = "polynomial"
    staleness_exponent: float = Field(0.5, ge=0)  # polynomial: s(tau) = (1 + tau)^-a
    hinge_a: float = Field(10.0, gt=0)  # hinge: s(tau) = 1 / (a (tau - b) + 1) for tau > b, else 1
    hinge_b: int = Field(4, ge=0)
    max_staleness: int | None = Field(None, ge=0)  # staler updates are rejected (logged)
    mixing: float = Field(0.6, gt=0, le=1)  # fedasync: alpha


class DeployConfig(Section):
    """Deployment on Flower's engine (``fedfm deploy``, fedfm.deploy); ignored by ``fedfm run``.

    ``superlink`` is the SuperLink's one HTTPS address (Fleet, Control and
    Runtime APIs since Flower 1.40), ``root_certificates`` the CA that signed
    its certificate; plain HTTP needs ``insecure: true`` spelled out. A round
    closes when every sampled node has replied or at ``round_timeout_s``
    with at least ``min_replies`` updates folded (fewer: nothing is released
    that round). Round 1 waits up to ``join_timeout_s`` for ``min_nodes``
    nodes, every later round up to ``round_timeout_s`` (then samples among the connected). ``test_data``: the server's own test file; None: the global
    held-out split of ``data.dataset`` (as in a simulation of the same config).
    """

    superlink: str = Field("127.0.0.1:9093", pattern=r"^[^\s:/]+:\d{1,5}$")
    root_certificates: str | None = None
    insecure: bool = False
    min_nodes: int | None = Field(None, ge=1)  # None: federation.clients_per_round
    min_replies: int = Field(1, ge=1)
    round_timeout_s: float = Field(600.0, gt=0)
    join_timeout_s: float = Field(600.0, gt=0)
    test_data: str | None = None

    @model_validator(mode="after")
    def _secure_or_explicit(self) -> "DeployConfig":
        if self.insecure and self.root_certificates:
            raise ValueError("deploy.insecure and deploy.root_certificates exclude each other")
        return self


class TrackingConfig(Section):
    """Also log every round's metrics and the resolved config to an experiment tracker (fedfm.eval.tracking).

    ``tensorboard``: torch's SummaryWriter into RUN_DIR/tensorboard (``dir``: DIR/<run folder name>);
    ``mlflow``: a local SQLite store RUN_DIR/mlruns/mlflow.db (``dir``: DIR/mlflow.db, shared by runs), or
    any MLflow tracking ``uri``; no server needed. ``tracking: mlflow`` is short for ``tracking: {kind: mlflow}``.
    """

    kind: Literal["none", "tensorboard", "mlflow"] = "none"
    dir: str | None = None  # a folder shared by runs; None: inside the run folder
    uri: str | None = None  # mlflow only: a tracking URI (sqlite:///..., http://host:5000); overrides dir
    experiment: str = Field("fedfm", min_length=1)  # mlflow only: the experiment's name

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data):
        return {"kind": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _uri_for_mlflow(self) -> "TrackingConfig":
        if self.uri is not None and self.kind != "mlflow":
            raise ValueError(f"tracking.uri is for kind mlflow (kind is {self.kind}); use tracking.dir")
        return self


class RunConfig(Section):
    name: str = "run"
    seed: int = 0
    out: str | None = None  # run folder; default runs/<name>-<timestamp>
    threads: int | None = Field(None, ge=1)  # torch intra-op threads; default: torch's choice
    # Simulation workers (fedfm.drivers.workers), each one process with one model and one compute thread;
    # None: one per core (capped by the cohort), or 1 where a run cannot be split. torchrun sets its own.
    workers: int | None = Field(None, ge=1)
    # Where the model trains and evaluates: auto (cuda when available, else cpu), cpu, cuda, cuda:N.
    # The global state, the wire and the server folds stay on the CPU.
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    progress: bool = True
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    federation: FederationConfig = FederationConfig()
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    robust: RobustConfig = Field(default_factory=RobustConfig)
    validation: ValidationConfig = ValidationConfig()
    attack: AttackConfig = Field(default_factory=AttackConfig)
    personalization: PersonalizationConfig = PersonalizationConfig()
    continual: ContinualConfig = ContinualConfig()
    compression: CompressionConfig = CompressionConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    devices: DevicesConfig = DevicesConfig()
    asynchronous: AsyncConfig = AsyncConfig()
    deploy: DeployConfig = DeployConfig()
    tracking: TrackingConfig = TrackingConfig()
