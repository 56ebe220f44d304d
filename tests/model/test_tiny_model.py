"""The bundled tiny Code Llama (codellama/assets/tiny) and the code that trains and measures it.

Fast (seconds): the checkpoint loads through the normal loader, its tokenizer follows Code Llama's
conventions, training examples are formatted exactly as the library prompts, and on held-out files the
model beats a unigram baseline and infills a missing ``return`` line with valid Python.
"""

import ast
import itertools
import json
import math
import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from codellama import Llama, ModelArgs, Tokenizer, Transformer, load_model
from codellama.prompts import chat_prompt_tokens, infilling_prompt_tokens
from training.data import (ExampleSampler, widen_to_lines, choose_heldout, corpus_files, fim_example, instruct_example,
                           instruct_pairs, is_corpus_file, is_test_file, line_chunks, load_corpus, plain_example,
                           read_heldout_list, stdlib_root, train_tokenizer)
from training.evaluate_tiny import (indentation, infill_cases, is_exact, mcnemar_p, measure_infilling, rate, scoring_rows,
                                   token_nlls, wilson_interval)
from training.train_tiny import TrainConfig, lm_loss, psm_weights

from conftest import ROOT
TINY = ROOT / "codellama" / "assets" / "tiny"
HELDOUT = ROOT / "training" / "heldout.txt"


def missing_return_cases():
    """30 small functions whose last line, ``return <accumulator>``, is the hole: (prefix, suffix, that line)."""
    cases = []
    for fn, arg, acc, op in itertools.product(["total", "count_items", "add_all"], ["xs", "items"], ["result", "n"],
                                              ["+= x", "+= 1"]):
        cases.append((f"def {fn}({arg}):\n    {acc} = 0\n    for x in {arg}:\n        {acc} {op}\n", "\n", f"    return {acc}"))
    for fn, a, b, op in [("add", "a", "b", "+"), ("sub", "a", "b", "-"), ("mul", "x", "y", "*"), ("div", "x", "y", "/"),
                         ("maximum", "a", "b", ">"), ("combine", "left", "right", "+")]:
        cases.append((f"def {fn}({a}, {b}):\n    result = {a} {op} {b}\n", "\n", "    return result"))
    return cases


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(TINY / "tokenizer.model")


@pytest.fixture(scope="module")
def model():
    return load_model(TINY, device="cpu", dtype=torch.float32)


# ----------------------------------------------------------------------------- the shipped files
def test_shipped_checkpoint_is_meta_layout_and_small():
    names = sorted(p.name for p in TINY.iterdir() if not p.name.startswith("."))
    assert names == ["consolidated.00.pth", "params.json", "tokenizer.model"]
    assert sum((TINY / n).stat().st_size for n in names) <= 16 * 2**20
    params = json.loads((TINY / "params.json").read_text())
    assert params["vocab_size"] == -1  # as Meta writes it: the tokenizer decides
    # Code Llama's values: theta 1e4 as in 70B-Python/Instruct (training/train_tiny.py says why not 1e6)
    assert params["rope_theta"] == 1e4 and params["norm_eps"] == 1e-5
    ModelArgs.from_dict(params)  # no unknown keys
    state = torch.load(TINY / "consolidated.00.pth", map_location="cpu", weights_only=True)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    assert "tok_embeddings.weight" in state and "layers.0.attention.wq.weight" in state and "output.weight" in state


def test_loads_through_the_normal_loader(model, tok):
    assert model.args.vocab_size == tok.n_words
    assert model.args.n_kv_heads is None  # no GQA, like Code Llama 7B/13B
    logits = model(torch.tensor([tok.encode("def f(x):\n    return", bos=True, eos=False)]))
    assert logits.shape[-1] == tok.n_words and torch.isfinite(logits).all()


# ----------------------------------------------------------------------------- tokenizer conventions
def test_tokenizer_has_code_llama_specials(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, -1)
    assert tok.can_infill and tok.step_id is None
    sp = tok.sp_model
    for i in (tok.prefix_id, tok.suffix_id, tok.middle_id, tok.eot_id):
        assert not sp.is_control(i) and not sp.is_byte(i)


def test_fim_pieces_decode_like_code_llamas(tok, codellama_tokenizer_path):
    ref = Tokenizer(codellama_tokenizer_path)
    for t in (tok, ref):
        x, y = t.encode("x", bos=False, eos=False), t.encode("y", bos=False, eos=False)
        assert t.decode(x + [t.prefix_id] + y) == "x <PRE> y"
        assert t.decode([t.eot_id]) == "<EOT>"
        assert t.sp_model.encode("a <MID> b")[1] == t.middle_id  # SentencePiece merges the literal text into the piece
        assert t.middle_id not in t.encode("a <MID> b", bos=False, eos=False)  # the library never lets it


def test_tokenizer_code_conventions(tok):
    sp = tok.sp_model
    pieces = [sp.id_to_piece(i) for i in range(tok.n_words)]
    assert all("\n" not in p for p in pieces)  # a newline is always the byte piece
    newline = sp.piece_to_id("<0x0A>")
    assert tok.encode("a\nb", bos=False, eos=False).count(newline) == 1
    assert "▁▁▁▁▁▁▁" in pieces or "▁▁▁▁▁▁▁▁" in pieces  # runs of indentation are single pieces
    digits = [sp.id_to_piece(i) for i in tok.encode("x = 12345", bos=False, eos=False)]
    assert digits[-5:] == ["1", "2", "3", "4", "5"]  # digits split
    assert tok.decode(tok.encode("s = 'héllo ☺ 世界'", bos=False, eos=False)) == "s = 'héllo ☺ 世界'"  # byte fallback


@pytest.mark.parametrize("text", ["    return a + b\n", " x", "x", "\tif y:\n\t\tpass", "", "é = '☺'  # ok\n\n"])
def test_infilling_encoding_round_trips(tok, text):
    assert tok.decode_infilling(tok.encode_infilling(text)) == text


# ----------------------------------------------------------------------------- training examples
def test_training_examples_match_inference_prompts(tok):
    text = "def f(x):\n    y = x + 1\n    return y\n"
    i, j = text.index("y ="), text.index("\n    return")
    psm = fim_example(tok, text, i, j, suffix_first=False)
    assert psm == infilling_prompt_tokens(tok, text[:i], text[j:]) + tok.encode_infilling(text[i:j]) + [tok.eot_id]
    spm = fim_example(tok, text, i, j, suffix_first=True)
    assert spm == (infilling_prompt_tokens(tok, text[:i], text[j:], suffix_first=True)
                   + tok.encode_infilling(text[i:j]) + [tok.eot_id])
    assert plain_example(tok, text, end_of_file=True) == tok.encode(text, bos=True, eos=True)
    # An instruct pair is the completed turn of the library's chat prompt.
    pair = instruct_example(tok, "Add one to x.", "def f(x):\n    return x + 1")
    dialog = [{"role": "user", "content": "Add one to x."}, {"role": "assistant", "content": "def f(x):\n    return x + 1"},
              {"role": "user", "content": "Thanks"}]
    assert chat_prompt_tokens(tok, dialog)[:len(pair)] == pair


def test_instruct_pairs_from_docstrings():
    source = ('def area(w, h):\n    """Return the area of a w by h rectangle."""\n    return w * h\n\n'
              'class A:\n    def m(self):\n        """Only a docstring here, no code at all."""\n')
    pairs = instruct_pairs({"x.py": source})
    assert pairs == [("Return the area of a w by h rectangle.", "def area(w, h):\n    return w * h")]


def test_sampler_is_a_function_of_seed_and_step(tok):
    texts = ["def f(x):\n    return x\n" * 40, "import os\nprint(os.sep)\n" * 30]
    pairs = [("Return x.", "def f(x):\n    return x")]
    sampler = ExampleSampler(tok, texts, pairs, seq_len=128, fim_rate=1.0, instruct_rate=0.2)
    (a, skip, psm), (b, skip_b, psm_b) = sampler.batch(7, 3, 4), sampler.batch(7, 3, 4)
    assert a.shape == (4, 129) and skip.shape == psm.shape == (4, 128)
    assert (a == b).all() and (skip == skip_b).all() and (psm == psm_b).all()
    assert not (a == sampler.batch(7, 4, 4)[0]).all()
    assert (a == tok.prefix_id).sum() > 0 and (a == tok.eot_id).sum() > 0


def test_sampler_skips_only_the_prefix_start_of_spm_examples(tok):
    texts = ["def f(x):\n    return x\n" * 40]
    pairs = [("Return x.", "def f(x):\n    return x")]
    spm = ExampleSampler(tok, texts, [], seq_len=256, fim_rate=1.0, spm_rate=1.0, instruct_rate=0.0)
    rows, skip, _ = spm.batch(0, 0, 8)
    starts = (rows[:, :-1] == tok.prefix_id) & (rows[:, 1:] == tok.suffix_id)  # one per SPM example
    assert skip.any() and (rows[:, :-1][skip] == tok.middle_id).all()
    assert skip.sum() <= starts.sum()  # (an SPM example with an empty prefix has nothing to skip)
    psm = ExampleSampler(tok, texts, [], seq_len=256, fim_rate=1.0, spm_rate=0.0, instruct_rate=0.0)
    assert not psm.batch(0, 0, 8)[1].any()
    with pytest.raises(ValueError):
        ExampleSampler(tok, texts, pairs, seq_len=128, fim_rate=1.5)
    with pytest.raises(ValueError):
        ExampleSampler(tok, [], pairs, seq_len=128)


def test_sampler_numbers_the_middle_targets_of_psm_examples(tok):
    texts = ["def f(x):\n    y = x * 2\n    return y\n" * 30]
    psm = ExampleSampler(tok, texts, [], seq_len=256, fim_rate=1.0, spm_rate=0.0, instruct_rate=0.0,
                         line_split_rate=1.0, one_line_share=1.0)
    rows, skip, psm_index = psm.batch(0, 0, 8)
    complete = 0
    for row, index in zip(rows.tolist(), psm_index.tolist()):
        mids = [k for k, t in enumerate(row[:-1]) if t == tok.middle_id]
        assert [k for k, i in enumerate(index) if i == 1] == mids  # numbering starts at every PSM <MID>
        for m in mids:
            if tok.eot_id not in row[m:]:
                continue  # the row's last example may be cut off
            end = row.index(tok.eot_id, m)
            assert index[m:end] == list(range(1, end - m + 1))  # the middle's tokens, then <EOT>
            assert index[end] == 0 and (m == 0 or index[m - 1] == 0)
            middle = tok.decode_infilling(row[m + 1:end])  # a whole line: it opens with indentation or a word
            assert middle.startswith(("def", "    ")) and "\n" not in middle, middle
            complete += 1
    assert complete > 0
    spm = ExampleSampler(tok, texts, [], seq_len=256, fim_rate=1.0, spm_rate=1.0, instruct_rate=0.0)
    assert not spm.batch(0, 0, 8)[2].any()


def test_lm_loss_weights_the_first_targets_of_psm_middles():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=50))
    rows = torch.randint(2, 50, (2, 9))
    skip = torch.zeros(2, 8, dtype=torch.bool)
    skip[0, 3] = True
    psm_index = torch.tensor([[0, 0, 1, 2, 3, 4, 0, 0], [0, 0, 0, 0, 0, 1, 2, 0]], dtype=torch.int16)
    cfg = TrainConfig(psm_weight=4.0, psm_weighted_tokens=2)
    weight = psm_weights(psm_index, cfg)
    assert weight.tolist() == [[1, 1, 4, 4, 1, 1, 1, 1], [1, 1, 1, 1, 1, 4, 4, 1]]
    assert psm_weights(psm_index, TrainConfig()) is None  # weight 1: the plain mean
    plain = lm_loss(model, rows, skip, bos_id=1)
    torch.testing.assert_close(lm_loss(model, rows, skip, 1, torch.ones(2, 8)), plain)
    nll = F.cross_entropy(model(rows[:, :-1]).transpose(1, 2), rows[:, 1:], reduction="none")  # (2, 8)
    keep = ~skip
    want = (nll * weight)[keep].sum() / keep.sum()  # the skipped target (weight 4) still counts for nothing
    torch.testing.assert_close(lm_loss(model, rows, skip, 1, weight), want)


def test_widen_to_lines_hides_whole_lines_and_keeps_the_newline_in_the_suffix():
    text = "a = 1\nif a:\n    b = 2\nc = 3"
    assert widen_to_lines(text, text.index("f a"), text.index("b =")) == (6, 21)  # "if a:\n    b = 2"
    assert text[6:21] == "if a:\n    b = 2" and text[21] == "\n"
    assert widen_to_lines(text, 0, 0) == (0, 5)
    assert widen_to_lines(text, len(text) - 1, len(text)) == (22, len(text))  # last line has no newline
    with pytest.raises(ValueError):
        widen_to_lines(text, 3, 2)


@pytest.mark.parametrize("one_line_share", [0.0, 1.0])
def test_sampler_line_splits_give_whole_line_middles(tok, one_line_share):
    texts = ["def f(x):\n    y = x * 2\n    return y\n" * 30]
    sampler = ExampleSampler(tok, texts, [], seq_len=256, fim_rate=1.0, spm_rate=0.0, instruct_rate=0.0,
                             line_split_rate=1.0, one_line_share=one_line_share)
    examples, multi_line = 0, 0
    for row in sampler.batch(0, 0, 4)[0].tolist():
        starts = [k for k, t in enumerate(row) if t == tok.prefix_id]
        for k in starts:
            s = row.index(tok.suffix_id, k)
            m = row.index(tok.middle_id, s)
            if tok.eot_id not in row[m:]:
                continue  # the row's last example may be cut off
            prefix, suffix = tok.decode(row[k + 1:s]), tok.decode_infilling(row[s + 1:m])
            assert prefix == "" or prefix.endswith("\n"), prefix
            assert suffix == "" or suffix.startswith("\n"), suffix
            multi_line += "\n" in tok.decode_infilling(row[m + 1:row.index(tok.eot_id, m)])
            examples += 1
    assert examples > 4
    assert (multi_line > 0) == (one_line_share == 0.0)


def test_bad_inputs_raise_clear_errors(tok, tmp_path):
    with pytest.raises(FileNotFoundError):
        read_heldout_list(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError):
        corpus_files(tmp_path / "no-stdlib-here")
    with pytest.raises(ValueError):
        fim_example(tok, "abc", 2, 1, suffix_first=False)
    with pytest.raises(ValueError):
        train_tokenizer(["x = 1"], tmp_path / "t.model", vocab_size=10)
    with pytest.raises(ValueError):
        line_chunks(tok, "x\n", 0)
    from training.train_tiny import main as train_main
    for bad in (["--psm_weight", "-1"], ["--psm_weight", "0"], ["--psm_weighted_tokens", "0"]):
        with pytest.raises(ValueError, match=bad[0]):
            train_main(bad + ["--out_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()  # refused before anything was written


# ----------------------------------------------------------------------------- corpus and held-out split
def test_heldout_list_is_fixed_and_follows_its_rule():
    names = read_heldout_list(HELDOUT)
    assert len(names) == len(set(names)) == 33
    assert all(is_corpus_file(n) and not is_test_file(n) for n in names)  # held-out files are library code
    assert choose_heldout(names) == names  # every listed path satisfies the documented hash rule


def test_corpus_never_trains_on_heldout_files():
    if not stdlib_root().is_dir():
        pytest.skip("this Python has no standard-library sources")
    corpus = load_corpus()
    assert not set(corpus.train) & set(corpus.heldout)
    assert set(corpus.heldout) | set(corpus.missing_heldout) == set(read_heldout_list(HELDOUT))
    assert not any(is_test_file(n) for n in corpus.library) and set(corpus.library) <= set(corpus.train)


def test_wilson_interval_matches_published_values():
    # Textbook values of the 95% Wilson score interval.
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(1, 10) == pytest.approx((0.0179, 0.4042), abs=1e-4)
    assert wilson_interval(0, 500)[0] == 0.0 and wilson_interval(500, 500)[1] == pytest.approx(1.0)
    assert rate(15, 500) == "3.0% (15/500, 95% CI 1.8–4.9%)"
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


def test_mcnemar_exact_test_matches_the_binomial_test():
    # scipy.stats.binomtest(2, 12).pvalue and binomtest(0, 5).pvalue: 158/4096 and 2/32
    assert mcnemar_p(10, 2) == mcnemar_p(2, 10) == pytest.approx(0.0385742, abs=1e-7)
    assert mcnemar_p(0, 5) == pytest.approx(0.0625)
    assert mcnemar_p(5, 5) == mcnemar_p(0, 0) == 1.0
    with pytest.raises(ValueError):
        mcnemar_p(-1, 3)


def test_corpus_rules():
    assert is_corpus_file("json/decoder.py") and not is_test_file("json/decoder.py")
    for rel in ("test/test_json/test_decode.py", "idlelib/idle_test/test_calltip.py", "lib2to3/tests/test_util.py"):
        assert is_corpus_file(rel) and is_test_file(rel)  # the test suites are training data
    for rel in ("site-packages/torch/nn/functional.py", "encodings/cp1252.py", "lib2to3/tests/data/py2_test_grammar.py",
                "test/tokenizedata/bad_coding.py", "test/test_future_stmt/badsyntax_future3.py", "pydoc_data/topics.py",
                "html/entities.py", "json/__init__.pyc"):
        assert not is_corpus_file(rel), rel


# ----------------------------------------------------------------------------- quality
def _heldout_texts(names):
    root = stdlib_root()
    paths = [root / n for n in names]
    if not all(p.is_file() for p in paths):
        pytest.skip(f"held-out files {names} are not in this Python's standard library")
    return [p.read_text(encoding="utf-8") for p in paths]


def test_heldout_bits_per_byte_beat_unigram(model, tok):
    texts = _heldout_texts(["getopt.py", "secrets.py"])
    rows, n_bytes = scoring_rows(tok, texts, seq_len=512)
    nll = token_nlls(model, rows)
    targets = np.concatenate([r[1:] for r in rows])
    # A unigram fitted to these very tokens: a lower bound on any unigram model's loss here.
    counts = np.bincount(targets, minlength=tok.n_words)
    unigram_nats = -np.log(counts[targets] / counts.sum())
    model_bpb = nll.sum() / n_bytes / math.log(2)
    unigram_bpb = unigram_nats.sum() / n_bytes / math.log(2)
    assert model_bpb < 0.6 * unigram_bpb, (model_bpb, unigram_bpb)


def test_greedy_infill_of_a_missing_return_line_is_valid_python(model, tok):
    """What the model does reliably, not one lucky prompt: across 30 variations of a function missing its
    last line, the default (PSM) greedy infill is usually exactly that ``return`` line and the filled text
    parses. The shipped model gets 30 of 30 on this machine; the bar leaves room for other CPUs' rounding."""
    cases = missing_return_cases()
    llama = Llama(model, tok, max_seq_len=512, max_batch_size=len(cases))
    outs = llama.text_infilling([p for p, _, _ in cases], [s for _, s, _ in cases], temperature=0.0, max_gen_len=32)
    good = []
    for (prefix, suffix, line), out in zip(cases, outs):
        try:
            ast.parse(prefix + out["generation"] + suffix)
        except SyntaxError:
            continue
        good.append(out["generation"].rstrip() == line)
    assert sum(good) >= 24, [o["generation"] for o in outs]


def test_infill_cases_hide_one_whole_line(tok):
    heldout = {"m.py": "import os\n\n\ndef f(x):\n    y = x * 2\n    return y\n"}
    cases = infill_cases(tok, heldout, n=4, seed=0, prefix_tokens=256, suffix_tokens=128)
    assert len(cases) == 4
    for c in cases:
        assert "\n" not in c.middle and c.middle.strip()
        assert c.prefix + c.middle + c.suffix == heldout["m.py"]


@pytest.mark.parametrize("suffix_first", [False, True])
def test_measure_infilling_counts_hits_and_indentation(model, tok, suffix_first):
    heldout = {"m.py": "def f(x):\n    y = x + 1\n    return y\n\n\nclass A:\n    pass\n"}
    cases = infill_cases(tok, heldout, n=5, seed=0, prefix_tokens=64, suffix_tokens=32)
    llama = Llama(model, tok, max_seq_len=256, max_batch_size=4)
    report, pairs = measure_infilling(llama, cases, "    pass", batch_size=4, suffix_first=suffix_first)
    assert report.mode == ("SPM" if suffix_first else "PSM") and report.lines == 5
    assert [c for c, _ in pairs] == cases and all("\n" not in p for _, p in pairs)
    assert report.baseline_hits == 1  # the one "    pass" line
    assert report.model_hits == sum(is_exact(c, p) for c, p in pairs) <= report.indent_hits  # exact => same indentation
    assert report.indent_hits == sum(indentation(p) == indentation(c.middle) for c, p in pairs)
    assert report.model_only - report.baseline_only == report.model_hits - report.baseline_hits
    assert report.p_value == mcnemar_p(report.model_only, report.baseline_only)
    assert (indentation("    x = 1"), indentation("\tx"), indentation("x"), indentation("  ")) == ("    ", "\t", "", "  ")


# ----------------------------------------------------------------------------- the training script
def test_training_is_seeded_and_resumable(tmp_path, monkeypatch):
    """A run stopped and resumed ends with exactly the weights of an uninterrupted run, and exports a
    Meta-layout checkpoint that the normal loader reads."""
    import shutil

    import training.train_tiny as train_tiny
    from training.data import Corpus, instruct_pairs, load_corpus

    if not stdlib_root().is_dir():
        pytest.skip("this Python has no standard-library sources")
    full = load_corpus()
    # What is tested is the training loop, not the corpus: a slice of it keeps the test fast.
    small = Corpus(full.root, dict(list(full.train.items())[:40]), dict(list(full.heldout.items())[:3]), [])
    monkeypatch.setattr(train_tiny, "training_data", lambda: (small, instruct_pairs(small.train)))
    train = train_tiny.train
    cfg = TrainConfig(dim=32, n_layers=1, n_heads=2, seq_len=64, short_max=48, steps=4, batch_size=2, warmup=1,
                      amp="fp32", psm_weight=5.0)
    weights = {}
    for name, stops in (("straight", [None]), ("resumed", [2, None])):
        out = tmp_path / name
        out.mkdir()
        shutil.copyfile(TINY / "tokenizer.model", out / "tokenizer.model")  # skip training a tokenizer
        for stop in stops:
            exported = train(cfg, out, torch.device("cpu"), ckpt_every=100, eval_every=2, log_every=100,
                             eval_rows=2, stop_after=stop)
            assert (exported is None) == (stop is not None)
        weights[name] = torch.load(out / "state.pt", weights_only=True)["model"]
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == [1, 2, 3, 4] and "heldout_bits_per_byte" in log[-1]
    for key, value in weights["straight"].items():
        assert torch.equal(value, weights["resumed"][key]), key
    model = load_model(exported, device="cpu", dtype=torch.float32)
    assert model.args.dim == 32 and model.args.vocab_size == 4096
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        train(TrainConfig(**{**cfg.__dict__, "init_from": str(tmp_path / "nope.pt")}), tmp_path / "x", torch.device("cpu"))
    with pytest.raises(ValueError, match="different configuration"):
        train(TrainConfig(**{**cfg.__dict__, "lr": 1e-3}), tmp_path / "straight", torch.device("cpu"))
