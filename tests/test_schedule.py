"""LR schedules, in-process: the learning rate of each scheduler at given optimiser steps, warm-up included.

Every expected value comes from the schedule's formula written out here (not from running the code under test
twice). Lengths in the config are epochs; ``SPE`` optimiser steps make one epoch.
"""

from __future__ import annotations

import math

import pytest
import torch

from cnnscale.config import OptimConfig, SchedConfig
from cnnscale.train.schedule import build_optimizer, build_scheduler, resume_scheduler

LR = 0.1
SPE = 10  # optimiser steps per epoch


def _lrs(sched: SchedConfig, total: int, steps: list[int], spe: int = SPE) -> list[float]:
    """The LR after ``k`` optimiser steps (k in ``steps``), stepping the scheduler once per optimiser step."""
    model = torch.nn.Linear(2, 1)
    opt = build_optimizer(OptimConfig(name="sgd", lr=LR, momentum=0.0, weight_decay=0.0), model)
    s = build_scheduler(sched, opt, spe, total)
    out, k = [], 0
    for want in sorted(steps):
        while k < want:
            opt.step()
            s.step()
            k += 1
        out.append(opt.param_groups[0]["lr"])
    return out


def _cos(start: float, end: float, frac: float) -> float:
    """Cosine from ``start`` (frac 0) to ``end`` (frac 1)."""
    return end + (start - end) * (1 + math.cos(math.pi * frac)) / 2


def test_none_is_constant() -> None:
    assert _lrs(SchedConfig(name="none"), 100, [0, 1, 50, 100]) == pytest.approx([LR] * 4)


def test_step_decays_every_step_size_epochs() -> None:
    # step_size 3 epochs = 30 optimiser steps: lr = LR * gamma ** (k // 30)
    steps = [0, 29, 30, 59, 60, 95]
    want = [LR * 0.5 ** (k // 30) for k in steps]
    assert _lrs(SchedConfig(name="step", step_size=3, gamma=0.5), 100, steps) == pytest.approx(want)
    assert want[-1] == pytest.approx(LR / 8)


def test_multistep_decays_at_each_milestone() -> None:
    # milestones at epochs 2 and 5 = steps 20 and 50: lr = LR * gamma ** (number of milestones reached)
    steps = [0, 19, 20, 49, 50, 80]
    want = [LR, LR, LR * 0.1, LR * 0.1, LR * 0.01, LR * 0.01]
    got = _lrs(SchedConfig(name="multistep", milestones=(2.0, 5.0), gamma=0.1), 100, steps)
    assert got == pytest.approx(want)


def test_cosine_over_the_whole_run() -> None:
    # t_max 0: the cosine spans the whole run, LR -> eta_min at the last step
    total, eta = 40, 0.0
    steps = [0, 10, 20, 30, 40]
    want = [_cos(LR, eta, k / total) for k in steps]
    assert _lrs(SchedConfig(name="cosine"), total, steps) == pytest.approx(want, abs=1e-12)
    assert want[2] == pytest.approx(LR / 2) and want[-1] == pytest.approx(0.0, abs=1e-12)


def test_cosine_with_t_max_and_eta_min() -> None:
    # t_max 2 epochs = 20 steps, eta_min 0.01: eta + (LR - eta) (1 + cos(pi k / 20)) / 2 for k <= 20
    eta = 0.01
    steps = [0, 5, 10, 15, 20]
    want = [eta + (LR - eta) * (1 + math.cos(math.pi * k / 20)) / 2 for k in steps]
    got = _lrs(SchedConfig(name="cosine", t_max_epochs=2, eta_min=eta), 100, steps)
    assert got == pytest.approx(want, rel=1e-9)
    assert got[2] == pytest.approx((LR + eta) / 2) and got[-1] == pytest.approx(eta)


def test_linear_warmup_then_cosine() -> None:
    # warm-up 1 epoch = W = 10 steps from start_factor 0.2: LR * (0.2 + 0.8 k / W); then the cosine over the
    # remaining total - W = 30 steps, starting again at LR.
    total, w, sf = 40, 10, 0.2
    steps = [0, 1, 5, 9, 10, 25, 40]

    def lr(k: int) -> float:
        return LR * (sf + (1 - sf) * k / w) if k < w else _cos(LR, 0.0, (k - w) / (total - w))

    got = _lrs(SchedConfig(name="cosine", warmup_epochs=1, warmup_start_factor=sf), total, steps)
    assert got == pytest.approx([lr(k) for k in steps], abs=1e-12)
    assert got[0] == pytest.approx(0.02) and got[4] == pytest.approx(LR) and got[5] == pytest.approx(LR / 2)


def test_warmup_then_step_counts_the_decay_from_the_end_of_warmup() -> None:
    # W = 5 steps (0.5 epoch), then StepLR with step_size 2 epochs = 20 steps, counted from step W
    w, sf = 5, 0.1
    steps = [0, 4, 5, 24, 25, 45]
    want = [LR * (sf + (1 - sf) * k / w) if k < w else LR * 0.5 ** ((k - w) // 20) for k in steps]
    got = _lrs(SchedConfig(name="step", step_size=2, gamma=0.5, warmup_epochs=0.5, warmup_start_factor=sf), 60, steps)
    assert got == pytest.approx(want)


def test_warmup_is_capped_below_the_run_length() -> None:
    # warm-up of 10 epochs in a 8-step run: W = total - 1 = 7, so the last step runs at the full LR
    total, w, sf = 8, 7, 0.1
    steps = [0, 3, 7]
    want = [LR * (sf + (1 - sf) * k / w) for k in steps]
    got = _lrs(SchedConfig(name="none", warmup_epochs=10, warmup_start_factor=sf), total, steps)
    assert got == pytest.approx(want)
    assert got[-1] == pytest.approx(LR)


def test_onecycle() -> None:
    # OneCycleLR over total + 1 steps (max_lr = LR, pct_start 0.3, div 25, final_div 1e4, cosine annealing):
    # up from LR/25 to LR until step 0.3 N - 1, then down to LR/25/1e4 at step N - 1. Warm-up does not apply.
    total = 99
    n = total + 1
    up_end, down_end = 0.3 * n - 1, n - 1
    lo, hi, end = LR / 25, LR, LR / 25 / 1e4

    def lr(k: int) -> float:
        if k <= up_end:
            return _cos(lo, hi, k / up_end)
        return _cos(hi, end, (k - up_end) / (down_end - up_end))

    steps = [0, 10, 29, 50, 99]
    got = _lrs(SchedConfig(name="onecycle", warmup_epochs=1), total, steps)
    assert got == pytest.approx([lr(k) for k in steps], rel=1e-9)
    assert got[0] == pytest.approx(LR / 25) and got[2] == pytest.approx(LR)


def test_plateau_decays_after_patience_epochs_without_improvement() -> None:
    # ReduceLROnPlateau(mode min, factor gamma, patience p), stepped once per epoch with the validation loss:
    # the LR is multiplied by gamma once more than p epochs in a row have not improved on the best loss.
    model = torch.nn.Linear(2, 1)
    opt = build_optimizer(OptimConfig(name="sgd", lr=LR, momentum=0.0, weight_decay=0.0), model)
    s = build_scheduler(SchedConfig(name="plateau", gamma=0.5, patience=1, warmup_epochs=1), opt, SPE, 100)
    seen = []
    for val_loss in (1.0, 0.9, 0.95, 0.95, 0.95, 0.8, 0.85, 0.85):
        s.step(val_loss)
        seen.append(opt.param_groups[0]["lr"])
    # best 0.9 after epoch 2; epochs 3, 4 do not improve (2 > p=1): decay at epoch 4; the count restarts, so
    # epoch 5 (1 bad) keeps it; 0.8 improves; epochs 7, 8 bad: decay again at epoch 8. Warm-up does not apply.
    assert seen == pytest.approx([LR, LR, LR, LR / 2, LR / 2, LR / 2, LR / 2, LR / 4])


# ------------------------------------------------------------------------------------------------ resume (15.1)
def _resumed_lrs(sched: SchedConfig, first_total: int, stop: int, new_total: int, until: int,
                 optim: OptimConfig | None = None) -> tuple[list[float], list[float]]:
    """A run of ``first_total`` steps stopped at ``stop``, its optimiser and scheduler state saved and loaded into a
    freshly built pair (as a resume does), extended to ``new_total`` with resume_scheduler: the LRs of steps 1..stop
    of the first run and of steps stop+1..until of the resumed one."""
    optim = optim or OptimConfig(name="sgd", lr=LR, momentum=0.0, weight_decay=0.0)
    model = torch.nn.Linear(2, 1)
    opt = build_optimizer(optim, model)
    s = build_scheduler(sched, opt, SPE, first_total)
    before = []
    for _ in range(stop):
        opt.step()
        s.step()
        before.append(opt.param_groups[0]["lr"])
    saved_opt, saved_s = opt.state_dict(), s.state_dict()
    opt2 = build_optimizer(optim, model)
    s2 = build_scheduler(sched, opt2, SPE, new_total)  # built at start-up, before the checkpoint is loaded
    opt2.load_state_dict(saved_opt)
    s2.load_state_dict(saved_s)
    resume_scheduler(s2, sched, opt2, SPE, new_total, stop)
    after = []
    for _ in range(stop, until):
        opt2.step()
        s2.step()
        after.append(opt2.param_groups[0]["lr"])
    return before, after


def test_extending_a_cosine_run_follows_the_new_length_from_the_resume_step() -> None:
    """The documented rule: steps done keep their LRs; from the resume step on, the LR a run of the new length has
    at that step. A 10-step cosine extended to 20 at step 10: steps 11..20 = cosine over 20 steps (never back up)."""
    before, after = _resumed_lrs(SchedConfig(name="cosine"), 10, 10, 20, 20)
    assert before == pytest.approx([_cos(LR, 0.0, k / 10) for k in range(1, 11)])
    assert after == pytest.approx([_cos(LR, 0.0, k / 20) for k in range(11, 21)])
    assert all(a >= b for a, b in zip(after, after[1:], strict=False)) and after[-1] == pytest.approx(0.0)


def test_resume_without_extending_is_the_uninterrupted_schedule() -> None:
    """Same length: the rebuilt schedule equals the saved one exactly (warm-up and cosine, stopped mid-warm-up)."""
    sched = SchedConfig(name="cosine", warmup_epochs=0.5, warmup_start_factor=0.1)
    _, after = _resumed_lrs(sched, 40, 3, 40, 40)
    assert after == _lrs_list(sched, 40, range(4, 41))


def test_resumed_onecycle_keeps_its_peak_lr() -> None:
    """OneCycleLR's peak is the configured LR, not the warm-up start LR the optimiser holds at the checkpoint."""
    _, after = _resumed_lrs(SchedConfig(name="onecycle"), 30, 6, 30, 30)
    assert after == _lrs_list(SchedConfig(name="onecycle"), 30, range(7, 31))
    assert max(after) > 0.9 * LR


def _lrs_list(sched: SchedConfig, total: int, steps: range) -> list[float]:
    return _lrs(sched, total, list(steps))
