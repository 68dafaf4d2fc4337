"""LoRA on one shared base model through PEFT: rank-r adapters, factors in and out, folding.

All simulated clients share ONE base model.  Each distinct rank ``r`` gets its own
PEFT adapter named ``r{r}``; a client's turn loads its factors into that adapter.

Factors cross this module's boundary in the *shared* convention ``ΔW = s·B·A``
(DESIGN.md §1), whatever PEFT scaling the config asks for: with PEFT scaling
``s_k`` for rank ``r_k`` the stored ``B`` is ``B_shared · s / s_k``.

Base weights of the adapted layers are rewritten from a pristine copy ``W0`` on every
change (``W = W0 + s Σ B_f A_f`` for folded factors), so nothing drifts across clients.

The model may live on any device; factors and head tensors leave this module as CPU fp32.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import Tensor, nn
from transformers import PreTrainedModel

from fedrank.config import ConfigError
from fedrank.export import CARD

Factors = dict[str, tuple[Tensor, Tensor]]

# PEFT still calls a transformers API that warns on every adapter: noise for our users, not theirs to fix.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

# PEFT alpha for a rank-r adapter so that its scaling alpha/r (or alpha/√r for rslora) is known.
SCALINGS = ("shared", "alpha_over_r", "rslora")


def peft_scaling(policy: str, scale: float, rank: int, global_rank: int) -> float:
    """PEFT's effective scaling ``s_k`` of a rank-``rank`` adapter under a scaling policy."""
    if policy == "shared":
        return scale
    if policy == "alpha_over_r":  # one alpha = s·R for every rank, PEFT divides by r
        return scale * global_rank / rank
    if policy == "rslora":  # one alpha = s·√R for every rank, rsLoRA divides by √r
        return scale * math.sqrt(global_rank / rank)
    raise ConfigError(f"unknown model.scaling `{policy}`: use one of {', '.join(SCALINGS)}")


def linear_module_names(model: nn.Module) -> list[str]:
    """The distinct names (last component) of the model's Linear modules: what ``model.target_modules`` can name."""
    return sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, nn.Linear)})


def default_lora_targets(model: PreTrainedModel) -> list[str]:
    """PEFT's default LoRA targets for the model's architecture (``config.model_type``)."""
    model_type = getattr(model.config, "model_type", None)
    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if not targets:
        raise ConfigError(f"PEFT has no default LoRA targets for model type `{model_type}`: set model.target_modules "
                          f"to some of its Linear modules ({', '.join(linear_module_names(model))})")
    return list(targets)


def _to_cpu(t: Tensor) -> Tensor:
    """A detached CPU fp32 copy: what crosses the wire whatever the model's device."""
    return t.detach().to("cpu", torch.float32, copy=True)


def lora_config(rank: int, scale: float, target_modules: Sequence[str], dropout: float,
                policy: str = "shared", global_rank: int | None = None, **extra) -> LoraConfig:
    """A PEFT LoraConfig whose scaling is ``peft_scaling(policy, ...)`` for this rank."""
    use_rslora = policy == "rslora"
    scaling = peft_scaling(policy, scale, rank, global_rank or rank)
    alpha = scaling * (math.sqrt(rank) if use_rslora else rank)
    return LoraConfig(r=rank, lora_alpha=alpha, use_rslora=use_rslora, target_modules=list(target_modules),
                      lora_dropout=dropout, **extra)


class AdaptedModel:
    """One base model with per-rank PEFT LoRA adapters and a trainable head shared by all clients."""

    def __init__(self, model: PreTrainedModel, target_modules: Sequence[str], head_modules: Sequence[str],
                 scale: float, scaling: str, dropout: float, global_rank: int, task_type: str | None = None,
                 frozen_dtype: torch.dtype | None = None) -> None:
        self.scale, self.scaling, self.dropout, self.task_type = scale, scaling, dropout, task_type
        self.target_modules, self.global_rank = list(target_modules), global_rank
        peft_scaling(scaling, scale, 1, 1)  # validate the policy name early
        self.head_names = [n for n, _ in model.named_parameters() if any(f".{h}." in f".{n}" for h in head_modules)]
        names = [n for n, _ in model.named_modules()]
        missing = [t for t in self.target_modules if not any(n == t or n.endswith(f".{t}") for n in names)]
        if missing:
            raise ConfigError(f"model.target_modules {missing} not found in the model: its Linear modules are "
                              f"{', '.join(linear_module_names(model))}")
        try:
            self.peft: PeftModel = get_peft_model(model, self._config(1), adapter_name="r1")
        except ValueError as err:
            raise ConfigError(f"cannot apply LoRA to model.target_modules={self.target_modules}: {err}") from None
        self.layers: dict[str, nn.Module] = {
            name.removeprefix("base_model.model."): mod
            for name, mod in self.peft.named_modules() if hasattr(mod, "lora_A") and hasattr(mod, "base_layer")
        }
        self.shapes = {name: tuple(mod.base_layer.weight.shape) for name, mod in self.layers.items()}
        self.W0 = {name: mod.base_layer.weight.detach().clone() for name, mod in self.layers.items()}
        self.params = dict(self.peft.named_parameters())
        self.head_params = {n: self.params[f"base_model.model.{n}"] for n in self.head_names}
        self._folded = False
        self.rank = 1
        if frozen_dtype is not None:
            self._store_frozen_linears(frozen_dtype)

    def _store_frozen_linears(self, dtype: torch.dtype) -> None:
        """Store the frozen base's Linear weights in ``dtype`` (the autocast dtype).

        Autocast casts every Linear weight to its dtype before each matmul anyway, so storing them cast gives the
        same arithmetic without the per-step cast.  LoRA factors, the head and the pristine ``W0`` stay fp32, and so
        does a Linear tied to an embedding table (e.g. a causal LM's ``lm_head``): casting it would cast the
        embeddings, and with them the whole residual stream, whose elementwise ops are slow in bf16 on CPUs.
        """
        keep = ({id(m.weight) for m in self.peft.modules() if isinstance(m, nn.Embedding)}
                | {id(p) for p in self.head_params.values()})
        for name, mod in self.peft.named_modules():
            if isinstance(mod, nn.Linear) and "lora_" not in name and id(mod.weight) not in keep:
                mod.to(dtype)

    @property
    def head_modules(self) -> list[str]:
        """The modules whose parameters form the trained head (e.g. ``["classifier"]``)."""
        return sorted({n.rsplit(".", 1)[0] for n in self.head_names})

    def _config(self, rank: int) -> LoraConfig:
        return lora_config(rank, self.scale, self.target_modules, self.dropout, self.scaling, self.global_rank)

    def _factor_ratio(self, rank: int) -> float:
        """``s / s_k``: multiply shared-convention B by this to get PEFT's stored B."""
        return self.scale / peft_scaling(self.scaling, self.scale, rank, self.global_rank)

    # ----------------------------------------------------------------- adapters and factors

    def use_rank(self, rank: int) -> None:
        """Activate the rank-``rank`` adapter, creating it on first use."""
        name = f"r{rank}"
        if name not in self.peft.peft_config:
            self.peft.add_adapter(name, self._config(rank))
            for mod in self.layers.values():  # PEFT creates new factors in the base weight's dtype
                mod.lora_A[name].float()
                mod.lora_B[name].float()
            self.params = dict(self.peft.named_parameters())
        self.peft.set_adapter(name)
        self.rank = rank

    def set_factors(self, factors: Factors) -> None:
        """Load shared-convention factors (rank = the active rank) into the active adapter."""
        name, ratio = f"r{self.rank}", self._factor_ratio(self.rank)
        with torch.no_grad():
            for layer, (A, B) in factors.items():
                mod = self.layers[layer]
                mod.lora_A[name].weight.copy_(A)
                mod.lora_B[name].weight.copy_(B * ratio)

    def get_factors(self) -> Factors:
        """The active adapter's factors in the shared convention (CPU fp32 copies)."""
        name, ratio = f"r{self.rank}", self._factor_ratio(self.rank)
        return {layer: (_to_cpu(mod.lora_A[name].weight), _to_cpu(mod.lora_B[name].weight) / ratio)
                for layer, mod in self.layers.items()}

    def trainable(self, train_A: bool = True, train_head: bool = True) -> tuple[list[Tensor], list[Tensor]]:
        """Mark exactly the active adapter's factors (B, and A unless ``train_A`` is False) and the head (unless
        ``train_head`` is False) trainable; return the (lora, head) params that train."""
        name = f"r{self.rank}"
        for p in self.peft.parameters():
            p.requires_grad_(False)
        lora = [mod.lora_B[name].weight for mod in self.layers.values()]
        if train_A:
            lora += [mod.lora_A[name].weight for mod in self.layers.values()]
        head = list(self.head_params.values()) if train_head else []
        for p in lora + head:
            p.requires_grad_(True)
        return lora, head

    # ----------------------------------------------------------------- head

    def get_head(self) -> dict[str, Tensor]:
        """The head's parameters (CPU fp32 copies)."""
        return {n: _to_cpu(p) for n, p in self.head_params.items()}

    def set_head(self, head: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for n, t in head.items():
                self.head_params[n].copy_(t)

    # ----------------------------------------------------------------- base weights

    def set_base(self, fold: Factors | None) -> None:
        """``W = W0 + s·B_f·A_f`` for folded factors, or ``W = W0`` when ``fold`` is None."""
        if fold is None and not self._folded:
            return
        with torch.no_grad():
            for layer, mod in self.layers.items():
                W = self.W0[layer].clone()
                if fold is not None and layer in fold and fold[layer][0].shape[0] > 0:
                    A, B = fold[layer]
                    W.add_(B.to(W) @ A.to(W), alpha=self.scale)
                mod.base_layer.weight.copy_(W)
        self._folded = fold is not None

    @contextmanager
    def merged(self, factors: Factors) -> Iterator[PreTrainedModel]:
        """The base model with ``W0 + s·B·A`` merged densely and adapters off, for evaluation."""
        self.set_base(factors)
        try:
            with self.peft.disable_adapter():
                yield self.peft
        finally:
            self.set_base(None)

    # ----------------------------------------------------------------- export

    def export(self, folder: Path, factors: Factors, head: dict[str, Tensor],
               fresh_base: Callable[[], PreTrainedModel]) -> None:
        """Save the global adapter with PEFT's own ``save_pretrained`` (adapter_config.json +
        adapter_model.safetensors) on a fresh CPU copy of the base model, so the files are CPU fp32
        whatever the training device.

        Rank = the largest layer rank (smaller layers are zero-padded: ``B·A`` unchanged); the task
        head travels as ``modules_to_save`` (none for causal LMs, whose adapter has PEFT task_type
        CAUSAL_LM).  Load it with ``PeftModel.from_pretrained(base, folder)``.  The base model's
        training card (``fedrank.export.CARD``), if it has one, becomes the folder's README.md.
        """
        rank = max(1, max(A.shape[0] for A, _ in factors.values()))
        extra = {"task_type": self.task_type} if self.task_type else {}
        config = lora_config(rank, self.scale, self.target_modules, 0.0, "shared",
                             modules_to_save=self.head_modules or None, **extra)
        base = fresh_base().cpu()
        card = getattr(base, CARD, None)
        peft = get_peft_model(base, config)
        params = dict(peft.named_parameters())
        with torch.no_grad():
            for layer, (A, B) in factors.items():
                mod = dict(peft.named_modules())[f"base_model.model.{layer}"]
                mod.lora_A["default"].weight.zero_()[: A.shape[0]] = A
                mod.lora_B["default"].weight.zero_()[:, : B.shape[1]] = B
            for name, t in head.items():
                module, leaf = name.rsplit(".", 1)
                params[f"base_model.model.{module}.modules_to_save.default.{leaf}"].copy_(t)
        if card:  # PEFT's save_pretrained adds its metadata to an existing README.md
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "README.md").write_text(card)
        peft.save_pretrained(str(folder), save_embedding_layers=False)  # LoRA never trains embeddings
