"""The quantize stage's choice among candidate methods: the gate, the size budget, then tokens/s."""

from raydistill.tasks.config import GateConfig
from raydistill.workflows.quantize import candidate_row, choose

FP32 = {"size_bytes": 1000, "tokens_per_s": 100.0, "kl_to_teacher": 0.5, "heldout_loss": 3.0,
        "top1_agreement": 0.5, "decode_ms_per_token": 10.0}


def row(method, size, speed, loss=3.0, kl=0.6):
    m = {**FP32, "size_bytes": size, "tokens_per_s": speed, "heldout_loss": loss, "kl_to_teacher": kl}
    return candidate_row(method, m, FP32, GateConfig(max_heldout_loss=4.0), budget=0.3)


def test_the_fastest_method_that_passes_the_gate_within_the_budget_wins():
    rows = {r["method"]: r for r in (row("bf16", 500, 300.0), row("int8_weight_only", 280, 150.0),
                                     row("int4_weight_only", 160, 180.0), row("gptq", 160, 190.0, loss=5.0))}
    assert not rows["bf16"]["within_budget"] and not rows["gptq"]["gate_passed"]
    assert rows["int4_weight_only"]["size_ratio"] == 0.16 and rows["int4_weight_only"]["tokens_per_s_ratio"] == 1.8
    method, reason = choose(rows)
    assert method == "int4_weight_only" and "best tokens/s" in reason


def test_without_a_method_in_budget_the_smallest_passing_one_and_else_the_lowest_kl():
    rows = {r["method"]: r for r in (row("bf16", 500, 300.0), row("int8_dynamic", 400, 90.0))}
    assert choose(rows)[0] == "int8_dynamic"
    rows = {r["method"]: r for r in (row("a", 200, 1.0, loss=9.0, kl=0.9), row("b", 200, 2.0, loss=9.0, kl=0.7))}
    method, reason = choose(rows)
    assert method == "b" and "no method passes the gate" in reason
