"""The `chat` command's two faces: an interactive terminal session, and one reply line per piped line."""

from __future__ import annotations

import sys

from .chat import Chat
from .sampling import SamplingConfig
from .session import open_with_tokenizer
from .tidy import TidyStream
from .tokenizer import TextStream, Tokenizer

QUIT = ("/quit", "/exit")
BANNER = "Chatting with {name}. /reset clears the history, /quit or Ctrl-D ends, Ctrl-C stops a reply."


def run_chat(args, model_dir: str, config: SamplingConfig, stdin=None, stdout=None) -> int:
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    session, tokenizer = open_with_tokenizer(model_dir, threads=args.threads)
    spec = session.spec
    chat = Chat(
        session, tokenizer, config, history_tokens=args.history_tokens, penalize_whole_history=args.penalize_history
    )
    if stdin.isatty():
        return _interactive(chat, tokenizer, not args.raw, spec.path.name, stdout)
    return _piped(chat, tokenizer, not args.raw, stdin, stdout)


def _stream_reply(chat: Chat, tokenizer: Tokenizer, text: str, tidy: bool, write) -> None:
    """Write the reply as it is generated; Ctrl-C ends this reply only."""
    ids = TextStream(tokenizer)
    tidier = TidyStream(enabled=tidy)
    reply = chat.respond(text)
    try:
        for token in reply:
            write(tidier.push(ids.push(token)))
    except KeyboardInterrupt:
        reply.close()  # keeps what was shown as the bot's turn
        write(tidier.push(ids.flush()) + tidier.flush() + " [stopped]")
        return
    write(tidier.push(ids.flush()) + tidier.flush())


def _piped(chat: Chat, tokenizer: Tokenizer, tidy: bool, stdin, stdout) -> int:
    for line in stdin:
        text = line.strip()
        if not text:
            continue
        if text in QUIT:  # as on a terminal: what follows is not read
            break
        if text == "/reset":  # lets one pipe carry several conversations
            chat.reset()
            continue
        parts: list[str] = []
        _stream_reply(chat, tokenizer, text, tidy, parts.append)
        # one reply per line, whatever the model generated
        stdout.write(" ".join("".join(parts).split()) + "\n")
        stdout.flush()
    return 0


def _interactive(chat: Chat, tokenizer: Tokenizer, tidy: bool, name: str, stdout) -> int:
    try:  # line editing and arrow-key history for input(); the module is missing on Windows
        import readline  # noqa: F401
    except ImportError:
        pass

    def write(chunk: str) -> None:
        stdout.write(chunk)
        stdout.flush()

    write(BANNER.format(name=name) + "\n")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            write("\n")
            return 0
        except KeyboardInterrupt:
            write("\n")
            return 0
        if not text:
            continue
        if text in QUIT:
            return 0
        if text == "/reset":
            chat.reset()
            write("(history cleared)\n")
            continue
        write("bot> ")
        _stream_reply(chat, tokenizer, text, tidy, write)
        write("\n")
