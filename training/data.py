"""Data for the tiny Code Llama: the running CPython's standard library, its tokenizer, and training examples.

Corpus: the ``.py`` files of the standard library of the Python that runs this code (Python Software
Foundation licence, redistributable; every machine with Python has it), its test suite included, minus
third-party packages, generated data tables and test fixtures (rules in ``is_corpus_file``). The evaluation
files are listed in ``training/heldout.txt`` (fixed; chosen once by ``choose_heldout``, library code only);
everything else is training data. The test suites (19 MB in CPython 3.11.7, against 9 MB of library code) are
there because the model overfits the library alone: trained for 2000 steps (five passes over the library),
its loss on training files was 1.96 nats per token against 2.76 on held-out ones. The tokenizer and the
baselines of ``training/evaluate_tiny.py`` use the library files only (``Corpus.library``), the code the
held-out files are.

Every training example is formatted exactly as the library prompts at inference (``codellama.prompts``):

    plain     <s> code [</s> at the end of a file]
    PSM       <s> <PRE> prefix <SUF>suffix <MID>middle <EOT>
    SPM       <s> <PRE> <SUF>suffix <MID> prefix middle <EOT>
    instruct  <s>[INST] docstring [/INST] code </s>

Command line (from the repository root):

    python -m training.data corpus                          # what the corpus holds, and its fingerprint
    python -m training.data tokenizer --out runs/tiny/tokenizer.model
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import os
import platform
import sys
import sysconfig
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from codellama.prompts import B_INST, E_INST, infilling_prompt_tokens
from codellama.tokenizer import Tokenizer

HELDOUT_PATH = Path(__file__).resolve().parent / "heldout.txt"

# Code Llama's infilling pieces, with the same names (the library looks them up by name).
FIM_PIECES = ["▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"]

# Directories that are not the standard library's own code (site-packages), or generated data (codec
# tables, pydoc's topic dump), or test fixtures (lib2to3's Python 2 samples, the tokenizer's odd encodings).
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__", "encodings", "pydoc_data", "data",
                  "tokenizedata"}
# Test-suite directories: training data (a Debian python3 ships them in a separate package,
# libpython3.X-testsuite; without it the corpus, and so the trained model, differ from the model card's).
_TEST_DIRS = {"test", "tests", "idle_test"}
# Generated tables, build-specific files, and the test suite's deliberately broken sources.
_EXCLUDED_FILES = {"html/entities.py"}
_EXCLUDED_PREFIXES = ("_sysconfigdata", "badsyntax_", "bad_coding")


# ----------------------------------------------------------------------------- corpus
def stdlib_root() -> Path:
    """The standard-library directory of the running CPython (e.g. ``…/lib/python3.11``)."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_corpus_file(rel: str) -> bool:
    """Whether the stdlib-relative POSIX path ``rel`` belongs to the corpus."""
    path = PurePosixPath(rel)
    if path.suffix != ".py" or any(part in _EXCLUDED_DIRS for part in path.parts[:-1]):
        return False
    return rel not in _EXCLUDED_FILES and not path.name.startswith(_EXCLUDED_PREFIXES)


def is_test_file(rel: str) -> bool:
    """Whether the stdlib-relative POSIX path ``rel`` is in one of the standard library's test suites."""
    return any(part in _TEST_DIRS for part in PurePosixPath(rel).parts[:-1])


def corpus_files(root: Optional[Path] = None) -> List[str]:
    """Sorted stdlib-relative POSIX paths of the corpus files under ``root`` (default: the running stdlib)."""
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"standard library directory not found: {root}")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if is_corpus_file(rel):
                files.append(rel)
    return sorted(files)


def read_source(root: Path, rel: str) -> Optional[str]:
    """The text of ``root/rel`` with ``\\n`` line ends, or None when it is not UTF-8 (a few legacy files)."""
    data = (Path(root) / rel).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def choose_heldout(files: Sequence[str], one_in: int = 20) -> List[str]:
    """The rule that picked ``heldout.txt``: files whose path's SHA-256 is 0 modulo ``one_in`` (about 5%).

    A hash of the path, not a random draw, so the choice does not depend on which other files a given
    Python version has.
    """
    return [f for f in files if int(hashlib.sha256(f.encode()).hexdigest()[:8], 16) % one_in == 0]


def read_heldout_list(path: Path = HELDOUT_PATH) -> List[str]:
    """The held-out paths recorded in ``path`` (one per line; ``#`` starts a comment)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"held-out file list not found: {path}")
    names = [line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"{path} lists no files")
    return names


@dataclass
class Corpus:
    """Training and held-out sources, keyed by stdlib-relative path, in sorted order."""

    root: Path
    train: Dict[str, str]
    heldout: Dict[str, str]
    missing_heldout: List[str]  # listed in heldout.txt but absent from this Python's stdlib

    @property
    def library(self) -> Dict[str, str]:
        """The training files outside the test suites: what the tokenizer and the baselines are built from."""
        return {rel: text for rel, text in self.train.items() if not is_test_file(rel)}

    def fingerprint(self) -> str:
        """SHA-256 over every path and text, training and held-out: equal fingerprints, equal corpus."""
        h = hashlib.sha256()
        for part in (self.train, self.heldout):
            for rel, text in part.items():
                h.update(rel.encode() + b"\0" + text.encode() + b"\0")
        return h.hexdigest()

    def describe(self) -> str:
        n_train = sum(len(t.encode()) for t in self.train.values())
        n_held = sum(len(t.encode()) for t in self.heldout.values())
        n_tests = len(self.train) - len(self.library)
        return (f"CPython {platform.python_version()} stdlib at {self.root}: {len(self.train)} training files "
                f"({n_train / 1e6:.2f} MB; {n_tests} of them tests), {len(self.heldout)} held-out files "
                f"({n_held / 1e6:.2f} MB); "
                f"fingerprint {self.fingerprint()[:16]}")


def load_corpus(root: Optional[Path] = None, heldout_path: Path = HELDOUT_PATH) -> Corpus:
    """Read the corpus and split it by the recorded held-out list.

    Held-out files this Python lacks are reported in ``missing_heldout`` (numbers then differ from the
    model card's); a listed file is never used for training.
    """
    root = Path(root) if root is not None else stdlib_root()
    heldout_names = set(read_heldout_list(heldout_path))
    train, heldout = {}, {}
    for rel in corpus_files(root):
        text = read_source(root, rel)
        if text is None or not text.strip():
            continue
        (heldout if rel in heldout_names else train)[rel] = text
    missing = sorted(heldout_names - set(heldout))
    if not heldout:
        raise ValueError(f"none of the held-out files listed in {heldout_path} exist under {root}")
    if not train:
        raise ValueError(f"no training files found under {root}")
    return Corpus(root, train, heldout, missing)


# ----------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: Iterable[str], out_path: Path, vocab_size: int = 4096) -> None:
    """Train a SentencePiece BPE model with Llama 2's settings plus Code Llama's four FIM pieces.

    Like Llama's: byte fallback, digits split, whitespace runs kept as pieces (no whitespace folding),
    an implicit leading space, and one sentence per line, so a newline is always the byte piece
    ``<0x0A>``. The FIM pieces are user-defined pieces: whole pieces that decode to their text
    (``" <PRE>"``), as Code Llama's do, not control pieces (which decode to nothing).
    """
    import sentencepiece as spm

    if vocab_size < 300:
        raise ValueError(f"vocab_size must be at least 300 (256 byte pieces, specials, FIM pieces), got {vocab_size}")
    lines = [line for text in texts for line in text.split("\n") if line.strip()]
    if not lines:
        raise ValueError("no text to train the tokenizer on")
    buf = io.BytesIO()
    with open(os.devnull, "w") as quiet:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buf, logstream=quiet,
            model_type="bpe", vocab_size=vocab_size, user_defined_symbols=FIM_PIECES,
            character_coverage=0.99995, byte_fallback=True, split_digits=True,
            split_by_unicode_script=True, split_by_whitespace=True, split_by_number=True,
            allow_whitespace_only_pieces=True, remove_extra_whitespaces=False, add_dummy_prefix=True,
            normalization_rule_name="identity", max_sentencepiece_length=16, max_sentence_length=4192,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, input_sentence_size=0, num_threads=2,
        )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(buf.getvalue())


# ----------------------------------------------------------------------------- examples
def plain_example(tok: Tokenizer, text: str, end_of_file: bool) -> List[int]:
    """Next-token prediction: ``<s> text``, with ``</s>`` only where the text ends its file."""
    return tok.encode(text, bos=True, eos=end_of_file)


def _check_split_points(text: str, i: int, j: int) -> None:
    if not 0 <= i <= j <= len(text):
        raise ValueError(f"split points must satisfy 0 <= i <= j <= len(text) = {len(text)}, got {i}, {j}")


def fim_example(tok: Tokenizer, text: str, i: int, j: int, suffix_first: bool) -> List[int]:
    """Fill-in-the-middle with ``text[i:j]`` as the middle, in the library's PSM or SPM prompt + middle + EOT."""
    _check_split_points(text, i, j)
    prompt = infilling_prompt_tokens(tok, text[:i], text[j:], suffix_first=suffix_first)
    return prompt + tok.encode_infilling(text[i:j]) + [tok.eot_id]


def instruct_example(tok: Tokenizer, request: str, answer: str) -> List[int]:
    """One completed Llama 2 instruct turn: ``<s>[INST] request [/INST] answer </s>``."""
    return tok.encode(f"{B_INST} {request.strip()} {E_INST} {answer.strip()} ", bos=True, eos=True)


_REQUEST_TEMPLATES = ("{doc}", "Write a Python function `{name}`. {doc}", "Write a Python function that does this:\n{doc}")


def instruct_pairs(sources: Mapping[str, str], max_request: int = 600, max_answer: int = 1500) -> List[Tuple[str, str]]:
    """(request, answer) pairs: a function's docstring as the request, its code without the docstring as the answer.

    Functions whose docstring is short (< 20 characters) or long, whose code is long, or whose body is
    only the docstring are skipped. The request's wording cycles through three fixed templates.
    """
    pairs = []
    for rel, text in sources.items():
        try:
            with warnings.catch_warnings():  # the test suite's deliberately odd sources (invalid escapes)
                warnings.simplefilter("ignore", (DeprecationWarning, SyntaxWarning))
                tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        lines = text.splitlines(keepends=True)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
                continue
            doc = ast.get_docstring(node, clean=True)
            if not doc or not 20 <= len(doc) <= max_request:
                continue
            first = node.body[0]
            if first.lineno == node.lineno:  # docstring on the def line: cannot cut it out by lines
                continue
            start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
            code = lines[start:first.lineno - 1] + lines[first.end_lineno:node.end_lineno]
            answer = textwrap.dedent("".join(code)).strip()
            # A dedent blocked by a less-indented multi-line string leaves the def indented: skip those.
            if len(answer) > max_answer or not answer.startswith(("def ", "async def ", "@")):
                continue
            template = _REQUEST_TEMPLATES[len(pairs) % len(_REQUEST_TEMPLATES)]
            pairs.append((template.format(doc=doc, name=node.name), answer))
    return pairs


def widen_to_lines(text: str, i: int, j: int) -> Tuple[int, int]:
    """Widen the middle ``text[i:j]`` to whole lines: ``i`` back to the start of its line, ``j`` on to the end
    of its line (before the newline, which stays in the suffix, as when a line is hidden at inference)."""
    _check_split_points(text, i, j)
    end = text.find("\n", j)
    return text.rfind("\n", 0, i) + 1, len(text) if end < 0 else end


class ExampleSampler:
    """Rows of exactly ``seq_len + 1`` tokens, each packed with whole examples, drawn from a seeded generator.

    A row is filled with examples until less than ``min_example`` tokens are left, then topped up with
    the start of a plain chunk. Each code example is a run of whole lines starting at a random line of a
    random file (files weighted by size), sized to the whole space left with probability ``long_share``,
    else to a uniform size of ``min_example`` to ``short_max`` tokens: several short examples per row give
    more fill-in-the-middle decisions per token of compute, which a tiny model needs to learn infilling.
    A code example is fill-in-the-middle with probability ``fim_rate`` (then SPM with probability
    ``spm_rate``, else PSM), its two split points uniform over the chunk's characters, as in Code Llama;
    otherwise plain. With probability ``line_split_rate`` a FIM example's split points are then widened to
    whole lines (``widen_to_lines``): with character-level splits only, almost every middle starts inside a
    word, and a tiny model learns that after ``<MID>`` comes a word fragment; it then infills PSM prompts
    whose hole is a whole line by starting mid-word (0% exact match on held-out lines). Code Llama's own
    models are large enough to read the position off the prefix; this one is not. With probability
    ``one_line_share`` such a whole-line middle is just the line at the first split point, so that the model
    learns to end a one-line hole with ``<EOT>`` (used by the second, fine-tuning stage of training).
    With probability ``instruct_rate`` the example is an instruction pair.

    One target is left out of the loss: in an SPM example, the first token after ``<MID>`` (the start of
    the prefix). At inference the prefix is always given there, so predicting it is never needed, and
    learning it teaches the model that ``<MID>`` is followed by the start of a line, which in PSM
    prompts (where ``<MID>`` is followed by the middle) then wins over the right answer: a tiny model
    trained with that target infills PSM prompts by starting a new line and gets no line right. ``batch``
    also numbers the targets of each PSM middle, so that training can weight its first tokens
    (``TrainConfig.psm_weight``).
    """

    def __init__(self, tok: Tokenizer, texts: Sequence[str], pairs: Sequence[Tuple[str, str]], seq_len: int,
                 fim_rate: float = 0.9, spm_rate: float = 0.5, instruct_rate: float = 0.1, long_share: float = 0.25,
                 short_max: int = 256, min_example: int = 32, line_split_rate: float = 0.0,
                 one_line_share: float = 0.0):
        if not tok.can_infill:
            tok.require_infilling()
        if not texts:
            raise ValueError("no training texts")
        for name, p in (("fim_rate", fim_rate), ("spm_rate", spm_rate), ("instruct_rate", instruct_rate),
                        ("long_share", long_share), ("line_split_rate", line_split_rate),
                        ("one_line_share", one_line_share)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        if seq_len < 2 * min_example:
            raise ValueError(f"seq_len={seq_len} is too short for examples of at least {min_example} tokens")
        if short_max < min_example:
            raise ValueError(f"short_max={short_max} must be at least min_example={min_example}")
        if instruct_rate > 0 and not pairs:
            raise ValueError("instruct_rate > 0 but there are no instruction pairs")
        self.tok, self.texts, self.seq_len = tok, list(texts), seq_len
        self.fim_rate, self.spm_rate, self.instruct_rate = fim_rate, spm_rate, instruct_rate
        self.long_share, self.short_max, self.min_example = long_share, short_max, min_example
        self.line_split_rate, self.one_line_share = line_split_rate, one_line_share
        self.pairs = [instruct_example(tok, q, a) for q, a in pairs]
        sizes = np.array([len(t) for t in self.texts], dtype=np.float64)
        self.file_weights = sizes / sizes.sum()
        # Start offset of every line of every file, to cut chunks at line boundaries.
        self.line_starts = [np.array([0] + [k + 1 for k, c in enumerate(t) if c == "\n" and k + 1 < len(t)])
                            for t in self.texts]
        sample = "".join(self.texts[:: max(1, len(self.texts) // 50)])
        self.chars_per_token = len(sample) / max(1, len(tok.encode(sample, bos=False, eos=False)))

    def _chunk(self, rng: np.random.Generator, n_chars: int) -> Tuple[str, bool, int, int]:
        """A random chunk of about ``n_chars`` (whole lines): (text, reaches end of file, file, start)."""
        f = int(rng.choice(len(self.texts), p=self.file_weights))
        start = int(self.line_starts[f][rng.integers(len(self.line_starts[f]))])
        return self._cut(f, start, n_chars)

    def _cut(self, f: int, start: int, n_chars: int, whole_lines: bool = True) -> Tuple[str, bool, int, int]:
        text = self.texts[f]
        end = text.find("\n", start + max(1, n_chars) - 1)  # extend to the end of that line
        end = len(text) if end < 0 else end + 1
        if not whole_lines or end - start > 2 * n_chars + 80:  # (one very long line:) cut mid-line instead
            end = min(len(text), start + max(1, n_chars))
        return text[start:end], end >= len(text), f, start

    def _code_example(self, rng: np.random.Generator, budget: int) -> Tuple[List[int], Optional[int], Optional[int]]:
        """A plain or FIM example of at most ``budget`` tokens; the index of the position whose next-token
        target is left out of the loss (an SPM example's ``<MID>``), if any; and the index of a PSM
        example's ``<MID>`` (whose target is the middle's first token), if any."""
        fim = rng.random() < self.fim_rate
        suffix_first = rng.random() < self.spm_rate
        line_split = rng.random() < self.line_split_rate
        one_line = rng.random() < self.one_line_share
        u = np.sort(rng.random(2))  # split points as shares of the chunk, kept when the chunk shrinks
        n_chars = int(budget * self.chars_per_token * 0.9)
        text, eof, f, start = self._chunk(rng, n_chars)
        for _ in range(8):
            skip = mid = None
            if fim:
                i, j = int(u[0] * len(text)), int(u[1] * len(text))
                if line_split:
                    i, j = widen_to_lines(text, i, i if one_line else j)
                ids = fim_example(self.tok, text, i, j, suffix_first)
                if suffix_first and i > 0:  # <s> <PRE> <SUF> suffix <MID> prefix…: not the prefix's first token
                    skip = 3 + len(self.tok.encode_infilling(text[j:]))
                elif not suffix_first:  # … <MID> middle <EOT>
                    mid = len(ids) - len(self.tok.encode_infilling(text[i:j])) - 2
            else:
                ids = plain_example(self.tok, text, eof)
            if len(ids) <= budget:
                return ids, skip, mid
            n_chars = max(1, int(len(text) * budget / len(ids) * 0.9))
            text, eof, _, _ = self._cut(f, start, n_chars, whole_lines=False)  # too long: shrink, mid-line if need be
        return plain_example(self.tok, text, False)[:budget], None, None  # pathological text: truncated plain example

    def row(self, rng: np.random.Generator) -> Tuple[List[int], List[int], List[Tuple[int, int]]]:
        """One row of ``seq_len + 1`` token ids, the positions whose next-token target the loss skips, and
        the (``<MID>``, ``<EOT>``) positions of each PSM example (examples are packed whole)."""
        row: List[int] = []
        skips: List[int] = []
        mids: List[Tuple[int, int]] = []
        need = self.seq_len + 1
        while need - len(row) >= self.min_example:
            left = need - len(row)
            if rng.random() < self.instruct_rate:
                ids = self.pairs[int(rng.integers(len(self.pairs)))]
                if len(ids) <= left:
                    row += ids
                    continue
            if rng.random() < self.long_share:
                budget = left
            else:
                budget = int(rng.integers(self.min_example, min(left, self.short_max) + 1))
            ids, skip, mid = self._code_example(rng, budget)
            if skip is not None:
                skips.append(len(row) + skip)
            if mid is not None:
                mids.append((len(row) + mid, len(row) + len(ids) - 1))
            row += ids
        if len(row) < need:  # top up with the start of a plain chunk
            n = need - len(row)
            text, _, _, _ = self._chunk(rng, int(n * self.chars_per_token * 1.5) + 8)
            row += self.tok.encode(text, bos=True, eos=False)[:n]
            while len(row) < need:  # only for a corpus of tiny files
                row += self.tok.encode(self._chunk(rng, 4 * n)[0], bos=True, eos=False)[:need - len(row)]
        return row, skips, mids

    def batch(self, seed: int, step: int, batch_size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The batch for training step ``step``, a function of (seed, step) only, so a resumed run sees exactly
        the data an uninterrupted one would: tokens (batch_size, seq_len + 1) int64; a boolean
        (batch_size, seq_len) mask of the positions whose next-token target the loss skips; and, for each
        position, where its target stands in the middle of a PSM example, counting from 1 (the target of
        ``<MID>``, the middle's first token), 0 outside PSM middles (batch_size, seq_len) int16."""
        rng = np.random.default_rng([seed, step])
        tokens = np.zeros((batch_size, self.seq_len + 1), dtype=np.int64)
        skip = np.zeros((batch_size, self.seq_len), dtype=bool)
        psm_index = np.zeros((batch_size, self.seq_len), dtype=np.int16)
        for b in range(batch_size):
            row, skips, mids = self.row(rng)
            tokens[b] = row
            skip[b, skips] = True
            for m, eot in mids:  # targets of <MID> … the last middle token: the middle's tokens and <EOT>
                psm_index[b, m:eot] = np.arange(1, eot - m + 1)
        return tokens, skip, psm_index


# ----------------------------------------------------------------------------- evaluation helpers
def line_chunks(tok: Tokenizer, text: str, max_tokens: int) -> List[str]:
    """Split ``text`` into runs of whole lines of at most ``max_tokens`` tokens each (``encode`` without bos).

    A single line longer than that becomes its own chunk (the caller truncates its tokens). The chunks
    concatenate back to ``text``.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    lines = text.splitlines(keepends=True)
    chunks: List[str] = []
    cur: List[str] = []
    for line in lines:
        trial = "".join(cur + [line])
        if cur and len(tok.encode(trial, bos=False, eos=False)) > max_tokens:
            chunks.append("".join(cur))
            cur = [line]
        else:
            cur.append(line)
    if cur:
        chunks.append("".join(cur))
    return chunks


# ----------------------------------------------------------------------------- command line
def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("corpus", help="describe the corpus and the held-out split")
    p_tok = sub.add_parser("tokenizer", help="train the SentencePiece model on the training files")
    p_tok.add_argument("--out", type=Path, default=Path("runs/tiny/tokenizer.model"))
    p_tok.add_argument("--vocab_size", type=int, default=4096)
    args = parser.parse_args(argv)

    corpus = load_corpus()
    print(corpus.describe())
    if corpus.missing_heldout:
        print(f"warning: held-out files missing from this Python: {corpus.missing_heldout}", file=sys.stderr)
    if args.command == "tokenizer":
        train_tokenizer(corpus.train.values(), args.out, args.vocab_size)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
