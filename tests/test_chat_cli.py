"""`dialogpt-edge chat` through the real entry point: piped stdin, and a terminal under pexpect."""

from __future__ import annotations

import shutil
import subprocess

import pexpect
import pytest

from conftest import run_env


def chat_cmd(model, *extra: str) -> list[str]:
    return [shutil.which("dialogpt-edge"), "chat", "--model", str(model), *extra]


def test_piped_input_gives_one_reply_line_per_line(tiny_model):
    proc = subprocess.run(chat_cmd(tiny_model, "--seed", "0", "--max-new-tokens", "12"), input="Hi\nHow are you?\n",
                          capture_output=True, text=True, env=run_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("\n")
    assert lines[-1] == "" and len(lines) == 3, proc.stdout
    assert all(line.strip() for line in lines[:2])


def test_a_reader_that_stops_reading_ends_the_chat_quietly(tiny_model, tmp_path):
    """`chat < questions | head -1`: once the pipe is closed, the next reply line ends the process
    with SIGPIPE's exit status and nothing on stderr (it was a BrokenPipeError traceback)."""
    questions = tmp_path / "questions.txt"
    questions.write_text("Hi\n" * 3000)  # seconds of replies: the reader is gone long before the last
    with questions.open() as stdin:
        proc = subprocess.Popen(chat_cmd(tiny_model, "--seed", "0", "--max-new-tokens", "4"), stdin=stdin,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=run_env())
        assert proc.stdout.readline().strip()
        proc.stdout.close()
        stderr = proc.stderr.read()
        assert proc.wait(timeout=120) == 141 and stderr == ""


def test_piped_reset_starts_a_new_conversation_and_blank_lines_get_no_reply(tiny_model):
    proc = subprocess.run(chat_cmd(tiny_model, "--temperature", "0", "--max-new-tokens", "8"), input="Hi\n\n  \n/reset\nHi\n",
                          capture_output=True, text=True, env=run_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    first, second, end = proc.stdout.split("\n")
    assert end == "" and first.strip()
    assert second == first  # greedy, and the history was cleared: the same reply to the same first line


def test_a_piped_quit_line_ends_the_chat(tiny_model):
    proc = subprocess.run(chat_cmd(tiny_model, "--seed", "0", "--max-new-tokens", "6"), input="Hi\n/quit\nHow are you?\n",
                          capture_output=True, text=True, env=run_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.split("\n")) == 2, proc.stdout  # one reply line, for the line before /quit


@pytest.mark.parametrize("io_encoding", ["utf-8:surrogateescape", "utf-8:strict", "ascii:strict"])
def test_bytes_that_are_not_utf8_still_get_a_reply(tiny_model, io_encoding):
    proc = subprocess.run(chat_cmd(tiny_model, "--seed", "0", "--max-new-tokens", "6"), input=b"caf\xe9?\nHi\n",
                          capture_output=True, env={**run_env(), "PYTHONIOENCODING": io_encoding}, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert proc.stderr == b""
    assert len(proc.stdout.decode().split("\n")) == 3, proc.stdout


def test_piped_chat_is_reproducible_with_a_seed(tiny_model):
    run = lambda seed: subprocess.run(chat_cmd(tiny_model, "--seed", str(seed), "--max-new-tokens", "8"), input="Hi\nAnd you?\n",
                                      capture_output=True, text=True, env=run_env(), timeout=120).stdout
    assert run(3) == run(3)
    assert run(3) != run(4)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--top-k", "0"], "--top-k must be an integer >= 1"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--temperature", "-1"], "--temperature must be"),
        (["--history-tokens", "2000"], "--history-tokens must be an integer between 1 and 960"),
        (["--max-new-tokens", "5000"], "--max-new-tokens must be below the model's 1024 positions, got 5000"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1 in a chat, got 0"),
    ],
)
def test_bad_settings_are_one_line_errors(tiny_model, flags, message):
    proc = subprocess.run(chat_cmd(tiny_model, *flags), input="Hi\n", capture_output=True, text=True, env=run_env(), timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: ") and message in proc.stderr


def test_interactive_session(tiny_model):
    # a long budget for replies, so that Ctrl-C lands while one is still streaming
    child = pexpect.spawn(
        chat_cmd(tiny_model, "--seed", "0", "--history-tokens", "24", "--max-new-tokens", "990")[0],
        chat_cmd(tiny_model, "--seed", "0", "--history-tokens", "24", "--max-new-tokens", "990")[1:],
        env=run_env(), encoding="utf-8", timeout=60, dimensions=(40, 2000),
    )
    try:
        child.expect("/reset clears the history")
        child.expect("you> ")
        child.sendline("Hello there")
        child.expect("bot> ")
        child.expect(r"\S")  # the reply has started streaming
        child.sendintr()  # Ctrl-C stops this reply only
        child.expect(r"\[stopped\]")
        child.expect("you> ")
        child.sendline("/reset")
        child.expect(r"\(history cleared\)")
        child.expect("you> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before


def test_ctrl_d_ends_the_session(tiny_model):
    cmd = chat_cmd(tiny_model)
    child = pexpect.spawn(cmd[0], cmd[1:], env=run_env(), encoding="utf-8", timeout=60)
    child.expect("you> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_the_up_arrow_recalls_the_last_message(tiny_model):
    cmd = chat_cmd(tiny_model, "--seed", "0", "--max-new-tokens", "4")
    child = pexpect.spawn(cmd[0], cmd[1:], env=run_env(), encoding="utf-8", timeout=60)
    try:
        child.expect("you> ")
        child.sendline("Hello there")
        child.expect("you> ")
        child.send("\x1b[A\r")  # line editing as a shell has it
        child.expect("bot> ")
        assert child.before.strip() == "Hello there"
        child.expect("you> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
