"""What every adapter method provides: a config, a rank plan, an adapter layer, optionally an allocator.

One file per method fills a `Method` record and registers it (see `methods/__init__.py`). The rest of
the package talks to methods only through this record, the `AdapterLinear` layer interface and the
`Allocator` interface below, so a new method needs no change anywhere else.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from adalora_cli.budget import Target
from adalora_cli.linear import linear_dims


@dataclass
class MethodConfig:
    """Hyper-parameters that every adapter method shares (set with `--set <method>.<key>=value`)."""

    alpha: float = 16.0  # numerator of the adapter scale alpha / r
    dropout: float = 0.0  # dropout on the adapter's input
    target_modules: list[str] | None = None  # regexes over module names; None: the architecture's preset

    def validate(self) -> None:
        """Raise UserError for values that cannot work; subclasses extend it."""
        from adalora_cli.errors import UserError

        if self.alpha <= 0:
            raise UserError(f"alpha must be positive, got {self.alpha}; set e.g. --set {self.section()}.alpha=16")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def section(cls) -> str:
        return cls.__name__.removesuffix("Config").lower()


@dataclass(frozen=True)
class RankPlan:
    """The rank each target starts training with, and the parameter budget it must end within."""

    ranks: dict[str, int]
    budget: int | None  # adapter parameters allowed at the end of training; None when no budget was given
    allocator_budget: int | None = None  # the allocator's final budget in its own unit (AdaLoRA: params or triplets)
    notes: dict[str, Any] = field(default_factory=dict)  # plan details worth logging (e.g. init_r, target_r)


@dataclass(frozen=True)
class DataInit:
    """What a data-driven method (`Method.from_data`) returns: the rank plan, the initial value of adapter tensors
    by target (`{"...query": {"lora_A": tensor}}`, each shaped as the layer's parameter of that name; tensors not
    named keep the layer's own initialisation) and the scale of every target."""

    plan: RankPlan
    initial: dict[str, dict[str, torch.Tensor]]
    scalings: dict[str, float]


@dataclass(frozen=True)
class LoraFactors:
    """An adapter as plain LoRA: delta W = scale * B @ A, with B (d_out x r) and A (r x d_in)."""

    B: torch.Tensor
    A: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta_weight(self) -> torch.Tensor:
        return (self.B @ self.A) * self.scale


class AdapterLinear(nn.Module):
    """A frozen linear layer (`nn.Linear`, or GPT-2's `Conv1D`) plus a low-rank update:
    y = base(x) + scaling * B (A dropout(x)).

    Subclasses define `factors` (the A and B the forward multiplies by), `to_lora` (the final adapter as
    plain factors), `compact_state` (the tensors to save: only what is kept) and `rank` (the rank kept).
    Adapter tensors are float32 whatever the base weights are: they are the master weights that the
    optimizer updates, and mixed precision is autocast, never half-precision parameters.
    """

    component_extra: ClassVar[int] = 0  # parameters per rank-1 component beyond d_in + d_out

    def __init__(self, base: nn.Linear, scaling: float, dropout: float):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.scaling = float(scaling)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None  # None: no identity call per forward

    @property
    def in_features(self) -> int:
        return linear_dims(self.base)[0]

    @property
    def out_features(self) -> int:
        return linear_dims(self.base)[1]

    @property
    def weight(self) -> torch.Tensor:
        # Some architectures read `.weight` of their projections (dtype checks); keep that working.
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        A, B = self.factors()
        h = F.linear(x if self.dropout is None else self.dropout(x), A)
        # One GEMM adds scaling * h B^T into the base output: no separate scale, product and sum kernels.
        return torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), B.t(),
                           alpha=self.scaling).view(out.shape)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of this forward: r x d_in and d_out x r."""
        raise NotImplementedError

    @property
    def rank(self) -> int:
        raise NotImplementedError

    def to_lora(self) -> LoraFactors:
        raise NotImplementedError

    def compact_state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def component_cost(self) -> int:
        """Parameters of one rank-1 component: a column of B, a row of A, and any extra (AdaLoRA's lambda)."""
        return self.in_features + self.out_features + self.component_extra

    def param_count(self) -> int:
        """Adapter parameters this layer holds at its kept rank."""
        return self.rank * self.component_cost()

    def nonzero_count(self) -> int:
        """Adapter parameters that are not exactly zero (pruned entries excluded)."""
        return sum(int(torch.count_nonzero(t)) for t in self.compact_state().values())

    def _factory(self) -> dict[str, Any]:
        return {"device": self.base.weight.device, "dtype": torch.float32}


class Allocator:
    """Changes the adapter between optimizer steps (pruning, rank sampling).

    Once per optimizer step, after `optimizer.step()` and before `zero_grad()`, with t the 0-based optimizer
    step, the training loop calls `observe(t)` and then `step(t)`. Gradients are still there and already
    all-reduced under DDP, so every process computes the same decision.

    `observe` folds the step's statistics (gradients, activations) into the allocator's state. It is not
    called for a step the optimizer skipped (fp16 loss scaling found inf/NaN gradients): those gradients are
    garbage, and one such step would poison moving averages for good. `step` acts on the schedule (mask,
    prune, draw the next rank) and is called for every step, skipped or not, so schedules stay aligned with
    the optimizer step count on every process.
    """

    def after_optimizer_step(self, t: int, skipped: bool = False) -> None:
        """The per-step entry point: `observe` (unless the optimizer skipped step t), then `step`."""
        if not skipped:
            self.observe(t)
        self.step(t)

    def observe(self, t: int) -> None:
        """Fold the statistics of optimizer step t into the allocator's state."""

    def step(self, t: int) -> None:
        raise NotImplementedError

    def finalize(self) -> None:
        """Called once when training ends: leave the adapter in the state that will be saved."""

    def at_final_budget(self) -> bool:
        """Whether the adapter now holds no more than the final budget (evaluations before that are not chosen)."""
        return True

    def evaluation_view(self):
        """A context in which the adapter is as it would be saved if training ended now (evaluation during
        training runs in it); the training state is restored on exit."""
        return contextlib.nullcontext()

    def log_values(self) -> dict[str, float]:
        """Numbers worth showing in the training log (budget, kept parameters)."""
        return {}

    def history(self) -> list[dict[str, float]]:
        """The budget and the kept parameters at each change, for the rank-allocation report."""
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@dataclass(frozen=True)
class Method:
    """A registered fine-tuning method.

    Attributes:
        name: registry name, used on the command line (`--method adalora`).
        summary: one line for `adalora methods`.
        config_cls: the method's hyper-parameter dataclass.
        default_lr: learning rate used when the user gives none (measured, see README).
        plan: (targets, budget, config) -> RankPlan; raises UserError when the budget cannot be met.
        make_layer: (base linear, rank, scaling, config) -> AdapterLinear.
        initial_scaling: (rank, config) -> the scale a freshly planned layer starts with.
        make_allocator: (layers by name, config, plan, total optimizer steps) -> Allocator, for methods
            that change the adapter during training.
        regulariser: (layers, config) -> a callable returning the extra loss term, or None.
        adapter: False for full fine-tuning, which trains the model's own weights.
        any_rank: the trained adapter can be used truncated to any rank (its layers have `set_rank`).
        max_zero_stage: the highest DeepSpeed ZeRO stage the method trains correctly under; 0 for allocators
            that read every gradient or edit weights in place (see `distributed.check_deepspeed`).
        takes_rank_plan: the method trains fixed per-target ranks given from outside (`--rank-plan`, see
            `rankplan.py`) in place of its own `plan`; rank 0 leaves a target unadapted.
        from_data: for methods whose ranks and initial adapter come from the data (EVA):
            (base model, targets, batches, budget, config) -> DataInit. The pipeline calls it after loading the
            pretrained model, before injecting adapters, with an endless iterator over training batches (collated
            by the task's collator, on the run's device, in a seeded order that is the same on every process and
            on every --resume; taking a few of them is the method's business), and then injects the adapters
            with the ranks, scales and tensors it returned. `plan` still runs first, before any model is loaded,
            to refuse a budget that cannot work. The pass must be deterministic: `--resume` runs it again.
    """

    name: str
    summary: str
    config_cls: type[MethodConfig]
    default_lr: float
    plan: Callable[[list[Target], int | None, Any], RankPlan] | None = None
    make_layer: Callable[[nn.Linear, int, float, Any], AdapterLinear] | None = None
    initial_scaling: Callable[[int, Any], float] | None = None
    make_allocator: Callable[[dict[str, AdapterLinear], Any, RankPlan, int], Allocator] | None = None
    regulariser: Callable[[list[AdapterLinear], Any], Callable[[], torch.Tensor]] | None = None
    needs_allocator: bool = False
    adapter: bool = True
    any_rank: bool = False
    max_zero_stage: int = 2
    takes_rank_plan: bool = False
    from_data: Callable[[nn.Module, list[Target], Iterator[dict[str, torch.Tensor]], int | None, Any],
                        DataInit] | None = None
