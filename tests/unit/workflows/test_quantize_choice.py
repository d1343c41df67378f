"""The quantize stage's choice among candidate methods: the gate and the size budget, then size, then KL to the
teacher; tokens/s only beyond the spread of its timing rounds — so the same inputs choose the same method."""

import random

from raydistill.tasks.config import GateConfig
from raydistill.workflows.quantize import candidate_row, choose

FP32 = {"size_bytes": 1000 * 2**20, "tokens_per_s": 100.0, "kl_to_teacher": 0.5, "heldout_loss": 3.0,
        "top1_agreement": 0.5, "decode_ms_per_token": 10.0}


def row(method, size, speed, loss=3.0, kl=0.6, spread=0.1):
    """A candidate of ``size`` MB whose timing rounds spread ``spread`` around ``speed``."""
    m = {**FP32, "size_bytes": size * 2**20, "tokens_per_s": speed, "heldout_loss": loss, "kl_to_teacher": kl,
         "tokens_per_s_min": speed * (1 - spread / 2), "tokens_per_s_max": speed * (1 + spread / 2)}
    return candidate_row(method, m, FP32, GateConfig(max_heldout_loss=4.0), budget=0.3)


def rows_of(*rows):
    return {r["method"]: r for r in rows}


def test_the_smallest_method_passing_the_gate_within_the_budget_wins_then_the_lowest_kl():
    rows = rows_of(row("bf16", 500, 300.0), row("int8_weight_only", 250, 250.0, kl=0.51),
                   row("int4_weight_only", 160, 180.0, kl=0.9), row("gptq", 160, 170.0, kl=0.7),
                   row("qad", 160, 200.0, loss=5.0))
    assert not rows["bf16"]["within_budget"] and not rows["qad"]["gate_passed"]
    assert rows["int4_weight_only"]["size_ratio"] == 0.16 and rows["int4_weight_only"]["tokens_per_s_ratio"] == 1.8
    method, why = choose(rows)
    assert method == "gptq"  # as small as int4_weight_only, closer to the teacher; int8 is larger
    assert "the smallest: 160.00 MB (int4_weight_only the same size), next int8_weight_only 250.00 MB" in why
    assert "the lowest KL to the teacher of those: 0.7000 (int4_weight_only 0.9000)" in why


def test_timing_noise_cannot_change_the_choice():
    """Speeds drawn afresh per run, as a busy machine gives them: the choice never moves."""
    rng = random.Random(0)
    chosen = set()
    for _ in range(200):
        speeds = {m: rng.uniform(50, 400) for m in ("int8_weight_only", "int4_weight_only", "gptq", "mixed")}
        rows = rows_of(row("int8_weight_only", 250, speeds["int8_weight_only"], kl=0.5),
                       row("int4_weight_only", 160, speeds["int4_weight_only"], kl=0.9),
                       row("gptq", 160, speeds["gptq"], kl=0.7), row("mixed", 250, speeds["mixed"], kl=0.45))
        chosen.add(choose(rows)[0])
    assert chosen == {"gptq"}


def test_speed_decides_between_equals_only_beyond_its_measured_noise():
    # the same size and KL within 1 %: the faster wins only if its slowest round beats the other's fastest
    clear = rows_of(row("gptq", 160, 100.0, kl=0.700, spread=0.1), row("qad", 160, 150.0, kl=0.705, spread=0.1))
    method, why = choose(clear)
    assert method == "qad" and "faster in every timing round" in why
    noisy = rows_of(row("gptq", 160, 100.0, kl=0.700, spread=0.6), row("qad", 160, 150.0, kl=0.705, spread=0.6))
    method, why = choose(noisy)
    assert method == "gptq" and "speed did not decide: qad not faster beyond the spread" in why


def test_without_a_method_in_budget_the_smallest_passing_one_and_else_the_lowest_kl():
    rows = rows_of(row("bf16", 500, 300.0), row("int8_dynamic", 400, 90.0))
    assert choose(rows)[0] == "int8_dynamic"
    rows = rows_of(row("a", 200, 1.0, loss=9.0, kl=0.9), row("b", 200, 2.0, loss=9.0, kl=0.7))
    method, reason = choose(rows)
    assert method == "b" and "no method passes the gate" in reason
