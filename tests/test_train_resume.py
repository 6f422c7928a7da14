"""`flexlora train --save-every N` / `--resume`: a run cut off after a checkpoint continues to the
same adapter, ranks, log and metrics as the run that was never cut off; a resume with other flags
or data, a resume without a checkpoint and a fresh run over an unfinished one are refused with
exit code 2 and a one-line message."""

import csv
import json

import pytest
from safetensors.torch import load_file

from _tiny_hf import sentiment_rows, tiny_run_inputs, write_jsonl
from flexlora.cli import main

STEPS = 10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_cli")
    rows = sentiment_rows(96)
    return {
        **tiny_run_inputs(root, rows),
        "lm2": write_jsonl(root / "lm2.jsonl", [{"text": r["text"] + " indeed"} for r in rows]),
        # more rows: the derived --test-size differs too, but the data are what changed
        "lm_more": write_jsonl(root / "lm_more.jsonl", [{"text": r["text"]} for r in rows + rows[:8]]),
    }


def argv(tiny, out, *extra, model="llama", data="lm"):
    # dropout draws from torch's RNG every step; events every 2 steps move ranks across the cut
    return ["train", "--model", str(tiny[model]), "--data", str(tiny[data]), "--output-dir", str(out),
            "--steps", str(STEPS), "--batch-size", "8", "--threads", "1", "--no-progress", "--r", "2",
            "--dropout", "0.1", "--delta-t", "2", "--t-warmup", "1", "--t-final", "2", "--b0", "2", *extra]


def outputs(out):
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    with open(out / "train_log.csv") as f:
        log = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in csv.DictReader(f)]
    metrics = json.loads((out / "metrics.json").read_text())
    return adapter, log, metrics, (out / "rank_history.csv").read_text()


class Cut(Exception):
    pass


def cut_at(monkeypatch, step):
    """Make the run fail inside allocator.step(step): after its checkpoints of earlier steps."""
    import flexlora

    real = flexlora.RankAllocator.step

    def step_or_cut(self, s, *a, **k):
        if s == step:
            raise KeyboardInterrupt
        return real(self, s, *a, **k)

    monkeypatch.setattr(flexlora.RankAllocator, "step", step_or_cut)


@pytest.mark.parametrize("model, data", [("llama", "lm"), ("bert", "data")], ids=["causal-lm", "classify"])
def test_a_run_cut_off_and_resumed_ends_as_the_run_never_cut(tiny, tmp_path, capsys, monkeypatch, model, data):
    assert main(argv(tiny, tmp_path / "straight", model=model, data=data)) == 0
    want = outputs(tmp_path / "straight")

    out = tmp_path / "cut"
    with monkeypatch.context() as m:
        cut_at(m, 7)
        with pytest.raises(SystemExit) as e:
            main(argv(tiny, out, "--save-every", "3", model=model, data=data))
    assert e.value.code == 130
    err = capsys.readouterr().err
    assert "the checkpoint of step 6 is in" in err and "--resume" in err
    assert (out / "checkpoint").is_dir() and not (out / "adapter").exists()

    assert main(argv(tiny, out, "--resume", model=model, data=data)) == 0
    adapter, log, metrics, history = outputs(out)
    assert not (out / "checkpoint").exists(), "a finished run keeps no checkpoint"
    assert metrics["resumed_from_step"] == 6
    # fp32 tolerance, not bits: MKL's GEMMs may round differently for buffers at other addresses
    # (a classifier head's weight differed by one ulp after the first resumed step)
    assert [(r["step"], r["lr"], r["total_rank"]) for r in log] == [(r["step"], r["lr"], r["total_rank"]) for r in want[1]]
    assert [float(r["loss"]) for r in log] == pytest.approx([float(r["loss"]) for r in want[1]], rel=1e-5, abs=2e-6)
    assert history == want[3], "the rank history differs"
    assert adapter.keys() == want[0].keys()
    for key, t in want[0].items():
        err = ((adapter[key].double() - t.double()).abs().max() / t.double().abs().max().clamp_min(1e-12)).item()
        assert err <= 1e-5, f"{key}: relative difference {err:.3g}"
    for key in ("loss_first", "loss_last", "total_rank_final", "test_loss_after", "test_accuracy_after",
                "test_accuracy_head_only", "test_loss_before"):
        assert metrics.get(key) == pytest.approx(want[2].get(key), abs=1e-4), key


def run_bad(capsys, args):
    with pytest.raises(SystemExit) as e:
        main(args)
    lines = [l for l in capsys.readouterr().err.splitlines() if l.strip() and not l.startswith("Loading weights")]
    return e.value.code, lines


@pytest.fixture
def unfinished(tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        cut_at(m, 5)
        with pytest.raises(SystemExit):
            main(argv(tiny, out, "--save-every", "2"))
    capsys.readouterr()
    return out


@pytest.mark.parametrize("change, message", [
    (["--lr", "0.02"], r"--lr 0\.005.*this run has --lr 0\.02"),
    (["--r", "3"], r"--r 2.*this run has --r 3"),
    (["--seed", "1"], r"--seed 0.*this run has --seed 1"),
    (["--data", "lm2"], r"training data differ"),
], ids=["lr", "r", "seed", "data"])
def test_a_resume_with_other_flags_or_data_is_refused(tiny, unfinished, capsys, change, message):
    import re

    args = argv(tiny, unfinished, "--resume")
    if change[0] == "--data":
        args[args.index("--data") + 1] = str(tiny["lm2"])
    else:
        args += change
    before = sorted(p.name for p in (unfinished / "checkpoint").iterdir())
    code, lines = run_bad(capsys, args)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("flexlora: error: --resume:")
    assert re.search(message, lines[0]), lines[0]
    assert sorted(p.name for p in (unfinished / "checkpoint").iterdir()) == before


def test_a_fresh_run_over_an_unfinished_one_is_refused(tiny, unfinished, capsys):
    code, lines = run_bad(capsys, argv(tiny, unfinished))
    assert code == 2 and len(lines) == 1
    assert "holds the checkpoint of an unfinished run (step 4 of 10)" in lines[0] and "--resume" in lines[0]
    assert (unfinished / "checkpoint").is_dir()


def test_resume_keeps_saving_every_n_steps_unless_told_otherwise(tiny, unfinished, capsys, monkeypatch):
    saved = []
    import flexlora

    real = flexlora.save_checkpoint
    monkeypatch.setattr(flexlora, "save_checkpoint", lambda *a, **k: saved.append(k["step"]) or real(*a, **k))
    assert main(argv(tiny, unfinished, "--resume")) == 0
    assert saved == [6, 8]  # the saved run's --save-every 2; never the last step


def test_resume_without_a_checkpoint_and_other_methods_are_refused(tiny, tmp_path, capsys):
    code, lines = run_bad(capsys, argv(tiny, tmp_path / "empty", "--resume"))
    assert code == 2 and len(lines) == 1 and "--resume: no checkpoint in" in lines[0] and "--save-every" in lines[0]
    for flag in (["--save-every", "2"], ["--resume"]):
        code, lines = run_bad(capsys, argv(tiny, tmp_path / "lora", "--method", "lora", *flag))
        assert code == 2 and f"flexlora: error: {flag[0]} is for --method flexlora" in lines[-1], lines
    code, lines = run_bad(capsys, argv(tiny, tmp_path / "neg", "--save-every", "-1"))
    assert code == 2 and "--save-every must be >= 0, got -1" in lines[0]
    (tmp_path / "file").mkdir()
    (tmp_path / "file" / "checkpoint").write_text("x")
    code, lines = run_bad(capsys, argv(tiny, tmp_path / "file", "--save-every", "2"))
    assert code == 2 and "is not a folder" in lines[0]


@pytest.mark.parametrize("error", [
    OSError(28, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file"),
    "safetensors",
], ids=["OSError", "torch.save", "safetensors"])
def test_a_failed_checkpoint_write_warns_and_training_goes_on(tiny, tmp_path, capsys, monkeypatch, error):
    # a real full disk reaches us as torch.save's RuntimeError or safetensors' SafetensorError
    import flexlora

    if error == "safetensors":
        from safetensors import SafetensorError

        error = SafetensorError("Error while serializing: IoError(Os { code: 27, message: \"File too large\" })")

    def full_disk(*a, **k):
        raise error

    monkeypatch.setattr(flexlora, "save_checkpoint", full_disk)
    assert main(argv(tiny, tmp_path / "out", "--save-every", "4")) == 0
    err = capsys.readouterr().err
    assert err.count("flexlora: warning: --save-every: the checkpoint of step") == 2, err
    assert str(error)[:20] in err and (tmp_path / "out" / "adapter").is_dir()


def test_the_flags_are_compared_before_the_model_loads(tiny, unfinished, capsys, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the flags were compared")

    monkeypatch.setattr("flexlora.train.load_model", no_model)
    code, lines = run_bad(capsys, argv(tiny, unfinished, "--resume", "--lr", "0.02"))
    assert code == 2 and "--lr 0.005" in lines[0]


def test_other_data_are_named_as_such_even_when_a_derived_default_changes_with_them(tiny, unfinished, capsys):
    args = argv(tiny, unfinished, "--resume")
    args[args.index("--data") + 1] = str(tiny["lm_more"])
    code, lines = run_bad(capsys, args)
    assert code == 2 and "training data differ" in lines[0], lines


def test_an_epochs_run_names_its_step_count_and_resumes(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    args = [a for a in argv(tiny, out, "--save-every", "3") if a not in ("--steps", str(STEPS))] + ["--epochs", "1"]
    with monkeypatch.context() as m:
        cut_at(m, 7)
        with pytest.raises(SystemExit):
            main(args)
    capsys.readouterr()
    code, lines = run_bad(capsys, args)
    assert code == 2 and "(step 6 of 11)" in lines[0], lines  # 87 training texts / batch 8
    assert main(args + ["--resume"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 11 and metrics["resumed_from_step"] == 6
    # wall time of every process: never less than the training time summed over them
    assert metrics["total_seconds"] >= metrics["train_seconds"]


def test_a_changed_save_every_holds_for_the_next_resume_too(tiny, unfinished, capsys, monkeypatch):
    import flexlora

    with monkeypatch.context() as m:  # resumed from step 4 with --save-every 3: saves 6, cut at 7
        cut_at(m, 7)
        with pytest.raises(SystemExit):
            main(argv(tiny, unfinished, "--resume", "--save-every", "3"))
    capsys.readouterr()
    saved = []
    real = flexlora.save_checkpoint
    monkeypatch.setattr(flexlora, "save_checkpoint", lambda *a, **k: saved.append(k["step"]) or real(*a, **k))
    assert main(argv(tiny, unfinished, "--resume")) == 0
    assert saved == [9], saved  # every 3 from step 6, not the first run's every 2


def test_a_folder_named_checkpoint_that_is_no_checkpoint_is_named_as_such(tiny, tmp_path, capsys):
    (tmp_path / "run" / "checkpoint").mkdir(parents=True)
    code, lines = run_bad(capsys, argv(tiny, tmp_path / "run"))
    assert code == 2 and "holds no checkpoint of flexlora train" in lines[0] and "--resume" not in lines[0]


def test_a_run_that_diverges_says_its_checkpoint_must_go(tiny, unfinished, capsys, monkeypatch):
    import flexlora

    real = flexlora.RankAllocator.step

    def diverge(self, s, *a, **k):
        if s == 5:
            raise FloatingPointError("importance scores are NaN")
        return real(self, s, *a, **k)

    monkeypatch.setattr(flexlora.RankAllocator, "step", diverge)
    code, lines = run_bad(capsys, argv(tiny, unfinished, "--resume"))
    assert code == 2 and "diverged at step 5" in lines[0] and f"delete {unfinished / 'checkpoint'} first" in lines[0]


def test_a_second_run_into_the_same_folder_at_once_is_refused(tiny, tmp_path, capsys):
    import fcntl
    import os

    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out / ".flexlora-run.lock", os.O_RDWR | os.O_CREAT)
    try:  # another process's run holds the lock (flock: per open file, so this process counts too)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"4242")
        code, lines = run_bad(capsys, argv(tiny, out, "--save-every", "3"))
    finally:
        os.close(fd)
    assert code == 2 and "another flexlora train (pid 4242) is writing into" in lines[0], lines
    assert main(argv(tiny, out, "--save-every", "3")) == 0  # released: the next run goes ahead
    assert not (out / ".flexlora-run.lock").exists(), "the lock file is removed at the end"
    # a run that fails before saving leaves no folder it made behind, lock file included
    code, _ = run_bad(capsys, argv(tiny, tmp_path / "new" / "deep", "--lr", "-1"))
    assert code == 2 and not (tmp_path / "new").exists()
    code, _ = run_bad(capsys, argv(tiny, tmp_path / "new2" / "deep", "--target-modules", "nothing_here"))
    assert code == 2 and not (tmp_path / "new2").exists()


def test_an_interrupt_after_the_loop_still_names_the_checkpoint(tiny, unfinished, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("flexlora.train.lm_loss", interrupted)  # the final evaluation (and the first)
    with pytest.raises(SystemExit) as e:
        main(argv(tiny, unfinished, "--resume"))
    assert e.value.code == 130
    assert "the checkpoint of step 4 is in" in capsys.readouterr().err


def test_sigterm_stops_the_run_like_ctrl_c_and_names_the_checkpoint(tiny, tmp_path, capsys, monkeypatch):
    import os
    import signal

    import flexlora

    real = flexlora.RankAllocator.step

    def preempted(self, s, *a, **k):
        if s == 7:
            os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's preemption
        return real(self, s, *a, **k)

    monkeypatch.setattr(flexlora.RankAllocator, "step", preempted)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        main(argv(tiny, tmp_path / "run", "--save-every", "3"))
    assert e.value.code == 143 and signal.getsignal(signal.SIGTERM) is before
    err = capsys.readouterr().err
    assert "flexlora: terminated (SIGTERM)" in err and "the checkpoint of step 6 is in" in err


def test_a_default_given_explicitly_or_the_same_step_count_resumes(tiny, unfinished, capsys):
    out = unfinished
    # --r-max 4 is what the saved run's default (2r) came to: the same run
    code, lines = run_bad(capsys, argv(tiny, out, "--resume", "--r-max", "6"))
    assert code == 2 and "(derived) --r-max 4, this run has --r-max 6" in lines[0], lines
    steps_as_epochs = [a for a in argv(tiny, out, "--resume", "--r-max", "4") if a not in ("--steps", str(STEPS))]
    code, lines = run_bad(capsys, steps_as_epochs + ["--epochs", "2"])  # 2 epochs of 11 steps = 22
    assert code == 2 and "a run of 10 steps, this run has 22 (--steps / --epochs)" in lines[0], lines
    assert main(argv(tiny, out, "--resume", "--r-max", "4")) == 0


def test_what_auto_came_to_and_another_spelling_of_the_model_folder_resume(tiny, unfinished, capsys):
    # --task causal-lm is what the saved run's --task auto came to, and ./x/../llama/ is its
    # --model folder: both were refused as other runs
    args = argv(tiny, unfinished, "--resume", "--task", "causal-lm")
    model = args.index("--model") + 1
    path = tiny["llama"]
    args[model] = f"{path.parent}/./{path.name}/"
    assert main(args) == 0


def test_resume_after_the_run_finished_says_so(tiny, tmp_path, capsys):
    assert main(argv(tiny, tmp_path / "run", "--save-every", "3")) == 0
    code, lines = run_bad(capsys, argv(tiny, tmp_path / "run", "--resume"))
    assert code == 2 and "has finished (its metrics.json is there" in lines[0], lines


@pytest.mark.parametrize("notes", [False, True], ids=["only-ours", "with-a-file-of-the-users"])
def test_a_finished_run_removes_a_symlinked_checkpoint_folder_too(tiny, unfinished, tmp_path, notes):
    # the checkpoint moved to another disk and linked back, then --resume: rmtree refuses a
    # symlink (silently, with ignore_errors), so the finished run kept its checkpoint and the
    # next run was refused as "unfinished" (or --resume retrained its last steps)
    import shutil

    elsewhere = tmp_path / "other-disk" / "ck"
    elsewhere.parent.mkdir()
    shutil.move(str(unfinished / "checkpoint"), str(elsewhere))
    (unfinished / "checkpoint").symlink_to(elsewhere, target_is_directory=True)
    if notes:
        (elsewhere / "notes.txt").write_text("mine")
    assert main(argv(tiny, unfinished, "--resume")) == 0
    if notes:  # the user's file keeps the folder and the link; ours are gone
        assert sorted(p.name for p in elsewhere.iterdir()) == ["notes.txt"]
        assert (unfinished / "checkpoint").is_symlink()
    else:
        assert not elsewhere.exists() and not (unfinished / "checkpoint").is_symlink()
        assert main(argv(tiny, unfinished)) == 0  # a new run over the finished one is not refused


def test_a_peft_run_over_a_flexlora_checkpoint_is_not_told_to_resume(tiny, unfinished, capsys):
    code, lines = run_bad(capsys, argv(tiny, unfinished, "--method", "lora"))
    assert code == 2 and "unfinished FlexLoRA run (step 4 of 10)" in lines[-1] and "--resume" not in lines[-1]


def test_a_lock_file_that_cannot_be_opened_is_a_one_line_error(tiny, tmp_path, capsys):
    (tmp_path / "run" / ".flexlora-run.lock").mkdir(parents=True)
    code, lines = run_bad(capsys, argv(tiny, tmp_path / "run"))
    assert code == 2 and len(lines) == 1 and "cannot open the lock file" in lines[0], lines


def test_a_lock_file_unlinked_by_the_run_ending_is_not_taken_for_a_lock(tmp_path, monkeypatch):
    # run B opened the lock file, run A then ended (unlinking it): B's flock on the orphaned
    # file must not count, or B and a run C that creates a new file both "hold" the lock
    import fcntl
    import os

    from flexlora.data import InputError
    from flexlora.train import _output_lock

    out = tmp_path / "run"
    real_flock = fcntl.flock
    state = {"done": False}

    def flock_after_unlink(fd, op):
        if not state["done"]:  # A ends between B's open and B's flock
            state["done"] = True
            os.unlink(out / ".flexlora-run.lock")
            c = os.open(out / ".flexlora-run.lock", os.O_RDWR | os.O_CREAT)  # run C starts and locks
            real_flock(c, fcntl.LOCK_EX | fcntl.LOCK_NB)
            state["c"] = c
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock_after_unlink)
    with pytest.raises(InputError, match="another flexlora train"):
        with _output_lock(out):
            pass
    os.close(state["c"])


def test_a_filesystem_without_locks_runs_with_a_warning(tiny, tmp_path, capsys, monkeypatch):
    # NFS without lockd (ENOLCK), Lustre mounted noflock (ENOSYS): every run was refused as if
    # another one held the folder
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert main(argv(tiny, tmp_path / "run")) == 0
    err = capsys.readouterr().err
    assert "flexlora: warning: --output-dir:" in err and "cannot be locked (No locks available)" in err
    assert not (tmp_path / "run" / ".flexlora-run.lock").exists()


def test_a_filesystem_without_locks_leaks_nothing_when_its_warning_is_an_error(tmp_path, monkeypatch):
    import errno
    import fcntl
    import os
    import warnings

    from flexlora.train import _output_lock

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    before = len(os.listdir("/proc/self/fd"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            with pytest.raises(UserWarning, match="cannot be locked"):
                with _output_lock(tmp_path / "run"):
                    pass
    assert len(os.listdir("/proc/self/fd")) == before, "file descriptors leaked"
    assert not (tmp_path / "run").exists()


def test_an_older_checkpoints_task_auto_is_compared_as_what_it_came_to(tmp_path):
    # before --task was recorded resolved, a checkpoint held "auto": it must still be compared
    # (as what auto comes to for this model and data), not taken as this run's own --task
    from flexlora.data import InputError
    from flexlora.train import _check_resume

    saved = {"data": "d", "steps": 10, "options": {"task": "auto", "model": "m"}}
    _check_resume(saved, {"data": "d", "steps": 10, "options": {"task": "classify", "model": "m"}}, tmp_path, "classify")
    with pytest.raises(InputError, match=r"\(derived\) --task classify, this run has --task causal-lm"):
        _check_resume(saved, {"data": "d", "steps": 10, "options": {"task": "causal-lm", "model": "m"}}, tmp_path,
                      "classify")


def test_a_built_in_model_name_is_never_the_same_folder(tmp_path, monkeypatch):
    from flexlora.train import _same_folder

    monkeypatch.chdir(tmp_path)
    (tmp_path / "minilm").mkdir()
    (tmp_path / "mine").mkdir()
    assert not _same_folder("minilm", "./minilm/")  # resolve_model takes the built-in first
    assert _same_folder("mine", "./mine/") and not _same_folder("mine", "./minilm")
