"""The training benchmarks run end to end on the tiny teacher and print what README and the issues quote."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_kd_quality_rows_and_checks_follow_the_measurements(capsys):
    kdq = _load("kd_quality")
    out = kdq.main(["--teacher", "tiny", "--layers", "0", "--seq-len", "32", "--tokens", "4096", "--steps", "3",
                    "--threads", "1", "--heldout-windows", "4"])
    assert json.loads(capsys.readouterr().out) == out
    assert [r["method"] for r in out["rows"]] == ["ce", "online", "topk", "sampled", "hidden"]
    rows = {r["method"]: r for r in out["rows"]}
    for r in rows.values():
        assert set(r) >= {"heldout_loss", "top1_agreement", "ece", "wall_s"} and r["wall_s"] > 0
    ce, online = rows["ce"]["heldout_loss"], rows["online"]["heldout_loss"]
    if ce - online > 1e-3:  # gain_recovered comes from unrounded losses; the rows are rounded to 4 decimals
        assert out["gain_recovered"]["online"] == 1.0
        assert out["checks"]["sampled_recovers_92pct"] == (out["gain_recovered"]["sampled"] >= 0.92)
    elif ce - online < -1e-3:
        assert out["gain_recovered"]["sampled"] is None and out["checks"]["sampled_recovers_92pct"] is None
    kd = [rows[m] for m in ("online", "topk", "sampled", "hidden")]
    if all(r["heldout_loss"] != ce and r["top1_agreement"] != rows["ce"]["top1_agreement"] for r in kd):
        beats = all(r["heldout_loss"] < ce and r["top1_agreement"] > rows["ce"]["top1_agreement"] for r in kd)
        assert out["checks"]["every_kd_beats_ce"] == beats  # (a tie after rounding says nothing either way)


def test_chat_quality_compares_the_six_rows_and_the_masked_cache_stores_only_assistant_rows(capsys):
    cq = _load("chat_quality")
    out = cq.main(["--teacher", "tiny", "--layers", "0", "--prompts", "12", "--heldout-every", "4",
                   "--heldout-prompts", "3", "--prompt-lines", "2", "--answer-lines", "2", "--seq-len", "128",
                   "--steps", "3", "--on-policy-steps", "1", "--answer-tokens", "8", "--gen-tokens", "4",
                   "--threads", "1"])
    assert json.loads(capsys.readouterr().out) == out
    assert [r["method"] for r in out["rows"]] == list(cq.METHODS)
    rows = {r["method"]: r for r in out["rows"]}
    for r in rows.values():
        assert None not in (r["heldout_loss"], r["top1_agreement"], r["ece"], r["gen_teacher_nll"])
        assert 0 <= r["gen_length"] <= 4 and 0 < r["gen_distinct_2"] <= 1 and r["wall_s"] > 0
        assert isinstance(r["gen_example"], str)
    cache = out["cache"]
    masked, unmasked = cache["masked"], cache["unmasked"]
    assert cache["same_windows"] and masked["windows"] == unmasked["windows"]  # the same conversations
    assert masked["teacher_forwards"] == unmasked["teacher_forwards"] == -(-masked["windows"] // 4)  # batches of 4
    # one target row per assistant token, none for the system or user tokens
    assert masked["stored_rows"] == cache["assistant_tokens"] > 0 and out["checks"]["masked_stores_assistant_rows_only"]
    assert unmasked["stored_rows"] == cache["conversation_tokens"] > masked["stored_rows"]
    assert masked["bytes"] < unmasked["bytes"] and out["checks"]["masked_fewer_bytes"]
    checks, ce = out["checks"], rows["ce"]["heldout_loss"]
    assert checks["winner_heldout_loss"] in rows and checks["winner_gen_teacher_nll"] in rows
    kd = [rows[m] for m in cq.KD_METHODS]
    if all(r["heldout_loss"] != ce for r in kd):  # (a tie after rounding says nothing either way)
        assert checks["every_kd_beats_ce"] == all(r["heldout_loss"] < ce for r in kd)
    on, off = rows["seq_kd_onpolicy"]["gen_teacher_nll"], rows["seq_kd"]["gen_teacher_nll"]
    if on != off:
        assert checks["on_policy_helps"] == (on < off)
    assert out["setup"]["heldout_conversations"] == 3 and out["setup"]["train_conversations"] == 9


def test_chat_quality_rejects_bad_input():
    cq = _load("chat_quality")
    with pytest.raises(SystemExit, match="--on-policy-steps must be < --steps"):
        cq.parse_args(["--steps", "4", "--on-policy-steps", "4"])
    with pytest.raises(SystemExit, match="--heldout-every must be >= 2"):
        cq.parse_args(["--heldout-every", "1"])
    assert cq.parse_args(["--steps", "40"]).on_policy_steps == 10


def test_kd_quality_rejects_bad_input():
    kdq = _load("kd_quality")
    with pytest.raises(SystemExit, match="--steps must be >= 1"):
        kdq.parse_args(["--steps", "0"])
    with pytest.raises(SystemExit, match="--alpha must be in"):
        kdq.parse_args(["--alpha", "1.0"])
    with pytest.raises(SystemExit, match="comma list of integers"):
        kdq.parse_args(["--num-samples", "32,many"])
    with pytest.raises(SystemExit, match="lists a value twice"):
        kdq.parse_args(["--num-samples", "32,64,32"])
    with pytest.raises(SystemExit, match="needs the sampled method"):
        kdq.parse_args(["--num-samples", "32,64", "--methods", "ce", "online"])
    args = kdq.parse_args(["--num-samples", "32,64,128", "--methods", "sampled", "ce"])
    assert args.num_samples == 32 and args.methods == ["ce", "sampled", "sampled_n64", "sampled_n128"]


def test_gpu_teacher_runs_its_cpu_path_through_the_tasks_cache_code(capsys):
    """The device benchmark's code path (forward, draws, coding, commit; Ray-free) on the CPU with the tiny model."""
    gpu = _load("gpu_teacher")
    out = gpu.main(["--device", "cpu", "--models", "tiny", "--tokens", "1024", "--batch-size", "2",
                    "--windows-per-shard", "2", "--rounds", "1"])
    assert json.loads(capsys.readouterr().out) == out
    (row,) = out["rows"]
    assert row["tokens"] == 1024 and row["bare_tokens_per_s"] > 0 and row["cache_tokens_per_s"] > 0
    assert row["mfu"] is None and row["gflops_per_token"] > 0  # MFU only against a GPU's peak
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device here; use --device cpu"):
            gpu.main(["--models", "tiny"])


@pytest.mark.slow
def test_kd_quality_sweep_adds_rows_without_changing_the_sampled_row(capsys):
    kdq = _load("kd_quality")
    base = ["--teacher", "tiny", "--layers", "0", "--seq-len", "32", "--tokens", "4096", "--steps", "2",
            "--threads", "1", "--heldout-windows", "2", "--methods", "ce", "online", "sampled"]
    alone = kdq.main(base + ["--num-samples", "4"])
    swept = kdq.main(base + ["--num-samples", "4,255"])
    capsys.readouterr()
    assert [r["method"] for r in swept["rows"]] == ["ce", "online", "sampled", "sampled_n255"]
    strip = [{k: v for k, v in r.items() if k != "wall_s"} for r in swept["rows"][:3]]
    assert strip == [{k: v for k, v in r.items() if k != "wall_s"} for r in alone["rows"]]
    assert set(swept["gain_recovered"]) == {"online", "sampled", "sampled_n255"}
    assert swept["setup"]["num_samples"] == 4 and swept["setup"]["num_samples_sweep"] == [255]


@pytest.mark.slow
def test_train_step_reports_ratios_of_its_own_timings(capsys):
    ts = _load("train_step")
    out = ts.main(["--teacher", "tiny", "--layers", "0", "--seq-len", "32", "--tokens", "2048", "--steps", "2",
                   "--micro-batch", "2"])
    assert json.loads(capsys.readouterr().out) == out
    assert out["cached_over_ce"] == pytest.approx(out["cached_kd_step_s"] / out["ce_step_s"], abs=2e-3)
    assert out["online_over_cached"] == pytest.approx(out["online_kd_step_s"] / out["cached_kd_step_s"], abs=2e-3)
    assert 0 < out["setup"]["size_ratio"] < 1


@pytest.mark.slow
def test_cache_frontier_joins_bytes_per_token_and_gain_per_row(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # it imports its two sibling benchmarks
    frontier = _load("cache_frontier")
    out = frontier.main(["--teacher", "tiny", "--bytes-tokens", "1024", "--num-samples", "16,32", "--",
                         "--layers", "0", "--seq-len", "32", "--tokens", "4096", "--steps", "3", "--threads", "1",
                         "--heldout-windows", "4"])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(out))  # (JSON turns int keys to str)
    assert [r["targets"] for r in out["rows"]] == ["sampled N=16", "sampled N=32", "topk k=32"]
    gains = out["kd_quality"]["gain_recovered"] or {}
    for row, label in zip(out["rows"], ("sampled", "sampled_n32", "topk")):
        assert row["gain_recovered"] == gains.get(label)
    n16, n32 = out["rows"][:2]
    assert n16["bytes_per_token"] < n32["bytes_per_token"]  # more draws keep more ids
    assert n16["bytes_per_token_with_logprobs"] > n16["bytes_per_token"]  # log-probs cost bytes
    assert out["checks"]["default_within_bytes"] is None  # the default N (64) was not measured


@pytest.mark.slow
def test_cache_scaling_compares_one_node_with_two_on_a_real_cluster(capsys):
    scaling = _load("cache_scaling")
    out = scaling.main(["--teacher", "tiny", "--tokens", "4096", "--seq-len", "64", "--batch-size", "8"])
    assert json.loads(capsys.readouterr().out) == out
    one, two = out["one_node"], out["two_nodes"]
    assert (one["actors"], one["threads_per_actor"], two["actors"], two["threads_per_actor"]) == (1, 2, 2, 1)
    assert one["tokens"] == two["tokens"] == out["tokens"] > 0  # the same corpus, all of it computed each time
    assert out["scaling_efficiency"] == pytest.approx(two["tokens_per_s"] / one["tokens_per_s"], abs=2e-3)
    assert two["nodes"] == 2 and out["checks"]["two_nodes_used"]


@pytest.mark.slow
def test_submit_overhead_times_the_same_pipeline_locally_and_as_a_job(capsys):
    overhead = _load("submit_overhead")
    out = overhead.main(["--teacher", "tiny", "train.steps=2"])
    assert json.loads(capsys.readouterr().out) == out
    assert out["job_over_local"] == pytest.approx(out["job_wall_s"] / out["local_wall_s"], abs=5e-3)
    assert out["local_wall_s"] > 0 and out["job_wall_s"] > 0


def test_cluster_benchmarks_take_teacher_and_corpus_like_the_others():
    for name in ("cache_scaling", "submit_overhead"):
        args = _load(name).parse_args(["--teacher", "some/dir", "--corpus", "texts"])
        assert (args.teacher, args.corpus) == ("some/dir", "texts")


@pytest.mark.slow
def test_serve_benchmark_measures_http_against_in_process_with_spread_keys_and_a_two_replica_swap():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve.py"), "--concurrency", "1", "4",
                           "--requests", "8", "--rounds", "2", "--max-tokens", "4", "--skip-kill"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)  # stdout holds only the JSON (Ray's and register's lines go to stderr)
    assert set(out["levels"]) == {"1", "4"}
    for c, level in out["levels"].items():
        assert level["failed"] == 0 and level["requests"] == 8
        assert level["http_over_inprocess"] == pytest.approx(
            level["generated_tokens_per_s"] / level["inprocess_tokens_per_s"])
        assert 1 <= level["rows_per_forward"] <= min(int(c), 8) and 0 < level["replica_busy_share"] <= 1
        assert level["client_cores"] > 0 and level["proxy_cores"] > 0 and level["replica_cores"] > 0
        assert level["stream_ttft_ms"]["p50"] > 0
        spread = level["http_over_inprocess_spread"]
        assert len(level["http_over_inprocess_rounds"]) == 2
        assert spread["min"] <= spread["median"] <= spread["max"] and spread["min"] > 0
    assert out["unauthenticated_status"] == 401 and out["checks"]["unauthenticated_status_eq_401"]
    assert out["openai_client_ok"] and out["swap_seen"] and out["swap_failed_requests"] == 0
    assert out["swap_replicas"] == 2 and out["swap_mixed_seconds"] >= 0 and out["swap_seconds"] > 0
    assert out["swap_old_answers_after_switch"] == 0
    assert out["checks"]["swap_failed_requests_eq_0"] and out["checks"]["replica_kill_success_rate_ge_0.97"] is None


@pytest.mark.slow
def test_cache_scale_runs_the_real_verb_at_two_sizes_and_reports_per_shard_ratios(capsys):
    scale = _load("cache_scale")
    out = scale.main(["--sizes", "40", "80", "--s3-sizes"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out
    first, second = out["local"]
    assert (first["shards"], second["shards"]) == (40, 80) and second["teacher_forwards"] == 80
    assert first["rerun_teacher_forwards"] == second["rerun_teacher_forwards"] == 0
    assert first["rerun_shard_bytes_read"] == 0 and second["rerun_requests"] == {"get": 1, "list": 1}
    s = out["local_summary"]
    want = (second["first_wall_s"] - first["first_wall_s"]) / 40
    assert s["marginal_s_per_shard_large"] == s["marginal_s_per_shard_small"] == pytest.approx(want, abs=1e-4)
    # two sizes: the same pair of runs on both sides of the ratio (1.0), or no ratio when the larger run was not
    # slower (40 shards apart, the machine's load can make it so)
    assert s["per_shard_flatness"] == (pytest.approx(1.0, abs=1e-3) if s["marginal_s_per_shard_small"] > 0 else None)
    assert out["checks"]["rerun_reads_no_shard_bytes"]


def test_cache_scale_refuses_sizes_out_of_order():
    with pytest.raises(SystemExit):
        _load("cache_scale").parse_args(["--sizes", "400", "100"])


def test_generate_throughput_compares_the_verb_with_a_bare_generate_loop_and_reruns_nothing(capsys):
    gt = _load("generate_throughput")
    out = gt.main(["--teacher", "tiny", "--prompts", "6", "--max-tokens", "4", "--batch-size", "3", "--threads", "1",
                   "--rounds", "1"])
    assert json.loads(capsys.readouterr().out) == out
    assert out["answers"] == 6 and out["generated_tokens"] > 0 and out["rerun_generated_tokens"] == 0
    assert out["ratio"] == pytest.approx(out["generate_tokens_per_s"] / out["bare_generate_tokens_per_s"], abs=5e-3)
    assert out["bare_tokens"] == out["generated_tokens"]  # greedy: both sides decode the same tokens
