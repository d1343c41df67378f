"""benchmarks/quantize.py: the issue's targets are judged from the measured rows (and only from them)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_quantize", ROOT / "benchmarks" / "quantize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(method, size, speed, kl):
    return {"method": method, "size_ratio": size, "tokens_per_s_ratio": speed, "kl_to_teacher": kl}


def test_checks_follow_the_rows():
    by = {r["method"]: r for r in (row("fp32", 1.0, 1.0, 1.00), row("int8_dynamic", 0.25, 0.5, 1.04),
                                   row("int8_weight_only", 0.28, 1.9, 1.01), row("int4_weight_only", 0.16, 1.8, 1.40),
                                   row("gptq", 0.16, 1.8, 1.10), row("qad", 0.16, 1.8, 1.25),
                                   row("mixed", 0.25, 1.7, 1.005))}
    c = _bench().checks(by)
    assert c["int8_dynamic_speed_ge_2x"] is False and c["int8_dynamic_size_le_0.30"] is True
    assert c["int8_dynamic_kl_le_1.05x_fp32"] is True and c["int4_or_gptq_size_le_0.20"] is True
    assert c["gptq_kl_below_rtn_int4"] is True
    assert c["qad_kl_recovered"] == 0.375 and c["qad_recovers_ge_50pct"] is False  # (1.40 - 1.25) / 0.40
    assert c["mixed_kl_below_int8_weight_only"] is True and c["mixed_kl_below_int8_dynamic"] is True


def test_checks_without_the_methods_they_need_are_absent():
    c = _bench().checks({"fp32": row("fp32", 1.0, 1.0, 1.0), "bf16": row("bf16", 0.5, 1.8, 1.0)})
    assert c == {"int4_or_gptq_size_le_0.20": None}
