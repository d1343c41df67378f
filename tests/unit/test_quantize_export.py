"""Standard exports (tasks/quantize/export*.py): each loads in its maintained loader — plain transformers for
the compressed-tensors checkpoint, transformers' ``gguf_file=`` for the GGUF — and gives raydistill's logits.

Two comparisons, two tolerances:
- against a float32 forward of raydistill's own dequantized weights (what the files claim to hold): the GGUF and
  the int4 checkpoints hold exactly those weights, so only float32 summation order differs (≤ 1e-5 of the
  largest logit); the int8 checkpoints' embedding is float16 (compressed-tensors quantizes Linear layers only),
  which rounds an int8 value by ≤ 2⁻¹² relative (≤ 1e-3 of the largest logit here);
- against raydistill's own forward (its low-bit kernels take bf16 activations, 8 significant bits, where the
  loaders compute in float32): ≤ 2 % of the largest logit and a KL below 1e-3 nats per position (int8_dynamic
  also quantizes its activations to int8 at run time, which no file holds: 5 %).
"""

import copy
import json

import gguf
import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from raydistill.tasks.quantize import load_quantized, quantize, quantize_dynamic_int8, save_quantized
from raydistill.tasks.quantize.export import export_all, export_tags, logits_gap, verify_exports
from raydistill.tasks.quantize.export_gguf import _permute
from raydistill.tasks.quantize.methods import HalfLinear, _set
from raydistill.tasks.quantize.qlinear import QuantEmbedding, QuantLinear, dequantize

def llama(vocab, tied=True, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                                        max_position_embeddings=128, bos_token_id=1, eos_token_id=2)).eval()


def float_reference(model):
    """raydistill's model with every low-bit or bf16 layer replaced by a float32 one holding its dequantized
    weights, computing in float32: what an exact export must reproduce."""
    ref = copy.deepcopy(model)
    for name, m in list(ref.named_modules()):  # embeddings first: an untied one holds a QuantLinear itself
        if isinstance(m, QuantEmbedding):
            _set(ref, name, nn.Embedding.from_pretrained(m.weight))
    for name, m in list(ref.named_modules()):
        if isinstance(m, (QuantLinear, HalfLinear)):
            w = m.weight_float() if isinstance(m, QuantLinear) else m.weight.float()
            new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            new.weight.data, new.bias = w, None if m.bias is None else nn.Parameter(m.bias.float())
            _set(ref, name, new)
    return ref.float()  # a bf16 model's weights upcast exactly


def quantized(model, method, **kw):
    plan = None
    if method == "mixed":
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        plan = {n: (16, 8, 4)[i % 3] for i, n in enumerate(names)}
    calib = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(4))
    return quantize(model, method, group_size=kw.pop("group_size", 32), calibration=calib, plan=plan, **kw)


@pytest.fixture(scope="module")
def small_tokenizer():
    """A byte-level BPE of 384 tokens trained here on a few lines: GGUF readers parse a 49k vocabulary for
    seconds, and the formats do not depend on its size (the SmolLM2 one is checked once, below)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    lines = ["ROMEO. But soft, what light through yonder window breaks?", "It is the east, and Juliet is the sun.",
             "Shall I compare thee to a summer's day? Thou art more lovely and more temperate."] * 20
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<|endoftext|>")


CASES = [("int4_weight_only", True, {}), ("int4_weight_only", False, {}), ("gptq", True, {}),
         ("int8_weight_only", True, {}), ("int8_weight_only", False, {"int8_per_channel": False}),
         ("int8_dynamic", True, {}), ("bf16", True, {}), ("bf16", False, {}), ("mixed", True, {}),
         ("int4_weight_only", True, {"group_size": 64})]


@pytest.mark.parametrize("method,tied,kw", CASES, ids=lambda c: str(c))
def test_each_export_loads_in_its_maintained_loader_and_matches(tmp_path, small_tokenizer, method, tied, kw):
    model = llama(len(small_tokenizer), tied=tied)
    src = save_quantized(quantized(model, method, **kw), small_tokenizer, tmp_path / method)
    info = export_all(src, tmp_path / "export", name="tiny-student")
    ours = load_quantized(src)
    ids = torch.randint(0, len(small_tokenizer), (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact, own = float_reference(ours)(input_ids=ids).logits, ours(input_ids=ids).logits
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "hf", dtype=torch.float32).eval()
    gg = AutoModelForCausalLM.from_pretrained(tmp_path / "export", gguf_file="tiny-student.gguf",
                                              dtype=torch.float32).eval()
    int8_embedding = method in ("int8_weight_only", "int8_dynamic")
    for kind, loaded in (("hf", hf), ("gguf", gg)):
        with torch.no_grad():
            theirs = loaded(input_ids=ids).logits
        held = logits_gap(exact, theirs)
        assert held["max_rel_diff"] <= (1e-3 if kind == "hf" and int8_embedding else 1e-5), (kind, held)
        vs_own = logits_gap(own, theirs)
        assert vs_own["max_rel_diff"] <= (0.05 if method == "int8_dynamic" else 0.02), (kind, vs_own)
        assert vs_own["kl"] < 1e-3, (kind, vs_own)
    checks = verify_exports(src, info, ids, model=ours)  # what the quantize stage records
    assert checks["hf"]["loads"] and checks["gguf"]["loads"]
    with torch.no_grad():
        assert checks["gguf"]["max_abs_diff"] == pytest.approx(logits_gap(own, gg(input_ids=ids).logits)
                                                               ["max_abs_diff"])


def test_the_checkpoint_is_compressed_tensors_with_raydistills_integers(tmp_path, small_tokenizer):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file

    q = quantized(llama(len(small_tokenizer), tied=False), "int4_weight_only")
    src = save_quantized(q, small_tokenizer, tmp_path / "q")
    info = export_all(src, tmp_path / "export", name="m")
    config = json.loads((tmp_path / "export" / "hf" / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    weights = qc["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["strategy"], weights["group_size"], weights["symmetric"]) == (4, "group", 32,
                                                                                                      True)
    stored = load_file(str(tmp_path / "export" / "hf" / "model.safetensors"))
    layer = q.model.layers[0].mlp.up_proj
    ints, scale = layer.integers()
    assert torch.equal(unpack_from_int32(stored["model.layers.0.mlp.up_proj.weight_packed"], 4, ints.shape), ints)
    assert torch.equal(stored["model.layers.0.mlp.up_proj.weight_scale"], scale)
    assert info["hf"]["format"] == "compressed-tensors pack-quantized (int4 group 32 ×15)"
    assert stored["model.embed_tokens.weight"].dtype == torch.float16 and not config["tie_word_embeddings"]


@pytest.mark.parametrize("method,kind", [("int4_weight_only", "Q4_0"), ("int8_weight_only", "Q8_0")])
def test_the_gguf_blocks_hold_raydistills_integers_and_scales(tmp_path, small_tokenizer, method, kind):
    q = quantized(llama(len(small_tokenizer)), method)
    src = save_quantized(q, small_tokenizer, tmp_path / "q")
    info = export_all(src, tmp_path / "export", name="m")
    assert info["gguf"]["types"] == {kind: 15, "F32": 5} and info["gguf"]["inexact_scales"] == 0
    reader = gguf.GGUFReader(str(tmp_path / "export" / "m.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied: the reader ties the head to token_embd
    for gname, layer, heads in (("blk.0.ffn_up.weight", q.model.layers[0].mlp.up_proj, None),
                                ("blk.1.attn_k.weight", q.model.layers[1].self_attn.k_proj, 2),
                                ("token_embd.weight", q.lm_head, None)):
        t = tensors[gname]
        assert t.tensor_type.name == kind
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        want = dequantize(*layer.integers())
        want = _permute(want, heads) if heads else want
        assert np.array_equal(got.reshape(want.shape), want.numpy())  # bit for bit
    metadata = {f.name: f for f in reader.fields.values()}
    assert "tokenizer.ggml.merges" in metadata and "tokenizer.ggml.tokens" in metadata


def test_the_gguf_tokenizer_encodes_as_raydistills(tmp_path, tiny_tokenizer):
    src = save_quantized(quantized(llama(len(tiny_tokenizer)), "int8_weight_only"), tiny_tokenizer, tmp_path / "q")
    export_all(src, tmp_path / "export", name="m")
    theirs = AutoTokenizer.from_pretrained(tmp_path / "export", gguf_file="m.gguf")
    for text in ("ROMEO. But soft, what light through yonder window breaks?", "<|im_start|>user\nhi  123\n",
                 "  Thou art   more lovely — and more temperate: 1599."):
        assert theirs(text)["input_ids"] == tiny_tokenizer(text)["input_ids"], text
    assert (theirs.bos_token_id, theirs.eos_token_id) == (tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id)


def test_what_a_format_cannot_hold_is_said_in_the_tags(tmp_path, small_tokenizer):
    from raydistill.tasks.config import PeftConfig
    from raydistill.tasks.students import wrap_peft

    student = wrap_peft(llama(len(small_tokenizer)), PeftConfig(method="prompt", num_virtual_tokens=4))
    src = save_quantized(quantize(student, "int8_dynamic", group_size=32), small_tokenizer, tmp_path / "q")
    info = export_all(src, tmp_path / "export", name="m")
    tags = export_tags(info, {"hf": {"loads": True, "max_abs_diff": 0.01}, "gguf": {"loads": False, "error": "x"}})
    notes = tags["export.notes"]
    assert "input embedding is float16" in notes and "activations per token at run time" in notes
    assert "adapter is in adapter/" in notes and "gguf: a PEFT adapter is not in the GGUF" in notes
    assert (tmp_path / "export" / "hf" / "adapter" / "adapter_config.json").is_file()
    assert tags["export.hf.loads"] == "true" and tags["export.gguf.loads"] == "false"
    assert tags["export.gguf.types"] == "Q8_0×15, F32×5"


def test_groups_gguf_blocks_cannot_carry_are_written_f16_and_still_load(tmp_path, small_tokenizer):
    q = quantized(llama(len(small_tokenizer)), "int4_weight_only", group_size=16)
    src = save_quantized(q, small_tokenizer, tmp_path / "q")
    info = export_all(src, tmp_path / "export", name="m")
    assert info["gguf"]["types"] == {"F16": 15, "F32": 5} and "not a multiple of 32: F16" in info["gguf"]["notes"][0]
    ids = torch.randint(0, len(small_tokenizer), (1, 16), generator=torch.Generator().manual_seed(2))
    assert verify_exports(src, info, ids)["gguf"]["max_rel_diff"] < 0.02


def test_the_deprecated_torch_ao_layout_is_refused_by_both_formats_with_the_alternative(tmp_path, small_tokenizer):
    src = save_quantized(quantize_dynamic_int8(llama(len(small_tokenizer))), small_tokenizer, tmp_path / "q")
    info = export_all(src, tmp_path / "export", name="m")
    assert "quantize with int8_dynamic or int8_weight_only instead" in info["hf"]["error"]
    assert "no GGUF export" in info["gguf"]["error"]
    assert export_tags(info)["export.hf.format"].startswith("none: ")
