"""The training step and the evaluation, in-process (no subprocess): one SGD step of train_step equals the update
written out by hand, gradient accumulation gates the optimiser step, and evaluate's loss and accuracy equal a direct
computation over the same loader. LeNet-5 (no BatchNorm), float64 comparisons of float32 maths.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from cnnscale.config import load_config
from cnnscale.models import create_model
from cnnscale.profile.profiler import NullProfiler
from cnnscale.train.build import build_accelerator
from cnnscale.train.schedule import build_optimizer
from cnnscale.train.step import ClassificationTask, evaluate, prepare_inputs, train_step

LR = 0.05


def _cfg(grad_accum: int = 1):
    return load_config(["--model", "lenet5", "--optim.name", "sgd", "--lr", str(LR), "--optim.momentum", "0",
                        "--optim.weight_decay", "0", "--grad-accum", str(grad_accum)])


def _batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def _setup(grad_accum: int):
    """A prepared LeNet-5 and SGD optimiser, and an untouched reference copy of the initial weights."""
    cfg = _cfg(grad_accum)
    acc = build_accelerator(cfg)
    assert acc.num_processes == 1 and acc.gradient_accumulation_steps == grad_accum
    torch.manual_seed(0)
    model = create_model("lenet5")
    ref = copy.deepcopy(model)
    opt = build_optimizer(cfg.optim, model)
    model, opt = acc.prepare(model, opt)
    return acc, model, opt, ref


def _grads(ref: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    """d(mean cross-entropy)/d(weights) of the reference model, by autograd directly."""
    return list(torch.autograd.grad(F.cross_entropy(ref(images), labels), list(ref.parameters())))


def test_one_sgd_step_equals_the_hand_written_update() -> None:
    acc, model, opt, ref = _setup(grad_accum=1)
    images, labels = _batch(8, seed=1)
    loss = train_step(acc, model, ClassificationTask(), opt, images, labels, 0.0, NullProfiler())
    assert acc.sync_gradients and loss.requires_grad is False
    assert loss.item() == pytest.approx(F.cross_entropy(ref(images), labels).item(), rel=1e-6)
    expected = [w.detach() - LR * g for w, g in zip(ref.parameters(), _grads(ref, images, labels))]
    for (name, w), want in zip(acc.unwrap_model(model).named_parameters(), expected, strict=True):
        assert torch.allclose(w, want, rtol=0, atol=1e-6), name
        assert not torch.equal(w, dict(ref.named_parameters())[name]), f"{name} did not move"


def test_grad_accumulation_gates_the_optimizer_step() -> None:
    """With grad_accum 2 the first micro-step leaves the weights alone; the second applies the mean gradient of both
    micro-batches (each loss is divided by 2 before backward), as one step on their union would."""
    acc, model, opt, ref = _setup(grad_accum=2)
    task, prof = ClassificationTask(), NullProfiler()
    (x1, y1), (x2, y2) = _batch(8, seed=2), _batch(8, seed=3)
    before = [w.detach().clone() for w in acc.unwrap_model(model).parameters()]

    train_step(acc, model, task, opt, x1, y1, 0.0, prof)
    assert not acc.sync_gradients, "the first of two micro-steps must not be an optimiser step"
    for w, b in zip(acc.unwrap_model(model).parameters(), before):
        assert torch.equal(w, b), "weights moved before the accumulation boundary"

    train_step(acc, model, task, opt, x2, y2, 0.0, prof)
    assert acc.sync_gradients
    g1, g2 = _grads(ref, x1, y1), _grads(ref, x2, y2)
    expected = [w.detach() - LR * (a + b) / 2 for w, a, b in zip(ref.parameters(), g1, g2)]
    for (name, w), want in zip(acc.unwrap_model(model).named_parameters(), expected, strict=True):
        assert torch.allclose(w, want, rtol=0, atol=1e-6), name
    union = [w.detach() - LR * g for w, g in zip(ref.parameters(), _grads(ref, torch.cat([x1, x2]),
                                                                            torch.cat([y1, y2])))]
    for w, want in zip(acc.unwrap_model(model).parameters(), union):
        assert torch.allclose(w, want, rtol=0, atol=1e-6)


def test_evaluate_equals_a_direct_computation_over_the_loader() -> None:
    acc, model, _, ref = _setup(grad_accum=1)
    images, labels = _batch(50, seed=4)  # 50 = 3 full batches of 16 and a last one of 2
    loader = acc.prepare(DataLoader(TensorDataset(images, labels), batch_size=16, shuffle=False))
    got = evaluate(acc, model, loader)
    assert model.training, "evaluate puts the model back in training mode"
    with torch.no_grad():
        logits = ref.eval()(images).double()
    want_loss = F.cross_entropy(logits, labels, reduction="sum").item() / 50
    want_acc = (logits.argmax(1) == labels).sum().item() / 50
    assert got["loss"] == pytest.approx(want_loss, rel=1e-6)
    assert got["acc"] == want_acc


def test_prepare_inputs_channels_last_and_dtype() -> None:
    x = torch.randn(2, 3, 8, 8)
    assert prepare_inputs(x, False) is x
    y = prepare_inputs(x, True, torch.float64)
    assert y.dtype == torch.float64 and y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
