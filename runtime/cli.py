"""The `dialogpt-edge` command: one entry point, verbs as subcommands.

export imports its heavy dependencies (torch, transformers) only when called.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import secrets
import sys
import time
import traceback

from .chat import DEFAULT_HISTORY_TOKENS
from .cpus import usable_cpus
from .errors import UserError
from .manifest import SHIPPED_MODEL, shipped_model_dir
from .sampling import SamplingConfig, SamplingConfigError

MODEL_ENV = "DIALOGPT_EDGE_MODEL"


def _add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-m",
        "--model",
        default=None,
        help=f"model folder written by `dialogpt-edge export` (default: ${MODEL_ENV}, else the shipped {SHIPPED_MODEL})",
    )


def _int_at_least(low: int):
    """An argparse type: an integer >= low, or a usage error saying so."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _threads(text: str) -> int:
    """1 .. the usable CPUs: more threads than CPUs contend (3 on 2 cores decoded 2.65x slower, spinning
    against each other), and a typo like 99999 would stall start-up."""
    value = _int_at_least(1)(text)
    cpus = usable_cpus()
    if value > cpus:
        raise argparse.ArgumentTypeError(f"must be between 1 and {cpus} (the CPUs this process may use), got {value}")
    return value


def _list_of(item):
    """An argparse type: comma-separated values, each parsed by `item`."""

    def parse(text: str) -> list:
        values = [item(part.strip()) for part in text.split(",") if part.strip()]
        if not values:
            raise argparse.ArgumentTypeError("needs at least one value")
        return values

    return parse


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default unless it has none worth showing (None, False) or its help names it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        # identity, not ==: a default of 0 (greedy's temperature) equals False and is worth showing
        if "default" in text or any(action.default is unset for unset in (None, False, argparse.SUPPRESS)):
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error, with where to look (exit 2)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dialogpt-edge",
        description="Fast DialoGPT on CPUs: export to ONNX, then generate without PyTorch.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action=_Version, help="this package's version and the runtime libraries' (for bug reports)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser(
        "generate",
        help="continuation of one prompt: greedy unless a --temperature is given",
        formatter_class=_HelpFormatter,
    )
    _add_model_arg(gen)
    gen.add_argument("--prompt", required=True, help="prompt text; the eos token is appended, as DialoGPT expects")
    # greedy with no processors by default: the ids transformers' generate(do_sample=False) gives
    _add_sampling_args(gen, SamplingConfig.greedy(), max_new_help="stop after this many new tokens (or sooner, where the model's positions run out)")
    gen.add_argument("--threads", type=_threads, default=None, help="onnxruntime intra-op threads (default: one per physical core, within any cgroup CPU limit)")
    gen.add_argument("--json", action="store_true", help="print one JSON object with ids, text and timings")
    gen.set_defaults(handler=_cmd_generate)

    chat = sub.add_parser(
        "chat",
        help="talk to the model: interactive on a terminal, one reply line per input line when piped (/reset starts a new conversation)",
        formatter_class=_HelpFormatter,
    )
    _add_model_arg(chat)
    _add_sampling_args(chat, SamplingConfig(), max_new_help="longest reply, in tokens")
    chat.add_argument("--penalize-history", action="store_true",
                      help="apply the repetition penalty to the whole history, not only the bot's own words")
    chat.add_argument("--history-tokens", type=int, default=None,
                      help=f"history budget; whole old turns are dropped beyond it (default: {DEFAULT_HISTORY_TOKENS}, "
                      "or less if the model's positions minus --max-new-tokens are fewer)")
    chat.add_argument("--raw", action="store_true", help="show replies as generated (no punctuation tidying)")
    chat.add_argument("--threads", type=_threads, default=None, help="onnxruntime intra-op threads (default: one per physical core, within any cgroup CPU limit)")
    chat.set_defaults(handler=_cmd_chat)

    exp = sub.add_parser(
        "export",
        help="convert a DialoGPT checkpoint (hub id or local folder) to a model folder",
        formatter_class=_HelpFormatter,
    )
    exp.add_argument("source", metavar="SRC", help="hub id (microsoft/DialoGPT-small) or local checkpoint folder")
    exp.add_argument("--output", "-o", required=True, help="model folder to write")
    exp.add_argument("--force", action="store_true", help="replace an existing output folder")
    exp.add_argument("--quantize", default="int8", choices=("none", "int8", "int4"),
                     help="weights: int8 per-channel (the tied embedding / lm_head in int8 blocks), "
                          "int4 block-wise (MatMulNBits), or none (fp32)")
    exp.add_argument("--block-size", type=int, default=None, choices=(16, 32, 64, 128, 256),
                     help="block size of int4 weights and of the int8 embedding / lm_head: smaller blocks are more exact, larger ones faster "
                          "(default: the widest up to 128 that divides the model width, 128 for DialoGPT; 256 decodes int4 "
                          "about 10 %% faster, check the fidelity export records)")
    exp.add_argument("--accuracy-level", type=int, default=None, choices=(0, 1, 2, 3, 4),
                     help="block-quantized matmuls' compute: 4 = int8 activations (fastest on CPUs), 0 = as the input type (default: 4)")
    exp.add_argument("--kv-cache", choices=("fp16", "fp32", "int8"), default=None,
                     help="KV cache precision (default: int8 for int8/int4 weights, with per-channel scales measured on "
                          "training dialogs; fp32 for unquantized weights, which keeps their greedy ids exactly PyTorch's)")
    exp.add_argument("--no-verify", action="store_true", help="skip the quantized-vs-fp32 fidelity measurement")
    exp.add_argument("--fidelity-tokens", type=int, default=8192, help="held-out dialog tokens for the fidelity measurement (at least 256)")
    exp.set_defaults(handler=_cmd_export)

    bench = sub.add_parser(
        "bench",
        help="latency, memory and start-up against PyTorch and peer runtimes",
        formatter_class=_HelpFormatter,
    )
    what = bench.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", "-m", help="checkpoint to benchmark: hub id or local folder")
    what.add_argument("--shape", choices=("small", "medium", "large"), help="a seeded random checkpoint in DialoGPT's real shape")
    bench.add_argument("--backends", default=None, help="comma-separated (default: ours,pytorch,optimum,ctranslate2,llamacpp,genai,openvino); missing peers are skipped")
    bench.add_argument("--precisions", default=None, help="comma-separated (default: fp32,int8,int4,q8_0,q4_0); each backend runs those it supports (ours: fp32, int8, int4 as export writes them, each also as -kv8 / -kv16 / -kv32 to pick the KV cache, or -prepacked to run from the prepacked cache; llamacpp: q8_0, q4_0, q4_k_m; genai: fp32, int8, int4, ours' exports in onnxruntime-genai's loop; openvino: fp32, int8, int4 by NNCF)")
    bench.add_argument("--prompt-tokens", type=_list_of(_int_at_least(1)), default="32", help="comma-separated context lengths, e.g. 64,256,512,900")
    bench.add_argument("--new-tokens", type=_int_at_least(1), default=64, help="tokens decoded per run (eos ignored)")
    bench.add_argument("--threads", type=_list_of(_threads), default=None,
                       help="comma-separated thread counts (default: the runtime's, one per physical core within any CPU limit)")
    bench.add_argument("--runs", type=_int_at_least(1), default=2, help="timed runs per pass")
    bench.add_argument("--warmup", type=_int_at_least(0), default=1, help="untimed runs first, per pass")
    bench.add_argument("--passes", type=_int_at_least(1), default=3, help="rotated passes over all backends")
    bench.add_argument("--chat-turns", type=_int_at_least(0), default=0, help="also time first tokens over an N-turn chat, cache kept vs not")
    bench.add_argument("--output", default="benchmarks/results", help="folder for the JSON, markdown and PNG files")
    bench.add_argument("--cache-dir", default=None, help="where exports are cached between runs (default ~/.cache/dialogpt-edge/bench)")
    bench.set_defaults(handler=_cmd_bench)
    return parser


class _Version(argparse.Action):
    """--version, read from the installed distributions' metadata (nothing is imported for it)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from .manifest import installed_versions

        versions = installed_versions("dialogpt-edge", "onnxruntime", "numpy", "tokenizers")
        ours = versions.pop("dialogpt-edge", "(not installed)")
        print(f"dialogpt-edge {ours} ({', '.join(f'{k} {v}' for k, v in versions.items())})")
        parser.exit()


def _add_sampling_args(p: argparse.ArgumentParser, defaults: SamplingConfig, max_new_help: str) -> None:
    """The SamplingConfig flags, with the command's own defaults; SamplingConfig checks the values."""
    p.add_argument("--temperature", type=float, default=defaults.temperature, help="0 = greedy")
    p.add_argument("--top-k", type=_top_k, default=defaults.top_k, help="keep the k most likely tokens ('none' = off)")
    p.add_argument("--top-p", type=float, default=defaults.top_p, help="nucleus mass to keep (1 = off)")
    p.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty, help="1 = off")
    p.add_argument("--no-repeat-ngram-size", type=_int_at_least(0), default=defaults.no_repeat_ngram_size, help="0 = off")
    p.add_argument("--min-new-tokens", type=_int_at_least(0), default=defaults.min_new_tokens, help="eos is banned before this many")
    p.add_argument("--max-new-tokens", type=_int_at_least(0), default=defaults.max_new_tokens, help=max_new_help)
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")


def _top_k(text: str) -> int | None:
    if text.strip().lower() in ("none", "off"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 or 'none', got {text!r}") from None


def _require_model(args) -> str:
    """A typed flag, then the environment, then the shipped model."""
    from_env = os.environ.get(MODEL_ENV)
    if not args.model and from_env and not os.path.exists(from_env):  # a stale setting is easy to forget
        raise UserError(f"${MODEL_ENV} names {from_env}, which does not exist (set it to a model folder, "
                        "or unset it for the shipped model)")
    model = args.model or from_env or shipped_model_dir()
    if not model:
        raise UserError(f"no model given and no shipped model in this install (pass --model DIR, or set {MODEL_ENV})")
    return model


def _cmd_generate(args) -> int:
    from .generate import generate, reply_room
    from .session import open_with_tokenizer
    from .tokenizer import TextStream

    config = _sampling_config(args)
    if not config.is_greedy and config.seed is None:  # drawn here so that --json can say how to repeat the run
        config = config.replace(seed=secrets.randbits(63))
    session, tokenizer = open_with_tokenizer(_require_model(args), threads=args.threads)
    prompt_ids = tokenizer.encode_turn(args.prompt)
    cache = session.new_cache()
    room = reply_room(session, cache) - len(prompt_ids)

    ids: list[int] = []
    stream = TextStream(tokenizer)
    start = time.perf_counter()
    first_at = None
    for token in generate(session, prompt_ids, config, cache=cache):
        if first_at is None:
            first_at = time.perf_counter()
        ids.append(token)
        if not args.json:
            sys.stdout.write(stream.push(token))
            sys.stdout.flush()
    end = time.perf_counter()
    stopped_by = "max_new_tokens" if len(ids) == config.max_new_tokens else "positions" if len(ids) == room else "eos"

    if args.json:
        result = {
            "prompt_tokens": len(prompt_ids),
            "ids": ids,
            "text": tokenizer.decode(ids),
            "ttft_ms": None if first_at is None else round((first_at - start) * 1e3, 3),
            "decode_ms_per_token": (
                round((end - first_at) * 1e3 / (len(ids) - 1), 3) if len(ids) > 1 else None
            ),
            "stopped_by": stopped_by,
            "seed": None if config.is_greedy else config.seed,
            "threads": session.threads,
        }
        print(json.dumps(result, ensure_ascii=False))
    else:
        sys.stdout.write(stream.flush() + "\n")
    if stopped_by == "positions":
        sys.stdout.flush()
        print(f"note: the reply stopped at {len(ids)} tokens, the most the model's {session.spec.n_positions} "
              f"positions leave after a {len(prompt_ids)}-token prompt", file=sys.stderr)
    return 0


def _sampling_config(args) -> SamplingConfig:
    return SamplingConfig(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        min_new_tokens=args.min_new_tokens,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )


def _as_flag_error(e: SamplingConfigError) -> UserError:
    """Name the flag the user typed, not the field."""
    return UserError(str(e).replace(e.field, "--" + e.field.replace("_", "-"), 1))


def _cmd_chat(args) -> int:
    from .chat_cli import run_chat

    return run_chat(args, _require_model(args), _sampling_config(args))


def _import_extra(module: str, extra: str):
    """A module of an optional extra; a missing dependency names the pip command that fixes it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UserError(
            f"{extra} needs the {extra} extra ({e.name or e} is not installed; run: pip install 'dialogpt-edge[{extra}]')"
        ) from None


def _cmd_export(args) -> int:
    if args.quantize == "none" and (args.block_size is not None or args.accuracy_level is not None):
        raise UserError("--block-size and --accuracy-level set how weights are quantized "
                        "(drop them for an fp32 export, or add --quantize int8 / int4)")
    _import_extra("dialogpt_edge.export.pipeline", "export").export_model(
        args.source,
        args.output,
        force=args.force,
        quantize=args.quantize,
        block_size=args.block_size,
        accuracy_level=4 if args.accuracy_level is None else args.accuracy_level,
        verify_fidelity=not args.no_verify,
        fidelity_tokens=args.fidelity_tokens,
        kv_cache=args.kv_cache,
    )
    return 0


def _cmd_bench(args) -> int:
    return _import_extra("dialogpt_edge.benchmarks.harness", "bench").main(args)


class _StderrLines(logging.Handler):
    """The runtime's notices (a one-time weight packing, a fallback) as plain lines on the current stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        print(record.getMessage(), file=sys.stderr, flush=True)


def _show_runtime_notices() -> None:
    logger = logging.getLogger("dialogpt_edge")
    if not any(isinstance(h, _StderrLines) for h in logger.handlers):
        logger.addHandler(_StderrLines())
        logger.setLevel(logging.INFO)


def _lenient_text_streams() -> None:
    """Bytes that are not text in the locale's encoding become U+FFFD instead of a traceback.

    Under a strict locale, one stray byte piped into `chat` would stop the conversation, and a
    reply character the terminal cannot show would stop it mid-sentence.
    """
    for stream in (sys.stdin, sys.stdout):
        if hasattr(stream, "reconfigure"):  # a test may swap in a plain StringIO
            stream.reconfigure(errors="replace")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _show_runtime_notices()
    _lenient_text_streams()
    try:
        return args.handler(args)
    except UserError as e:
        if args.debug:
            traceback.print_exc()
        if isinstance(e, SamplingConfigError):  # either command's settings, or Chat's checks of them
            e = _as_flag_error(e)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as tools killed by SIGPIPE do
        # Python flushes stdout again at exit, which would fail the same way: point it at /dev/null
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13
