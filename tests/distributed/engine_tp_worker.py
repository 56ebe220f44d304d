"""Run under torchrun by tests/test_engine_tp.py: a tensor-parallel engine serving concurrent requests.

Rank 0 runs the engine on a background thread and submits from several threads at once, as a server
does; the other ranks follow rank 0's steps. Rank 0 saves every request's greedy tokens.

    torchrun --nproc_per_node N tests/engine_tp_worker.py OUT.pt CKPT_DIR
"""

import sys
import threading

import torch

from codellama import Llama
from codellama.cli import run
from codellama.engine import SamplingParams

PROMPTS = [[1, 5, 9, 200, 17], [1, 300, 301, 8, 9, 10, 11, 12, 13, 14, 15, 16], [1, 7], [1, 40, 41, 42, 43, 44]]
MAX_TOKENS = [12, 7, 15, 10]


def main() -> None:
    out, ckpt = sys.argv[1], sys.argv[2]
    llama = Llama.build(ckpt, None, 64, 2, device="cpu")  # 2 slots for 4 requests: some wait, join later
    engine = llama.engine
    if llama.model.tp.rank != 0:
        engine.follow()
        return
    engine.start()
    results = {}

    def client(i):
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS[i])
        results[i] = engine.submit(PROMPTS[i], params).result().tokens

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.stop()  # also releases the followers
    torch.save(results, out)


if __name__ == "__main__":
    run(main)
