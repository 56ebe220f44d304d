"""Code completion: continue each prompt.

    python example_completion.py --ckpt_dir CodeLlama-7b/
    torchrun --nproc_per_node 1 example_completion.py --ckpt_dir CodeLlama-7b/ --stream
"""

from codellama.commands import build, example_parser, is_main_process, run

PROMPTS = [
    "def fizzbuzz(n: int):",
    'import argparse\n\ndef main(string: str):\n    print(string)\n    print(string[::-1])\n\nif __name__ == "__main__":',
]


def main() -> None:
    parser = example_parser(__doc__, temperature=0.2, top_p=0.9, max_seq_len=256, max_batch_size=4, max_gen_len=None)
    parser.add_argument("--stream", action="store_true", help="print the first completion as it is generated")
    args = parser.parse_args()
    generator = build(args)
    if args.stream:  # print the first prompt's completion piece by piece as it is generated
        if is_main_process():
            print(PROMPTS[0])
            print("> ", end="")
        for piece in generator.stream_completion(PROMPTS[0], args.temperature, args.top_p, args.max_gen_len):
            if is_main_process():
                print(piece, end="", flush=True)
        if is_main_process():
            print("\n\n" + "=" * 34 + "\n")
        return
    results = generator.text_completion(PROMPTS, temperature=args.temperature, top_p=args.top_p,
                                        max_gen_len=args.max_gen_len)
    if is_main_process():
        for prompt, result in zip(PROMPTS, results):
            print(prompt)
            print(f"> {result['generation']}")
            print("\n" + "=" * 34 + "\n")


if __name__ == "__main__":
    run(main)
