from __future__ import annotations

import json
import subprocess
import sys

import pytest

from igpt.cli import main, make_parser
from igpt.tokenizers import Palette


def test_help_lists_every_command_and_every_flag_has_help():
    parser = make_parser()
    text = parser.format_help()
    for command in ("palette", "prepare", "pretrain", "demo"):
        assert command in text
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.help, f"igpt {name} {action.option_strings} has no help"


@pytest.mark.slow  # runs the command line in a subprocess
def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "igpt", "pretrain", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--objective" in out.stdout and "--n-layer" in out.stdout


def test_palette_prepare_pretrain_resume_end_to_end(tmp_path, capsys):
    pal, cache, run = tmp_path / "pal.npz", tmp_path / "cache", tmp_path / "run"
    assert main(["palette", "fit", "--data", "digits", "--vocab-size", "16", "--n-px", "8", "--out", str(pal)]) == 0
    assert main(["prepare", "--data", "digits", "--n-px", "8", "--tokenizer", str(pal), "--out", str(cache)]) == 0
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["kind"] == "ids" and set(meta["splits"]) >= {"train", "val", "test"}
    args = ["pretrain", "--preset", "igpt-nano", "--data", str(cache), "--tokenizer", str(pal), "--out", str(run),
            "--max-steps", "4", "--batch-size", "16", "--eval-every", "2", "--ckpt-every", "2", "--device", "cpu"]
    assert main(args) == 0
    assert "checkpoint" in capsys.readouterr().out
    run_cfg = json.loads((run / "run.json").read_text())
    assert run_cfg["model"]["n_layer"] == 2 and run_cfg["model"]["n_vocab"] == 16
    assert run_cfg["train"]["max_steps"] == 4
    assert main(["pretrain", "--resume", str(run)]) == 0  # already finished: loads and stops at once
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines if '"train"' in l] == [4]


def test_bad_input_is_one_clear_line(tmp_path, capsys):
    code = main(["pretrain", "--preset", "igpt-nano", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "nope" in err
    other = tmp_path / "other.npz"
    assert main(["palette", "fit", "--data", "digits", "--vocab-size", "8", "--n-px", "8", "--out", str(other)]) == 0
    assert main(["prepare", "--data", "digits", "--n-px", "8", "--tokenizer", str(other), "--out", str(tmp_path / "c")]) == 0
    pal16 = tmp_path / "p16.npz"
    assert main(["palette", "fit", "--data", "digits", "--vocab-size", "16", "--n-px", "8", "--out", str(pal16)]) == 0
    capsys.readouterr()
    code = main(["pretrain", "--preset", "igpt-nano", "--data", str(tmp_path / "c"), "--tokenizer", str(pal16),
                 "--out", str(tmp_path / "r2"), "--max-steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "palette" in err
    with pytest.raises(SystemExit):
        main(["pretrain", "--objective", "gan"])


@pytest.mark.slow  # the whole demo: palette, pretraining, probe and samples
def test_demo_end_to_end(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "6"]) == 0
    out = capsys.readouterr().out
    assert "samples.png" in out and "<- chosen on validation" in out
    for name in ("samples.png", "probe.png", "summary.json", "palette.npz"):
        assert (tmp_path / "demo" / name).exists(), name
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert len(summary["probe_acc"]) == 5  # embeddings, 3 block inputs, final norm of the 4-layer demo model


def _all_parsers():
    """Every (name, parser) of the command tree, nested commands included."""
    todo, out = [("igpt", make_parser())], []
    while todo:
        name, p = todo.pop()
        out.append((name, p))
        for action in p._actions:
            if action.dest in ("command", "palette_command", "bench_command"):
                todo += [(f"{name} {n}", sub) for n, sub in action.choices.items()]
    return out


def test_every_flag_states_its_default_once():
    for name, p in _all_parsers():
        for action in p._actions:
            text = p._get_formatter()._expand_help(action) if action.help else ""
            assert text.count("default") <= 1, f"{name} {action.option_strings}: {text}"
            assert "(default: None)" not in text, f"{name} {action.option_strings}: {text}"


def test_one_name_per_concept_across_commands():
    flags = {name: {o for a in p._actions for o in a.option_strings} for name, p in _all_parsers()}
    every = set().union(*flags.values())
    for old in ("--batch", "--k", "--n", "--no-compile", "--n-vocab-override"):
        assert old not in every, old
    assert "--n-vocab" not in flags["igpt pretrain"]  # the palette decides it
    for name in ("igpt sample", "igpt complete", "igpt score", "igpt probe", "igpt finetune", "igpt convert"):
        assert "--checkpoint" in flags[name], name
    for name in ("igpt bench sample", "igpt bench train", "igpt bench loader", "igpt bench memory"):
        assert "--batch-size" in flags[name], name


def test_version_and_quiet_after_the_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("igpt ")
    assert make_parser().parse_args(["bench", "memory", "-q"]).quiet
    assert make_parser().parse_args(["-q", "bench", "memory"]).quiet
    assert not make_parser().parse_args(["bench", "memory"]).quiet


def test_int_flags_take_whole_numbers_in_float_notation_and_refuse_fractions():
    from igpt.cli.args import integer
    assert integer("64") == 64 and integer("1e8") == 100_000_000 and integer("2E3") == 2000
    for bad in ("2.5", "inf", "nan", "x"):
        with pytest.raises(ValueError):
            integer(bad)


@pytest.mark.slow  # five help pages in subprocesses
def test_old_flag_names_answer_for_one_release(tmp_path):
    """Release 0.1 called every tokenizer a palette: its flags still work, and each help says which is old."""
    pal, cache = tmp_path / "pal.npz", tmp_path / "cache"
    assert main(["palette", "fit", "--data", "digits", "--palette-k", "4", "--n-px", "8", "--out", str(pal)]) == 0
    assert main(["prepare", "--data", "digits", "--n-px", "8", "--palette", str(pal), "--out", str(cache)]) == 0
    palette = Palette.load(pal)
    meta = json.loads((cache / "meta.json").read_text())
    assert palette.k == 4 and meta["tokenizer_fingerprint"] == palette.fingerprint()
    args = make_parser().parse_args(["tokenizer", "fit", "--data", "digits", "--codebook-size", "8"])
    assert args.vocab_size == 8
    for command, old in ((["pretrain"], "--palette"), (["prepare"], "--palette"), (["pretrain"], "--palette-k"),
                         (["tokenizer", "fit"], "--codebook-size"), (["bench", "loader"], "--palette")):
        out = subprocess.run([sys.executable, "-m", "igpt", *command, "--help"], capture_output=True, text=True)
        assert f"({old} is its old name, kept for one release)" in " ".join(out.stdout.split()), (command, old)


@pytest.mark.parametrize("argv", [
    ["prepare", "--data", "digits", "--n-px", "8", "--palette", "a.npz", "--tokenizer", "b.npz", "--out", "c"],
    ["pretrain", "--tokenizer", "a.npz", "--palette", "a.npz"],
    ["tokenizer", "fit", "--data", "digits", "--vocab-size", "8", "--codebook-size", "16"],
])
def test_a_flag_under_its_new_and_old_name_at_once_is_one_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    new, old = ("--vocab-size", "--codebook-size") if "--vocab-size" in argv else ("--tokenizer", "--palette")
    first, second = sorted((new, old), key=argv.index)
    assert last.endswith(f"error: {first} and {second} are one flag ({old} is the old name of {new}); give it once")
