"""In-Squeeze: anneal the LoRA rank during one training run.

At each stage boundary (after the optimizer step and before the next forward) the live model's LoRA
layers are resized in place by :func:`lsq.live.resize_lora_`, and the optimizer keeps running with
the new parameters: the same optimizer object (so the learning-rate scheduler continues), its
parameter groups pointing at the new factors, and its state carried over or reset.

Carrying Adam's moments over ("project"). With ``dW = s B A`` and ``G = dL/dW``, the gradients are
``g_A = s B^T G`` and ``g_B = s G A^T``. The new factors are linear in the old ones,
``A' = M_a A`` and ``B' = B M_b`` (``M_a: (k, r)``, ``M_b: (r, k)``), so at the same ``G`` the new
gradients are exactly ``g_A' = (s'/s) M_b^T g_A`` and ``g_B' = (s'/s) g_B M_a^T``. The first moment,
an average of gradients, is mapped the same way. The second moment averages squared entries; it is
mapped with the element-wise squared maps, ``v_A' = (s'/s)^2 (M_b^T)^2 v_A`` (exact when the
gradient entries mixed by a row of the map are uncorrelated, otherwise an estimate), and clamped at 0.
The step count is kept, so bias correction continues. "reset" zeroes both moments and the count.
Optimizers with other state (Adafactor's factored moments) are always reset.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from transformers import TrainerCallback

from lsq.live import ModuleResize, resize_lora_

log = logging.getLogger("lsq")


def _project_state(state: dict[str, Any], left: torch.Tensor | None, right: torch.Tensor | None, ratio: float) -> dict[str, Any]:
    """Map Adam state of one factor: ``left @ X`` (for A) or ``X @ right`` (for B), X flattened to 2-D."""
    out = dict(state)
    for key, power in (("exp_avg", 1), ("exp_avg_sq", 2)):
        X = state[key]
        X2 = X.reshape(X.shape[0], -1) if left is not None else X.reshape(X.shape[0], X.shape[1])
        M = (left if left is not None else right).to(X.dtype)
        M = M.square() if power == 2 else M
        Y = (M @ X2 if left is not None else X2 @ M) * ratio**power
        if power == 2:
            Y = Y.clamp_min(0)
        shape = (Y.shape[0], *X.shape[1:]) if left is not None else (X.shape[0], Y.shape[1], *X.shape[2:])
        out[key] = Y.reshape(shape).contiguous()
    return out


def swap_optimizer_params(optimizer, changes: list[ModuleResize], mode: str = "project") -> None:
    """Point the optimizer at the resized factors and carry (or reset) their state."""
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
    new_of = {}
    for c in changes:
        (A, B), (A2, B2) = c.old_params, c.new_params
        ratio = c.new_scale / c.old_scale
        for old, new, left, right in ((A, A2, c.map_b.mT, None), (B, B2, None, c.map_a.mT)):
            new_of[old] = new
            state = opt.state.pop(old, None)
            if mode == "project" and state and {"exp_avg", "exp_avg_sq"} <= state.keys():
                opt.state[new] = _project_state(state, left, right, ratio)
    for group in opt.param_groups:
        group["params"] = [new_of.get(p, p) for p in group["params"]]


class RankScheduleCallback(TrainerCallback):
    """Resize the model's LoRA layers when ``state.global_step`` reaches a boundary of ``schedule``.

    ``schedule`` maps a global step to the rank that starts after it, e.g. ``{50: 32, 100: 16}``.
    ``log`` (optional) receives ``({"rank": k, "retained_energy": e}, step)`` at every resize.
    Data parallelism passes ``replicas`` (:class:`lsq.distributed.Replicas`): before a resize it
    checks that every process holds the same state (the gradients were synced), after it syncs the
    new factors and rebuilds the DDP wrapper; the event keeps the per-process digests of both.
    """

    def __init__(
        self,
        schedule: Mapping[int, int],
        optimizer_state: str = "project",
        alpha_policy: str = "keep-scale",
        log: Callable[[Mapping[str, float], int], None] | None = None,
        replicas=None,
    ):
        self.schedule = dict(schedule)
        self.optimizer_state = optimizer_state
        self.alpha_policy = alpha_policy
        self.log = log
        self.replicas = replicas
        self.events: list[dict[str, Any]] = []

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        k = self.schedule.get(state.global_step)
        if k is None:
            return control
        before = self.replicas.check() if self.replicas is not None else None
        changes = resize_lora_(model, k, alpha_policy=self.alpha_policy)
        swap_optimizer_params(optimizer, changes, self.optimizer_state)
        energy = sum(c.retained_energy for c in changes) / len(changes)
        event: dict[str, Any] = {"step": state.global_step, "rank": k, "mean_retained_energy": energy}
        if self.replicas is not None:
            event["replica_digests_before"] = before
            event["replica_digests"] = self.replicas.sync(changes)
        self.events.append(event)
        if state.is_world_process_zero:
            before_rank = max(c.old_rank for c in changes)
            log.info("in-squeeze: step %d rank %d -> %d, retained energy %.3f", state.global_step, before_rank, k, energy)
        if self.log is not None and state.is_world_process_zero:
            self.log({"rank": float(k), "resize_retained_energy": energy}, state.global_step)
        return control


def boundaries(stage_ranks: list[int], stage_steps: list[int]) -> dict[int, int]:
    """``{global step at the end of a stage: rank of the next stage}``."""
    out, step = {}, 0
    for steps, next_rank in zip(stage_steps[:-1], stage_ranks[1:]):
        step += steps
        out[step] = next_rank
    return out
