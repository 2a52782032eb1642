"""PRILoRA (Benedek & Wolf, Findings of EACL 2024, arXiv:2401.11316): ranks rising with depth, A pruned by
weight x input statistics.

    h = W0 x + (alpha / r_l) * B A x,     r_l = round(r_first + (r_last - r_first) * l / (L - 1))

- Rank plan: layer l of L gets r_l, rising linearly (paper: 4 -> 12 on DeBERTaV3-base). Under a budget,
  r_first and r_last are scaled by the largest common factor whose dense adapter fits.
- Pruning: every `prune_interval` optimizer steps, the lowest-scoring `prune_ratio` of each row of A is
  zeroed, with score_ij = |A_ij| * xbar_j and xbar_j an exponential moving average of the L2 norm of
  input feature j seen by that layer. Pruned entries may grow back in later steps; the next prune decides
  again, and a last prune at the end of training leaves the saved A with exactly that sparsity.

Choices the paper leaves open, made here on purpose:
- The input norms are accumulated over all micro-batches of an optimizer step (sum of squares, summed over
  DDP processes) and folded into the EMA once per step, so gradient accumulation and the number of
  processes do not change the statistics; recomputation under gradient checkpointing scales every feature
  of a layer alike and so leaves each row's ranking unchanged. Padding tokens are counted (the hook does
  not see the attention mask).
- prune_ratio and prune_interval defaults were chosen by measurement (README, "PRILoRA defaults").
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adalora_cli.budget import Target, check_capacity, component_cost, format_count
from adalora_cli.errors import UserError
from adalora_cli.methods.registry import register_method
from adalora_cli.methods.base import Allocator, Method, MethodConfig, RankPlan
from adalora_cli.methods.lora import LoraLinear


@dataclass
class PriLoraConfig(MethodConfig):
    r_first: float = 4.0  # rank of the first layer (scaled to fit --budget)
    r_last: float = 12.0  # rank of the last layer (scaled to fit --budget)
    prune_ratio: float = 0.5  # fraction of each row of A zeroed at every prune (README, "PRILoRA defaults")
    prune_interval: int = 50  # optimizer steps between prunes
    beta: float = 0.9  # EMA factor of the input-norm statistics

    def validate(self) -> None:
        super().validate()
        if not 0 < self.r_first <= self.r_last:
            raise UserError(f"prilora needs 0 < r_first <= r_last, got {self.r_first} and {self.r_last}")
        if not 0.0 <= self.prune_ratio < 1.0:
            raise UserError(f"prilora.prune_ratio must be in [0, 1), got {self.prune_ratio}")
        if self.prune_interval < 1:
            raise UserError(f"prilora.prune_interval must be at least 1, got {self.prune_interval}")
        if not 0.0 <= self.beta < 1.0:
            raise UserError(f"prilora.beta must be in [0, 1), got {self.beta}")


class PriLoraLinear(LoraLinear):
    """A LoRA layer that records the squared L2 norm of each input feature during training (forward hook)."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float, dropout: float = 0.0):
        super().__init__(base, rank, scaling, dropout)
        self.register_buffer("input_norm", torch.zeros(self.in_features, device=self.base.weight.device))  # xbar
        self.register_buffer("input_sq_sum", torch.zeros(self.in_features, device=self.base.weight.device),
                             persistent=False)  # this optimizer step's sum of x_j^2
        self.register_forward_pre_hook(_accumulate_input_norms)


def _accumulate_input_norms(layer: PriLoraLinear, args: tuple) -> None:
    if layer.training and torch.is_grad_enabled():
        x = args[0].detach()
        # squared column norms, accumulated in float32 even under bf16/fp16 autocast. Not linalg.vector_norm over
        # dim 0: on the CPU that strided reduction is 6 to 18 times slower (scripts/bench_speed.py, prilora)
        layer.input_sq_sum += x.reshape(-1, x.shape[-1]).float().square().sum(dim=0)


def linear_ranks(layers: list[int], r_first: float, r_last: float, scale: float = 1.0) -> dict[int, int]:
    """r_l = round(s*r_first + (s*r_last - s*r_first) * l / (L - 1)), at least 1, for layer indices 0..L-1."""
    depth = max(layers) + 1
    ranks = {}
    for layer in sorted(set(layers)):
        position = layer / (depth - 1) if depth > 1 else 0.5
        ranks[layer] = max(1, round(scale * (r_first + (r_last - r_first) * position)))
    return ranks


def plan_increasing(targets: list[Target], budget: int | None, cfg: PriLoraConfig) -> RankPlan:
    """Linearly increasing ranks; under a budget, the largest common scale whose dense adapter fits."""
    layer_of = [t.layer for t in targets]

    def cost(scale: float) -> int:
        ranks = linear_ranks(layer_of, cfg.r_first, cfg.r_last, scale)
        return sum(ranks[t.layer] * component_cost(t) for t in targets)

    scale = 1.0
    if budget is not None:
        if cost(0.0) > budget:  # every rank at its minimum of 1
            raise UserError(
                f"budget {budget:,} is below one rank per adapted matrix ({cost(0.0):,} parameters for "
                f"{len(targets)} matrices); raise --budget to at least {format_count(cost(0.0))}"
            )
        check_capacity(targets, budget)
        low, high = 0.0, 1.0
        while cost(high) <= budget:
            low, high = high, high * 2
        for _ in range(60):  # cost is a non-decreasing step function of the scale: bisect its last fitting value
            middle = (low + high) / 2
            low, high = (middle, high) if cost(middle) <= budget else (low, middle)
        scale = low
    by_layer = linear_ranks(layer_of, cfg.r_first, cfg.r_last, scale)
    ranks = {t.name: by_layer[t.layer] for t in targets}
    return RankPlan(ranks, budget, notes={"ranks_by_layer": by_layer, "scale": round(scale, 4)})


def make_layer(base: nn.Linear, rank: int, scaling: float, cfg: PriLoraConfig) -> PriLoraLinear:
    return PriLoraLinear(base, rank, scaling, cfg.dropout)


class InputNormPruner(Allocator):
    """Folds each step's input norms into the EMA and prunes every row of A on schedule."""

    def __init__(self, layers: dict[str, PriLoraLinear], cfg: PriLoraConfig, plan: RankPlan, total_steps: int):
        self.layers = list(layers.values())
        self.cfg = cfg
        self.prunes = 0

    @torch.no_grad()
    def update_statistics(self) -> None:
        """Fold this step's input norms into the EMA: xbar = beta xbar + (1 - beta) sqrt(sum of x_j^2)."""
        sums = [layer.input_sq_sum for layer in self.layers]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flat = torch.cat(sums)
            torch.distributed.all_reduce(flat)  # every process prunes from the same statistics
            sums = list(flat.split([s.numel() for s in sums]))
        norms = [layer.input_norm for layer in self.layers]
        torch._foreach_mul_(norms, self.cfg.beta)
        torch._foreach_add_(norms, torch._foreach_sqrt(sums), alpha=1 - self.cfg.beta)

    @torch.no_grad()
    def prune(self) -> None:
        for layer in self.layers:
            A = layer.lora_A
            drop = int(self.cfg.prune_ratio * A.shape[1])
            if drop == 0:
                continue
            score = A.abs() * layer.input_norm.view(1, -1)
            keep = torch.topk(score, A.shape[1] - drop, dim=1).indices
            mask = torch.zeros_like(A, dtype=torch.bool).scatter_(1, keep, True)
            A.masked_fill_(~mask, 0.0)
        self.prunes += 1

    def observe(self, t: int) -> None:
        self.update_statistics()

    def step(self, t: int) -> None:
        torch._foreach_zero_([layer.input_sq_sum for layer in self.layers])  # the next step sums afresh
        if (t + 1) % self.cfg.prune_interval == 0:
            self.prune()

    def finalize(self) -> None:
        self.prune()

    @contextlib.contextmanager
    def evaluation_view(self):
        """A as it would be saved now (pruned, as `finalize` leaves it); the training A comes back afterwards."""
        kept = [layer.lora_A.detach().clone() for layer in self.layers]
        prunes = self.prunes
        self.prune()
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([layer.lora_A for layer in self.layers], kept)
            self.prunes = prunes

    def nonzero_params(self) -> int:
        return sum(layer.nonzero_count() for layer in self.layers)

    def log_values(self) -> dict[str, float]:
        return {"nonzero_adapter_params": self.nonzero_params()}

    def state_dict(self) -> dict[str, Any]:
        return {"prunes": self.prunes, "input_sq_sum": [layer.input_sq_sum.clone() for layer in self.layers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prunes = state["prunes"]
        for layer, sq_sum in zip(self.layers, state["input_sq_sum"]):
            layer.input_sq_sum.copy_(sq_sum)


register_method(
    Method(
        name="prilora",
        summary="PRILoRA: ranks rising linearly with depth, A pruned by |weight| x input-norm EMA",
        config_cls=PriLoraConfig,
        default_lr=1e-3,
        plan=plan_increasing,
        make_layer=make_layer,
        initial_scaling=lambda rank, cfg: cfg.alpha / rank,
        make_allocator=InputNormPruner,
        needs_allocator=True,
        max_zero_stage=0,  # pruning edits A in place, which ZeRO's optimizer copy of the weights would undo
    )
)
