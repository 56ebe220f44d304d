"""The programs as a user meets them: one set of flags in both spellings with their defaults shown, errors that
name the flag, Ctrl-C without a traceback, a word while compiling, outputs others can read."""

import argparse
import io
import logging
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from conftest import ROOT

from codellama import Llama, ModelArgs
from codellama.cli import run
from codellama.cli.convert import main as convert_main
from codellama.cli.evaluate import parse_args as evaluate_args
from codellama.cli.generate import chat, complete, infill
from codellama.cli.quantize import main as quantize_main
from codellama.cli.serve import build_service, main as serve_main, parser as serve_parser
from codellama.checkpoint import BUNDLED_CKPT_DIR
from codellama.engine import Engine, SamplingParams
from codellama.evaluate.progress import Progress
from codellama.options import (ENGINE_FLAGS, LOAD_FLAGS, OptionError, add_flags, engine_options, load_options,
                               split_options)
from codellama.quantize import QuantConfig
from codellama.testing import random_model

PROGRAMS = {
    "complete": lambda argv: complete(argv, prog="complete"),
    "infill": lambda argv: infill(argv, prog="infill"),
    "chat": lambda argv: chat(argv, prog="chat"),
    "serve": lambda argv: serve_main(argv, prog="serve"),
    "evaluate run": lambda argv: evaluate_args(["run", *argv]),
    "evaluate generate": lambda argv: evaluate_args(["generate", *argv]),
}


def help_of(program, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        PROGRAMS[program](["--help"])
    assert exit_.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare on single spaces


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_every_program_takes_the_shared_flags_in_both_spellings_with_their_defaults(program, capsys):
    text = help_of(program, capsys)
    for name in LOAD_FLAGS + ENGINE_FLAGS:
        assert f"--{name}" in text and (f"--{name.replace('_', '-')}" in text or "_" not in name), (program, name)
    assert "(default: auto)" in text and "(default: 512)" in text  # attention, max_tokens_per_step
    assert text.count("(default:") >= 6, text


def test_program_defaults_are_their_own_and_shown(capsys):
    assert "(default: 0.2)" in help_of("complete", capsys)       # Meta's example_completion.py
    assert "(default: 128)" in help_of("infill", capsys)         # its max_gen_len
    serve = help_of("serve", capsys)
    assert "(default: 64)" in serve and "(default: 127.0.0.1)" in serve and "(default: 8000)" in serve
    evaluate = help_of("evaluate run", capsys)
    assert "(default: humaneval)" in evaluate and "(default: 0.95)" in evaluate and "(default: bwrap)" in evaluate


def test_both_spellings_parse_to_the_same_options():
    p = argparse.ArgumentParser()
    add_flags(p, LOAD_FLAGS + ENGINE_FLAGS)
    a = p.parse_args(["--ckpt_dir", "x", "--max_seq_len", "99", "--max_tokens_per_step", "64", "--quantize", "int4",
                      "--group_size", "32"])
    b = p.parse_args(["--ckpt-dir", "x", "--max-seq-len", "99", "--max-tokens-per-step", "64", "--quantize", "int4",
                      "--group-size", "32"])
    assert vars(a) == vars(b)
    assert load_options(a) == load_options(b) and load_options(a).quantize == QuantConfig("int4", 32)
    assert engine_options(a).max_tokens_per_step == 64 and engine_options(a).max_seq_len == 99


def test_the_evaluator_takes_every_load_and_engine_option():
    args = evaluate_args(["run", "--quantize", "int8", "--compile", "--max_tokens_per_step", "32", "--ckpt-dir", "d"])
    assert load_options(args).quantize == QuantConfig("int8") and engine_options(args).compile
    assert engine_options(args).max_tokens_per_step == 32 and load_options(args).ckpt_dir == "d"
    with pytest.raises(OptionError, match="max_token_per_step=1 is not an option; valid: .*max_tokens_per_step"):
        split_options("d", max_token_per_step=1)


def test_max_tokens_per_step_reaches_the_engine_from_python_and_the_server():
    assert Llama.build(max_seq_len=64, max_batch_size=1, max_tokens_per_step=48).engine.max_tokens_per_step == 48
    args = serve_parser().parse_args(["--max-tokens-per-step", "40", "--max_seq_len", "64", "--max_batch_size", "1"])
    assert build_service(args).engine.max_tokens_per_step == 40


def test_errors_name_the_flag(tmp_path, capsys):
    for argv, message in ((["--ckpt_dir", str(tmp_path)], f"--ckpt_dir: {tmp_path} is not a checkpoint"),
                          (["--max_seq_len", "0"], "--max_seq_len 0: must be a positive integer"),
                          (["--tokenizer_path", str(tmp_path / "t.model")], "--tokenizer_path: tokenizer not found"),
                          (["--group_size", "32"], "--group_size 32: needs quantize int4")):
        with pytest.raises(SystemExit) as exit_:
            run(complete, argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith(f"error: {message}"), err
        assert err.count("\n") == 1 and "Traceback" not in err


def test_python_names_the_argument_as_python_spells_it(tmp_path):
    with pytest.raises(ValueError, match=r"max_seq_len must be a positive integer, got 0"):
        Llama.build(max_seq_len=0)
    with pytest.raises(FileNotFoundError, match="is not a checkpoint") as e:
        Llama.build(str(tmp_path))
    assert e.value.option == "ckpt_dir"


@pytest.mark.parametrize("program", ["complete", "chat"])
def test_ctrl_c_ends_a_program_in_one_line(program):
    argv = [sys.executable, "-m", "codellama", program, "--max_seq_len", "4096", "--max_gen_len", "4000",
            "--temperature", "0.8"] + (["--stream", "--prompt", "def f():"] if program == "complete" else [])
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "bundled tiny demonstration model" in proc.stderr.readline()  # loaded: generating now
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines() == ["interrupted"], err


def test_compiling_is_announced_and_timed():
    model = random_model(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=128, multiple_of=32))
    engine = Engine(model, None, max_batch_size=1, max_seq_len=64, compile=True)
    # A handler of its own: a program run in-process earlier may have stopped the notes propagating to caplog.
    logger, records = logging.getLogger("codellama.progress"), []
    handler, level = logging.Handler(logging.INFO), logger.level
    handler.emit = records.append
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        engine.submit([1, 2, 3], SamplingParams(temperature=0, max_tokens=3)).result()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    messages = [r.getMessage() for r in records]
    assert any(m.startswith("compiling the decode step") for m in messages), messages
    assert any(m.startswith("compiled in ") for m in messages), messages


def modes(path):
    return {name: stat.S_IMODE(os.stat(os.path.join(path, name)).st_mode) for name in os.listdir(path)}


def test_written_checkpoints_are_readable_by_others(tmp_path, capsys):
    old = os.umask(0o022)
    try:
        assert convert_main([BUNDLED_CKPT_DIR, str(tmp_path / "hf"), "--to", "hf"]) == 0
        assert quantize_main([BUNDLED_CKPT_DIR, str(tmp_path / "q"), "--int8"]) == 0
    finally:
        os.umask(old)
    for out in ("hf", "q"):
        assert stat.S_IMODE(os.stat(tmp_path / out).st_mode) == 0o755
        assert set(modes(tmp_path / out).values()) == {0o644}, modes(tmp_path / out)


def test_progress_to_a_file_is_lines_not_redraws():
    stream = io.StringIO()
    with Progress(1000, "generate", stream=stream) as bar:
        for _ in range(1000):
            bar.update()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and 10 <= len(lines) <= 11
    assert lines[-1].startswith("generate 1000/1000 [")


def test_progress_notes_reach_the_stderr_there_is_when_they_are_written(monkeypatch):
    from codellama.cli import show_progress
    logger = logging.getLogger("codellama.progress")
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "propagate", logger.propagate)
    monkeypatch.setattr(logger, "level", logger.level)
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    show_progress()  # a program run in-process, with the stderr of its time ...
    first.close()  # ... which is gone by the time the next note is written
    monkeypatch.setattr(sys, "stderr", second)
    logger.info("compiling")
    assert second.getvalue() == "codellama: compiling\n"
