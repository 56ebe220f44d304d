"""Instruct: answer each dialog with an Instruct model ([INST] format, or <step> for 70B-Instruct).

    python example_instruct.py --ckpt_dir CodeLlama-7b-Instruct/
"""

from codellama.commands import build, example_parser, is_main_process, run

DIALOGS = [
    [{"role": "user", "content": "In Bash, how do I list all text files in the current directory (excluding "
                                 "subdirectories) that have been modified in the last month?"}],
    [{"role": "user", "content": "What is the difference between inorder and preorder traversal? Give an example in Python."}],
    [{"role": "system", "content": "Provide answers in JavaScript"},
     {"role": "user", "content": "Write a function that computes the set of sums of all contiguous sublists of a given list."}],
]


def main() -> None:
    parser = example_parser(__doc__, temperature=0.2, top_p=0.95, max_seq_len=512, max_batch_size=8, max_gen_len=None)
    args = parser.parse_args()
    generator = build(args)
    results = generator.chat_completion(DIALOGS, temperature=args.temperature, top_p=args.top_p,
                                        max_gen_len=args.max_gen_len)
    if is_main_process():
        for dialog, result in zip(DIALOGS, results):
            for msg in dialog:
                print(f"{msg['role'].capitalize()}: {msg['content']}\n")
            print(f"> {result['generation']['role'].capitalize()}: {result['generation']['content']}")
            print("\n==================================\n")


if __name__ == "__main__":
    run(main)
