"""Run under torchrun by tests/test_quantize_tp.py: build each quantized model split across the ranks, record
logits and greedy tokens on rank 0.

    torchrun --nproc_per_node N tests/quant_tp_worker.py OUT.pt TOKENIZER CKPT_DIR[@SCHEME] …

``CKPT_DIR`` alone is a quantized checkpoint (each rank reads its slices of the codes and scales);
``CKPT_DIR@int8`` quantizes a full-precision checkpoint as it loads (each rank quantizes its own slices).
"""

import sys

import torch

from codellama import Llama
from codellama.cli import is_main_process, run

from tp_worker import PROMPTS, TOKENS


def main() -> None:
    out, tokenizer, specs = sys.argv[1], sys.argv[2], sys.argv[3:]
    results = {}
    for spec in specs:
        ckpt_dir, _, scheme = spec.partition("@")
        llama = Llama.build(ckpt_dir, tokenizer, 64, 2, device="cpu", quantize=scheme or None)
        llama.model.clear_cache()
        with torch.inference_mode():
            logits = llama.model(TOKENS)
        tokens, _ = llama.generate(PROMPTS, 12, temperature=0, stop_token=[])
        results[spec] = {"logits": logits, "greedy": tokens, "world": llama.model.tp.world}
    if is_main_process():
        torch.save(results, out)


if __name__ == "__main__":
    run(main)
