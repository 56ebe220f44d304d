"""Instruct: answer each dialog with an Instruct model (the same program as ``python -m codellama chat``).

    python example_instruct.py --ckpt_dir CodeLlama-7b-Instruct/
"""

from codellama.cli.generate import chat, run

if __name__ == "__main__":
    run(chat)
