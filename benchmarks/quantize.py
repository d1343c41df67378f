"""int8 (dynamic, per-channel) vs fp32: weight bytes on disk, forward and decoding latency, KL and top-1 agreement.

    python benchmarks/quantize.py                                  # SmolLM2-shaped 4-layer student, random weights
    python benchmarks/quantize.py --layers 2 --hidden 64 --intermediate 128 --heads 4 --kv-heads 2   # tiny
    python benchmarks/quantize.py --student runs/smollm2-shakespeare/train/student                  # a trained one

Prints one JSON object. KL and agreement compare the int8 model with its own fp32 original on random token
windows (the quantization error alone; ``raydistill quantize`` scores both against the teacher instead).
Timings are medians over ``--repeats`` runs with ``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


from raydistill.tasks.generate import complete
from raydistill.tasks.quantize import load_quantized, model_file_size, quantize_dynamic_int8, save_quantized


def synthetic(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, tie_word_embeddings=True, max_position_embeddings=2048,
                         eos_token_id=2)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def median_s(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class _Chars:
    """A stand-in tokenizer for random models: one id per character (``complete`` needs encode/decode)."""

    pad_token_id, eos_token_id = 0, 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(c) % 200 for c in text]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(32 + i % 90) for i in ids)


def bench(model, tokenizer, windows: torch.Tensor, args) -> dict:
    with torch.inference_mode():
        forward = median_s(lambda: model(input_ids=windows), args.repeats)
    decode = median_s(lambda: complete(model, tokenizer, ["ROMEO.\nBut soft, what light"], max_tokens=args.tokens,
                                       temperature=0.0), args.repeats)
    return {"forward_ms": 1000 * forward, "forward_tokens_per_s": windows.numel() / forward,
            "decode_ms_per_token": 1000 * decode / args.tokens}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", help="a Hugging Face student dir (default: a random SmolLM2-shaped model)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--batch", type=int, default=4, help="windows per forward pass")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--tokens", type=int, default=16, help="greedy tokens for the decoding latency (batch 1)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    if args.student:
        from transformers import AutoTokenizer

        from raydistill.tasks.students import load_student

        fp32, tokenizer = load_student(args.student), AutoTokenizer.from_pretrained(args.student)
    else:
        fp32, tokenizer = synthetic(args), _Chars()
    vocab = fp32.config.vocab_size
    windows = torch.randint(0, vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        fp32.save_pretrained(Path(tmp, "fp32"))
        save_quantized(quantize_dynamic_int8(fp32), None, Path(tmp, "int8"))
        int8 = load_quantized(Path(tmp, "int8"))
        sizes = {"fp32": model_file_size(Path(tmp, "fp32")), "int8": model_file_size(Path(tmp, "int8"))}
    with torch.inference_mode():
        a, b = fp32(input_ids=windows).logits.float(), int8(input_ids=windows).logits.float()
    la, lb = a.log_softmax(-1), b.log_softmax(-1)
    kl = (la.exp() * (la - lb)).sum(-1).mean().item()
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    result = {"model": args.student or "synthetic", "params": sum(p.numel() for p in fp32.parameters()),
              "threads": torch.get_num_threads(), "size_bytes": sizes,
              "fp32": bench(fp32, tokenizer, windows, args), "int8": bench(int8, tokenizer, windows, args),
              "kl_fp32_to_int8": kl, "top1_agreement_fp32_int8": agree}
    result["ratios"] = {"size": sizes["int8"] / sizes["fp32"],
                        "forward_latency": result["int8"]["forward_ms"] / result["fp32"]["forward_ms"],
                        "decode_latency": result["int8"]["decode_ms_per_token"] / result["fp32"]["decode_ms_per_token"]}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
