# Sandcastle's interpreter for MCP run_code: one long-lived process per context, in the
# sandbox. It reads one JSON request per line and answers each after a marker only the
# server knows, so code that prints anything (even a fake answer) cannot end a call.
import ast
import json
import linecache
import os
import signal
import subprocess
import sys
import traceback

MARK = "\x1e" + os.environ.pop("SANDCASTLE_MCP_TOKEN") + "\x1e"
LANGUAGE = sys.argv[1]

# The requests arrive on the real stdin; the code gets /dev/null, so an input() cannot
# swallow the next request.
requests = os.fdopen(os.dup(0), "r", encoding="utf-8")
null = os.open(os.devnull, os.O_RDONLY)
os.dup2(null, 0)
sys.stdin = open(os.devnull, "r")

namespace = {"__name__": "__main__", "__builtins__": __builtins__}
shell = {"cwd": os.getcwd(), "env": dict(os.environ)}
cells = 0


class Interrupted(BaseException):
    # A BaseException, so that the code's own `except Exception` does not swallow it.
    pass


def on_alarm(signum, frame):
    raise Interrupted()


signal.signal(signal.SIGALRM, on_alarm)


def user_traceback(error):
    # The frames of the code only: the interpreter's own are noise to the caller.
    tb = error.__traceback__
    while tb is not None and not tb.tb_frame.f_code.co_filename.startswith("<cell-"):
        tb = tb.tb_next
    if isinstance(error, SyntaxError) or tb is None:
        return "".join(traceback.format_exception_only(type(error), error))
    return "".join(traceback.format_exception(type(error), error, tb))


def run_python(code):
    global cells
    cells += 1
    name = "<cell-%d>" % cells
    linecache.cache[name] = (len(code), None, code.splitlines(True), name)
    tree = ast.parse(code, name, "exec")
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    exec(compile(tree, name, "exec"), namespace)
    if last is not None:
        value = eval(compile(last, name, "eval"), namespace)
        if value is not None:
            namespace["_"] = value
            return {"text": repr(value)}
    return None


def run_bash(code, timeout):
    # A shell per call, with the working directory and exported variables of the last
    # one carried over: what a terminal session keeps that matters to code.
    state = "/tmp/.sandcastle-mcp-state-%d" % os.getpid()
    script = "trap '{ printf \"%%s\\0\" \"$PWD\"; env -0; } > %s' EXIT\n%s\n" % (state, code)
    process = subprocess.Popen(
        ["bash", "-c", script],
        cwd=shell["cwd"],
        env=shell["env"],
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        status = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise Interrupted()
    finally:
        try:
            with open(state, "rb") as saved:
                entries = saved.read().split(b"\0")
            os.unlink(state)
            if entries and os.path.isdir(entries[0]):
                shell["cwd"] = entries[0].decode()
                shell["env"] = dict(
                    entry.decode().split("=", 1) for entry in entries[1:] if b"=" in entry
                )
        except OSError:
            pass
    if status != 0:
        return None, {"name": "ExitCode", "value": "exit status %d" % status, "traceback": ""}
    return None, None


def execute(request):
    timeout = float(request.get("timeout", 60))
    result, error = None, None
    try:
        if LANGUAGE == "bash":
            result, error = run_bash(request["code"], timeout)
        else:
            signal.setitimer(signal.ITIMER_REAL, timeout)
            try:
                result = run_python(request["code"])
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
    except Interrupted:
        error = {
            "name": "TimeoutError",
            "value": "interrupted after %gs; the context keeps its state" % timeout,
            "traceback": "",
        }
    except BaseException as caught:
        error = {"name": type(caught).__name__, "value": str(caught), "traceback": user_traceback(caught)}
    return {"result": result, "error": error}


while True:
    line = requests.readline()
    if not line:
        break
    answer = execute(json.loads(line))
    sys.stdout.flush()
    sys.stderr.flush()
    # The mark on stderr tells the server that all of this call's stderr has arrived.
    os.write(2, MARK.encode())
    os.write(1, (MARK + json.dumps(answer) + "\n").encode())
