"""LoRA adapters on PicoGPT's projections, through peft; QLoRA when the base is held in NF4.

A LoRA layer computes base(x) + (alpha / r) * B(A(dropout(x))): the base weight W stays frozen
and only the two thin matrices A (r x in) and B (out x r) train; B starts at zero, so an
adapted model starts as its base (Hu et al., 2021). QLoRA (Dettmers et al., 2023) holds W in
NF4 while training and dequantizes it in the compute dtype on each forward (quant/nf4.py).

peft builds the layers (`inject_adapter_in_model`, the model keeps its own class and names:
`blocks.0.attn.qkv.base_layer.weight`, `...qkv.lora_A.default.weight`); this module adds what
peft cannot know about PicoGPT: which projections exist, and the folded weight of each
adapted layer, W' = W + (alpha / r) B A, which makes an adapted model a plain PicoGPT again
(peft's `merge_and_unload` semantics; for QLoRA, W is the NF4 base dequantized).
peft is imported only when adapters are made: it takes seconds to load.
"""

import contextlib
import logging
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Dict, List, Optional

import torch
from torch import nn

from picogpt_lightning.errors import UserError
from picogpt_lightning.quant.nf4 import NF4Linear, quantize_nf4

# the blocks' projections by their names in PicoGPT (qkv is attention's fused q, k, v; "proj" is
# attention's output projection and, in a gelu MLP, the MLP's own); the head is tied to the embeddings
PROJECTIONS = ("qkv", "proj", "gate_proj", "up_proj", "down_proj", "fc")
BASE_KINDS = ("full", "nf4")  # the frozen base in full precision (LoRA) or in NF4 (QLoRA)
ADAPTER_MARK = ".lora_"  # in the name of every adapter tensor peft creates
ADAPTER_NAME = "default"


@dataclass
class LoraSettings:
    """LoRA's knobs, as peft's LoraConfig names them where both have them.

    r: the adapters' rank. alpha: their scale is alpha / r. dropout: on the adapters' input.
    target_modules: projection names (any of PROJECTIONS); every block's layer of that name is adapted.
    base: "full" keeps the frozen base as it is; "nf4" holds it in NF4 (QLoRA).
    nf4_block_size: values per NF4 scale when base="nf4" (QLoRA's 64).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: List[str] = field(default_factory=lambda: ["qkv", "proj", "gate_proj", "up_proj", "down_proj"])
    base: str = "full"
    nf4_block_size: int = 64

    def __post_init__(self):
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise UserError(f"lora r must be a positive integer (the adapters' rank), got {self.r!r}")
        if not self.alpha > 0:
            raise UserError(f"lora alpha must be > 0 (the adapters' scale is alpha / r), got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        self.target_modules = list(self.target_modules)
        unknown = [name for name in self.target_modules if name not in PROJECTIONS]
        if unknown or not self.target_modules:
            raise UserError(
                f"lora target_modules {self.target_modules} must be a non-empty list of PicoGPT's projections "
                f"{list(PROJECTIONS)}; unknown: {unknown}"
            )
        if self.base not in BASE_KINDS:
            raise UserError(f"lora base must be one of {BASE_KINDS} ('nf4' is QLoRA), got {self.base!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "LoraSettings":
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in dict(values).items() if key in known})


def peft_config(settings: LoraSettings, target_modules: Optional[List[str]] = None, **extra):
    """peft's LoraConfig for these settings (target_modules renamed for another model's layer names)."""
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, bias="none",
        target_modules=list(target_modules or settings.target_modules), **extra,
    )


@contextlib.contextmanager
def quiet_peft_import():
    """peft imports torchao where it is installed, whose optional CUDA libraries log a warning each on a CPU machine."""
    names = ("torchao", "torch.utils._pytree")
    levels = [logging.getLogger(name).level for name in names]
    for name in names:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in zip(names, levels):
            logging.getLogger(name).setLevel(level)


def add_adapters(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Puts LoRA adapters on `model`'s target projections, in place; everything else is frozen.

    With base="nf4" the blocks' linear layers become NF4 first (the head stays tied to the
    embeddings, frozen). Adapters take the base's device; their dtype is float32.
    """
    adapted = [name for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in settings.target_modules]
    if not adapted:
        raise UserError(
            f"lora target_modules {settings.target_modules} match no layer of this model (mlp={model.config.mlp!r}); "
            f"choose among {[n for n in PROJECTIONS if any(m.endswith('.' + n) for m, _ in model.named_modules())]}"
        )
    if settings.base == "nf4":
        quantize_nf4(model, block_size=settings.nf4_block_size)
    with quiet_peft_import():
        from peft import inject_adapter_in_model
        from peft.tuners.lora import Linear as LoraLinear
    config = peft_config(settings)
    config._register_custom_module({NF4Linear: LoraLinear})  # peft's own LoRA layer wraps any forward
    with warnings.catch_warnings():
        # NF4Linear is a layer type peft does not know; it has in_features and out_features, which is all it needs
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    for name, param in model.named_parameters():
        param.requires_grad_(ADAPTER_MARK in name)
    return model


def is_adapter_key(key: str) -> bool:
    return ADAPTER_MARK in key


def adapter_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {key: value for key, value in model.state_dict().items() if is_adapter_key(key)}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The model as its base alone, in eval mode (a DPO reference without a second model)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    training = model.training
    model.eval()
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        model.train(training)


def effective_base(base_state: Dict[str, torch.Tensor], settings: LoraSettings) -> Dict[str, torch.Tensor]:
    """The base weights the adapters were trained against: as stored, or for QLoRA NF4-rounded
    as quantize_nf4 holds them (every block matrix; embeddings, norms and the head stay)."""
    if settings.base == "full":
        return dict(base_state)
    return {
        key: NF4Linear.from_weight(value, block_size=settings.nf4_block_size).dequantize(value.dtype)
        if key.startswith("blocks.") and value.dim() == 2 else value
        for key, value in base_state.items()
    }


def fold(base_state: Dict[str, torch.Tensor], adapters: Dict[str, torch.Tensor], settings: LoraSettings) -> Dict[str, torch.Tensor]:
    """A plain PicoGPT state dict computing base + adapters: W + (alpha / r) B A for each adapted layer."""
    state = effective_base(base_state, settings)
    for layer in sorted({key.split(ADAPTER_MARK)[0] for key in adapters}):
        down = adapters[f"{layer}.lora_A.{ADAPTER_NAME}.weight"].float()
        up = adapters[f"{layer}.lora_B.{ADAPTER_NAME}.weight"].float()
        weight = state[f"{layer}.weight"]
        state[f"{layer}.weight"] = (weight.float() + settings.scaling * up @ down).to(weight.dtype)
    return state
