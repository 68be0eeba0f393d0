"""`sandcastle mcp` driven by the official MCP Python SDK, over stdio and streamable HTTP.

Run by tests/controlplane (mcp.rs), which provides the binary, a cluster with the operator
and the provider the servers make their sandboxes on (SANDCASTLE_BIN, KUBECONFIG,
SANDCASTLE_MCP_ARGS, SANDCASTLE_MCP_NAMESPACE).
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

BIN = os.environ["SANDCASTLE_BIN"]
ARGS = json.loads(os.environ["SANDCASTLE_MCP_ARGS"])
NAMESPACE = os.environ["SANDCASTLE_MCP_NAMESPACE"]
TRANSPORTS = ["stdio", "http"]


@pytest.fixture
def anyio_backend():
    return "asyncio"


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_healthy(port, server):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert server.poll() is None, "the HTTP server exited at start"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("the HTTP server never answered /healthz")


@contextlib.asynccontextmanager
async def connect(transport, *extra):
    args = ["mcp", *ARGS, *extra]
    if transport == "stdio":
        params = StdioServerParameters(command=BIN, args=args, env=dict(os.environ))
        async with stdio_client(params) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                yield session
        return
    port = free_port()
    server = subprocess.Popen([BIN, *args, "--transport", "http", "--listen", f"127.0.0.1:{port}"])
    try:
        wait_healthy(port, server)
        async with streamable_http_client(f"http://127.0.0.1:{port}/mcp") as streams:
            async with ClientSession(streams[0], streams[1]) as session:
                await session.initialize()
                yield session
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0, "the HTTP server did not stop cleanly on SIGTERM"


async def run(session, **arguments):
    answer = await session.call_tool("run_code", arguments)
    assert not answer.is_error, answer.content
    return answer.structured_content


async def refused(session, tool, arguments):
    answer = await session.call_tool(tool, arguments)
    assert answer.is_error, f"{tool} {arguments} was not refused: {answer}"
    return answer.content[0].text


@pytest.mark.anyio
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_tools_are_listed_with_their_schemas(transport):
    async with connect(transport) as session:
        tools = {tool.name: tool for tool in (await session.list_tools()).tools}
        assert set(tools) == {
            "run_code", "create_context", "delete_context", "list_contexts",
            "create_task", "get_task", "list_tasks",
        }
        run_code = tools["run_code"]
        assert run_code.input_schema["required"] == ["code"]
        assert set(run_code.input_schema["properties"]) == {"code", "language", "context", "timeoutSeconds"}
        output = run_code.output_schema["properties"]
        assert {"stdout", "stderr", "error", "result"} <= set(output)
        assert "prompt" in tools["create_task"].input_schema["properties"]
        assert "template" in tools["create_task"].input_schema["required"]


@pytest.mark.anyio
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_code_runs_in_each_language(transport):
    async with connect(transport) as session:
        python = await run(session, code="import sys\nprint('out')\nprint('err', file=sys.stderr)\n6 * 7")
        assert (python["stdout"], python["stderr"], python["result"]) == ("out\n", "err\n", {"text": "42"})
        assert "error" not in python
        javascript = await run(session, code="console.log('out'); console.error('err'); [6 * 7]", language="javascript")
        assert (javascript["stdout"], javascript["stderr"], javascript["result"]) == ("out\n", "err\n", {"text": "[ 42 ]"})
        bash = await run(session, code="echo out; echo err >&2; uname -s", language="bash")
        assert (bash["stdout"], bash["stderr"]) == ("out\nLinux\n", "err\n")
        assert "result" not in bash


@pytest.mark.anyio
async def test_calls_without_a_context_share_no_state():
    async with connect("stdio") as session:
        await run(session, code="secret_number = 7")
        again = await run(session, code="secret_number")
        assert again["error"]["name"] == "NameError", again


@pytest.mark.anyio
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_context_keeps_state_between_calls(transport):
    async with connect(transport) as session:
        python = (await session.call_tool("create_context", {"language": "python"})).structured_content
        await run(session, code="import math\nradius = 2", context=python["id"])
        area = await run(session, code="round(math.pi * radius ** 2, 2)", context=python["id"])
        assert area["result"] == {"text": "12.57"}

        javascript = (await session.call_tool("create_context", {"language": "js"})).structured_content
        assert javascript["language"] == "javascript"
        await run(session, code="let counter = 40; function bump() { return ++counter; }", context=javascript["id"])
        await run(session, code="bump()", context=javascript["id"])
        assert (await run(session, code="bump()", context=javascript["id"]))["result"] == {"text": "42"}

        shell = (await session.call_tool("create_context", {"language": "bash"})).structured_content
        await run(session, code="mkdir -p deep/er && cd deep/er && export GREETING=hi", context=shell["id"])
        here = await run(session, code="echo $GREETING; basename $PWD", context=shell["id"])
        assert here["stdout"] == "hi\ner\n"

        listed = (await session.call_tool("list_contexts", {})).structured_content["contexts"]
        assert {context["id"] for context in listed} == {python["id"], javascript["id"], shell["id"]}

        deleted = await session.call_tool("delete_context", {"context": python["id"]})
        assert not deleted.is_error
        gone = await refused(session, "run_code", {"code": "radius", "context": python["id"]})
        assert "no context" in gone


@pytest.mark.anyio
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_timeout_interrupts_the_code_and_the_context_lives_on(transport):
    async with connect(transport) as session:
        python = (await session.call_tool("create_context", {})).structured_content
        await run(session, code="kept = 'still here'", context=python["id"])
        started = time.monotonic()
        stuck = await run(session, code="import time\nprint('before')\nwhile True:\n    time.sleep(0.1)", context=python["id"], timeoutSeconds=2)
        assert time.monotonic() - started < 10
        assert stuck["error"]["name"] == "TimeoutError", stuck
        assert stuck["stdout"] == "before\n"
        assert (await run(session, code="kept", context=python["id"]))["result"] == {"text": "'still here'"}

        javascript = (await session.call_tool("create_context", {"language": "javascript"})).structured_content
        await run(session, code="var kept = 'js here'", context=javascript["id"])
        spin = await run(session, code="while (true) {}", context=javascript["id"], timeoutSeconds=1)
        assert spin["error"]["name"] == "TimeoutError", spin
        assert (await run(session, code="kept", context=javascript["id"]))["result"] == {"text": "'js here'"}

        shell = (await session.call_tool("create_context", {"language": "bash"})).structured_content
        await run(session, code="export KEPT=sh", context=shell["id"])
        slow = await run(session, code="sleep 30", context=shell["id"], timeoutSeconds=1)
        assert slow["error"]["name"] == "TimeoutError", slow
        assert (await run(session, code="echo $KEPT", context=shell["id"]))["stdout"] == "sh\n"


@pytest.mark.anyio
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_error_comes_with_its_traceback(transport):
    async with connect(transport) as session:
        python = await run(session, code="def divide(a, b):\n    return a / b\n\nprint('partial')\ndivide(1, 0)")
        error = python["error"]
        assert (error["name"], error["value"]) == ("ZeroDivisionError", "division by zero")
        assert "in divide" in error["traceback"] and "return a / b" in error["traceback"], error
        assert "driver" not in error["traceback"], "the interpreter's own frames are left out"
        assert python["stdout"] == "partial\n"

        syntax = await run(session, code="def broken(:\n  pass")
        assert syntax["error"]["name"] == "SyntaxError"

        javascript = await run(session, code="function fail() { throw new RangeError('too far'); }\nfail()", language="javascript")
        assert (javascript["error"]["name"], javascript["error"]["value"]) == ("RangeError", "too far")
        assert "fail" in javascript["error"]["traceback"]

        bash = await run(session, code="echo going; exit 3", language="bash")
        assert bash["error"] == {"name": "ExitCode", "value": "exit status 3", "traceback": ""}
        assert bash["stdout"] == "going\n"


@pytest.mark.anyio
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_bad_input_is_a_tool_error_and_the_server_goes_on(transport):
    async with connect(transport) as session:
        assert "unknown language" in await refused(session, "run_code", {"code": "1", "language": "cobol"})
        assert "256" in await refused(session, "run_code", {"code": "x" * (300 * 1024)})
        assert "no context" in await refused(session, "run_code", {"code": "1", "context": "ctx-nope"})
        assert "no context" in await refused(session, "delete_context", {"context": "ctx-nope"})
        assert "at least 1" in await refused(session, "run_code", {"code": "1", "timeoutSeconds": 0})
        python = (await session.call_tool("create_context", {"language": "python"})).structured_content
        wrong = await refused(session, "run_code", {"code": "1", "language": "bash", "context": python["id"]})
        assert "runs python" in wrong
        long_prompt = "p" * 65537
        assert "at most 65536" in await refused(session, "create_task", {"template": "base", "prompt": long_prompt})
        assert "no SandboxTemplate" in await refused(session, "create_task", {"template": "nope", "prompt": "hi"})
        assert "no AgentTask" in await refused(session, "get_task", {"name": "nope"})
        still = await run(session, code="'alive'")
        assert still["result"] == {"text": "'alive'"}


@pytest.mark.anyio
async def test_a_template_that_does_not_exist_is_named_in_the_error():
    async with connect("stdio", "--template", "no-such-template") as session:
        error = await refused(session, "run_code", {"code": "1"})
        assert "no-such-template" in error, error
        tools = await session.list_tools()
        assert tools.tools, "the server still answers"


@pytest.mark.anyio
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_task_runs_with_progress_notifications(transport):
    async with connect(transport) as session:
        heard = []

        async def progress(value, total, message):
            heard.append((value, message))

        answer = await session.call_tool(
            "create_task",
            {"template": "base", "command": ["sh", "-c", "sleep 3; echo all done"], "name": f"mcp-{transport}"},
            progress_callback=progress,
        )
        assert not answer.is_error, answer.content
        task = answer.structured_content
        assert (task["name"], task["namespace"], task["phase"], task["finished"]) == (f"mcp-{transport}", NAMESPACE, "Succeeded", True)
        assert "all done" in task["result"] and task["exitCode"] == 0
        messages = [message for _, message in heard]
        assert any("Running" in message for message in messages), messages
        assert messages[-1].endswith("Succeeded"), messages
        values = [value for value, _ in heard]
        assert values == sorted(set(values)), f"progress must only grow: {values}"

        got = (await session.call_tool("get_task", {"name": f"mcp-{transport}"})).structured_content
        assert got["phase"] == "Succeeded"
        listed = (await session.call_tool("list_tasks", {})).structured_content["tasks"]
        assert f"mcp-{transport}" in {task["name"] for task in listed}

        queued = await session.call_tool("create_task", {"template": "base", "command": ["true"], "wait": False})
        assert not queued.is_error and queued.structured_content["name"].startswith("mcp-")


@pytest.mark.anyio
async def test_without_a_cluster_the_task_tools_say_so():
    async with connect("stdio", "--no-kubernetes") as session:
        error = await refused(session, "list_tasks", {})
        assert "no Kubernetes cluster" in error
        assert (await run(session, code="1 + 1"))["result"] == {"text": "2"}
