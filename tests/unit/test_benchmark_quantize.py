"""benchmarks/quantize.py: the issues' targets are judged from the measured rows (and only from them)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_quantize", ROOT / "benchmarks" / "quantize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(method, size, speed, kl, rss=None, loads=None, slowest=None):
    r = {"method": method, "size_ratio": size, "tokens_per_s_ratio": speed, "kl_to_teacher": kl,
         "tokens_per_s_ratio_min": speed if slowest is None else slowest}
    if rss is not None:
        r["rss_over_bf16"] = rss
    if loads is not None:
        r["export_loads"] = loads
    return r


def test_checks_follow_the_rows():
    by = {r["method"]: r for r in (row("fp32", 1.0, 1.0, 1.00), row("bf16", 0.5, 3.0, 1.0, rss=1.0, loads=True),
                                   row("int8_dynamic", 0.25, 0.5, 1.04, loads=True),
                                   row("int8_weight_only", 0.25, 2.4, 1.01, rss=0.55, loads=True, slowest=1.9),
                                   row("int4_weight_only", 0.16, 1.8, 1.40, rss=0.45, loads=True),
                                   row("gptq", 0.16, 1.8, 1.10, rss=0.35, loads=False), row("qad", 0.16, 1.8, 1.25),
                                   row("mixed", 0.25, 1.7, 1.005))}
    c = _bench().checks(by)
    assert c["int8_dynamic_speed_ge_2x"] is False and c["int8_dynamic_size_le_0.30"] is True
    assert c["int8_dynamic_kl_le_1.05x_fp32"] is True and c["int4_or_gptq_size_le_0.20"] is True
    assert c["int8_weight_only_speed_ge_2x"] is True and c["int8_weight_only_speed_ge_2x_every_round"] is False
    assert c["int8_weight_only_kl_le_1.05x_fp32"] is True
    assert c["int8_weight_only_rss_over_bf16_le_0.6"] is True and c["int4_weight_only_rss_over_bf16_le_0.4"] is False
    assert c["gptq_rss_over_bf16_le_0.4"] is True and c["every_export_loads"] is False
    assert c["gptq_kl_below_rtn_int4"] is True
    assert c["qad_kl_recovered"] == 0.375 and c["qad_recovers_ge_50pct"] is False  # (1.40 - 1.25) / 0.40
    assert c["mixed_kl_below_int8_weight_only"] is True and c["mixed_kl_below_int8_dynamic"] is True


def test_checks_without_the_methods_they_need_are_absent():
    c = _bench().checks({"fp32": row("fp32", 1.0, 1.0, 1.0), "bf16": row("bf16", 0.5, 1.8, 1.0)})
    assert c == {"int8_weight_only_rss_over_bf16_le_0.6": None, "int4_weight_only_rss_over_bf16_le_0.4": None,
                 "gptq_rss_over_bf16_le_0.4": None, "int4_or_gptq_size_le_0.20": None, "every_export_loads": None}
