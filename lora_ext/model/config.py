"""LoraConfig: what to adapt and how, with PEFT's field names, defaults and meaning.

The subset of ``peft.LoraConfig`` that the fused path implements. Unknown PEFT
fields found in an ``adapter_config.json`` are accepted only when they hold
their PEFT default (so a file that needs DoRA, ``lora_bias`` or
``fan_in_fan_out`` is refused with a clear error instead of loading wrongly).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..targets import pattern_matches

_BIAS_OPTIONS = ("none", "all", "lora_only")

# PEFT initialisations that only choose the initial factors (the base weights stay as they are).
_INIT_ONLY_FACTORS = ("eva", "orthogonal")

# PEFT fields we do not implement, with the value that means "feature off".
# A config file may carry them at these values (PEFT writes them all out).
_PEFT_FIELDS_AT_DEFAULT: dict[str, Any] = {
    "fan_in_fan_out": False,
    "lora_bias": False,
    "megatron_config": None,
    "layer_replication": None,
    "trainable_token_indices": None,
    "target_parameters": None,
    "exclude_modules": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "arrow_config": None,
    "use_bdlora": None,
    "velora_config": None,
    "monteclora_config": None,
    "kasa_config": None,
}

# PEFT bookkeeping fields that carry no semantics for the math.
_PEFT_FIELDS_IGNORED = frozenset(
    {
        "peft_type",
        "task_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "megatron_core",
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
        "runtime_config",
        "qalora_group_size",
        "ensure_weight_tying",
        "modules_to_tie",
        "target_modules_to_tie",
    }
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
            (``re.fullmatch``); or ``"all-linear"`` (every ``nn.Linear`` except the
            model's output head). Only ``nn.Linear`` and ``nn.Embedding`` can be
            adapted.
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
    use_dora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` naming the bad field and value."""
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
        """The ``adapter_config.json`` content, loadable by ``peft.PeftConfig.from_pretrained``."""
        out: dict[str, Any] = {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": base_model_name_or_path,
            "revision": None,
            "inference_mode": True,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "target_modules": self.target_modules,
            "lora_dropout": self.lora_dropout,
            "bias": self.bias,
            "use_rslora": self.use_rslora,
            "init_lora_weights": self.init_lora_weights,
            "modules_to_save": self.modules_to_save,
            "layers_to_transform": self.layers_to_transform,
            "layers_pattern": self.layers_pattern,
            "rank_pattern": self.rank_pattern,
            "alpha_pattern": self.alpha_pattern,
        }
        # Feature switches at "off", limited to fields that PEFT has had since 0.10, so
        # that older PEFT versions (which reject unknown fields) read the file too.
        out.update({"fan_in_fan_out": False, "megatron_config": None, "layer_replication": None})
        out["use_dora"] = self.use_dora
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
        peft_type = data.get("peft_type", "LORA")
        if str(peft_type).upper() != "LORA":
            raise ValueError(f"lora_ext: only LoRA adapters are supported, the config has peft_type={peft_type!r}")
        own = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in own}
        unsupported = []
        for key, value in data.items():
            if key in own or key in _PEFT_FIELDS_IGNORED:
                continue
            if key in _PEFT_FIELDS_AT_DEFAULT:
                if not _is_default(value, _PEFT_FIELDS_AT_DEFAULT[key]):
                    unsupported.append(f"{key}={value!r}")
            elif value not in (None, False, {}, [], ""):
                unsupported.append(f"{key}={value!r}")
        if unsupported:
            raise ValueError(
                "lora_ext: the adapter config enables PEFT features the fused path does not implement: "
                + ", ".join(unsupported)
                + " (load it with peft, optionally followed by lora_ext.integrations.peft.accelerate)"
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
        return cls(**kwargs)


def _is_default(value: Any, default: Any) -> bool:
    if default is None:
        return value in (None, {}, [])
    return value == default


def _check_rank(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"lora_ext: {name} (the rank) must be a positive integer, got {value!r}")


def _check_alpha(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"lora_ext: {name} (lora_alpha) must be a positive finite number, got {value!r}")
