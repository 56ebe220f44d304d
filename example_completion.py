"""Code completion: continue each prompt (the same program as ``python -m codellama complete``).

    python example_completion.py --ckpt_dir CodeLlama-7b/
    torchrun --nproc_per_node 1 example_completion.py --ckpt_dir CodeLlama-7b/ --stream
"""

from codellama.cli.generate import complete, run

if __name__ == "__main__":
    run(complete)
