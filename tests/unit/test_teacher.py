"""tasks.teacher: tokenizer cache, identities, tiny/HF teachers (the 20 s GGUF model load is marked slow)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from raydistill.tasks.config import ConfigError, TeacherConfig, TinyModelConfig
from raydistill.tasks.teacher import (identity_key_fields, load_teacher, load_tokenizer, smollm2_gguf, teacher_identity,
                                      tokenizer_hash)

TINY = TinyModelConfig(num_layers=1, hidden_size=16, num_heads=2, num_kv_heads=1, intermediate_size=32, seed=3)


def test_gguf_tokenizer_is_converted_once_and_cached(tmp_path, monkeypatch, tiny_tokenizer):
    monkeypatch.setenv("RAYDISTILL_HOME", str(tmp_path))
    first = load_tokenizer(TeacherConfig(source="smollm2"))
    cached = list((tmp_path / "tokenizers").iterdir())
    assert len(cached) == 1 and (cached[0] / "tokenizer.json").is_file()
    assert not [p for p in (tmp_path / "tokenizers").iterdir() if p.name.startswith(".")]  # no temp dirs left
    second = load_tokenizer(TeacherConfig(source="tiny"))
    assert tokenizer_hash(first) == tokenizer_hash(second) == tokenizer_hash(tiny_tokenizer)
    assert len(second) == 49152 and second.eos_token_id is not None
    text = "But soft, what light through yonder window breaks?"
    assert first(text)["input_ids"] == second(text)["input_ids"]


def test_gguf_identity_hashes_the_weights_without_loading():
    ident = teacher_identity(TeacherConfig(source="smollm2"))
    with open(smollm2_gguf(), "rb") as f:
        assert ident["weights_sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert ident["kind"] == "gguf" and ident["architecture"]["block_count"] == 30
    assert ident["architecture"]["vocab_size"] == 49152
    by_path = teacher_identity(TeacherConfig(source=str(smollm2_gguf())))
    assert identity_key_fields(by_path) == identity_key_fields(ident)  # same weights, same cache


def test_tiny_teacher_is_seeded_and_leaves_the_global_rng_alone(tiny_tokenizer):
    cfg = TeacherConfig(source="tiny", tiny=TINY)
    state = torch.random.get_rng_state()
    a, ident = load_teacher(cfg)
    assert torch.equal(torch.random.get_rng_state(), state)
    b, _ = load_teacher(cfg)
    assert not a.training and a.config.vocab_size == len(tiny_tokenizer) and a.config.tie_word_embeddings
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    other = teacher_identity(TeacherConfig(source="tiny", tiny=TinyModelConfig(**{**vars(TINY), "seed": 4})))
    assert other["weights_sha256"] != ident["weights_sha256"]
    assert teacher_identity(cfg) == ident


def test_hf_directory_teacher(tmp_path, tiny_tokenizer):
    model, _ = load_teacher(TeacherConfig(source="tiny", tiny=TINY))
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    cfg = TeacherConfig(source=str(tmp_path / "m"))
    loaded, ident = load_teacher(cfg)
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        assert torch.allclose(loaded(x).logits, model(x).logits, atol=1e-5)
    assert ident["kind"] == "hf" and ident["architecture"]["hidden_size"] == 16
    assert tokenizer_hash(load_tokenizer(cfg)) == tokenizer_hash(tiny_tokenizer)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    model.save_pretrained(tmp_path / "m")
    assert teacher_identity(cfg)["weights_sha256"] != ident["weights_sha256"]


def test_bad_sources_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        teacher_identity(TeacherConfig(source=str(tmp_path / "nope")))
    (tmp_path / "d").mkdir()
    with pytest.raises(ConfigError, match="neither a .gguf"):
        teacher_identity(TeacherConfig(source=str(tmp_path / "d")))
    (tmp_path / "d" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="no weight files"):
        teacher_identity(TeacherConfig(source=str(tmp_path / "d")))
    (tmp_path / "fake.gguf").write_bytes(b"NOPE" + bytes(20))
    with pytest.raises(ConfigError, match="not a GGUF"):
        teacher_identity(TeacherConfig(source=str(tmp_path / "fake.gguf")))
    with pytest.raises(ConfigError, match="teacher.tokenizer"):
        load_tokenizer(TeacherConfig(source="tiny", tokenizer=str(tmp_path / "missing")))


@pytest.mark.slow
def test_smollm2_teacher_predicts_shakespeare(tiny_tokenizer):
    """The real teacher (~20 s to de-quantize): low NLL on text it has surely seen."""
    model, ident = load_teacher(TeacherConfig(source="smollm2"))
    ids = tiny_tokenizer("To be, or not to be, that is the question:", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logits = model(ids).logits
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert logits.shape[-1] == 49152 and float(nll) < 4.0


def test_a_trained_students_export_teaches_the_next_generation(tmp_path, tiny_tokenizer):
    """Self-distillation: generation k's ``train/student`` directory is generation k+1's teacher."""
    from raydistill.tasks.config import PeftConfig, StudentConfig
    from raydistill.tasks.students import build_student, save_student

    tiny = TeacherConfig(source="tiny", tiny=TinyModelConfig(num_layers=1, hidden_size=32, intermediate_size=64),
                         dtype="float32")
    teacher, _ = load_teacher(tiny)
    student = build_student(StudentConfig(init="born_again"), teacher).eval()
    export = save_student(student, tiny_tokenizer, tmp_path / "gen0" / "student")
    cfg = TeacherConfig(source=str(export), dtype="float32")  # auto could be bf16 here: compared bit for bit
    identity = teacher_identity(cfg)
    assert identity["kind"] == "hf" and identity["architecture"]["num_hidden_layers"] == 1
    assert identity["weights_sha256"] != teacher_identity(tiny)["weights_sha256"]  # another cache key
    model, _ = load_teacher(cfg)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, student(ids).logits)
    assert load_tokenizer(cfg).get_vocab() == tiny_tokenizer.get_vocab()
    prefix = build_student(StudentConfig(init="born_again", peft=PeftConfig(method="prefix", num_virtual_tokens=2)),
                           teacher)
    with pytest.raises(ConfigError, match="student with a prefix adapter, which cannot teach"):
        teacher_identity(TeacherConfig(source=str(save_student(prefix, tiny_tokenizer, tmp_path / "prefix"))))

def test_auto_dtype_is_resolved_in_the_identity_so_gpu_and_cpu_caches_never_share_shard_keys(monkeypatch):
    """``teacher.dtype: auto`` means bf16 where the teacher runs on CUDA or on a CPU with native bf16, else fp32:
    the identity (hashed into every shard key) records what it resolved to and the device type, and an explicit
    dtype is recorded as it is."""
    monkeypatch.setattr("raydistill.tasks.device._CPU_BF16", [False])
    auto = TeacherConfig(source="tiny", tiny=TINY)
    on_cpu, on_gpu = teacher_identity(auto), teacher_identity(auto, "cuda")
    assert on_cpu["dtype"] == "float32" and on_gpu["dtype"] == "bfloat16"
    assert (on_cpu["device"], on_gpu["device"]) == ("cpu", "cuda")
    assert identity_key_fields(on_cpu) != identity_key_fields(on_gpu)
    assert on_cpu == teacher_identity(TeacherConfig(source="tiny", tiny=TINY, dtype="float32"))
    assert teacher_identity(TeacherConfig(source="tiny", tiny=TINY, dtype="float16"), "cuda")["dtype"] == "float16"
    bf16_cpu = teacher_identity(TeacherConfig(source="tiny", tiny=TINY, dtype="bfloat16"))
    assert identity_key_fields(bf16_cpu) != identity_key_fields(on_gpu)  # same dtype, another device: other keys
    monkeypatch.setattr("raydistill.tasks.device._CPU_BF16", [True])
    assert teacher_identity(auto)["dtype"] == "bfloat16"  # a CPU with AVX-512 BF16 / AMX runs the teacher in bf16


def test_a_teacher_loaded_in_bf16_gives_fp32_targets_of_the_same_format(tiny_tokenizer):
    """What a GPU actor does, on the CPU: the teacher in bf16, its logits upcast before the format encodes them, so
    the shard's fields have the dtypes and shapes of an fp32 teacher's and its draws differ only by rounding."""
    import numpy as np

    from raydistill.tasks.cache.encode import encode_shard
    from raydistill.tasks.cache.formats import sampled

    tokens = np.arange(2 * 9, dtype=np.int32).reshape(2, 9) + 100
    params = sampled.Params(num_samples=16, seed=0, logprobs=True)
    fp32, _ = load_teacher(TeacherConfig(source="tiny", tiny=TINY))
    bf16, ident = load_teacher(TeacherConfig(source="tiny", tiny=TINY, dtype="bfloat16"))
    assert ident["dtype"] == "bfloat16" and next(bf16.parameters()).dtype == torch.bfloat16
    a, _, _ = encode_shard(fp32, tokens, "heldout", params, 1.0, 2, "k")
    b, _, _ = encode_shard(bf16, tokens, "heldout", params, 1.0, 2, "k")
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype for k in a)
    assert a["logp"].dtype == np.float32 and a["row_len"].shape == b["row_len"].shape
    assert np.abs(a["teacher_nll"] - b["teacher_nll"]).max() < 0.1  # the same teacher, rounded to bf16


def test_a_train_config_with_dtype_auto_accepts_the_cache_whatever_auto_resolved_to(tmp_path, tiny_tokenizer):
    """A cache computed on GPUs (auto → bf16) is what ``teacher.dtype: auto`` asked for, also when training runs
    elsewhere; an explicit dtype must match the cache's."""
    from raydistill.tasks.cache.manifest import CacheMismatchError, check_compatible, new_manifest, write_manifest
    from raydistill.tasks.cache.shards import open_cache
    from raydistill.tasks.config import CacheConfig, CorpusConfig

    auto, cache_cfg, corpus = TeacherConfig(source="tiny", tiny=TINY), CacheConfig(), CorpusConfig(seq_len=8)
    written = new_manifest(teacher_identity(auto, "cuda"), tokenizer_hash(tiny_tokenizer), cache_cfg, corpus)
    written["complete"] = True
    write_manifest(str(tmp_path), written)
    cache = open_cache(str(tmp_path))
    check_compatible(cache, auto, cache_cfg, corpus)
    check_compatible(cache, TeacherConfig(source="tiny", tiny=TINY, dtype="bfloat16"), cache_cfg, corpus)
    with pytest.raises(CacheMismatchError, match="teacher.dtype"):
        check_compatible(cache, TeacherConfig(source="tiny", tiny=TINY, dtype="float32"), cache_cfg, corpus)
