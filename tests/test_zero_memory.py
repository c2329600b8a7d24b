"""The ZeRO memory model (cnnscale/scaling/memory.py): the paper's table, the working-set terms, bad input."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from cnnscale.errors import UserError
from cnnscale.scaling.memory import memory_env, optimizer_states, param_counts, predict_rank_bytes, step_temporaries

PSI = 1_000_000  # divisible by every world size used below


def test_paper_model_states_fp32_adam() -> None:
    """Model states per rank (bytes) at N = 4 for fp32 Adam: 4Ψ params, 4Ψ grads, 8Ψ states, 4Ψ/N master."""
    n = 4
    rows = {s: predict_rank_bytes(PSI, s, n, "adam", "no") for s in range(4)}
    assert rows[0]["model_states"] == 16 * PSI  # DDP: nothing partitioned, no separate master copy
    assert rows[1]["model_states"] == 4 * PSI + 4 * PSI + 8 * PSI // n + 4 * PSI // n
    assert rows[2]["model_states"] == 4 * PSI + 4 * PSI // n + 8 * PSI // n + 4 * PSI // n
    assert rows[3]["model_states"] == (4 + 4 + 8 + 4) * PSI // n
    assert [rows[s]["model_states"] for s in range(4)] == sorted((rows[s]["model_states"] for s in range(4)),
                                                                 reverse=True)


def test_paper_figure_mixed_precision() -> None:
    """The ZeRO paper's example: Ψ = 7.5B, N = 64, K = 12 (fp32 master + Adam m, v) in fp16."""
    psi, n = 7_500_000_000, 64
    gb = {s: predict_rank_bytes(psi, s, n, "adam", "fp16")["model_states"] / 1e9 for s in (1, 2, 3)}
    assert gb[1] == pytest.approx(31.4, abs=0.1)
    assert gb[2] == pytest.approx(16.6, abs=0.1)
    assert gb[3] == pytest.approx(1.88, abs=0.01)


def test_sgd_momentum_has_one_state_and_ddp_ignores_autocast_precision() -> None:
    sgd = predict_rank_bytes(PSI, 1, 2, "sgd", "no")
    assert sgd["optimizer_states"] == 4 * PSI // 2
    assert predict_rank_bytes(PSI, 1, 2, "sgd", "no", momentum=0.0)["optimizer_states"] == 0
    assert optimizer_states("adamw") == 2 and optimizer_states("rmsprop", momentum=0.0) == 1
    # DDP with autocast keeps fp32 weights and gradients; DeepSpeed bf16 halves them.
    assert predict_rank_bytes(PSI, 0, 2, "sgd", "bf16")["params"] == 4 * PSI
    assert predict_rank_bytes(PSI, 1, 2, "sgd", "bf16")["params"] == 2 * PSI


def test_working_set_terms() -> None:
    big = PSI // 2
    ddp = predict_rank_bytes(PSI, 0, 2, "adam", "no", weight_decay=5e-4)
    assert ddp["comm_buffers"] == 4 * PSI  # DDP's bucket copy of the gradients
    assert ddp["optimizer_step"] == 2 * 4 * PSI  # sqrt(v) + eps, and the L2 copy of the gradient
    assert predict_rank_bytes(PSI, 0, 1, "adam", "no")["comm_buffers"] == 0  # one process: no DDP
    z2 = predict_rank_bytes(PSI, 2, 2, "adamw", "no", weight_decay=5e-4, largest_layer_params=big)
    z3 = predict_rank_bytes(PSI, 3, 2, "adamw", "no", weight_decay=5e-4, largest_layer_params=big)
    assert z2["comm_buffers"] == 4 * big and z3["comm_buffers"] == 2 * 4 * big
    assert z2["optimizer_step"] == 4 * PSI // 2  # AdamW decays in place: only the denominator
    for row in (ddp, z2, z3):
        assert row["total"] == row["model_states"] + row["comm_buffers"] + row["optimizer_step"]
    assert step_temporaries("sgd") == 0 and step_temporaries("sgd", 5e-4, nesterov=True) == 2


@pytest.mark.parametrize(("kw", "needle"), [
    ({"stage": 4}, "choose from: 0, 1, 2, 3"),
    ({"precision": "int8"}, "choose from: no, fp32, bf16, fp16"),
    ({"optimizer": "lamb"}, "choose from: adam, adamw, rmsprop, sgd"),
    ({"world_size": 0}, "world_size >= 1"),
])
def test_bad_input_is_a_user_error(kw: dict, needle: str) -> None:
    args = {"params": PSI, "stage": 1, "world_size": 2, "optimizer": "adam", "precision": "no", **kw}
    with pytest.raises(UserError, match=needle.replace("(", r"\(")):
        predict_rank_bytes(**args)


def test_param_counts_and_env() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 30 * 30, 10))
    counts = param_counts(model)
    assert counts == {"param_count": 3 * 8 * 9 + 8 + 7200 * 10 + 10, "largest_layer_params": 72010}
    optim = SimpleNamespace(name="sgd", momentum=0.9, weight_decay=0.0, nesterov=False)
    env = memory_env(counts, None, 2, optim, "no")
    assert env["param_count"] == counts["param_count"]
    assert env["predicted_rank_bytes"] == predict_rank_bytes(counts["param_count"], 0, 2, "sgd", "no",
                                                             largest_layer_params=72010)


def test_vgg16_classic_counts() -> None:
    from cnnscale.models import create_model

    with torch.device("meta"):
        model = create_model("vgg16_classic")
    assert param_counts(model) == {"param_count": 134_301_514, "largest_layer_params": 25088 * 4096 + 4096}


def test_memory_rows_for_the_report() -> None:
    from cnnscale.scaling.memory import memory_rows

    pred = predict_rank_bytes(PSI, 2, 2, "adam", "no")
    records = [
        {"path": "z2", "summary": {"model": "m", "rank_peak_rss_bytes": [3, 5]},
         "env": {"world_size": 2, "zero_stage": 2, "zero_offload_optimizer": "none", "predicted_rank_bytes": pred}},
        {"path": "z3o", "summary": {"model": "m", "rank_peak_rss_bytes": [2, 2],
                                    "rank_max_memory_allocated_bytes": [1, 1]},
         "env": {"world_size": 2, "zero_stage": 3, "zero_offload_param": "cpu"}},
        {"path": "ddp", "summary": {"model": "m", "rank_peak_rss_bytes": [9, 8]}, "env": {"world_size": 2}},
        {"path": "old", "summary": {"model": "m", "peak_rss_bytes": 7}, "env": {"world_size": 1}},  # no per-rank
    ]
    rows = memory_rows(records)
    assert [(r["run"], r["config"]) for r in rows] == [("ddp", "DDP"), ("z2", "ZeRO-2"), ("z3o", "ZeRO-3 offload")]
    assert rows[0]["max_rank_peak_bytes"] == 9 and rows[0]["predicted_total_bytes"] is None
    assert rows[1]["rank_peak_bytes"] == [3, 5] and rows[1]["predicted_total_bytes"] == pred["total"]
    assert rows[2]["mem_kind"] == "gpu allocator" and rows[2]["rank_peak_bytes"] == [1, 1]
