"""`flexlora train` end to end on tiny offline models: outputs, and every bad input -> exit code 2
with a one-line message on stderr and no traceback; a failed run loses nothing saved before."""

import json
import warnings
import os
import subprocess
import sys

import pytest
import torch

from _tiny_hf import sentiment_rows, tiny_run_inputs
from flexlora.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return {"root": root, **tiny_run_inputs(root, sentiment_rows(64))}


FAST = ["--steps", "4", "--batch-size", "8", "--threads", "1", "--no-progress", "--r", "2"]


def _run_bad(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith("Loading weights")]
    return e.value.code, lines


def test_train_writes_outputs_and_summary(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny["bert"]), "--data", str(tiny["data"]), "--output-dir", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "head only" in printed and "after FlexLoRA" in printed
    assert "step     4/4" in printed or "step    4/4" in printed or "4/4" in printed
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "classify" and m["steps"] == 4
    assert f"| {m.get('device_name') or m['device']}, fp32" in printed  # where it trained, and how
    for f in ("adapter", "rank_history.csv", "rank_heatmap.png", "train_log.csv", "classifier_head.safetensors"):
        assert (out / f).exists(), f


def test_target_modules_accepts_commas_and_spaces(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    main(["train", "--model", str(tiny["llama"]), "--data", str(tiny["lm"]), "--output-dir", str(out),
          "--target-modules", "q_proj,v_proj", "o_proj", *FAST])
    m = json.loads((out / "metrics.json").read_text())
    assert m["target_modules"] == ["q_proj", "v_proj", "o_proj"] and m["adapted_modules"] == 6


@pytest.mark.parametrize(
    "case",
    ["missing-model", "model-without-config", "empty-data", "malformed-data", "targets-match-nothing",
     "output-dir-unwritable", "unknown-flag", "bad-flag-value", "steps-zero", "classify-without-labels",
     "missing-data", "config-not-an-object", "targets-only-commas", "lr-nan", "lr-inf", "head-lr-negative",
     "weight-decay-negative", "warmup-ratio-above-1", "threads-zero", "log-every-negative", "epochs-negative",
     "diverging-lr", "adalora-r-above-r-max", "t-final-too-large", "adalora-t-final-too-large",
     "model-without-tokenizer", "adapter-is-a-file", "metrics-is-a-folder", "dropout-1", "r-min-above-r",
     "test-size-negative", "steps-and-epochs-before-data", "device-unknown", "device-absent",
     "precision-unknown", "adalora-one-step", "max-length-above-positions", "encoder-decoder-model",
     "architectures-not-a-list", "encoder-on-texts-only", "output-dir-empty", "adalora-r-equals-r-max",
     "epochs-overflow", "steps-huge", "seed-negative", "seed-too-large", "rank-above-every-layer",
     "lora-rank-above-every-layer"],
)
def test_bad_input_exit_2_one_line(tiny, tmp_path, capsys, monkeypatch, case):
    model, data = str(tiny["bert"]), str(tiny["data"])
    out = tmp_path / "out" / "run"
    extra = []
    if case == "missing-model":
        model = str(tmp_path / "no-such-model")
        expect = "does not exist"
    elif case == "model-without-config":
        (tmp_path / "m").mkdir()
        model = str(tmp_path / "m")
        expect = "no config.json"
    elif case == "empty-data":
        (tmp_path / "e.jsonl").write_text("")
        data = str(tmp_path / "e.jsonl")
        expect = "contains no examples"
    elif case == "malformed-data":
        (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n{"text": "c", "label": 1\n')
        data = str(tmp_path / "bad.jsonl")
        expect = "bad.jsonl:3: invalid JSON"
    elif case == "missing-data":
        data = str(tmp_path / "nothing.csv")
        expect = "--data"
    elif case == "targets-match-nothing":
        extra = ["--target-modules", "no_such_proj"]
        expect = "--target-modules"
    elif case == "output-dir-unwritable":
        (tmp_path / "a-file").write_text("x")
        extra = ["--output-dir", str(tmp_path / "a-file" / "sub")]  # a directory under a regular file
        expect = "--output-dir: cannot write"
    elif case == "output-dir-empty":  # "" would mean the working folder: an unset shell variable
        extra = ["--output-dir", ""]
        (tmp_path / "cwd").mkdir()
        monkeypatch.chdir(tmp_path / "cwd")
        expect = "--output-dir: empty"
    elif case == "unknown-flag":
        extra = ["--no-such-flag"]
        expect = "unrecognized arguments"
    elif case == "bad-flag-value":
        extra = ["--r", "4", "--r-max", "2"]
        expect = "--r-max must be >= --r (4), got 2"
    elif case == "steps-zero":
        extra = ["--steps", "0"]
        expect = "--steps must be >= 1"
    elif case == "config-not-an-object":
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "config.json").write_text("[1, 2]")
        model = str(tmp_path / "m")
        expect = "must hold a JSON object"
    elif case == "targets-only-commas":
        extra = ["--target-modules", ","]
        expect = "--target-modules: expected at least one module name"
    elif case in ("lr-nan", "lr-inf"):
        extra = ["--lr", case[3:]]
        expect = "--lr must be a finite number > 0"
    elif case == "head-lr-negative":
        extra = ["--head-lr", "-1"]
        expect = "--head-lr must be a finite number > 0"
    elif case == "weight-decay-negative":
        extra = ["--weight-decay", "-1"]
        expect = "--weight-decay must be"
    elif case == "warmup-ratio-above-1":
        extra = ["--warmup-ratio", "5"]
        expect = "--warmup-ratio must be in [0, 1]"
    elif case == "threads-zero":
        extra = ["--threads", "0"]
        expect = "--threads must be >= 1"
    elif case == "log-every-negative":
        extra = ["--log-every", "-1"]
        expect = "--log-every must be >= 1"
    elif case == "epochs-negative":
        extra = ["--epochs", "-1"]
        expect = "--epochs must be"
    elif case == "diverging-lr":
        extra = ["--lr", "1e30"]
        expect = "try a smaller --lr"
    elif case == "classify-without-labels":
        data = str(tiny["lm"])
        extra = ["--task", "classify"]
        expect = "needs labels"
    elif case == "adalora-r-above-r-max":
        extra = ["--method", "adalora", "--r", "8", "--r-max", "4"]
        expect = "--r-max must be >= --r (8), got 4"
    elif case in ("t-final-too-large", "adalora-t-final-too-large"):
        extra = ["--t-final", "100"] + (["--method", "adalora"] if case.startswith("adalora") else [])
        expect = "--t-final (100): no steps left for rank allocation (--t-warmup + --t-final = 1 + 100 must be < the 4"
    elif case == "model-without-tokenizer":
        model = str(tmp_path / "m")
        os.mkdir(model)
        for f in ("config.json", "model.safetensors"):
            os.link(tiny["bert"] / f, os.path.join(model, f))
        expect = "has no tokenizer vocabulary, only 5 special tokens"
    elif case in ("adapter-is-a-file", "metrics-is-a-folder"):
        out.mkdir(parents=True)
        if case == "adapter-is-a-file":
            (out / "adapter").write_text("mine")
            expect = "adapter exists and is not a folder"
        else:
            (out / "metrics.json").mkdir()
            expect = "metrics.json is a folder"
    elif case == "dropout-1":
        extra = ["--dropout", "1"]
        expect = "--dropout must be in [0, 1), got 1.0"
    elif case == "r-min-above-r":
        extra = ["--r-min", "3"]
        expect = "--r-min must be <= --r (2), got 3"
    elif case == "steps-and-epochs-before-data":
        data = str(tmp_path / "not-there.jsonl")  # the flag conflict is found first
        extra = ["--epochs", "1"]
        expect = "give --steps or --epochs, not both"
    elif case == "test-size-negative":
        extra = ["--test-size", "-1"]
        expect = "--test-size must be >= 0, got -1"
    elif case == "device-unknown":
        extra = ["--device", "tpu"]
        expect = "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"
    elif case == "device-absent":  # a GPU index past those visible (none at all on a CPU machine)
        extra = ["--device", "cuda:99"]
        expect = "--device cuda:99: " + (
            "only" if torch.cuda.is_available() else "no CUDA device is visible here")
    elif case == "precision-unknown":
        extra = ["--precision", "fp8"]
        expect = "argument --precision: invalid choice: 'fp8'"
    elif case == "adalora-one-step":  # PEFT's AdaLoRA raised a KeyError from inside
        extra = ["--method", "adalora", "--steps", "1"]
        expect = "--method adalora needs at least 2 steps before its final phase: steps (1) - --t-final (0)"
    elif case == "max-length-above-positions":  # BERT's position table has 64 rows
        extra = ["--max-length", "65"]
        expect = "--max-length must be <= 64 (the model's max_position_embeddings), got 65"
    elif case in ("encoder-decoder-model", "architectures-not-a-list"):
        model = _model_with_config(tiny["bert"], tmp_path / "m", **(
            {"is_encoder_decoder": True, "model_type": "t5"} if case == "encoder-decoder-model" else {"architectures": 5}))
        expect = "is an encoder-decoder model ('t5')" if case == "encoder-decoder-model" else (
            '"architectures" must be a list of class names, got 5')
    elif case == "encoder-on-texts-only":  # would train BERT as a causal LM with a new, frozen head
        data = str(tiny["lm"])
        expect = "has no labels, so --task auto would fine-tune a causal LM, but --model"
    elif case == "adalora-r-equals-r-max":  # PEFT's budget masking raised from inside training
        extra = ["--method", "adalora", "--r", "4", "--r-max", "4"]
        expect = "--method adalora needs --r-max > --r (4): it prunes from --r-max down to --r"
    elif case == "epochs-overflow":  # ceil(inf): OverflowError with a traceback
        extra = ["--epochs", "1e308"]
        expect = "--epochs 1e+308 gives "
    elif case == "steps-huge":
        extra = ["--steps", str(2**31)]
        expect = f"--steps must be <= {2**31 - 1}, got {2**31}"
    elif case in ("seed-negative", "seed-too-large"):  # torch.manual_seed overflowed with a traceback
        value = -(2**63) - 1 if case == "seed-negative" else 2**64
        extra = ["--seed", str(value)]
        expect = f"--seed must be an int in [-2**63, 2**64), got {value}"
    elif case in ("rank-above-every-layer", "lora-rank-above-every-layer"):  # --r 10**11 ran out of memory
        extra = ["--r", "100"] + (["--method", "lora"] if case.startswith("lora") else [])
        expect = ("--r 100 exceeds min(in, out) = 32 of every adapted layer" if case.startswith("lora") else
                  "--r-max 200 (it defaults to 2 x --r) exceeds min(in, out) = 32 of every adapted layer")
    fast = [a for a in FAST if not (case == "threads-zero" and a in ("--threads", "1"))]
    if case in ("rank-above-every-layer", "lora-rank-above-every-layer"):
        fast = [a for a in fast if a not in ("--r", "2")]
    if case in ("steps-huge", "epochs-overflow"):
        fast = [a for a in fast if a not in ("--steps", "4")]
    if case in ("epochs-negative", "adalora-one-step"):
        fast = [a for a in fast if a not in ("--steps", "4")]
    argv = ["train", "--model", model, "--data", data, "--output-dir", str(out), *fast, *extra]
    existed = {p: p.read_bytes() if p.is_file() else None for p in (tmp_path / "out").rglob("*")}
    code, lines = _run_bad(capsys, argv)
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("flexlora: error: "), lines
    assert expect in lines[0], lines
    assert "Traceback" not in lines[0]
    # nothing written: no output folder created (not even the parent), what was there unchanged
    assert {p: p.read_bytes() if p.is_file() else None for p in (tmp_path / "out").rglob("*")} == existed
    if not existed:
        assert not (tmp_path / "out").exists()
    if case == "output-dir-empty":
        assert not any((tmp_path / "cwd").iterdir())


def _model_with_config(src, dst, **changes):
    """A copy of model folder ``src`` (files hard-linked) whose config.json has ``changes``."""
    os.mkdir(dst)
    for f in src.iterdir():
        if f.name != "config.json":
            os.link(f, dst / f.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


def test_test_size_zero_trains_without_a_test_split(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny["bert"]), "--data", str(tiny["data"]), "--output-dir", str(out),
                 "--test-size", "0", *FAST]) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4


def test_failed_run_keeps_previous_outputs(tiny, tmp_path, capsys):
    out = tmp_path / "keep"
    main(["train", "--model", str(tiny["bert"]), "--data", str(tiny["data"]), "--output-dir", str(out), *FAST])
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, _ = _run_bad(capsys, ["train", "--model", str(tiny["bert"]), "--data", str(tiny["data"]),
                                "--output-dir", str(out), "--target-modules", "nothing", *FAST])
    assert code == 2
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before


def _files(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}


@pytest.mark.parametrize("error", ["OSError", "RuntimeError", "SafetensorError"])
def test_failed_save_keeps_previous_outputs_whole(tiny, tmp_path, capsys, monkeypatch, error):
    """Run 2 fails while saving (after its adapter is written): run 1's outputs stay, all of them
    and only them, and no staging folder is left behind. A full disk reaches us as an OSError, or
    as torch.save's RuntimeError and safetensors' SafetensorError: one line and exit 2 for each."""
    from safetensors import SafetensorError

    import flexlora

    out = tmp_path / "keep"
    main(["train", "--model", str(tiny["bert"]), "--data", str(tiny["data"]), "--output-dir", str(out), *FAST])
    before = _files(out)
    assert "adapter/adapter_model.safetensors" in before and "rank_heatmap.png" in before

    def disk_full(*a, **k):
        if error == "RuntimeError":
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1984 vs 1872")
        if error == "SafetensorError":
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(flexlora, "plot_rank_heatmap", disk_full)
    code, lines = _run_bad(capsys, ["train", "--model", str(tiny["bert"]), "--data", str(tiny["data"]),
                                    "--output-dir", str(out), "--seed", "1", *FAST])
    assert code == 2 and len(lines) == 1, lines
    assert "saving the outputs into" in lines[0]
    assert ("unexpected pos" if error == "RuntimeError" else "No space left on device") in lines[0]
    if error != "OSError":
        assert error in lines[0] and "MiB free there" in lines[0]
    assert "what was there before is unchanged" in lines[0]
    assert _files(out) == before
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["adapter", "classifier_head.safetensors", "metrics.json", "rank_heatmap.png", "rank_history.csv", "train_log.csv"])


def test_rerun_replaces_all_outputs_and_keeps_other_files(tiny, tmp_path, capsys):
    """A PEFT LoRA run into a FlexLoRA run's folder: the FlexLoRA-only files (rank history,
    heatmap) go, the adapter is PEFT's, a user's own file stays."""
    out = tmp_path / "run"
    main(["train", "--model", str(tiny["bert"]), "--data", str(tiny["data"]), "--output-dir", str(out), *FAST])
    (out / "notes.txt").write_text("mine")
    main(["train", "--model", str(tiny["bert"]), "--data", str(tiny["data"]), "--output-dir", str(out),
          "--method", "lora", *FAST])
    names = sorted(p.name for p in out.iterdir())
    assert names == ["adapter", "classifier_head.safetensors", "metrics.json", "notes.txt", "train_log.csv"], names
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "metrics.json").read_text())["method"] == "lora"
    assert (out / "adapter" / "adapter_config.json").exists()
    assert not (out / "adapter" / "flexlora_config.json").exists()


def test_allocation_flags_reach_the_config_and_the_run(tiny, tmp_path, capsys):
    """Every adapter / allocation flag lands in the saved FlexLoRAConfig, and the run follows it:
    with expand_only and a constant schedule of b0 = 2, every event adds exactly 2 to the total rank."""
    import csv
    from collections import defaultdict

    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny["bert"]), "--data", str(tiny["data"]), "--output-dir", str(out),
                 "--steps", "6", "--batch-size", "8", "--threads", "1", "--no-progress", "--r", "2", "--r-max", "6",
                 "--alpha", "5", "--dropout", "0.125", "--importance", "sensitivity", "--schedule", "constant",
                 "--allocation-mode", "expand_only", "--expand-init", "orthogonal", "--orth-reg", "0.3", "--b0", "2",
                 "--delta-t", "1", "--t-warmup", "1", "--t-final", "1", "--r-min", "2"]) == 0
    cfg = json.loads((out / "adapter" / "flexlora_config.json").read_text())["config"]
    want = dict(r_init=2, r_max=6, alpha=5.0, dropout=0.125, importance="sensitivity", schedule="constant",
                allocation_mode="expand_only", expand_init="orthogonal", orth_reg=0.3, b0=2, delta_t=1, t_warmup=1,
                t_final=1, r_min=2, total_steps=6)
    assert {k: cfg[k] for k in want} == want
    totals = defaultdict(int)
    with open(out / "rank_history.csv", newline="") as f:
        for row in csv.DictReader(f):
            totals[int(row["step"])] += int(row["rank"])
    steps = sorted(totals)
    assert totals[steps[0]] == 2 * 12 and len(steps) >= 3, totals  # 12 adapted modules at r = 2
    assert all(totals[b] - totals[a] == 2 for a, b in zip(steps, steps[1:])), totals


def test_leftover_of_an_interrupted_save_is_pointed_out_and_kept(tiny, tmp_path, capsys):
    """A run killed while renaming its outputs in leaves its stage, holding the previous
    outputs under .previous/: the next run says where they are and leaves that folder alone."""
    out = tmp_path / "run"
    left = out / ".flexlora-save-killed"
    (left / ".previous").mkdir(parents=True)
    (left / ".previous" / "metrics.json").write_text('{"run": "before"}')
    other = out / ".flexlora-save-empty"
    other.mkdir()
    assert main(["train", "--model", str(tiny["bert"]), "--data", str(tiny["data"]), "--output-dir", str(out),
                 *FAST]) == 0
    notes = [l for l in capsys.readouterr().err.splitlines() if l.startswith("flexlora: note:")]
    assert len(notes) == 2, notes
    assert str(left) in notes[1] and "interrupted save" in notes[1] and ".previous/" in notes[1]
    assert str(other) in notes[0] and ".previous/" not in notes[0]
    assert (left / ".previous" / "metrics.json").read_text() == '{"run": "before"}' and other.is_dir()
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4
    assert sorted(p.name for p in out.glob(".flexlora-save-*")) == [".flexlora-save-empty", ".flexlora-save-killed"]


def test_symlinked_adapter_folder_is_written_through(tiny, tmp_path, capsys):
    out, elsewhere = tmp_path / "run", tmp_path / "big-disk" / "adapter"
    elsewhere.mkdir(parents=True)
    (elsewhere / "old-notes.txt").write_text("a stale file")
    out.mkdir()
    (out / "adapter").symlink_to(elsewhere, target_is_directory=True)
    main(["train", "--model", str(tiny["bert"]), "--data", str(tiny["data"]), "--output-dir", str(out), *FAST])
    assert (out / "adapter").is_symlink() and (out / "adapter").resolve() == elsewhere.resolve()
    assert sorted(p.name for p in elsewhere.iterdir()) == [
        "adapter_model.safetensors", "allocator_state.pt", "flexlora_config.json"]  # replaced whole
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4


def test_a_failed_save_puts_a_symlinked_adapter_folder_back_too(tiny, tmp_path, capsys, monkeypatch):
    # the folder adapter/ links to was replaced first; when the other outputs then failed to go
    # in, it kept the new run's adapter beside the old run's metrics ("unchanged", said the error)
    import flexlora.train as train_mod

    out, elsewhere = tmp_path / "run", tmp_path / "big-disk" / "adapter"
    elsewhere.mkdir(parents=True)
    out.mkdir()
    (out / "adapter").symlink_to(elsewhere, target_is_directory=True)
    main(["train", "--model", str(tiny["bert"]), "--data", str(tiny["data"]), "--output-dir", str(out), *FAST])
    before, linked = _files(out), _files(elsewhere)  # rglob does not follow the link: two parts
    assert "adapter_model.safetensors" in linked and "metrics.json" in before

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train_mod, "move_into", full)
    code, lines = _run_bad(capsys, ["train", "--model", str(tiny["bert"]), "--data", str(tiny["data"]),
                                    "--output-dir", str(out), "--seed", "1", *FAST])
    assert code == 2 and "what was there before is unchanged" in lines[0], lines
    assert _files(elsewhere) == linked and _files(out) == before
    assert (out / "adapter").is_symlink()
    assert sorted(p.name for p in elsewhere.parent.iterdir()) == ["adapter"]  # no staging folder left


def test_help_states_every_default_once(capsys):
    """`flexlora train --help` lists every flag with its default: a value default is printed,
    a None default is described in words, none twice, and --data names every accepted format."""
    from flexlora.cli import build_parser

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: False)" not in text
    for action in train._actions:
        if not action.option_strings or action.nargs == 0:
            continue
        help_text = train.formatter_class("x")._get_help_string(action) % dict(vars(action), prog="flexlora")
        assert help_text.count("default") == 1, (action.option_strings, help_text)
        if action.default is not None:
            assert str(action.default) in help_text, (action.option_strings, help_text)
    for fmt in (".jsonl", ".json", ".csv", ".tsv"):
        assert fmt in text, fmt
    assert "(default: 32)" in text and "(default: cubic)" in text and "(default: zero_impact)" in text


def test_python_dash_m_help_subprocess():
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "flexlora", "train", "--help"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--target-modules" in proc.stdout and "--method" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "flexlora", "train", "--bogus"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unrecognized arguments: --bogus" in proc.stderr


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip().startswith("flexlora 0.")


def test_flags_the_method_does_not_read_warn(tiny, tmp_path, capsys):
    # were accepted silently (and metrics.json recorded r_max for a LoRA run)
    pytest.importorskip("peft")
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny["bert"]), "--data", str(tiny["data"]), "--output-dir", str(out), *FAST,
                 "--method", "lora", "--b0=3", "--importance", "nuclear", "--r-max", "8"]) == 0
    err = capsys.readouterr().err
    assert "flexlora: warning: --r-max, --b0, --importance have no effect with --method lora" in err
    assert json.loads((out / "metrics.json").read_text())["r_max"] is None


def test_head_lr_on_a_causal_lm_warns(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny["llama"]), "--data", str(tiny["lm"]), "--output-dir", str(out), *FAST,
                 "--head-lr", "1e-3"]) == 0
    assert "flexlora: warning: --head-lr has no effect on a causal LM" in capsys.readouterr().err


def test_library_warnings_are_one_line_and_name_flags(tiny, tmp_path, capsys):
    # --r 1 with the default --r-min 1: no module can ever be pruned. The warning came as a raw
    # "train.py:259: UserWarning: ... r_min=1 ..." with the library's source line echoed
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["train", "--model", str(tiny["bert"]), "--data", str(tiny["data"]), "--output-dir", str(out),
                     *[a for a in FAST if a not in ("--r", "2")], "--r", "1"]) == 0
    err = [l for l in capsys.readouterr().err.splitlines() if "warning" in l.lower()]
    assert err and all(l.startswith("flexlora: warning: ") for l in err), err
    assert any("--r-min" in l for l in err) and not any("UserWarning" in l or "r_min" in l for l in err), err
