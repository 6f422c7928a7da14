"""Datasets for ``flexlora train``: JSONL / CSV files and the built-in movie sentences.

A dataset is a list of texts, with one label per text or none (text only: causal-LM training).
Every reading error is an :class:`InputError` naming the file and the line.

Built-in data (fetched from PyPI on first use, then cached under :func:`cache_dir`):

- ``movie-sentences``: the 10 605 Pang & Lee movie-review sentences with mean human ratings in
  [-4, 4] that ship in the ``vaderSentiment==3.3.2`` source distribution; ratings of exactly 0
  are dropped (10 568 left) and ``label = rating > 0`` (1 = positive).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from ._atomic import replace_file


class InputError(Exception):
    """Bad user input (model, data, flags, output directory): the CLI prints it on one line and
    exits with code 2."""


@dataclass
class TextDataset:
    """texts[i] with labels[i] (an int in [0, len(label_names))) or no labels at all."""

    texts: List[str]
    labels: Optional[List[int]] = None
    label_names: Optional[List[str]] = None
    source: str = ""

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_labels(self) -> int:
        return 0 if self.label_names is None else len(self.label_names)

    def subset(self, idx: Sequence[int]) -> "TextDataset":
        return TextDataset(
            [self.texts[i] for i in idx],
            None if self.labels is None else [self.labels[i] for i in idx],
            self.label_names,
            self.source,
        )


BUILTIN_DATA = ("movie-sentences",)


def cache_dir() -> Path:
    """Where built-in models and data are cached: ``$FLEXLORA_CACHE`` or ``~/.cache/flexlora``."""
    env = os.environ.get("FLEXLORA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "flexlora"


# --------------------------------------------------------------------------------------------
# reading files


def load_dataset(spec: str, cache: Optional[Path] = None) -> TextDataset:
    """A built-in name (``movie-sentences``) or the path of a ``.jsonl`` / ``.json`` / ``.csv``
    file. JSONL: one object per line with ``"text"`` and optionally ``"label"``. CSV: a header
    row with a ``text`` column and optionally a ``label`` column. Either every example has a
    label or none has; labels may be ints or strings (sorted, then numbered from 0)."""
    if spec in BUILTIN_DATA:
        return movie_sentences(cache)
    path = Path(spec).expanduser()  # "--data=~/x.jsonl" reaches us unexpanded by the shell
    if not path.exists():
        raise InputError(
            f"--data: {spec!r} does not exist (expected a .jsonl/.csv file or one of {list(BUILTIN_DATA)})"
        )
    if path.is_dir():
        raise InputError(f"--data: {spec!r} is a directory, expected a .jsonl or .csv file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = _read_jsonl(path)
    elif suffix in (".csv", ".tsv"):
        rows = _read_csv(path, delimiter="\t" if suffix == ".tsv" else ",")
    else:
        raise InputError(f"--data: {spec!r} has suffix {suffix!r}, expected .jsonl, .json, .csv or .tsv")
    if not rows:
        raise InputError(f"--data: {path} contains no examples")
    return _build(rows, str(path))


def _read_jsonl(path: Path) -> List[Tuple[int, str, object]]:
    """JSON Lines; a ``.json`` file that holds one JSON array of objects is read as that array
    (each example's line is where its object starts)."""
    rows = []
    with _open_text(path) as f:  # the file read once, into memory
        if path.suffix.lower() == ".json":
            text = f.read()
            if text.lstrip(_JSON_WS).startswith("["):
                return _read_json_array(path, text)
            f.seek(0)
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object with a \"text\" field, got {type(obj).__name__}")
            rows.append((lineno, _text_field(obj.get("text"), path, lineno), obj.get("label", _MISSING)))
    return rows


_JSON_WS = " \t\n\r"  # JSON's whitespace (str.isspace would also take \f, NBSP, ...)


def _read_json_array(path: Path, text: str) -> List[Tuple[int, str, object]]:
    """The examples of ``text``, a JSON array of objects (its first non-space character is "[")."""
    decoder = json.JSONDecoder()
    rows: List[Tuple[int, str, object]] = []
    counted = [0, 1]  # (position, its line): positions only move forward, O(file size) in all

    def line(pos: int) -> int:
        counted[1] += text.count("\n", counted[0], pos)
        counted[0] = pos
        return counted[1]

    ws = _JSON_WS
    i = len(text) - len(text.lstrip(ws)) + 1  # past the "["
    expect_item = True  # right after "[" or ","
    while True:
        while i < len(text) and text[i] in ws:
            i += 1
        if i >= len(text):
            raise InputError(f"{path}:{line(i)}: invalid JSON (the array is not closed with ']')")
        if text[i] == "]" and (not rows or not expect_item):
            break
        if not expect_item:
            if text[i] != ",":
                raise InputError(f"{path}:{line(i)}: invalid JSON (expected ',' or ']' between the array's objects)")
            i += 1
            expect_item = True
            continue
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        at = line(i)
        if not isinstance(obj, dict):
            raise InputError(f"{path}:{at}: expected a JSON object with a \"text\" field, got {type(obj).__name__}")
        rows.append((at, _text_field(obj.get("text"), path, at), obj.get("label", _MISSING)))
        i, expect_item = end, False
    rest = text[i + 1:]
    if rest.strip(ws):
        raise InputError(f"{path}:{line(i + 1 + len(rest) - len(rest.lstrip(ws)))}: invalid JSON "
                         "(text after the array's closing ']')")
    return rows


@contextlib.contextmanager
def _csv_fields_unlimited():
    """No cap on a CSV field's length while reading (the csv module's default, 131 072
    characters, refused a valid file with one long text as malformed; JSONL had no cap); the
    process-wide limit is put back after."""
    old = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # the largest a C long takes on every platform
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _read_csv(path: Path, delimiter: str) -> List[Tuple[int, str, object]]:
    """CSV: RFC 4180 quoting, strictly (an unterminated quote is an error naming the line it opens
    on, not a field that silently swallows the rest of the file). TSV: no quoting, one record per
    line, quotes are text (as GLUE's and most NLP TSVs are written and read)."""
    rows = []
    start = 1  # the line the record being read starts on
    with _open_text(path, newline="") as f, _csv_fields_unlimited():
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting, strict=True)
        try:
            header = next(reader, None)
            if header is None:
                return []
            header = [h.strip().lower() for h in header]
            if "text" not in header:
                raise InputError(f"{path}:1: the header row must name a 'text' column (and optionally 'label'), got {header}")
            ti = header.index("text")
            li = header.index("label") if "label" in header else None
            start = reader.line_num + 1
            for rec in reader:
                lineno, start = start, reader.line_num + 1
                if not rec or all(not c.strip() for c in rec):
                    continue
                if len(rec) != len(header):
                    raise InputError(f"{path}:{lineno}: expected {len(header)} fields like the header, got {len(rec)}")
                label = _MISSING if li is None else rec[li].strip()
                rows.append((lineno, _text_field(rec[ti], path, lineno), label))
        except csv.Error as e:
            if "unexpected end of data" in str(e):
                raise InputError(f"{path}:{start}: a quoted field opens here and is never closed") from None
            raise InputError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    return rows


class _Missing:
    pass


_MISSING = _Missing()


def _open_text(path: Path, newline=None):
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"--data: cannot read {path}: {e.strerror}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        lineno = data[: e.start].count(b"\n") + 1
        raise InputError(f"{path}:{lineno}: not valid UTF-8 (byte {data[e.start]:#04x})") from None
    return io.StringIO(text, newline=newline)


def _text_field(value, path: Path, lineno: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{path}:{lineno}: \"text\" must be a non-empty string, got {value!r}")
    return value


def _build(rows, source: str) -> TextDataset:
    has = [not isinstance(r[2], _Missing) and r[2] != "" for r in rows]
    if any(has) and not all(has):
        bad = next(i for i, h in enumerate(has) if h != has[0])
        what = "has no label but the first example has one" if has[0] else "has a label but the first example has none"
        raise InputError(f"{source}:{rows[bad][0]}: this example {what}; label every example or none")
    texts = [r[1] for r in rows]
    if not has[0]:
        return TextDataset(texts, None, None, source)
    raw = []
    for lineno, _, label in rows:
        if isinstance(label, float) and label.is_integer():
            label = int(label)  # 1.0: what pandas' to_json writes for an int column that once held a NaN
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            raise InputError(f"{source}:{lineno}: \"label\" must be an int (1.0 counts as 1) or a string, got {label!r}")
        raw.append(label)
    kinds = [isinstance(v, int) for v in raw]
    if any(kinds) and not all(kinds):  # JSON 1 beside "1": one class or two? refuse to guess
        bad = next(i for i, k in enumerate(kinds) if k != kinds[0])
        first = "a JSON int" if kinds[0] else "a string"
        raise InputError(f"{source}:{rows[bad][0]}: this label is {'a string' if kinds[0] else 'a JSON int'} "
                         f"({raw[bad]!r}) but the first is {first}; labels must be all of one kind")
    # CSV labels are strings: treat "0", "1", ... as ints so they keep their numeric order.
    if all(isinstance(v, int) or (isinstance(v, str) and _is_int(v)) for v in raw):
        raw = [int(v) for v in raw]
        names = sorted(set(raw))
    elif all(isinstance(v, str) for v in raw):
        names = sorted(set(raw))
    else:
        first_int = isinstance(raw[0], int) or _is_int(raw[0])
        bad = next(i for i, v in enumerate(raw) if (isinstance(v, int) or _is_int(v)) != first_int)
        kind = "a string" if first_int else "an int"
        first = "an int" if first_int else "a string"
        raise InputError(f"{source}:{rows[bad][0]}: this label is {kind} ({raw[bad]!r}) but the first is {first}; "
                         "labels must be all ints or all strings")
    if len(names) < 2:
        raise InputError(f"{source}: every example has the label {names[0]!r}; a classifier needs at least 2 labels")
    ids = {v: i for i, v in enumerate(names)}
    return TextDataset(texts, [ids[v] for v in raw], [str(v) for v in names], source)


def _is_int(s) -> bool:
    """An int written the one canonical way (ASCII digits, no leading zero or "+", "-" only on a
    non-zero): int() also takes "1_0" (= 10), "01" and "+1", which would merge distinct string
    labels into one class."""
    return isinstance(s, str) and re.fullmatch(r"0|-?[1-9][0-9]*", s.strip()) is not None


def split(ds: TextDataset, test_size: int, seed: int) -> Tuple[TextDataset, TextDataset]:
    """A fixed seeded split: (train, test) with ``test_size`` test examples, each in shuffled
    order (files are often sorted by label, so the first n of the train split must be a random
    sample, not a block)."""
    if not 0 < test_size < len(ds):
        raise InputError(f"--test-size must be in [1, {len(ds) - 1}] for {len(ds)} examples, got {test_size}")
    order = list(range(len(ds)))
    random.Random(seed).shuffle(order)
    return ds.subset(order[test_size:]), ds.subset(order[:test_size])


# --------------------------------------------------------------------------------------------
# fetching from PyPI


def pip(args: Sequence[str], what: str) -> None:
    """Run ``python -m pip <args>``; a failure is an :class:`InputError` naming ``what``."""
    cmd = [sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise InputError(f"could not fetch {what} from PyPI ({' '.join(args[:1])} failed: {last})")


VADER_SDIST = "vaderSentiment==3.3.2"
_VADER_INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_VADER_MOVIES = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"


def movie_sentences(cache: Optional[Path] = None) -> TextDataset:
    """The built-in ``movie-sentences`` data (see the module docstring); fetched once, then read
    from ``<cache>/data/movie_sentences.jsonl``."""
    cache = Path(cache) if cache is not None else cache_dir()
    out = cache / "data" / "movie_sentences.jsonl"
    rows = _read_cached_movies(out)
    if rows is None:
        with tempfile.TemporaryDirectory(prefix="flexlora-dl-") as tmp:
            pip(["download", "--no-deps", "--no-binary", ":all:", "-d", tmp, VADER_SDIST], VADER_SDIST)
            sdists = sorted(Path(tmp).glob("*.tar.gz"))
            if not sdists:
                raise InputError(f"could not fetch {VADER_SDIST}: pip left no .tar.gz source archive")
            parsed = parse_movie_sentences(read_movie_file(sdists[0]))
        if len(parsed) != MOVIE_SENTENCES:
            raise InputError(f"{VADER_SDIST}: parsed {len(parsed)} movie sentences, expected {MOVIE_SENTENCES}")
        write_atomic(out, "".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in parsed))
        rows = _read_jsonl(out)
    return _build(rows, "movie-sentences")


MOVIE_SENTENCES = 10568  # labelled sentences in vaderSentiment 3.3.2's file (rating 0 dropped)


def _read_cached_movies(path: Path):
    """The cached rows, or None when there is no cache or it is damaged (empty, truncated,
    unreadable): then the data is fetched again instead of failing for good."""
    if not path.exists():
        return None
    try:
        rows = _read_jsonl(path)
    except (InputError, OSError):
        rows = []
    if len(rows) == MOVIE_SENTENCES:
        return rows
    print(f"flexlora: the cached {path} is damaged ({len(rows)} usable rows); fetching it again", file=sys.stderr)
    return None


def read_movie_file(sdist: Path) -> str:
    """The movie ground-truth file's text from inside the vaderSentiment sdist (a tar.gz holding
    another tar.gz)."""
    try:
        with tarfile.open(sdist) as outer:
            inner_bytes = outer.extractfile(_VADER_INNER).read()
        with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
            return inner.extractfile(_VADER_MOVIES).read().decode("utf-8")
    except (KeyError, tarfile.TarError, AttributeError, UnicodeDecodeError) as e:
        raise InputError(f"{sdist.name}: does not hold {_VADER_INNER} -> {_VADER_MOVIES} ({e})") from None


def parse_movie_sentences(text: str) -> List[Tuple[str, int]]:
    """Lines ``id \\t rating \\t sentence`` -> [(sentence, rating > 0)], rating 0 dropped."""
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        try:
            rating = float(parts[1])
        except ValueError:
            raise InputError(f"{_VADER_MOVIES}:{lineno}: rating {parts[1]!r} is not a number") from None
        if rating == 0:
            continue
        rows.append((parts[2].strip(), int(rating > 0)))
    return rows


def write_atomic(path: Path, data) -> None:
    """Write ``data`` (str or bytes) beside ``path``, then rename onto it: a crash never leaves
    half a file. Creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, data)
