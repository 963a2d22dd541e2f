from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from igpt.bench.sample import bench_sample
from igpt.cli import main, make_parser
from igpt.config import (BenchSampleConfig, DataConfig, EvalDataConfig, FinetuneConfig, ModelConfig, SampleConfig,
                         ScoreConfig, TrainConfig)
from igpt.data.open import open_split, prepare
from igpt.data.streams import fixed_batches
from igpt.eval.score import score
from igpt.generate.complete import complete
from igpt.generate.infill import infill, still_masked
from igpt.objectives import mean_loss
from igpt.tokenizers import Palette
from igpt.train.finetune import finetune
from igpt.train.pretrain import pretrain
from igpt.viz import completion_figure
from igpt.weights.convert import load as load_checkpoint

N_PX, SCALE = 8, 4  # igpt-nano's side and the figures' default enlargement


def _pretrain(root, objective: str):
    run = root / "run"
    pretrain(ModelConfig.from_preset("igpt-nano"),
             TrainConfig(objective=objective, max_steps=3, batch_size=16, device="cpu", eval_every=0, log_every=1),
             DataConfig(data="digits", vocab_size=16), run, progress=False)
    return run


@pytest.fixture(scope="module")
def ar_run(tmp_path_factory):
    return _pretrain(tmp_path_factory.mktemp("ar"), "ar")


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory):
    return _pretrain(tmp_path_factory.mktemp("bert"), "bert")


def _finetuned(run, out):
    """A few steps of fine-tuning: a checkpoint whose record marks a classifier on the run's trunk."""
    cfg = FinetuneConfig(max_steps=2, eval_every=2, batch_size=8, labels_per_class=2, device="cpu")
    return Path(finetune(run, "digits", out, cfg, progress=False)["checkpoint"])


def test_a_finetuned_ar_checkpoint_is_scored_sampled_and_completed_as_ar(ar_run, tmp_path, capsys):
    tuned = _finetuned(ar_run, tmp_path / "ft")
    model, palette, record = load_checkpoint(tuned)
    assert record.finetuned is not None and record.objective == "ar" and model.causal
    report = score(tuned, EvalDataConfig(data="digits"), ScoreConfig(device="cpu"), progress=False)
    test = open_split("digits", "test", n_px=N_PX)
    direct = mean_loss(model, fixed_batches(test, 64, 0, palette, torch.device("cpu")), "ar")
    assert report["objective"] == "ar" and report["nats_per_token"] == pytest.approx(direct["loss"], rel=1e-5)
    assert main(["sample", "--checkpoint", str(tuned), "--n-images", "2", "--out", str(tmp_path / "s")]) == 0
    done = complete(tuned, tmp_path / "c", data=EvalDataConfig(data="digits"), n_images=2, rows=3, n_samples=2,
                    cfg=SampleConfig(device="cpu"), progress=False)
    assert done["how"] == "sampled" and done["objective"] == "ar"
    kept = done["original_ids"].repeat_interleave(2, dim=0)[:, :3 * N_PX]
    assert torch.equal(done["ids"][:, :3 * N_PX], kept)


def test_a_finetuned_bert_checkpoint_is_refused_by_sample(bert_run, tmp_path, capsys):
    tuned = _finetuned(bert_run, tmp_path / "ft")
    model, _, record = load_checkpoint(tuned)
    assert record.finetuned is not None and record.objective == "bert" and not model.causal
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(tuned), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "BERT" in err and "left to right" in err
    assert not (tmp_path / "s").exists()
    report = score(tuned, EvalDataConfig(data="digits"), ScoreConfig(device="cpu"), progress=False)
    assert report["objective"] == "bert" and report["mask_prob"] == 0.15
    done = complete(tuned, tmp_path / "c", data=EvalDataConfig(data="digits"), n_images=1, rows=4, n_samples=1,
                    rounds=2, cfg=SampleConfig(device="cpu"), progress=False)
    assert done["how"].startswith("infilled by BERT")


def _cells(png, n_inputs: int, n_samples: int) -> np.ndarray:
    """Cut a completion figure back into its cells: (n_inputs, 2 + n_samples, N_PX, N_PX, 3) uint8. The layout
    depends on the shapes and the scale (not on the title's text), so a figure of blank images gives the
    tile boxes."""
    fig = Image.open(png).convert("RGB")
    blank = np.zeros((n_inputs, N_PX, N_PX, 3), np.uint8)
    layout = completion_figure(blank, blank, np.zeros((n_inputs, n_samples, N_PX, N_PX, 3), np.uint8), SCALE,
                               title="any")
    assert fig.size[1] == layout.image.size[1]
    return np.stack([np.stack([layout.cell(r, c, fig) for c in range(2 + n_samples)]) for r in range(n_inputs)])


def test_every_new_flag_has_help():
    parser = make_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    bench = next(a for a in sub.choices["bench"]._actions if a.dest == "bench_command")
    parsers = [sub.choices[n] for n in ("sample", "complete", "score")] + [bench.choices["sample"]]
    for p in parsers:
        for action in p._actions:
            assert action.help, f"{p.prog} {action.option_strings} has no help"


def test_sample_cli_writes_each_image_and_a_grid(ar_run, tmp_path, capsys):
    args = ["sample", "--checkpoint", str(ar_run), "--n-images", "5", "--batch-size", "2", "--top-k", "8"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b"), "--scale", "1"]) == 0
    assert main(args + ["--out", str(tmp_path / "c"), "--seed", "1"]) == 0
    assert "5 samples" in capsys.readouterr().out
    pngs = sorted((tmp_path / "a").glob("sample-*.png"))
    assert len(pngs) == 5 and Image.open(pngs[0]).size == (N_PX * SCALE, N_PX * SCALE)  # --scale's default: 4
    assert (tmp_path / "a" / "grid.png").exists()
    read = lambda d: np.stack([np.asarray(Image.open(p)) for p in sorted(d.glob("sample-*.png"))])  # noqa: E731
    big = read(tmp_path / "a")  # nearest neighbour: every 4x4 block is one colour
    assert np.array_equal(big, big[:, ::SCALE, ::SCALE].repeat(SCALE, 1).repeat(SCALE, 2))
    assert np.array_equal(read(tmp_path / "b"), big[:, ::SCALE, ::SCALE])  # seeded: the same draws, at --scale 1
    assert not np.array_equal(big, read(tmp_path / "c"))
    prov = json.loads((tmp_path / "c" / "provenance.json").read_text())
    assert prov["checkpoint"] == str(ar_run) and prov["step"] == 3 and prov["seed"] == 1
    assert (prov["temperature"], prov["top_k"], prov["top_p"], prov["objective"]) == (1.0, 8, 1.0, "ar")
    assert Path(prov["checkpoint_dir"]).name == "step-0000003"


def test_complete_cli_on_a_dataset_keeps_the_top_rows_exactly(ar_run, tmp_path, capsys):
    out = tmp_path / "fig"
    assert main(["complete", "--checkpoint", str(ar_run), "--data", "digits", "--n-images", "3", "--offset", "5",
                 "--n-samples", "2", "--keep", "0.5", "--out", str(out)]) == 0
    assert "kept 4 of 8 rows" in capsys.readouterr().out
    cells = _cells(out / "completions.png", 3, 2)
    _, palette, _ = load_checkpoint(ar_run)
    test = open_split("digits", "test", n_px=N_PX)
    quantized = palette.decode(palette.encode(test.pixels[5:8])).numpy()
    assert np.array_equal(cells[:, 0], quantized)  # column 0: the quantized originals
    assert np.array_equal(cells[:, 1, :4], quantized[:, :4]) and np.all(cells[:, 1, 4:] == 128)  # kept | grey
    assert np.array_equal(cells[:, 2:, :4], np.repeat(quantized[:, None, :4], 2, axis=1))  # the kept rows survive
    assert len(list(out.glob("complete-test-*.png"))) == 3
    assert np.array_equal(_cells(out / "complete-test-00006.png", 1, 2)[0], cells[1])
    prov = json.loads((out / "provenance.json").read_text())
    assert (prov["rows_kept"], prov["n_samples"], prov["how"], prov["step"]) == (4, 2, "sampled", 3)
    assert prov["names"] == ["test-00005", "test-00006", "test-00007"] and prov["top_p"] == 1.0


def test_complete_cli_on_image_files_and_an_ids_cache(ar_run, tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 12, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 256, (9, 9), dtype=np.uint8)).save(tmp_path / "b.jpg")
    out = tmp_path / "fig"
    assert main(["complete", "--checkpoint", str(ar_run), "--images", str(tmp_path / "a.png"), str(tmp_path / "b.jpg"),
                 "--rows", "3", "--n-samples", "3", "--out", str(out)]) == 0
    cells = _cells(out / "completions.png", 2, 3)
    assert np.array_equal(cells[:, 2:, :3], np.repeat(cells[:, None, 0, :3], 3, axis=1))
    assert (out / "complete-000-a.png").exists() and (out / "complete-001-b.png").exists()
    # an ids cache prepared with the run's own palette is accepted; --keep 0 samples whole images
    cache = tmp_path / "cache"
    prepare("digits", cache, n_px=N_PX, tokenizer=Palette.load(ar_run / "palette.npz"), progress=False)
    assert main(["complete", "--checkpoint", str(ar_run), "--data", str(cache), "--split", "val", "--n-images", "2",
                 "--keep", "0", "--out", str(tmp_path / "fig2")]) == 0
    assert np.all(_cells(tmp_path / "fig2" / "completions.png", 2, 4)[:, 1] == 128)


def test_score_cli_reports_nats_bits_and_matches_evaluate(ar_run, tmp_path, capsys):
    path = tmp_path / "s.json"
    assert main(["score", "--checkpoint", str(ar_run), "--data", "digits", "--batch-size", "50", "--json", str(path),
                 "--out", str(tmp_path / "o")]) == 0
    text = capsys.readouterr().out
    assert "nats/token" in text and "bits/token" in text and "not 8-bit" in text
    report = json.loads(path.read_text())
    assert report == json.loads((tmp_path / "o" / "score.json").read_text())
    test = open_split("digits", "test", n_px=N_PX)
    assert report["split"] == "test" and report["images"] == len(test) and report["objective"] == "ar"
    assert report["bits_per_token"] == pytest.approx(report["nats_per_token"] / math.log(2))
    assert report["bits_per_subpixel_equivalent"] == pytest.approx(report["bits_per_token"] / 3)
    model, palette, _ = load_checkpoint(ar_run)
    direct = mean_loss(model, fixed_batches(test, len(test), 0, palette, torch.device("cpu")))
    assert report["nats_per_token"] == pytest.approx(direct["loss"], rel=1e-5)
    assert 1.0 < report["nats_per_token"] < 4.0  # near ln 16 = 2.77 after three steps, not garbage
    args = ["score", "--checkpoint", str(ar_run), "--data", "digits", "--split", "val", "--json", str(path)]
    assert main(args) == 2  # an existing result is not replaced silently
    assert main(args + ["--overwrite"]) == 0
    assert json.loads(path.read_text())["split"] == "val"


def test_bert_checkpoint_infills_scores_and_refuses_to_sample(bert_run, tmp_path, capsys):
    out = tmp_path / "fig"
    assert main(["complete", "--checkpoint", str(bert_run), "--data", "digits", "--n-images", "2", "--rows", "5",
                 "--n-samples", "2", "--rounds", "3", "--out", str(out)]) == 0
    assert "infilled by BERT in 3 rounds" in capsys.readouterr().out
    cells = _cells(out / "completions.png", 2, 2)
    assert np.array_equal(cells[:, 2:, :5], np.repeat(cells[:, None, 0, :5], 2, axis=1))
    assert main(["score", "--checkpoint", str(bert_run), "--data", "digits", "--json", str(tmp_path / "s.json")]) == 0
    assert "masked-pixel loss" in capsys.readouterr().out
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["objective"] == "bert" and report["mask_prob"] == 0.15
    assert main(["sample", "--checkpoint", str(bert_run), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "BERT" in err and "igpt complete" in err


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_infill_leaves_unmasked_ids_untouched_and_fills_the_rest(nano_model, temperature):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 16, (5, 16), generator=g)
    keep = torch.rand(5, 16, generator=g) < 0.4
    keep[0] = False  # a blank canvas
    keep[1] = True  # nothing to fill
    out = infill(nano_model, ids, keep, rounds=4, temperature=temperature, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out[keep], ids[keep]) and torch.equal(out[1], ids[1])
    assert out.min() >= 0 and out.max() < 16
    again = infill(nano_model, ids, keep, rounds=4, temperature=temperature, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)  # seeded
    batched = infill(nano_model, ids, keep, rounds=4, temperature=temperature,
                     generator=torch.Generator().manual_seed(1), batch_size=2)
    assert torch.equal(batched[keep], ids[keep])
    if temperature == 0:
        assert torch.equal(out, batched)  # greedy: the batch size cannot matter


def test_one_round_is_one_parallel_prediction(nano_model):
    ids = torch.randint(0, 16, (3, 16))
    keep = torch.zeros(3, 16, dtype=torch.bool)
    keep[:, :6] = True
    out = infill(nano_model, ids, keep, rounds=1, temperature=0)
    expected = nano_model(ids.masked_fill(~keep, 0), causal=False, keep=keep).argmax(-1)
    assert torch.equal(out[:, 6:], expected[:, 6:])
    # more rounds condition later positions on earlier choices, so greedy results differ from one round
    assert not torch.equal(infill(nano_model, ids, keep, rounds=10, temperature=0), out)


def test_mask_schedule():
    total = torch.tensor([0, 1, 10, 100])
    for schedule in ("cosine", "linear"):
        counts = [still_masked(total, r, 6, schedule) for r in range(1, 7)]
        assert all(torch.all(a >= b) for a, b in zip(counts, counts[1:]))
        assert torch.all(counts[-1] == 0) and torch.all(counts[0] <= total)
    assert still_masked(total, 1, 4, "cosine")[3] > still_masked(total, 1, 4, "linear")[3]  # cosine: slow start
    with pytest.raises(ValueError, match="schedule"):
        still_masked(total, 1, 4, "square")


def test_infill_bad_arguments(nano_model):
    ids = torch.zeros(2, 16, dtype=torch.long)
    with pytest.raises(ValueError, match="rounds"):
        infill(nano_model, ids, torch.ones(2, 16, dtype=torch.bool), rounds=0)
    with pytest.raises(ValueError, match="bool keep"):
        infill(nano_model, ids, torch.ones(2, 16))


def test_bad_inputs_are_one_clear_line(ar_run, tmp_path, capsys):
    (tmp_path / "notes.png").write_text("not an image")
    other = Palette.fit(open_split("digits", "train", n_px=N_PX).pixels, k=8, seed=0, device="cpu")
    prepare("digits", tmp_path / "other", n_px=N_PX, tokenizer=other, progress=False)
    prepare("digits", tmp_path / "small", n_px=4, tokenizer=Palette.load(ar_run / "palette.npz"), progress=False)
    run = str(ar_run)
    cases = [
        (["complete", "--checkpoint", run, "--images", str(tmp_path / "missing.png")], "missing.png"),
        (["complete", "--checkpoint", run, "--images", str(tmp_path / "notes.png")], "not a readable image"),
        (["complete", "--checkpoint", run, "--data", str(tmp_path / "other")], "palette"),
        (["score", "--checkpoint", run, "--data", str(tmp_path / "other")], "palette"),
        (["score", "--checkpoint", run, "--data", str(tmp_path / "small")], "prepared at 4x4"),
        (["score", "--checkpoint", str(tmp_path / "nope"), "--data", "digits"], "nope"),
        (["complete", "--checkpoint", run, "--data", "digits", "--images", str(tmp_path / "notes.png")], "exactly one"),
        (["complete", "--checkpoint", run, "--data", "digits", "--rows", "9"], "--rows"),
        (["complete", "--checkpoint", run, "--data", "digits", "--keep", "1.5"], "--keep"),
        (["complete", "--checkpoint", run, "--data", "digits", "--offset", "1000"], "--offset"),
        (["sample", "--checkpoint", run, "--top-p", "0"], "--top-p"),
        (["score", "--checkpoint", run, "--data", "digits", "--split", "unlabeled"], "unlabeled"),
    ]
    for argv, needle in cases:
        argv = argv + (["--out", str(tmp_path / "o")] if argv[0] != "score" else [])
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, (argv, err)


def test_bench_sample_runs_on_cpu_and_cli_prints_both_columns(tmp_path, capsys):
    result = bench_sample(BenchSampleConfig("igpt-nano", 2, n_px=4, n_vocab=16, device="cpu", batches=1, warmup=1,
                                            compare_hf=True), show=False)
    assert result["igpt"]["images_per_s"] > 0 and result["setup"]["dtype"] == "fp32"
    assert result["hf"] is not None or "transformers" in result["hf_skipped"]
    path = tmp_path / "b.json"
    assert main(["bench", "sample", "--preset", "igpt-nano", "--batch-size", "2", "--n-px", "4", "--device", "cpu",
                 "--batches", "1", "--json", str(path)]) == 0
    text = capsys.readouterr().out
    assert "images/s" in text and "igpt (KV cache)" in text and "skipped" in text
    assert json.loads(path.read_text())["igpt"]["batch"] == 2
