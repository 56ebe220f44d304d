"""Run under torchrun by tests/test_distributed.py: build each checkpoint split across the ranks, record
logits and greedy tokens on rank 0.

    torchrun --nproc_per_node N tests/tp_worker.py OUT.pt TOKENIZER CKPT_DIR [CKPT_DIR …]
"""

import sys

import torch

from codellama import Llama
from codellama.cli import is_main_process, run

TOKENS = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(0))
PROMPTS = [[1, 5, 9, 200, 17], [1, 300, 301, 8, 9, 10, 11, 12, 13, 14, 15, 16]]


def main() -> None:
    out, tokenizer, dirs = sys.argv[1], sys.argv[2], sys.argv[3:]
    results = {}
    for d in dirs:
        llama = Llama.build(d, tokenizer, 64, 2, device="cpu")
        llama.model.clear_cache()
        with torch.inference_mode():
            logits = llama.model(TOKENS)
        tokens, _ = llama.generate(PROMPTS, 12, temperature=0, stop_token=[])
        sampled, _ = llama.generate(PROMPTS, 12, temperature=1.0, top_p=0.9, stop_token=[])
        results[d] = {"logits": logits, "greedy": tokens, "sampled": sampled,
                      "local_heads": llama.model.layers[0].attention.n_kv_heads,
                      "world": llama.model.tp.world}
    if is_main_process():
        torch.save(results, out)


if __name__ == "__main__":
    run(main)
