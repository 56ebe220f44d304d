"""Prefill and decode speed of this library against Hugging Face transformers, on the same weights.

    python benchmarks/bench_generate.py                        # ~170M-parameter model shaped like 7B, fp32 and bf16
    python benchmarks/bench_generate.py --size small           # ~10M parameters: per-token overhead dominates
    python benchmarks/bench_generate.py --ckpt_dir CodeLlama-7b --dtype bf16 --batch 1

For each dtype and batch size, both libraries greedily decode the same prompts with the same weights.
Prefill is tokens/s of one forward over the prompts (with a KV cache). Decode is tokens/s of the
decoding steps alone: (time to generate N tokens - time to generate 1) / (N - 1), through each
library's own generate(). "util" is the bytes a decode step must read (every weight but the embedding,
plus the KV cache) per second, divided by the bandwidth of a large matrix-vector product in the same
dtype measured in this run (the best of torch's paths): the limit batch-1 decode can reach.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from codellama import Llama, ModelArgs, Transformer, load_model
from codellama.formats.hf import to_hf_state_dict, write_config
from codellama.cpu import bf16_packing_supported, bf16_path, optimize_for_cpu
from codellama.runtime import parse_dtype

SIZES = {  # Code Llama 7B's proportions, scaled down (vocab and head_dim kept)
    "base": dict(dim=1024, n_layers=10, n_heads=8, multiple_of=256, vocab_size=32016, rope_theta=1e6),
    "small": dict(dim=128, n_layers=4, n_heads=1, multiple_of=64, vocab_size=32016, rope_theta=1e6),
}


class _Vocab:
    """Generation needs only the vocabulary size and EOS from a tokenizer."""

    def __init__(self, n_words: int):
        self.n_words, self.eos_id, self.model_path = n_words, 2, "(no tokenizer)"


def timed(fn, repeat: int) -> float:
    """Median wall time of ``fn()`` over ``repeat`` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matvec_bandwidth(dtype: torch.dtype, repeat: int = 10) -> float:
    """Bytes/s of the fastest matrix-vector product torch offers in ``dtype`` on a 256 MiB-class matrix."""
    n = 8192 if dtype == torch.float32 else 11584
    w = torch.randn(n, n, dtype=torch.float32).to(dtype)
    x = torch.randn(1, n, dtype=torch.float32).to(dtype)
    candidates = [lambda: F.linear(x, w)]
    if dtype == torch.bfloat16 and bf16_packing_supported():  # oneDNN's bf16 needs AVX-512 or AVX-NE-CONVERT
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        candidates.append(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""))
    best = min(timed(c, repeat) for c in candidates)
    return w.numel() * w.element_size() / best


def hf_model(model, dtype):
    """Hugging Face's LlamaForCausalLM holding the same weights (q/k permuted as HF's converter does)."""
    import transformers

    config = transformers.LlamaConfig(**{k: v for k, v in write_config(model.args).items() if k != "architectures"})
    hf = transformers.LlamaForCausalLM(config).to(dtype).eval()
    hf.load_state_dict(to_hf_state_dict({k: v.detach() for k, v in model.state_dict().items()}, model.args), strict=True)
    return hf


def run(args) -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; bf16 linear layers: {bf16_path()}")
    for dtype_name in args.dtype:
        dtype = parse_dtype(dtype_name)
        if args.ckpt_dir:
            model = load_model(args.ckpt_dir, device="cpu", dtype=dtype)
        else:
            margs = ModelArgs(**SIZES[args.size])
            with torch.device("meta"):
                model = Transformer(margs)
            sd = {k: (torch.randn(v.shape) / v.shape[-1] ** 0.5 if v.dim() > 1 else torch.ones(v.shape)).to(dtype)
                  for k, v in model.state_dict().items()}
            model.load_state_dict(sd, assign=True)
            optimize_for_cpu(model.eval())  # what load_model does on CPU
        a = model.args
        hf = hf_model(model, dtype)
        n_params = a.num_params()
        weight_bytes = (n_params - a.vocab_size * a.dim) * dtype.itemsize  # the embedding reads one row per token
        bw = matvec_bandwidth(dtype)
        print(f"\nmodel: {n_params / 1e6:.0f}M parameters (dim {a.dim}, {a.n_layers} layers, {a.n_heads}/{a.kv_heads} heads), "
              f"{dtype_name}; mat-vec bandwidth {bw / 1e9:.1f} GB/s")
        print(f"{'batch':>5} {'phase':>8} {'ours tok/s':>11} {'HF tok/s':>10} {'ratio':>6} {'ours util':>10} {'HF util':>8}  same tokens")
        for batch in args.batch:
            prompts = torch.randint(3, a.vocab_size, (batch, args.prompt_len), generator=torch.Generator().manual_seed(batch))
            llama = Llama(model, _Vocab(a.vocab_size), max_seq_len=args.prompt_len + args.new_tokens + 1, max_batch_size=batch)
            plist = prompts.tolist()

            def ours_gen(n):
                return llama.generate(plist, n, temperature=0, stop_token=[])[0]

            def hf_gen(n):
                with torch.inference_mode():
                    return hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n, min_new_tokens=n,
                                       do_sample=False, pad_token_id=0)[:, args.prompt_len:].tolist()

            model.setup_cache(batch, args.prompt_len)  # the model's own cache, for the bare prefill forward

            def ours_prefill():
                with torch.inference_mode():
                    model(prompts, 0, logits_index=-1)

            def hf_prefill():
                with torch.inference_mode():
                    hf(prompts, use_cache=True, logits_to_keep=1)

            same = ours_gen(args.new_tokens) == hf_gen(args.new_tokens)
            n = args.new_tokens
            rows = {}
            rows["prefill"] = (batch * args.prompt_len / timed(ours_prefill, args.repeat),
                               batch * args.prompt_len / timed(hf_prefill, args.repeat))
            ours_step = (timed(lambda: ours_gen(n), args.repeat) - timed(lambda: ours_gen(1), args.repeat)) / (n - 1)
            hf_step = (timed(lambda: hf_gen(n), args.repeat) - timed(lambda: hf_gen(1), args.repeat)) / (n - 1)
            rows["decode"] = (batch / ours_step, batch / hf_step)
            kv_bytes = 2 * a.n_layers * a.kv_heads * a.head_dim * dtype.itemsize * batch * (args.prompt_len + n / 2)
            step_bytes = weight_bytes + kv_bytes
            for phase, (ours, theirs) in rows.items():
                util = ""
                if phase == "decode":
                    util = f"{step_bytes / ours_step / bw:>9.0%} {step_bytes / hf_step / bw:>8.0%}"
                else:
                    util = f"{'':>9} {'':>8}"
                print(f"{batch:>5} {phase:>8} {ours:>11.1f} {theirs:>10.1f} {ours / theirs:>5.2f}x {util}  "
                      f"{'yes' if same else 'no'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_dir", default=None, help="a real checkpoint instead of a random model")
    p.add_argument("--size", default="base", choices=sorted(SIZES), help="random model size (no --ckpt_dir)")
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run(args)


if __name__ == "__main__":
    main()
