"""In-Squeeze: the optimizer after a rank change (checked against autograd at the new factors) and a live
training run whose model is resized at the stage boundaries (ranks, events, loss, schedule, optimizer)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import get_linear_schedule_with_warmup

import lsq.train
from lsq.insqueeze import RankScheduleCallback, boundaries, swap_optimizer_params
from lsq.live import lora_layers, resize_lora_
from lsq.train import train
from lsq.train_config import TrainConfig
from tests.lsq.dense import best_rank_k, dense_update, rel_err
from tests.lsq.tiny import lm_config, lm_jsonl, tiny_llama  # noqa: F401  (fixtures)

BETAS = (0.9, 0.999)
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


class Net(nn.Module):
    """One linear layer (``deep=False``) or two with a tanh between them."""

    def __init__(self, deep: bool):
        super().__init__()
        self.lin1 = nn.Linear(12, 10)
        self.lin2 = nn.Linear(10, 8) if deep else None

    def forward(self, x):
        h = self.lin1(x)
        return self.lin2(torch.tanh(h)) if self.lin2 is not None else h


def lora_net(deep: bool, r: int = 6, update_rank: int | None = None):
    """A PEFT LoRA model with random factors (B is not zero); ``update_rank`` < r makes each B @ A exactly low-rank."""
    torch.manual_seed(0)
    targets = ["lin1", "lin2"] if deep else ["lin1"]
    model = get_peft_model(Net(deep), LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            B.copy_(torch.randn_like(B) * 0.5)
            if update_rank is None:
                A.copy_(torch.randn_like(A) * 0.5)
            else:
                A.copy_(torch.randn(r, update_rank) @ torch.randn(update_rank, A.shape[1]) * 0.3)
    return model


def factor_grads(model, loss_fn) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (dL/dA, dL/dB)}`` by autograd at the model's current factors."""
    model.zero_grad()
    loss_fn(model).backward()
    return {n: (l.lora_A["default"].weight.grad.clone(), l.lora_B["default"].weight.grad.clone())
            for n, l in lora_layers(model).items()}


def factors(model) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
    return {n: (l.lora_A["default"].weight, l.lora_B["default"].weight) for n, l in lora_layers(model).items()}


torch.manual_seed(1)
X, C, Y = torch.randn(5, 12), torch.randn(5, 10), torch.randn(5, 8)


def linear_loss(model):  # L = <C, model(x)>: dL/dW does not depend on W, so it is the same before and after
    return (model(X) * C).sum()


def mse_loss(model):
    return ((model(X) - Y) ** 2).mean()


CASES = {
    # name: (deep, update rank, loss, target rank); the update is unchanged by the resize in both
    "linear loss, generic factors": (False, None, linear_loss, 3),
    "nonlinear loss, exactly rank-3 updates": (True, 3, mse_loss, 4),
}


def adam_after_one_step(model, loss_fn):
    """Adam (lr 0, so the factors stay put) after one step: exp_avg = (1 - beta1) g, exp_avg_sq = (1 - beta2) g^2."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=0.0, betas=BETAS)
    grads = factor_grads(model, loss_fn)
    opt.step()
    for name, (A, B) in factors(model).items():
        torch.testing.assert_close(opt.state[A]["exp_avg"], (1 - BETAS[0]) * grads[name][0])
    return opt, grads


@pytest.mark.parametrize("alpha_policy", ["keep-scale", "rank"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_projected_first_moment_equals_adam_of_the_new_gradients(case, alpha_policy):
    deep, update_rank, loss_fn, k = CASES[case]
    model = lora_net(deep, update_rank=update_rank)
    before = {n: dense_update(A.detach(), B.detach(), lora_layers(model)[n].scaling["default"]) for n, (A, B) in factors(model).items()}
    opt, old_grads = adam_after_one_step(model, loss_fn)
    old = factors(model)

    changes = resize_lora_(model, k, alpha_policy=alpha_policy)
    swap_optimizer_params(opt, changes, "project")

    new = factors(model)
    ratios = {c.name: c.new_scale / c.old_scale for c in changes}
    assert (alpha_policy == "keep-scale") == all(r == pytest.approx(1.0) for r in ratios.values())
    if update_rank is not None:  # the resize is exact here: same dW, so the same G at every layer
        for n, (A, B) in new.items():
            assert rel_err(dense_update(A.detach(), B.detach(), lora_layers(model)[n].scaling["default"]), before[n]) < 1e-5
    new_grads = factor_grads(model, loss_fn)  # autograd at the new factors, independent of the projection
    for n, (A2, B2) in new.items():
        assert A2.shape[0] == B2.shape[1] == k
        assert old[n][0] not in opt.state and old[n][1] not in opt.state
        for p, g in zip((A2, B2), new_grads[n]):
            state, m = opt.state[p], (1 - BETAS[0]) * g
            # float32 factors: exact to rounding; a rank-3 update kept at rank 4 has one direction of pure
            # rounding noise (sigma ~ 1e-7), whose gradient is only known to ~sqrt(1e-7) of the largest
            atol = 1e-6 if update_rank is None else 1e-3 * float(m.abs().max())
            torch.testing.assert_close(state["exp_avg"], m, rtol=1e-4, atol=atol)
            assert float(state["step"]) == 1.0  # bias correction continues
            v, v_true = state["exp_avg_sq"], (1 - BETAS[1]) * g**2
            assert v.shape == p.shape and bool((v >= 0).all())
            # an estimate, but on the scale of the true one (a noise direction once gave 5e6 times too much)
            assert float(v.max()) <= 10 * float(v_true.max()), (n, float(v.max()), float(v_true.max()))
        # the gradients really changed with the resize: the check above is not vacuous
        assert not torch.allclose(new_grads[n][0][:k], old_grads[n][0][:k], rtol=1e-3)


def test_projected_second_moment_follows_the_squared_maps():
    """v_A' = ratio^2 (M_b^T)^2 v_A and v_B' = ratio^2 v_B (M_a^T)^2, with M_a, M_b from pseudo-inverses."""
    model = lora_net(False)
    opt, grads = adam_after_one_step(model, linear_loss)
    (A, B), = factors(model).values()
    changes = resize_lora_(model, 2, alpha_policy="rank")
    swap_optimizer_params(opt, changes)
    (A2, B2), = factors(model).values()
    ratio = changes[0].new_scale / changes[0].old_scale
    M_b = torch.linalg.pinv(B.detach().double()) @ B2.detach().double()  # (r, k): B' = B M_b
    M_a = A2.detach().double() @ torch.linalg.pinv(A.detach().double())  # (k, r): A' = M_a A
    v_A, v_B = (1 - BETAS[1]) * grads["lin1"][0].double() ** 2, (1 - BETAS[1]) * grads["lin1"][1].double() ** 2
    torch.testing.assert_close(opt.state[A2]["exp_avg_sq"].double(), ratio**2 * (M_b.mT**2) @ v_A, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(opt.state[B2]["exp_avg_sq"].double(), ratio**2 * v_B @ (M_a.mT**2), rtol=1e-4, atol=1e-9)


def test_param_groups_point_at_the_new_factors_and_training_goes_on():
    model = lora_net(True)
    extra = nn.Parameter(torch.randn(3))  # not a LoRA factor: its state must survive untouched
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": params}, {"params": [extra], "weight_decay": 0.0}], lr=0.1)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=0, num_training_steps=10)
    for _ in range(3):
        opt.zero_grad()
        (mse_loss(model) + extra.square().sum()).backward()
        opt.step()
        sched.step()
    extra_state = opt.state[extra]

    swap_optimizer_params(opt, resize_lora_(model, 2), "project")

    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in trainable]
    assert opt.param_groups[1]["params"] == [extra] and opt.state[extra] is extra_state
    assert len(opt.state) == len(trainable) + 1  # no state left for the dropped factors
    snapshot = [p.detach().clone() for p in trainable]
    for _ in range(2):
        opt.zero_grad()
        (mse_loss(model) + extra.square().sum()).backward()
        opt.step()
        sched.step()
    assert all(not torch.equal(p, q) for p, q in zip(trainable, snapshot))
    assert all(float(opt.state[p]["step"]) == 5.0 for p in trainable)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 5 / 10)  # the schedule went on: 5 of 10 steps done


def test_reset_drops_the_moments():
    model = lora_net(False)
    opt, _ = adam_after_one_step(model, linear_loss)
    old = factors(model)["lin1"]
    swap_optimizer_params(opt, resize_lora_(model, 2), "reset")
    new = factors(model)["lin1"]
    assert not any(p in opt.state for p in (*old, *new))
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in model.parameters() if p.requires_grad]
    factor_grads(model, linear_loss)
    opt.step()  # a fresh state, counted from 1
    assert float(opt.state[new[0]]["step"]) == 1.0


def test_adafactor_state_is_reset_even_in_project_mode():
    from transformers.optimization import Adafactor

    model = lora_net(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = Adafactor(params, lr=1e-2, relative_step=False, scale_parameter=False, warmup_init=False)
    factor_grads(model, linear_loss)
    opt.step()
    swap_optimizer_params(opt, resize_lora_(model, 2), "project")
    assert not any(p in opt.state for p in factors(model)["lin1"])
    factor_grads(model, linear_loss)
    opt.step()  # runs with the new shapes


def test_boundaries():
    assert boundaries([16, 8, 4], [3, 3, 4]) == {3: 8, 6: 4}
    assert boundaries([64, 32, 16, 8], [50, 50, 50, 50]) == {50: 32, 100: 16, 150: 8}
    assert boundaries([8], [10]) == {}


# ------------------------------------------------------------------------------------- a live run


class Watch(RankScheduleCallback):
    """The real callback, plus what the optimizer and the model look like right after each resize."""

    seen: list[dict] = []

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        out = super().on_step_end(args, state, control, model=model, optimizer=optimizer, **kwargs)
        if state.global_step in self.schedule:
            opt = getattr(optimizer, "optimizer", optimizer)
            in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
            trainable = [p for p in model.parameters() if p.requires_grad]
            ranks = {layer.r["default"] for layer in lora_layers(model).values()}
            Watch.seen.append({
                "step": state.global_step, "ranks": ranks,
                "optimizer_has_every_trainable": all(id(p) in in_opt for p in trainable),
                "optimizer_count": len(in_opt), "trainable_count": len(trainable),
                "lora": {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n},
            })
        return out


def test_in_squeeze_resizes_the_live_model_and_keeps_learning(tiny_llama, lm_jsonl, tmp_path, monkeypatch, caplog):
    Watch.seen = []
    monkeypatch.setattr(lsq.train, "RankScheduleCallback", Watch)
    steps, lr = 18, 2e-2
    raw = lm_config(tiny_llama, lm_jsonl, tmp_path / "in", method="in", rank=4, source_rank=16,
                    train__steps=steps, train__lr=lr, insqueeze={"stage_steps": [6, 6, 6]})
    logs: list[tuple[int, dict]] = []
    with caplog.at_level(logging.INFO, logger="lsq"):
        result = train(TrainConfig.model_validate(raw), log=lambda m, s: logs.append((s, dict(m))))
    resizes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("in-squeeze:")]
    assert [m.rsplit(" ", 1)[0] for m in resizes] == ["in-squeeze: step 6 rank 16 -> 8, retained energy",
                                                      "in-squeeze: step 12 rank 8 -> 4, retained energy"]

    # the events: 16 -> 8 at step 6, 8 -> 4 at step 12; logged too
    assert [(e["step"], e["rank"]) for e in result.rank_events] == [(6, 8), (12, 4)]
    assert all(0 < e["mean_retained_energy"] <= 1 for e in result.rank_events)
    assert [(s, m["rank"]) for s, m in logs if "rank" in m] == [(6, 8.0), (12, 4.0)]
    summary = json.loads((tmp_path / "in" / "train_summary.json").read_text())
    assert summary["rank_events"] == result.rank_events and summary["method"] == "in"

    # the live model right after each boundary: new ranks, and the optimizer holds exactly its parameters
    assert [(w["step"], w["ranks"]) for w in Watch.seen] == [(6, {8}), (12, {4})]
    assert all(w["optimizer_has_every_trainable"] and w["optimizer_count"] == w["trainable_count"] for w in Watch.seen)

    # the saved adapter has rank 4 everywhere and keeps the scale alpha/r of the source
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8.0) and not config["rank_pattern"]
    from safetensors.torch import load_file

    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    lora_a = [v for k, v in weights.items() if "lora_A" in k]
    assert lora_a and all(v.shape[0] == 4 for v in lora_a)

    # training went on after the last boundary: the rank-4 factors moved
    last = Watch.seen[-1]["lora"]
    final = {k.replace(".weight", ".default.weight"): v for k, v in weights.items() if "lora_" in k}
    moved = [not torch.allclose(final[n], v) for n, v in last.items() if n in final]
    assert moved and all(moved)

    # the loss: no blow-up at a boundary, and lower at the end than before the first one
    loss = {s: m["loss"] for s, m in logs if "loss" in m}
    assert sorted(loss) == list(range(1, steps + 1))
    for b in (6, 12):
        before, after = (loss[b - 1] + loss[b]) / 2, (loss[b + 1] + loss[b + 2]) / 2
        assert after < 1.5 * before, (b, before, after)
    assert (loss[steps - 1] + loss[steps]) / 2 < 0.8 * (loss[5] + loss[6]) / 2

    # the learning rate follows the linear schedule across the boundaries (no warm-up here)
    lrs = {s: m["learning_rate"] for s, m in logs if "learning_rate" in m}
    for s, value in lrs.items():
        assert value == pytest.approx(lr * (steps - (s - 1)) / steps, rel=1e-6), s


def test_resize_of_the_live_model_is_the_best_rank_k_update(tiny_llama):
    """The resize the callback applies keeps the Eckart-Young truncation of every module's update."""
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.2)
    before = {n: dense_update(A.detach(), B.detach(), 2.0) for n, (A, B) in factors(model).items()}
    changes = resize_lora_(model, 3)
    assert {c.name for c in changes} == set(before) and len(before) == 4
    for n, (A, B) in factors(model).items():
        layer = lora_layers(model)[n]
        assert layer.r["default"] == 3 and layer.scaling["default"] == pytest.approx(2.0)
        assert rel_err(dense_update(A.detach(), B.detach(), layer.scaling["default"]), best_rank_k(before[n], 3)) < 1e-5
