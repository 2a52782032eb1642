"""AdaLoRA (Zhang et al., ICLR 2023, arXiv:2303.10512): adaptive budget allocation over SVD-like triplets.

    W = W0 + P diag(lambda) Q * alpha / r_init        P: d_out x r, lambda: r, Q: r x d_in

- lambda starts at zero, P and Q at N(0, 0.02^2), so the model starts equal to the base model.
- Orthogonality regulariser (Eq. 4): gamma * mean over matrices of ||P^T P - I||_F and ||Q Q^T - I||_F.
- Sensitivity (Eq. 8-10), for every entry w of P, lambda, Q after each optimizer step:
  I = |w * grad|, Ibar = b1 Ibar + (1 - b1) I, U = b2 U + (1 - b2) |I - Ibar|, s = Ibar * U.
- Triplet score (Eq. 11): S_i = s(lambda_i) + mean_j s(P_ji) + mean_j s(Q_ij).
- Cubic budget schedule (Eq. 12, App. A): b0 for the first t_init steps, then
  b(t) = bT + (b0 - bT) (1 - k / D)^3 applied every delta_t steps, k counting decay steps and
  D = T - t_init - t_final, then bT, re-applied every step, for the last t_final steps.

Departures from the paper, each on purpose:
- The budget counts parameters (a triplet of a d_out x d_in matrix costs d_in + d_out + 1), so matrices
  of different shapes compete fairly; the paper counts triplets. Give `target_r` without `--budget`
  to count triplets exactly as the paper does.
- The kept set is the best-scoring prefix that fits the budget (stable sort), so ties never prune more
  than asked; the reference code prunes everything at or below a k-th value threshold.
- The regulariser uses the unsquared Frobenius norm averaged over matrices, as the released code does
  (the paper prints it squared).
- Steps are 0-based optimizer steps; warm-up is exactly t_init steps.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from adalora_cli.budget import Target, check_capacity, component_cost, format_count
from adalora_cli.errors import UserError
from adalora_cli.methods.registry import register_method
from adalora_cli.methods.base import AdapterLinear, Allocator, LoraFactors, Method, MethodConfig, RankPlan

logger = logging.getLogger(__name__)

# When a step-based schedule does not fit the run, t_init + t_final are shrunk to this share of the run:
# the paper's GLUE tables spend 55-70% of training (0.65 on average) in warm-up plus final phase.
RESCALED_SHARE = 0.65


@dataclass
class AdaLoraConfig(MethodConfig):
    alpha: float = 32.0  # numerator of the scale alpha / r_init (measured: README, "How the defaults were chosen")
    init_r: int | None = None  # initial rank of every target; default: 1.5x the final average rank
    target_r: float | None = None  # paper-exact final average rank (budget in triplets), instead of --budget
    t_init: float = 0.1  # warm-up before pruning: steps if >= 1, else a fraction of the run
    t_final: float = 0.4  # final phase at the target budget: steps if >= 1, else a fraction of the run
    delta_t: float = 0.01  # steps between allocations during the decay: steps if >= 1, else a fraction
    beta1: float = 0.85  # EMA factor of the sensitivity
    beta2: float = 0.85  # EMA factor of the uncertainty
    orth_reg: float = 0.1  # gamma, weight of the orthogonality regulariser
    init_factor: float = 1.5  # init_r / final average rank when init_r is not given

    def validate(self) -> None:
        super().validate()
        if self.init_r is not None and self.init_r < 1:
            raise UserError(f"adalora.init_r must be at least 1, got {self.init_r}")
        if self.target_r is not None and self.target_r <= 0:
            raise UserError(f"adalora.target_r must be positive, got {self.target_r}")
        for key in ("t_init", "t_final", "delta_t"):
            value = getattr(self, key)
            if value < 0 or (value >= 1 and value != int(value)):
                raise UserError(f"adalora.{key} must be a whole number of steps or a fraction in [0, 1), got {value}")
        if self.delta_t == 0:
            raise UserError("adalora.delta_t must be positive")
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise UserError(f"adalora.{key} must be in [0, 1), got {getattr(self, key)}")
        if self.orth_reg < 0:
            raise UserError(f"adalora.orth_reg must be >= 0, got {self.orth_reg}")
        if self.init_factor < 1:
            raise UserError(f"adalora.init_factor must be >= 1, got {self.init_factor}")


class AdaLoraLinear(AdapterLinear):
    component_extra = 1  # the singular value lambda_i

    def __init__(self, base: nn.Linear, rank: int, scaling: float, dropout: float = 0.0):
        super().__init__(base, scaling, dropout)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **self._factory()))  # Q
        self.lora_E = nn.Parameter(torch.zeros(rank, 1, **self._factory()))  # lambda
        self.lora_B = nn.Parameter(torch.empty(self.out_features, rank, **self._factory()))  # P
        nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
        nn.init.normal_(self.lora_B, mean=0.0, std=0.02)
        self.register_buffer("kept", torch.ones(rank, dtype=torch.bool, device=self.base.weight.device))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A * self.lora_E, self.lora_B  # diag(lambda) Q: an r x d_in product, cheaper than r x tokens

    @property
    def rank(self) -> int:
        return int(self.kept.sum())

    def _kept_index(self) -> torch.Tensor:
        return self.kept.nonzero().view(-1)

    def to_lora(self) -> LoraFactors:
        idx = self._kept_index()
        B = self.lora_B.detach()[:, idx] * self.lora_E.detach()[idx].view(1, -1)
        return LoraFactors(B, self.lora_A.detach()[idx], self.scaling)

    def compact_state(self) -> dict[str, torch.Tensor]:
        idx = self._kept_index()
        return {
            "lora_A": self.lora_A.detach()[idx],
            "lora_E": self.lora_E.detach()[idx],
            "lora_B": self.lora_B.detach()[:, idx],
        }


def plan_adaptive(targets: list[Target], budget: int | None, cfg: AdaLoraConfig) -> RankPlan:
    """Initial rank of every target, and the final budget the allocator prunes down to."""
    per_rank = sum(component_cost(t, AdaLoraLinear.component_extra) for t in targets)
    if budget is not None and cfg.target_r is not None:
        raise UserError("give either --budget or adalora.target_r, not both")
    if budget is None:
        target_r = 8.0 if cfg.target_r is None else cfg.target_r
        init_r = cfg.init_r or max(1, math.ceil(cfg.init_factor * target_r))
        if target_r > init_r:
            raise UserError(f"adalora.target_r={target_r} exceeds adalora.init_r={init_r}; lower target_r")
        notes = {"init_r": init_r, "target_r": target_r, "unit": "triplets"}
        return RankPlan({t.name: init_r for t in targets}, None, round(target_r * len(targets)), notes)
    check_capacity(targets, budget, AdaLoraLinear.component_extra)
    average = budget / per_rank
    if average < 1:
        raise UserError(
            f"budget {budget:,} is below one rank per adapted matrix ({per_rank:,} parameters for "
            f"{len(targets)} matrices); raise --budget to at least {format_count(per_rank)}"
        )
    init_r = cfg.init_r or max(math.ceil(average), round(cfg.init_factor * average))
    if init_r * per_rank < budget:
        raise UserError(
            f"budget {budget:,} is above what the initial rank holds (adalora.init_r={init_r}: "
            f"{init_r * per_rank:,} parameters); raise adalora.init_r or lower --budget"
        )
    notes = {"init_r": init_r, "target_avg_rank": round(average, 3), "unit": "params"}
    return RankPlan({t.name: init_r for t in targets}, budget, budget, notes)


def make_layer(base: nn.Linear, rank: int, scaling: float, cfg: AdaLoraConfig) -> AdaLoraLinear:
    return AdaLoraLinear(base, rank, scaling, cfg.dropout)


class _GramPenalty(torch.autograd.Function):
    """sum_i ||Q_i Q_i^T - I||_F over same-shape r x d matrices Q_i, with its gradient 2 S_i Q_i / ||S_i||_F
    (S_i = Q_i Q_i^T - I, symmetric) computed in the same pass.

    Computing the gradient here, group by group, keeps autograd from running one small product per matrix in an
    order that mixes shapes: CPU BLAS libraries re-plan small products whenever the shape changes, which made this
    term cost 100-400 ms per step at DeBERTaV3-base's shape, against a few ms now. On a GPU each group is one
    batched product.
    """

    @staticmethod
    def forward(ctx, *Qs):
        with torch.no_grad():
            if Qs[0].is_cuda:
                M = torch.stack(Qs)
                S = torch.bmm(M, M.mT)
                S.diagonal(dim1=1, dim2=2).sub_(1)
                norms = torch.linalg.matrix_norm(S)
                grads = (2 * torch.bmm(S, M) / norms.clamp_min(1e-12).view(-1, 1, 1)).unbind()
            else:
                eye = torch.eye(Qs[0].shape[0], dtype=Qs[0].dtype)
                Ss = [Q @ Q.T - eye for Q in Qs]
                norms = torch.stack([torch.linalg.matrix_norm(S) for S in Ss])
                grads = [2 * (S @ Q) / max(float(n), 1e-12) for S, Q, n in zip(Ss, Qs, norms)]
        ctx.save_for_backward(*grads)
        return norms.sum()

    @staticmethod
    def backward(ctx, grad_output):
        return tuple(g * grad_output for g in ctx.saved_tensors)


def orthogonality_regulariser(layers: list[AdapterLinear], cfg: AdaLoraConfig) -> Callable[[], torch.Tensor] | None:
    """gamma * mean over the 2n matrices of ||P^T P - I||_F and ||Q Q^T - I||_F (unsquared, as released).

    Both terms are the r x r Gram matrix of a factor along its rank axis: Q = lora_A as it is, P = lora_B through
    its transpose (a view, never a copy). Factors of the same shape are handled together (`_GramPenalty`).
    """
    if cfg.orth_reg == 0 or not layers:
        return None
    groups: dict[tuple[str, tuple[int, ...]], list[nn.Parameter]] = {}
    for layer in layers:
        for name in ("lora_A", "lora_B"):
            param = getattr(layer, name)
            groups.setdefault((name, tuple(param.shape)), []).append(param)
    weight = cfg.orth_reg / (2 * len(layers))

    def regulariser() -> torch.Tensor:
        total = 0.0
        for (name, _), params in groups.items():
            total = total + _GramPenalty.apply(*(p if name == "lora_A" else p.T for p in params))
        return weight * total

    return regulariser


@dataclass(frozen=True)
class Schedule:
    """The cubic budget schedule over T optimizer steps (0-based t)."""

    total: int
    t_init: int
    t_final: int
    delta_t: int

    @property
    def decay_steps(self) -> int:
        return self.total - self.t_init - self.t_final

    def phase(self, t: int) -> str:
        if t < self.t_init:
            return "warmup"
        if t >= self.total - self.t_final:
            return "final"
        return "decay"

    def budget(self, t: int, b0: int, bT: int) -> tuple[int, bool]:
        """(scheduled budget, whether to prune at this step)."""
        phase = self.phase(t)
        if phase == "warmup":
            return b0, False
        if phase == "final":
            return bT, True
        k = t - self.t_init + 1  # decay steps done, 1..D
        left = 1.0 - k / self.decay_steps
        budget = bT + int((b0 - bT) * left**3)
        return budget, k % self.delta_t == 0 or k == self.decay_steps


def _to_steps(value: float, total: int) -> int:
    return int(value) if value >= 1 else round(value * total)


def resolve_schedule(cfg: AdaLoraConfig, total: int) -> Schedule:
    """Turn the configured schedule into steps of this run, rescaling (with a warning) when it does not fit."""
    t_init, t_final = _to_steps(cfg.t_init, total), _to_steps(cfg.t_final, total)
    delta_t = max(1, _to_steps(cfg.delta_t, total))
    if t_init + t_final >= total:
        factor = RESCALED_SHARE * total / (t_init + t_final)
        scaled = Schedule(total, round(t_init * factor), round(t_final * factor), max(1, round(delta_t * factor)))
        logger.warning(
            "the AdaLoRA schedule (t_init=%d, t_final=%d, delta_t=%d steps) does not fit this run of %d "
            "optimizer steps; rescaled to t_init=%d, t_final=%d, delta_t=%d",
            t_init, t_final, delta_t, total, scaled.t_init, scaled.t_final, scaled.delta_t,
        )
        return scaled
    return Schedule(total, t_init, t_final, delta_t)


class _ScoreGroup:
    """EMA storage for one parameter kind (P, lambda or Q) of layers that share a shape.

    The per-layer EMA tensors are views into one stacked tensor, so the per-step update runs as fused
    `_foreach` ops over the views and the triplet scores reduce a whole group in one op.
    """

    def __init__(self, kind: str, members: list[int], params: list[torch.Tensor], offsets: list[int]):
        self.kind = kind
        self.ipt = torch.zeros((len(members), *params[0].shape), dtype=params[0].dtype, device=params[0].device)
        self.unc = torch.zeros_like(self.ipt)
        rank = params[0].shape[1] if kind == "P" else params[0].shape[0]
        self.index = torch.stack([offsets[i] + torch.arange(rank) for i in members]).to(params[0].device)

    def scores(self) -> torch.Tensor:
        """This group's share of S_i, shaped like `index`: s(lambda_i), mean_j s(P_ji) or mean_j s(Q_ij)."""
        s = self.ipt * self.unc
        if self.kind == "P":
            return s.mean(dim=1)
        if self.kind == "Q":
            return s.mean(dim=2)
        return s.view(s.shape[0], -1)


class AdaLoraAllocator(Allocator):
    """Importance EMAs and budget masking over all AdaLoRA layers, as fused ops over cached tensor lists."""

    def __init__(self, layers: dict[str, AdaLoraLinear], cfg: AdaLoraConfig, plan: RankPlan, total_steps: int):
        self.names = list(layers)
        self.layers = list(layers.values())
        self.cfg = cfg
        self.schedule = resolve_schedule(cfg, total_steps)
        # Parameters ordered P (lora_B), lambda (lora_E), Q (lora_A) per layer: one flat list for _foreach ops.
        self.params = [p for layer in self.layers for p in (layer.lora_B, layer.lora_E, layer.lora_A)]
        self.lambdas = [layer.lora_E for layer in self.layers]
        self.kept = [layer.kept for layer in self.layers]
        self.sizes = [layer.lora_E.shape[0] for layer in self.layers]
        self._build_groups()
        device = self.params[0].device if self.params else torch.device("cpu")
        unit_params = plan.notes.get("unit") == "params"
        costs = [
            (layer.in_features + layer.out_features + layer.component_extra) if unit_params else 1
            for layer in self.layers
            for _ in range(layer.lora_E.shape[0])
        ]
        self.unit_costs = torch.tensor(costs, dtype=torch.int64, device=device)
        self.b0 = int(self.unit_costs.sum())
        self.bT = int(plan.allocator_budget)
        self.budget = self.b0
        self.frozen = False  # True once the final phase has fixed the kept set
        self._frozen_factors: list[torch.Tensor] = []
        self._history: list[dict[str, float]] = []
        self._record(0)

    def _build_groups(self) -> None:
        offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        by_key: dict[tuple, list[int]] = {}
        for i, layer in enumerate(self.layers):
            for kind, p in (("P", layer.lora_B), ("E", layer.lora_E), ("Q", layer.lora_A)):
                by_key.setdefault((kind, tuple(p.shape)), []).append(i)
        self.groups = []
        ipt_views: dict[tuple[int, str], torch.Tensor] = {}
        unc_views: dict[tuple[int, str], torch.Tensor] = {}
        for (kind, _), members in by_key.items():
            attr = {"P": "lora_B", "E": "lora_E", "Q": "lora_A"}[kind]
            group = _ScoreGroup(kind, members, [getattr(self.layers[i], attr) for i in members], offsets)
            self.groups.append(group)
            for row, i in enumerate(members):
                ipt_views[(i, kind)], unc_views[(i, kind)] = group.ipt[row], group.unc[row]
        order = [(i, kind) for i in range(len(self.layers)) for kind in ("P", "E", "Q")]
        self.ipt = [ipt_views[key] for key in order]  # Ibar, aligned with self.params
        self.unc = [unc_views[key] for key in order]  # U

    # -- importance -------------------------------------------------------------------------------
    @torch.no_grad()
    def update_importance(self) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        sensitivity = torch._foreach_mul(self.params, grads)
        torch._foreach_abs_(sensitivity)
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        torch._foreach_mul_(self.ipt, b1)
        torch._foreach_add_(self.ipt, sensitivity, alpha=1 - b1)
        torch._foreach_sub_(sensitivity, self.ipt)  # I - Ibar, with Ibar already updated
        torch._foreach_abs_(sensitivity)
        torch._foreach_mul_(self.unc, b2)
        torch._foreach_add_(self.unc, sensitivity, alpha=1 - b2)

    @torch.no_grad()
    def triplet_scores(self) -> torch.Tensor:
        """S_i for every triplet of every layer, concatenated in layer order."""
        scores = torch.zeros(sum(self.sizes), dtype=self.params[0].dtype, device=self.params[0].device)
        for group in self.groups:
            scores.index_add_(0, group.index.view(-1), group.scores().reshape(-1))
        return scores

    # -- masking ----------------------------------------------------------------------------------
    @torch.no_grad()
    def keep_mask(self, budget: int) -> torch.Tensor:
        """The best-scoring triplets whose total cost fits `budget` (a prefix of the stable ranking)."""
        order = torch.sort(self.triplet_scores(), descending=True, stable=True).indices
        fits = torch.cumsum(self.unit_costs[order], dim=0) <= budget
        keep = torch.zeros_like(fits)
        keep[order[fits]] = True
        return keep

    @torch.no_grad()
    def apply_mask(self, keep: torch.Tensor) -> None:
        torch._foreach_copy_(self.kept, list(keep.split(self.sizes)))
        factors = [k.view(-1, 1).to(self.lambdas[0].dtype) for k in keep.split(self.sizes)]
        torch._foreach_mul_(self.lambdas, factors)  # pruned lambda_i -> 0; P and Q keep training
        self._frozen_factors = factors

    @torch.no_grad()
    def _reapply_frozen_mask(self) -> None:
        if not self._frozen_factors:  # e.g. right after a resume
            self._frozen_factors = [k.view(-1, 1).to(self.lambdas[0].dtype) for k in self.kept]
        torch._foreach_mul_(self.lambdas, self._frozen_factors)

    # -- the per-step entry point -----------------------------------------------------------------
    def observe(self, t: int) -> None:
        if self.schedule.phase(t) != "final":  # the kept set is fixed in the final phase: no scores needed
            self.update_importance()

    def step(self, t: int) -> None:
        phase = self.schedule.phase(t)
        budget, prune = self.schedule.budget(t, self.b0, self.bT)
        if not prune:
            return
        self.budget = budget  # the budget in force: the one the last allocation applied
        if self.frozen:
            self._reapply_frozen_mask()  # pruned lambdas regrow between steps; the kept set is fixed
            return
        self.apply_mask(self.keep_mask(budget))
        self.frozen = phase == "final"
        self._record(t + 1)

    def finalize(self) -> None:
        """Leave exactly the final budget's triplets, even when the run ended outside the final phase."""
        if self.frozen:
            self._reapply_frozen_mask()
        else:
            self.apply_mask(self.keep_mask(self.bT))
            self.frozen = True
        self.budget = self.bT
        self._record(self.schedule.total)

    def at_final_budget(self) -> bool:
        return self.frozen  # from the first step of the final phase on, the kept set is the final budget's

    # -- reporting and state ----------------------------------------------------------------------
    def kept_ranks(self) -> list[int]:
        """Every layer's kept rank, read from the device in one transfer (not one host sync per layer)."""
        return torch.stack([kept.sum() for kept in self.kept]).tolist() if self.kept else []

    def kept_params(self) -> int:
        return sum(rank * layer.component_cost() for rank, layer in zip(self.kept_ranks(), self.layers))

    def _record(self, step: int) -> None:
        ranks = self.kept_ranks()
        entry = {"step": step, "budget": self.budget, "total_rank": sum(ranks),
                 "adapter_params": sum(rank * layer.component_cost() for rank, layer in zip(ranks, self.layers))}
        if not self._history or any(entry[k] != self._history[-1][k] for k in ("budget", "adapter_params")):
            self._history.append(entry)

    def log_values(self) -> dict[str, float]:
        return {"budget": self.budget, "adapter_params": self.kept_params()}

    def history(self) -> list[dict[str, float]]:
        return list(self._history)

    def state_dict(self) -> dict[str, Any]:
        return {
            "ipt": [t.clone() for t in self.ipt],
            "unc": [t.clone() for t in self.unc],
            "kept": [layer.kept.clone() for layer in self.layers],
            "budget": self.budget,
            "frozen": self.frozen,
            "history": self.history(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for dst, src in zip(self.ipt + self.unc, state["ipt"] + state["unc"]):
            dst.copy_(src)
        for layer, kept in zip(self.layers, state["kept"]):
            layer.kept.copy_(kept)
        self.budget, self.frozen = state["budget"], state["frozen"]
        self._frozen_factors = []
        self._history = list(state["history"])


register_method(
    Method(
        name="adalora",
        summary="AdaLoRA: SVD-like triplets pruned by importance along a cubic budget schedule",
        config_cls=AdaLoraConfig,
        default_lr=3e-3,
        plan=plan_adaptive,
        make_layer=make_layer,
        initial_scaling=lambda rank, cfg: cfg.alpha / rank,
        make_allocator=AdaLoraAllocator,
        regulariser=orthogonality_regulariser,
        needs_allocator=True,
        max_zero_stage=0,  # importance needs every gradient; masking edits weights in place
    )
)
