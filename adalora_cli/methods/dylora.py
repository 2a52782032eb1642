"""DyLoRA (Valipour et al., EACL 2023, arXiv:2210.07558): one training run, an adapter usable at any rank.

    h = W0 x + (alpha / b) * B[:, :b] A[:b, :] x        b ~ Uniform{r_min, ..., r_max}, one b per step

Every optimizer step draws one rank b for all layers; the forward uses the first b components with scale
alpha / b. Two modes, named as in the paper (Section 3.3, Table 4):
- `nonfrozen` (the default) trains all of components 1..b at a step drawn at rank b. This is the mode of the
  paper's headline "DyLoRA" rows (Table 2), and it beats frozen in every ablation of Table 4 (RoBERTa-base, mean
  of six GLUE tasks: rank 8 84.47 vs 83.31, rank 1 83.30 vs 81.61).
- `frozen` trains only component b that step, the first b - 1 being held as trained: cheaper per step, and the
  mode the official training loop happens to call, but not the one the paper's tables report.
(`full`, this tool's earlier name for `nonfrozen`, is still accepted, with a deprecation note in the log.)
After training, the adapter truncated to any b <= r_max is a valid LoRA adapter (`adalora eval --rank b`,
`--rank-sweep`, `export-adapter --rank b`).

The rank draws come from a generator seeded with the run's seed, so every DDP process draws the same ranks
and a resumed run continues the same sequence (the generator state is checkpointed).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adalora_cli.budget import Target, largest_uniform_rank
from adalora_cli.errors import UserError
from adalora_cli.methods.registry import register_method
from adalora_cli.methods.base import AdapterLinear, Allocator, LoraFactors, Method, MethodConfig, RankPlan

MODES = ("nonfrozen", "frozen")
DEPRECATED_MODES = {"full": "nonfrozen"}  # earlier name -> the paper's
logger = logging.getLogger("adalora_cli")


@dataclass
class DyLoraConfig(MethodConfig):
    r_max: int | None = None  # largest rank; default: the largest uniform rank that fits --budget (8 without one)
    r_min: int = 1  # smallest rank drawn during training
    alpha: float = 8.0  # numerator of the scale alpha / b (measured for non-frozen training: docs/methods.md)
    mode: str = "nonfrozen"  # nonfrozen: components 1..b learn at a step drawn at rank b; frozen: only b learns
    seed: int | None = None  # seed of the rank draws; default: the run's seed

    def validate(self) -> None:
        super().validate()
        if self.mode in DEPRECATED_MODES:
            _note_deprecated_mode(self.mode)
            self.mode = DEPRECATED_MODES[self.mode]
        if self.mode not in MODES:
            raise UserError(f"dylora.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.r_min < 1:
            raise UserError(f"dylora.r_min must be at least 1, got {self.r_min}")
        if self.r_max is not None and self.r_max < self.r_min:
            raise UserError(f"dylora.r_max={self.r_max} is below dylora.r_min={self.r_min}; raise r_max")


@functools.cache
def _note_deprecated_mode(mode: str) -> None:
    logger.warning("dylora.mode=%s is the earlier name of %s (the paper's name); it trains the same, and the run's "
                   "config saves the new name", mode, DEPRECATED_MODES[mode])


class DyLoraLinear(AdapterLinear):
    """A LoRA layer of rank r_max whose forward uses only the first `active_rank` components."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, mode: str = "nonfrozen"):
        super().__init__(base, alpha / rank, dropout)
        self.alpha = float(alpha)
        self.mode = mode
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **self._factory()))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **self._factory()))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.active_rank = rank

    @property
    def r_max(self) -> int:
        return self.lora_A.shape[0]

    def set_rank(self, b: int) -> None:
        if not 1 <= b <= self.r_max:
            raise UserError(f"rank {b} is outside 1..{self.r_max} (the run's r_max); choose a rank in that range")
        self.active_rank = b
        self.scaling = self.alpha / b

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.active_rank
        A, B = self.lora_A[:b], self.lora_B[:, :b]
        if self.mode == "frozen" and self.training and b > 1:
            # Only the b-th component learns this step; the nested ones below it stay as trained.
            A = torch.cat([A[: b - 1].detach(), A[b - 1 :]])
            B = torch.cat([B[:, : b - 1].detach(), B[:, b - 1 :]], dim=1)
        return A, B


    @property
    def rank(self) -> int:
        return self.r_max  # everything is kept: any rank up to r_max can be used after training

    def to_lora(self) -> LoraFactors:
        b = self.active_rank
        return LoraFactors(self.lora_B.detach()[:, :b], self.lora_A.detach()[:b], self.alpha / b)

    def compact_state(self) -> dict[str, torch.Tensor]:
        return {"lora_A": self.lora_A.detach(), "lora_B": self.lora_B.detach()}


def plan_nested(targets: list[Target], budget: int | None, cfg: DyLoraConfig) -> RankPlan:
    if budget is None:
        r_max = cfg.r_max or 8
    else:
        r_max = largest_uniform_rank(targets, budget)
        if cfg.r_max is not None:
            if cfg.r_max > r_max:
                raise UserError(f"dylora.r_max={cfg.r_max} does not fit --budget {budget:,} (at most {r_max}); "
                                "lower r_max or raise the budget")
            r_max = cfg.r_max
    if cfg.r_min > r_max:
        raise UserError(f"dylora.r_min={cfg.r_min} is above r_max={r_max}; lower r_min or raise the budget")
    return RankPlan({t.name: r_max for t in targets}, budget, notes={"r_max": r_max, "r_min": cfg.r_min})


def make_layer(base: nn.Linear, rank: int, scaling: float, cfg: DyLoraConfig) -> DyLoraLinear:
    # The scale follows the active rank (alpha / b); `scaling` is only the value at r_max.
    return DyLoraLinear(base, rank, cfg.alpha, cfg.dropout, cfg.mode)


class RankSampler(Allocator):
    """Draws the rank of the next optimizer step, the same for all layers."""

    def __init__(self, layers: dict[str, DyLoraLinear], cfg: DyLoraConfig, plan: RankPlan, total_steps: int):
        self.layers = list(layers.values())
        self.r_min, self.r_max = cfg.r_min, plan.notes["r_max"]
        # Built at train begin, right after the Trainer seeded torch with the run's seed on every process.
        seed = cfg.seed if cfg.seed is not None else torch.initial_seed()
        self.generator = torch.Generator().manual_seed(seed)
        self.draws: list[int] = []
        self._draw()  # the rank of step 0

    def _draw(self) -> None:
        b = int(torch.randint(self.r_min, self.r_max + 1, (1,), generator=self.generator))
        self.draws.append(b)
        for layer in self.layers:
            layer.set_rank(b)

    def step(self, t: int) -> None:
        self._draw()

    def finalize(self) -> None:
        for layer in self.layers:
            layer.set_rank(self.r_max)  # evaluate and save at full rank unless asked otherwise

    @contextlib.contextmanager
    def evaluation_view(self):
        """The adapter at r_max, as it is saved; the rank drawn for the current step comes back afterwards."""
        for layer in self.layers:
            layer.set_rank(self.r_max)
        try:
            yield
        finally:
            for layer in self.layers:
                layer.set_rank(self.draws[-1])

    def log_values(self) -> dict[str, float]:
        return {"rank": self.draws[-1]}

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "draws": list(self.draws)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.draws = list(state["draws"])
        for layer in self.layers:
            layer.set_rank(self.draws[-1])


register_method(
    Method(
        name="dylora",
        summary="DyLoRA: one rank drawn per step, the adapter works at any rank up to r_max afterwards",
        config_cls=DyLoraConfig,
        default_lr=1e-3,  # measured for non-frozen training (docs/methods.md, "How the defaults were chosen")
        plan=plan_nested,
        make_layer=make_layer,
        initial_scaling=lambda rank, cfg: cfg.alpha / rank,
        make_allocator=RankSampler,
        needs_allocator=True,
        any_rank=True,
    )
)
