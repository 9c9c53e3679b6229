"""LoraConfig: what to adapt and how, with PEFT's field names, defaults and meaning.

Every field of ``peft.LoraConfig`` (PEFT 0.21) is a field here, in one of three groups:

- implemented: the LoRA math and target selection (r, lora_alpha, target_modules, ...);
- kept: bookkeeping that does not change the math (task_type, base_model_name_or_path,
  revision, inference_mode, peft_version, ...): stored and written back to
  ``adapter_config.json``; ``task_type`` also adds PEFT's per-task ``modules_to_save``;
- refused unless off: features the fused path does not implement. Setting one raises a
  ``ValueError`` that names the field and what to do instead.

A field that a newer PEFT adds (unknown here) is accepted at its "off" value with one
warning and refused otherwise, so a file that needs it never loads wrongly.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

from ..targets import pattern_matches

_BIAS_OPTIONS = ("none", "all", "lora_only")

# PEFT's task types (peft.TaskType) and the modules_to_save each one adds, as
# PeftModelForSequenceClassification / ...ForTokenClassification / ...ForQuestionAnswering do.
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "SEQ_2_SEQ_LM", "QUESTION_ANS", "FEATURE_EXTRACTION")
TASK_MODULES_TO_SAVE: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}

# PEFT initialisations that only choose the initial factors (the base weights stay as they are).
_INIT_ONLY_FACTORS = ("eva", "orthogonal")

_LOAD_WITH_PEFT = "load the model with peft and call lora_ext.integrations.peft.accelerate(peft_model)"

# ---- Feature fields the fused path does not implement: refused unless off.
UNSUPPORTED_FEATURES: dict[str, tuple[Any, str]] = {
    "lora_bias": (False, "a bias on lora_B is not supported"),
    "megatron_config": (None, "Megatron-parallel LoRA layers are not supported"),
    "layer_replication": (None, "layer replication is not supported"),
    "trainable_token_indices": (None, "trainable tokens are not supported; use modules_to_save for the embedding"),
    "target_parameters": (None, "LoRA on nn.Parameter targets is not supported; target modules instead"),
    "alora_invocation_tokens": (None, "activated LoRA (aLoRA) is not supported"),
    "use_qalora": (False, "QA-LoRA is not supported"),
    "velora_config": (None, "VeLoRA is not supported"),
    "monteclora_config": (None, "MonteCLoRA is not supported"),
    "use_bdlora": (None, "BD-LoRA is not supported"),
    "arrow_config": (None, "Arrow routing is not supported"),
    "kasa_config": (None, "KaSA is not supported"),
    "ensure_weight_tying": (False, "keeping tied modules_to_save copies tied is not supported"),
    "runtime_config": (None, "runtime_config (ephemeral_gpu_offload) is not supported"),
}

# ---- Bookkeeping fields: kept and written back, no effect on the math here.
KEPT_FIELDS = (
    "task_type",
    "peft_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "megatron_core",  # only read together with megatron_config (refused unless None)
    "qalora_group_size",  # only read together with use_qalora (refused unless False)
    "loftq_config",  # init-time settings of init_lora_weights="loftq"/"eva"/"corda"/"lora_ga"
    "eva_config",
    "corda_config",
    "lora_ga_config",
)

# Keys PEFT versions write to adapter_config.json that are not LoraConfig fields: accepted when off.
_FILE_ONLY_KEYS: dict[str, Any] = {"modules_to_tie": None, "target_modules_to_tie": None}

# Fields written even at their default: those PEFT has had since 0.10, so older PEFT
# versions (which reject unknown fields) read the file too. The others are written
# only when they differ from their default (PEFT restores the default on load).
_ALWAYS_WRITTEN = (
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "r",
    "lora_alpha",
    "target_modules",
    "lora_dropout",
    "bias",
    "use_rslora",
    "init_lora_weights",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "fan_in_fan_out",
    "use_dora",
    "megatron_config",
    "layer_replication",
)


@dataclass
class LoraConfig:
    """LoRA hyper-parameters; same names, defaults and meaning as ``peft.LoraConfig``.

    Args:
        r: default rank of every adapted layer (> 0).
        lora_alpha: default alpha; the scale is ``lora_alpha / r``
            (``lora_alpha / sqrt(r)`` with ``use_rslora``).
        target_modules: which modules get LoRA. A list of names, each matching a
            module whose full name equals it or ends with ``"." + name``; a
            string, matched as a regex against the full module name
            (``re.fullmatch``); or ``"all-linear"`` (every ``nn.Linear`` and
            transformers ``Conv1D`` except the model's output head). The layer
            types that can be adapted are those of lora_ext/nn/dispatch.py
            (``nn.Linear``, ``nn.Embedding``, ``Conv1D``, ``nn.Conv1d/2d/3d``).
        lora_dropout: dropout probability on the LoRA branch input of Linear
            layers (training mode only). Embedding LoRA has no dropout, as in PEFT.
        bias: ``"none"``, ``"all"`` (every bias in the model trains) or
            ``"lora_only"`` (the biases of the adapted layers train). Trained
            biases are saved with the adapter, as PEFT does.
        use_rslora: rank-stabilised scale ``lora_alpha / sqrt(r)``.
        init_lora_weights: ``True`` (A Kaiming-uniform, B zero; embeddings: A
            zero, B normal), ``"gaussian"`` (A normal with std 1/r), or ``False``
            (the random init of the factor layers, so B is not zero: for tests).
        modules_to_save: names (suffix match, as PEFT) of extra modules that are
            trained fully and saved with the adapter (e.g. a classifier head).
        layers_to_transform: an int or list of ints: only layers with these
            indices are adapted (index = the number after ``layers_pattern``, or
            the first ``.<name>.<int>.`` segment of the module name).
        layers_pattern: name(s) of the layer list (e.g. ``"layers"``, ``"h"``).
        rank_pattern: ``{regex: r}`` overriding ``r`` for modules whose name ends
            with a match of the regex.
        alpha_pattern: ``{regex: alpha}``, likewise for ``lora_alpha``.
        exclude_modules: modules never adapted, matched as ``target_modules`` is
            (a list: full name or ``"." + name`` suffix; a string: ``re.fullmatch``).
        fan_in_fan_out: PEFT's flag for layers whose weight is stored ``[in, out]``.
            As in PEFT it follows the layer type: set to True (with a warning)
            when a transformers ``Conv1D`` (GPT-2) is targeted, to False when an
            ``nn.Linear`` is; the stored config and the saved file carry the result.
        use_dora: DoRA (weight-decomposed LoRA) on the adapted ``nn.Linear`` layers:
            a learned magnitude per output row (lora_ext/nn/dora.py).
    """

    r: int = 8
    lora_alpha: float = 8
    target_modules: list[str] | str | None = None
    lora_dropout: float = 0.0
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    # ---- kept (bookkeeping; see KEPT_FIELDS). task_type also adds PEFT's per-task modules_to_save.
    task_type: str | None = None
    peft_type: str | None = None  # always "LORA" after construction
    auto_mapping: dict | None = None
    peft_version: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    megatron_core: str | None = "megatron.core"
    qalora_group_size: int = 16
    loftq_config: dict = field(default_factory=dict)
    eva_config: dict | None = None
    corda_config: dict | None = None
    lora_ga_config: dict | None = None
    exclude_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    use_dora: bool = False
    # ---- refused unless off (UNSUPPORTED_FEATURES)
    lora_bias: bool = False
    megatron_config: dict | None = None
    layer_replication: list | None = None
    trainable_token_indices: list | dict | None = None
    target_parameters: list[str] | None = None
    alora_invocation_tokens: list[int] | None = None
    use_qalora: bool = False
    velora_config: dict | None = None
    monteclora_config: dict | None = None
    use_bdlora: dict | None = None
    arrow_config: dict | None = None
    kasa_config: dict | None = None
    ensure_weight_tying: bool = False
    runtime_config: Any = None  # PEFT's LoraRuntimeConfig; only ephemeral_gpu_offload=False is accepted

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        self.task_type = _enum_value(self.task_type)
        peft_type = _enum_value(self.peft_type)
        if peft_type is not None and str(peft_type).upper() != "LORA":
            raise ValueError(f"lora_ext: only LoRA adapters are supported, the config has peft_type={peft_type!r}")
        self.peft_type = "LORA"
        for name in ("loftq_config", "eva_config", "corda_config", "lora_ga_config", *UNSUPPORTED_FEATURES):
            value = getattr(self, name)
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                setattr(self, name, dataclasses.asdict(value))  # PEFT's sub-config objects, as their JSON form
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` naming the bad field and value."""
        for table in (UNSUPPORTED_FEATURES,):
            for name, (off, why) in table.items():
                value = getattr(self, name)
                if not _is_off(value, off):
                    raise ValueError(
                        f"lora_ext: LoraConfig.{name}={value!r} is not supported: {why}. "
                        f"Leave it at {off!r}, or {_LOAD_WITH_PEFT}"
                    )
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(f"lora_ext: task_type must be None or one of {list(TASK_TYPES)}, got {self.task_type!r}")
        if not isinstance(self.inference_mode, bool):
            raise TypeError(f"lora_ext: inference_mode must be a bool, got {type(self.inference_mode).__name__}")
        _check_rank(self.r, "r")
        _check_alpha(self.lora_alpha, "lora_alpha")
        for key, value in self.rank_pattern.items():
            _check_rank(value, f"rank_pattern[{key!r}]")
        for key, value in self.alpha_pattern.items():
            _check_alpha(value, f"alpha_pattern[{key!r}]")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_ext: lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"lora_ext: use_dora must be True or False, got {self.use_dora!r}")
        if self.bias not in _BIAS_OPTIONS:
            raise ValueError(f"lora_ext: bias must be one of {list(_BIAS_OPTIONS)}, got {self.bias!r}")
        tm = self.target_modules
        if tm is None:
            raise ValueError("lora_ext: target_modules is required (a list of names, a regex string or 'all-linear')")
        if isinstance(tm, str):
            if not tm:
                raise ValueError("lora_ext: target_modules must not be an empty string")
        elif not isinstance(tm, list) or not tm or not all(isinstance(t, str) and t for t in tm):
            raise ValueError(f"lora_ext: target_modules must be a non-empty list of non-empty names, got {tm!r}")
        ex = self.exclude_modules
        if ex is not None and not (
            (isinstance(ex, str) and ex) or (isinstance(ex, list) and all(isinstance(e, str) and e for e in ex))
        ):
            raise ValueError(f"lora_ext: exclude_modules must be a regex string or a list of module names, got {ex!r}")
        if not isinstance(self.fan_in_fan_out, bool):
            raise ValueError(f"lora_ext: fan_in_fan_out must be True or False, got {self.fan_in_fan_out!r}")
        init = self.init_lora_weights
        if not (isinstance(init, bool) or (isinstance(init, str) and init.lower() == "gaussian")):
            raise ValueError(f"lora_ext: init_lora_weights must be True, False or 'gaussian', got {init!r}")
        if self.modules_to_save is not None and not all(isinstance(m, str) and m for m in self.modules_to_save):
            raise ValueError(f"lora_ext: modules_to_save must be a list of module names, got {self.modules_to_save!r}")
        lt = self.layers_to_transform
        if lt is not None:
            if isinstance(tm, str):
                raise ValueError("lora_ext: layers_to_transform cannot be used when target_modules is a str")
            items = [lt] if isinstance(lt, int) else lt
            if not isinstance(items, list) or not all(isinstance(i, int) and i >= 0 for i in items):
                raise ValueError(f"lora_ext: layers_to_transform must be an int or a list of ints >= 0, got {lt!r}")
        if self.layers_pattern is not None:
            if isinstance(tm, str):
                raise ValueError("lora_ext: layers_pattern cannot be used when target_modules is a str")
            if lt is None:
                raise ValueError("lora_ext: layers_pattern needs layers_to_transform")

    # ------------------------------------------------------------ task type

    def task_modules_to_save(self) -> tuple[str, ...]:
        """The modules_to_save entries PEFT adds for ``task_type`` (e.g. SEQ_CLS: classifier, score)."""
        return TASK_MODULES_TO_SAVE.get(self.task_type or "", ())

    def with_task_modules(self) -> LoraConfig:
        """A copy whose modules_to_save has the task type's entries added (duplicates removed, order kept)."""
        extra = self.task_modules_to_save()
        names = list(self.modules_to_save or []) + list(extra)
        if not names:
            return self
        unique = list(dict.fromkeys(names))
        if unique == self.modules_to_save:
            return self
        return dataclasses.replace(self, modules_to_save=unique)

    # ------------------------------------------------------------------ per layer

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """(r, lora_alpha) for ``module_name`` after rank_pattern/alpha_pattern (first match wins, as PEFT)."""
        r = self.r
        for key, value in self.rank_pattern.items():
            if pattern_matches(key, module_name):
                r = value
                break
        alpha = self.lora_alpha
        for key, value in self.alpha_pattern.items():
            if pattern_matches(key, module_name):
                alpha = value
                break
        return int(r), float(alpha)

    def scale_for(self, r: int, alpha: float) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    # --------------------------------------------------------------- PEFT format

    def to_peft_dict(self, base_model_name_or_path: str | None = None) -> dict[str, Any]:
        """The ``adapter_config.json`` content, loadable by ``peft.PeftConfig.from_pretrained``.

        ``inference_mode`` is written as True, as PEFT's ``save_pretrained`` does;
        ``base_model_name_or_path`` is the config's own, else the argument.
        """
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "runtime_config":
                continue  # runtime only; PEFT does not write it either
            value = getattr(self, f.name)
            if f.name in _ALWAYS_WRITTEN or not _is_default(f, value):
                out[f.name] = value
        out["peft_type"] = "LORA"
        out["inference_mode"] = True
        if out.get("base_model_name_or_path") is None:
            out["base_model_name_or_path"] = base_model_name_or_path
        return out

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> LoraConfig:
        """Build from an ``adapter_config.json`` dict written by PEFT or by :meth:`to_peft_dict`.

        Raises:
            ValueError: the file is not a LoRA config, or it enables a PEFT
                feature that the fused path does not implement.
        """
        if not isinstance(data, dict):
            raise ValueError(f"lora_ext: adapter config must be a JSON object, got {type(data).__name__}")
        peft_type = _enum_value(data.get("peft_type", "LORA"))
        if str(peft_type).upper() != "LORA":
            raise ValueError(f"lora_ext: only LoRA adapters are supported, the config has peft_type={peft_type!r}")
        own = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in own}
        unknown_off, unsupported = [], []
        for key, value in data.items():
            if key in own:
                continue
            if key in _FILE_ONLY_KEYS:
                if not _is_off(value, _FILE_ONLY_KEYS[key]):
                    unsupported.append(f"{key}={value!r}")
            elif _is_off(value, None) or value in (False, ""):
                unknown_off.append(key)
            else:
                unsupported.append(f"{key}={value!r}")
        if unsupported:
            raise ValueError(
                "lora_ext: the adapter config sets fields this lora_ext does not know (from a newer PEFT?): "
                + ", ".join(unsupported)
                + f"; {_LOAD_WITH_PEFT}"
            )
        if unknown_off:
            warnings.warn(
                f"lora_ext: the adapter config has fields this lora_ext does not know (from a newer PEFT?): "
                f"{sorted(unknown_off)}; they are at their 'off' value and ignored",
                stacklevel=2,
            )
        init = kwargs.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower() != "gaussian":
            if init.lower() not in _INIT_ONLY_FACTORS:
                # PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA, MiCA also rewrite the base weights at
                # init; the saved factors are only right on that rewritten base.
                raise ValueError(
                    f"lora_ext: init_lora_weights={init!r} modifies the base weights; such adapters are not "
                    "supported (convert it with PEFT's path_initial_model_for_weight_conversion, or load with peft)"
                )
            kwargs["init_lora_weights"] = True  # only the initial factors differ; the saved ones are plain LoRA
        if isinstance(kwargs.get("modules_to_save"), list):
            # PEFT extends modules_to_save in place per task type, so its files repeat entries
            kwargs["modules_to_save"] = list(dict.fromkeys(kwargs["modules_to_save"]))
        return cls(**kwargs)

    @classmethod
    def from_peft(cls, config: Any) -> LoraConfig:
        """A ``lora_ext.LoraConfig`` from a ``peft.LoraConfig`` (or any config object with PEFT's ``to_dict``)."""
        if isinstance(config, cls):
            config.validate()
            return config
        peft_type = _enum_value(getattr(config, "peft_type", None))
        if not callable(getattr(config, "to_dict", None)) or peft_type is None:
            raise TypeError(
                f"lora_ext: config must be a lora_ext.LoraConfig or a peft.LoraConfig, got {type(config).__name__}"
            )
        if str(peft_type).upper() != "LORA":
            raise ValueError(f"lora_ext: only LoRA adapters are supported, the config has peft_type={peft_type!r}")
        data = dict(config.to_dict())
        runtime = getattr(config, "runtime_config", None)
        if runtime is not None and getattr(runtime, "ephemeral_gpu_offload", False):
            data["runtime_config"] = dataclasses.asdict(runtime) if dataclasses.is_dataclass(runtime) else runtime
        for key in ("target_modules", "exclude_modules"):
            if isinstance(data.get(key), set):
                data[key] = sorted(data[key])
        return cls.from_peft_dict(data)


def _enum_value(value: Any) -> Any:
    """PEFT's str enums (PeftType.LORA, TaskType.SEQ_CLS) as their plain value ('LORA', 'SEQ_CLS')."""
    return value.value if isinstance(value, enum.Enum) else value


def _is_off(value: Any, off: Any) -> bool:
    """``value`` means "feature off": equal to ``off``; for ``off=None`` also an empty container."""
    if off is None:
        if isinstance(value, dict) and set(value) <= {"ephemeral_gpu_offload"}:
            return not value.get("ephemeral_gpu_offload", False)  # runtime_config's off value
        if hasattr(value, "ephemeral_gpu_offload") and not isinstance(value, dict):
            return not value.ephemeral_gpu_offload
        return value is None or (isinstance(value, (dict, list, tuple, set)) and not value)
    return type(value) is type(off) and value == off


def _is_default(f: dataclasses.Field, value: Any) -> bool:
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return value == default


def _check_rank(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"lora_ext: {name} (the rank) must be a positive integer, got {value!r}")


def _check_alpha(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"lora_ext: {name} (lora_alpha) must be a positive finite number, got {value!r}")
