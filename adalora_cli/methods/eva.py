"""EVA, Explained Variance Adaptation (Paischer et al., 2024, arXiv:2410.07170): LoRA initialised from data.

Before training, a few training batches run through the frozen model. For each target W (d_out x d_in) an
incremental PCA of the layer's *input* activations (one row per non-padding token) is updated batch by batch
until its top components stop moving (cosine similarity between consecutive estimates >= tau). Then

    A = top right-singular vectors of the centred inputs (rank_t of them),   B = 0,
    h = W0 x + scale * B A x,                                                  training as plain LoRA.

Ranks come from pooling every matrix's components (at most rho x the uniform rank each) sorted by explained
variance ratio (ties broken as peft's sort breaks them) and keeping the best that fit. peft budgets in
components (n_targets * r); we budget in *parameters*: a component of target t costs d_in + d_out, and we keep
components in that order while they fit (a component that does not fit is passed over; a cheaper one further
down may still fit). When every target costs the same c and the budget is n * r * c, this keeps exactly peft's
n * r components, so the ranks are peft's (tests/test_eva.py). Targets fed the same input (BERT's q, k, v) share
one PCA, as in peft. Differences from peft: docs/methods.md, "EVA".

The numerics follow peft's `IncrementalPCA` (sklearn's algorithm, Ross et al. 2008): mean and variance in
float64, the first batch's SVD in float32, later ones in float64 (the mean-correction row), a randomized SVD
(Halko et al.; torch.svd_lowrank, 2k columns, 4 power iterations, seed 42 on every call) and sklearn's sign
rule (each component's largest entry positive). So A equals peft's to float rounding on the same batches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from itertools import islice
from typing import Iterator

import torch
from torch import nn

from adalora_cli.budget import Target, largest_uniform_rank
from adalora_cli.errors import UserError
from adalora_cli.methods.base import DataInit, Method, MethodConfig, RankPlan
from adalora_cli.methods.lora import LoraLinear
from adalora_cli.methods.registry import register_method

logger = logging.getLogger("adalora_cli")

SVD_SEED = 42  # the randomized SVD's seed, as peft's (results do not depend on the run's seed)
POWER_ITERATIONS = 4


@dataclass
class EvaConfig(MethodConfig):
    r: int = 8  # the uniform rank when no --budget is given (peft's r); with a budget, the largest that fits
    rho: float = 2.0  # a matrix gets at most round(rho * uniform rank) components (peft's rho; 1: no redistribution)
    tau: float = 0.99  # a component has converged when its cosine similarity to the previous batch's is >= tau
    max_batches: int = 100  # stop the data pass here even if some components have not converged (peft: no limit)
    whiten: bool = False  # divide each component by the square root of its singular value
    adjust_scaling_factors: bool = True  # scale alpha / uniform rank on every matrix, whatever its rank (peft's)
    label_mask: bool = False  # also leave out token positions whose label is -100 (labels shaped like the input)

    def validate(self) -> None:
        super().validate()
        if self.r < 1:
            raise UserError(f"eva.r must be at least 1, got {self.r}")
        if self.rho < 1:
            raise UserError(f"eva.rho must be at least 1 (1: no redistribution), got {self.rho}; "
                            "set e.g. --set eva.rho=2")
        if not 0.0 <= self.tau <= 1.0:
            raise UserError(f"eva.tau must be in [0, 1], got {self.tau}; set e.g. --set eva.tau=0.99")
        if self.max_batches < 2:
            raise UserError(f"eva.max_batches must be at least 2 (convergence compares two batches), "
                            f"got {self.max_batches}")


# -- incremental PCA ---------------------------------------------------------------------------------------

class IncrementalPCA:
    """The top `k` principal components of rows seen in batches (sklearn's IncrementalPCA, Ross et al. 2008):
    each step takes the SVD of [previous components scaled by their singular values; the centred batch; a row
    correcting for the moved mean], so memory is k + batch rows whatever the number of batches."""

    def __init__(self, k: int):
        self.k = k
        self.count = 0
        self.mean: torch.Tensor | None = None  # float64
        self.var: torch.Tensor | None = None  # float64, population variance of every feature
        self.components: torch.Tensor | None = None  # k x d
        self.singular_values: torch.Tensor | None = None
        self.explained_variance_ratio: torch.Tensor | None = None
        self.converged = torch.zeros(k, dtype=torch.bool)  # set from the second fit on

    def _moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Mean and variance of all rows seen including `x` (Chan et al.'s pairwise update), in float64."""
        n, total = x.shape[0], self.count + x.shape[0]
        batch_sum = x.sum(dim=0, dtype=torch.float64)
        deviation = x - batch_sum / n
        batch_ss = deviation.square().sum(dim=0, dtype=torch.float64) - \
            deviation.sum(dim=0, dtype=torch.float64).square() / n
        if self.mean is None:
            return batch_sum / total, batch_ss / total, total
        old_sum = self.mean * self.count
        ratio = self.count / n
        ss = self.var * self.count + batch_ss + ratio / total * (old_sum / ratio - batch_sum).square()
        return (old_sum + batch_sum) / total, ss / total, total

    def fit(self, x: torch.Tensor, tau: float) -> None:
        """Fold the rows of `x` (n x d) in; then mark the components whose cosine similarity to the previous
        estimate is at least `tau` (converged)."""
        x = x.float()
        mean, var, total = self._moments(x)
        if self.components is None:
            stacked = x - mean.float()  # the first batch stays float32 (as peft: same random draws)
        else:
            batch_mean = x.mean(dim=0)
            correction = ((self.count / total) * x.shape[0]) ** 0.5 * (self.mean - batch_mean)
            stacked = torch.vstack((self.singular_values.view(-1, 1) * self.components, x - batch_mean, correction))
        _, s, vt = _randomized_svd(stacked, self.k)
        previous = self.components
        self.count, self.mean, self.var = total, mean, var
        self.components, self.singular_values = vt[:self.k], s[:self.k]
        self.explained_variance_ratio = (s.square() / (var * total).sum())[:self.k]
        if previous is not None:
            self.converged = (nn.functional.cosine_similarity(self.components, previous) >= tau).cpu()

    def fitted(self) -> bool:
        return self.components is not None

    def converged_up_to(self, rank: int) -> bool:
        return bool(self.converged[:rank].all())


def _randomized_svd(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, V^T of `x` with 2k columns of oversampling, seeded, each row of V^T signed so that its
    largest-magnitude entry is positive (sklearn's rule: the signs do not depend on the SVD routine)."""
    with torch.random.fork_rng():  # seeded without moving the run's random streams
        torch.manual_seed(SVD_SEED)
        u, s, v = torch.svd_lowrank(x, q=2 * k, niter=POWER_ITERATIONS)
    vt = v.mH
    signs = torch.sign(vt[torch.arange(vt.shape[0]), vt.abs().argmax(dim=1)])
    return u * signs, s, vt * signs.view(-1, 1)


# -- the data pass -----------------------------------------------------------------------------------------

@dataclass
class _Group:
    """Targets whose inputs are identical (BERT's q, k, v): one PCA serves them all, as in peft."""

    members: list[str]
    first_inputs: torch.Tensor | None  # the first batch's rows, kept to compare and fit once the group is known
    pca: IncrementalPCA | None = None


@dataclass
class _Pass:
    """What the forward hooks see: the token mask of the current batch and, per group, the rows to fit."""

    tau: float
    mask: torch.Tensor | None = None
    groups: list[_Group] = field(default_factory=list)
    group_of: dict[str, _Group] = field(default_factory=dict)
    fitting: set[int] = field(default_factory=set)  # ids of the groups fitted in this forward
    skipped: set[str] = field(default_factory=set)


def token_mask(batch: dict[str, torch.Tensor], label_mask: bool) -> torch.Tensor | None:
    """Which token positions count: not padding (attention mask), and with `label_mask` not labelled -100
    when the labels are per token. A per-sequence label (classification) never masks tokens."""
    mask = batch.get("attention_mask")
    if mask is None:
        return None
    mask = mask.bool()
    labels = batch.get("labels")
    if label_mask and labels is not None and labels.shape == mask.shape:
        mask = mask & (labels != -100)
    return mask


def _rows(layer_input: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The layer's input as one row per counted token: padding left out where the mask fits the input."""
    if mask is not None and layer_input.dim() == 3 and layer_input.shape[:2] == mask.shape:
        return layer_input[mask]
    return layer_input.reshape(-1, layer_input.shape[-1])


def _hook(state: _Pass, name: str):
    def record(module, inputs, output):
        x = _rows(inputs[0] if isinstance(inputs, tuple) else inputs, state.mask)
        group = state.group_of.get(name)
        if group is None:  # the first batch: find the group of identical inputs
            group = next((g for g in state.groups if g.first_inputs is not None
                          and g.first_inputs.shape == x.shape and torch.equal(g.first_inputs, x)), None)
            if group is None:
                group = _Group([], x.detach().clone())
                state.groups.append(group)
            group.members.append(name)
            state.group_of[name] = group
        elif id(group) in state.fitting and group.members[0] == name:
            _fit(group, x, name, state)
    return record


def _fit(group: _Group, x: torch.Tensor, name: str, state: _Pass) -> None:
    if x.shape[0] < group.pca.k:  # too few tokens to estimate k components from this batch (peft skips it too)
        state.skipped.add(name)
        return
    group.pca.fit(x, state.tau)


def collect_components(model: nn.Module, targets: list[Target], batches: Iterator[dict[str, torch.Tensor]],
                       max_ranks: dict[str, int], distribute, cfg: EvaConfig) -> tuple[dict[str, _Group], dict, int]:
    """Run batches through the model until every target's components up to its current rank have converged.

    `distribute(ratios by target, groups of identical inputs) -> ranks` is called after every batch (as peft
    does: the ranks needed decide which components must converge). Returns each target's group, the final ranks
    and the number of batches used.
    """
    state = _Pass(cfg.tau)
    handles = [model.get_submodule(t.name).register_forward_hook(_hook(state, t.name))
               for t in targets]
    training = model.training
    model.eval()
    used, ranks = 0, dict(max_ranks)
    try:
        with torch.no_grad():
            for batch in islice(batches, cfg.max_batches):
                if state.groups and all(_group_done(g, ranks) for g in state.groups):
                    break
                state.mask = token_mask(batch, cfg.label_mask)
                state.fitting = {id(g) for g in state.groups if not _group_done(g, ranks)}
                model(**batch)  # labels too: an encoder-decoder model builds its decoder's inputs from them
                used += 1
                if used == 1:
                    _start_groups(state, max_ranks)
                if all(g.pca.fitted() for g in state.groups):
                    ranks = distribute({name: state.group_of[name].pca.explained_variance_ratio
                                        for name in max_ranks}, [g.members for g in state.groups])
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)
    if state.skipped:
        logger.warning("eva: some batches had fewer tokens than components for %s; they were skipped there",
                       ", ".join(sorted(state.skipped)))
    if not all(g.pca.fitted() for g in state.groups):
        raise UserError("eva: no batch had enough tokens to estimate the components; raise --batch-size or lower "
                        "eva.rho")
    late = [m for g in state.groups if not _group_done(g, ranks) for m in g.members]
    if late:
        logger.warning("eva: after %d batches, the components of %d target(s) had not converged (tau %s); using "
                       "them as they are (raise eva.max_batches to wait longer)", used, len(late), cfg.tau)
    return state.group_of, ranks, used


def _start_groups(state: _Pass, max_ranks: dict[str, int]) -> None:
    """After the first batch: one PCA per group of identical inputs, fitted on that batch."""
    for group in state.groups:
        k = max(max_ranks[m] for m in group.members)
        group.pca = IncrementalPCA(k)
        x, group.first_inputs = group.first_inputs, None
        _fit(group, x, group.members[0], state)


def _group_done(group: _Group, ranks: dict[str, int]) -> bool:
    """Whether the group's components up to the largest rank any member now needs have converged."""
    if group.pca is None:
        return False
    needed = max(ranks[m] for m in group.members)
    return needed == 0 or (group.pca.fitted() and group.pca.converged_up_to(needed))


# -- ranks under the parameter budget ----------------------------------------------------------------------

def uniform_rank(targets: list[Target], budget: int | None, cfg: EvaConfig) -> int:
    return cfg.r if budget is None else largest_uniform_rank(targets, budget)


def max_ranks_for(targets: list[Target], rank: int, rho: float) -> dict[str, int]:
    """At most round(rho * uniform rank) components per matrix (peft's rule), and never above min(d_in, d_out)."""
    return {t.name: min(round(rank * rho), t.d_in, t.d_out) for t in targets}


def distribute_ranks(targets: list[Target], ratios: dict[str, torch.Tensor], max_ranks: dict[str, int],
                     budget: int | None, components: int, groups: list[list[str]] | None = None) -> dict[str, int]:
    """Ranks from components pooled over targets, highest explained variance ratio first. With a parameter
    budget: keep each while its d_in + d_out still fits; without: the first `components` (peft's n_targets * r).

    Targets with identical inputs (`groups`, the first of each the one whose PCA serves the group) have exactly
    equal ratios. Those ties are broken as peft breaks them, so that the ranks are peft's: the pool is laid out
    as peft lays it out (the first of every group in module order, then the others group by group) and ordered
    by `torch.argsort(descending=True)`, which is not stable; then the first of a group gets the largest rank
    of its group (peft swaps ranks; we swap only between targets of equal cost, which leaves the budget as is).
    """
    groups = groups or [[t.name] for t in targets]
    layout = [g[0] for g in groups] + [name for g in groups for name in g[1:]]
    cost = {t.name: t.d_in + t.d_out for t in targets}
    pieces = [ratios[name][:max_ranks[name]] for name in layout]
    owners = [name for name, piece in zip(layout, pieces) for _ in range(len(piece))]
    order = torch.argsort(torch.cat(pieces), descending=True).tolist()
    ranks = {t.name: 0 for t in targets}
    left = budget
    for index in order if budget is not None else order[:components]:
        name = owners[index]
        if left is not None:
            if cost[name] > left:
                continue
            left -= cost[name]
        ranks[name] += 1
    for first, *others in groups:
        for name in others:
            if ranks[name] > ranks[first] and cost[name] == cost[first]:
                ranks[first], ranks[name] = ranks[name], ranks[first]
    return ranks


def plan(targets: list[Target], budget: int | None, cfg: EvaConfig) -> RankPlan:
    """The budget check before any model is loaded: the uniform rank the budget allows, and each matrix's ceiling.
    The ranks themselves come from the data (`from_data`)."""
    rank = uniform_rank(targets, budget, cfg)
    return RankPlan(ranks={t.name: rank for t in targets}, budget=budget,
                    notes={"uniform r": rank, "max r": round(rank * cfg.rho)})


def from_data(model: nn.Module, targets: list[Target], batches: Iterator[dict[str, torch.Tensor]],
              budget: int | None, cfg: EvaConfig) -> DataInit:
    """EVA's data pass: the ranks, and A of every target at its rank (B stays zero)."""
    rank = uniform_rank(targets, budget, cfg)
    max_ranks = max_ranks_for(targets, rank, cfg.rho)

    def distribute(ratios, groups):
        return distribute_ranks(targets, ratios, max_ranks, budget, rank * len(targets), groups)

    group_of, ranks, used = collect_components(model, targets, batches, max_ranks, distribute, cfg)
    initial, scalings = {}, {}
    for t in targets:
        if ranks[t.name] == 0:
            continue
        pca = group_of[t.name].pca
        a = pca.components[:ranks[t.name]].clone()
        if cfg.whiten:
            a /= pca.singular_values[:ranks[t.name]].sqrt().view(-1, 1)
        initial[t.name] = {"lora_A": a.float().cpu()}
        scalings[t.name] = cfg.alpha / (rank if cfg.adjust_scaling_factors else ranks[t.name])
    kept = sorted(ranks.values())
    notes = {"uniform r": rank, "max r": max(max_ranks.values()), "ranks": f"{kept[0]}..{kept[-1]}",
             "batches": used, "params": sum(ranks[t.name] * (t.d_in + t.d_out) for t in targets)}
    return DataInit(RankPlan(ranks=ranks, budget=budget, notes=notes), initial, scalings)


def make_layer(base: nn.Linear, rank: int, scaling: float, cfg: EvaConfig) -> LoraLinear:
    return LoraLinear(base, rank, scaling, cfg.dropout)


register_method(
    Method(
        name="eva",
        summary="EVA: LoRA initialised from the SVD of each target's inputs, ranks by explained variance",
        config_cls=EvaConfig,
        default_lr=1e-3,
        plan=plan,
        make_layer=make_layer,
        initial_scaling=lambda rank, cfg: cfg.alpha / rank,
        from_data=from_data,
    )
)
