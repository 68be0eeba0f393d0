"""The official E2B Python SDK against an E2B-compatible server.

tests/sdk_conformance.rs starts the server and runs this suite with E2B_API_URL,
E2B_SANDBOX_URL and E2B_API_KEY pointing at it. Every test is one scenario of
scenarios.txt, which the Rust client suite implements too, or of sdk_scenarios.txt,
which only the official SDKs run (this suite and tests/conformance/js).
"""

import asyncio
import os
import re
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
from e2b import (
    AsyncSandbox,
    AuthenticationException,
    CommandExitException,
    FileNotFoundException,
    InvalidArgumentException,
    NotFoundException,
    PtySize,
    FilesystemEventType,
    FileType,
    Sandbox,
    SandboxNotFoundException,
    SandboxException,
    SandboxNotRunningException,
    SandboxQuery,
    SandboxState,
    Template,
)

for variable in ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY"):
    assert os.environ.get(variable), f"{variable} is unset: run via tests/sdk_conformance.rs"
assert "E2B_DEBUG" not in os.environ, "E2B_DEBUG makes the SDK skip the API; unset it"

# The server's runtime, where the two differ in what they can honestly do (pause).
ON_PODS = os.environ.get("SANDCASTLE_RUNTIME") == "kubernetes"
SCENARIO_LISTS = [Path(__file__).with_name(name) for name in ("scenarios.txt", "sdk_scenarios.txt")]
# A well-formed sandbox ID (20 characters of [a-z0-9]) that no server has handed out.
UNKNOWN_SANDBOX_ID = "0nosuchsandbox000000"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def assert_lifetime(info, seconds: int, since: datetime):
    """The sandbox ends `seconds` after `since`, give or take clock granularity."""
    expected = since + timedelta(seconds=seconds)
    assert abs(info.end_at - expected) < timedelta(seconds=5), (info.end_at, expected)


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox.create(timeout=600) as sbx:
        yield sbx


@pytest.fixture
def workdir(sandbox):
    path = f"/tmp/{unique('conformance')}"
    assert sandbox.files.make_dir(path)
    return path


def test_every_scenario_has_one_test():
    listed = [name for path in SCENARIO_LISTS for name in path.read_text().split()]
    assert len(listed) == len(set(listed)), "scenarios.txt lists a scenario twice"
    tests = {
        name.removeprefix("test_")
        for name, value in globals().items()
        if name.startswith("test_") and callable(value)
    }
    assert tests - {"every_scenario_has_one_test"} == set(listed)


def test_sandbox_create():
    metadata = {"suite": "conformance", "case": unique("create")}
    started = datetime.now(timezone.utc)
    with Sandbox.create(
        timeout=120, metadata=metadata, envs={"GREETING": "hello from create"}
    ) as sbx:
        assert sbx.sandbox_id
        assert sbx.is_running()
        info = sbx.get_info()
        assert info.sandbox_id == sbx.sandbox_id
        assert info.template_id
        assert info.metadata == metadata
        assert info.state == SandboxState.RUNNING
        assert_lifetime(info, 120, started)
        assert sbx.commands.run("echo $GREETING").stdout == "hello from create\n"


def test_command_stdout(sandbox):
    result = sandbox.commands.run("echo one; echo two")
    assert (result.stdout, result.stderr, result.exit_code) == ("one\ntwo\n", "", 0)
    many = sandbox.commands.run("seq 1 20000")
    assert many.stdout == "".join(f"{i}\n" for i in range(1, 20001))


def test_command_stderr(sandbox):
    result = sandbox.commands.run("echo oops >&2")
    assert (result.stdout, result.stderr, result.exit_code) == ("", "oops\n", 0)


def test_command_exit_code(sandbox):
    assert sandbox.commands.run("true").exit_code == 0
    with pytest.raises(CommandExitException) as exited:
        sandbox.commands.run("exit 7")
    assert exited.value.exit_code == 7


def test_command_env(sandbox):
    result = sandbox.commands.run('echo "$FIRST-$SECOND"', envs={"FIRST": "a", "SECOND": "b c"})
    assert result.stdout == "a-b c\n"


def test_command_cwd(sandbox, workdir):
    assert sandbox.commands.run("pwd", cwd=workdir).stdout == f"{workdir}\n"
    sandbox.commands.run("echo here > relative.txt", cwd=workdir)
    assert sandbox.files.read(f"{workdir}/relative.txt") == "here\n"


def test_command_failure(sandbox):
    with pytest.raises(CommandExitException) as failed:
        sandbox.commands.run("echo partial; ls /definitely/missing")
    assert failed.value.exit_code == 2
    assert failed.value.stdout == "partial\n"
    assert "No such file or directory" in failed.value.stderr


def test_command_background_connect(sandbox):
    handle = sandbox.commands.run("sleep 2; echo finished", background=True)
    assert handle.pid > 0
    assert handle.pid in {process.pid for process in sandbox.commands.list()}
    handle.disconnect()
    result = sandbox.commands.connect(handle.pid).wait()
    assert (result.stdout, result.exit_code) == ("finished\n", 0)


def test_files_write_read(sandbox, workdir):
    path = f"{workdir}/nested/dir/hello.txt"
    info = sandbox.files.write(path, "hello world\n")
    assert (info.path, info.name, info.type) == (path, "hello.txt", FileType.FILE)
    assert sandbox.files.read(path) == "hello world\n"
    assert sandbox.commands.run(f"cat {path}").stdout == "hello world\n"

    sandbox.files.write(path, "replaced")
    assert sandbox.files.read(path) == "replaced"

    binary = bytes(range(256)) * 64
    sandbox.files.write(f"{workdir}/blob.bin", binary)
    assert sandbox.files.read(f"{workdir}/blob.bin", format="bytes") == binary


def test_files_list(sandbox, workdir):
    sandbox.files.write(f"{workdir}/a.txt", "12345")
    sandbox.files.make_dir(f"{workdir}/sub")
    entries = {entry.name: entry for entry in sandbox.files.list(workdir)}
    assert set(entries) == {"a.txt", "sub"}
    assert (entries["a.txt"].type, entries["a.txt"].size) == (FileType.FILE, 5)
    assert entries["a.txt"].path == f"{workdir}/a.txt"
    assert entries["sub"].type == FileType.DIR


def test_files_watch(sandbox, workdir):
    sandbox.files.make_dir(f"{workdir}/sub")
    handle = sandbox.files.watch_dir(workdir, recursive=True)
    sandbox.files.write(f"{workdir}/new.txt", "one")
    sandbox.commands.run(
        f"echo deep > {workdir}/sub/deep.txt; mv {workdir}/new.txt {workdir}/moved.txt; "
        f"rm {workdir}/moved.txt"
    )
    wanted = {
        ("new.txt", FilesystemEventType.CREATE),
        ("sub/deep.txt", FilesystemEventType.CREATE),
        ("new.txt", FilesystemEventType.RENAME),
        ("moved.txt", FilesystemEventType.REMOVE),
    }
    seen = set()
    deadline = time.monotonic() + 10
    while not wanted <= seen and time.monotonic() < deadline:
        seen |= {(event.name, event.type) for event in handle.get_new_events()}
        time.sleep(0.1)
    assert wanted <= seen, seen
    handle.stop()
    with pytest.raises(SandboxException):
        handle.get_new_events()


def test_files_watch_stream(sandbox, workdir):
    # The async SDK watches through the streaming WatchDir.
    async def watch():
        sbx = await AsyncSandbox.connect(sandbox.sandbox_id)
        events = []
        handle = await sbx.files.watch_dir(workdir, on_event=events.append, recursive=True)
        await sbx.files.write(f"{workdir}/streamed.txt", "x")
        await sbx.commands.run(f"rm {workdir}/streamed.txt")
        wanted = {
            ("streamed.txt", FilesystemEventType.CREATE),
            ("streamed.txt", FilesystemEventType.REMOVE),
        }
        deadline = time.monotonic() + 10
        while not wanted <= {(e.name, e.type) for e in events} and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await handle.stop()
        return wanted, {(e.name, e.type) for e in events}

    wanted, seen = asyncio.run(watch())
    assert wanted <= seen, seen


def test_files_exists(sandbox, workdir):
    sandbox.files.write(f"{workdir}/present.txt", "x")
    assert sandbox.files.exists(f"{workdir}/present.txt")
    assert sandbox.files.exists(workdir)
    assert not sandbox.files.exists(f"{workdir}/absent.txt")


def test_files_make_dir(sandbox, workdir):
    path = f"{workdir}/x/y"
    assert sandbox.files.make_dir(path)
    assert not sandbox.files.make_dir(path), "make_dir on an existing directory reports False"
    assert sandbox.files.get_info(path).type == FileType.DIR
    sandbox.commands.run(f"test -d {path}")


def test_files_remove(sandbox, workdir):
    sandbox.files.write(f"{workdir}/gone.txt", "x")
    sandbox.files.remove(f"{workdir}/gone.txt")
    assert not sandbox.files.exists(f"{workdir}/gone.txt")

    sandbox.files.write(f"{workdir}/tree/leaf.txt", "x")
    sandbox.files.remove(f"{workdir}/tree")
    assert not sandbox.files.exists(f"{workdir}/tree")
    assert sandbox.files.list(workdir) == []


def test_files_read_missing_not_found(sandbox, workdir):
    with pytest.raises(FileNotFoundException):
        sandbox.files.read(f"{workdir}/missing.txt")
    with pytest.raises(FileNotFoundException):
        sandbox.files.list(f"{workdir}/missing-dir")


def test_sandbox_list_metadata_query():
    suite = unique("list")
    # Characters that need URL encoding, which the SDK applies twice.
    odd = "a b&c=d/é"
    with (
        Sandbox.create(timeout=120, metadata={"suite": suite, "role": odd}) as first,
        Sandbox.create(timeout=120, metadata={"suite": suite, "role": "second"}) as second,
    ):
        paginator = Sandbox.list(query=SandboxQuery(metadata={"suite": suite}))
        listed = paginator.next_items()
        assert not paginator.has_next
        assert {info.sandbox_id for info in listed} == {first.sandbox_id, second.sandbox_id}
        assert all(info.state == SandboxState.RUNNING for info in listed)

        narrowed = Sandbox.list(query=SandboxQuery(metadata={"suite": suite, "role": odd}))
        (only,) = narrowed.next_items()
        assert only.sandbox_id == first.sandbox_id
        assert only.metadata == {"suite": suite, "role": odd}

        absent = Sandbox.list(query=SandboxQuery(metadata={"suite": unique("nobody")}))
        assert absent.next_items() == []


def test_sandbox_set_timeout():
    with Sandbox.create(timeout=60) as sbx:
        sbx.set_timeout(600)
        assert_lifetime(sbx.get_info(), 600, datetime.now(timezone.utc))
        Sandbox.set_timeout(sbx.sandbox_id, 30)
        assert_lifetime(sbx.get_info(), 30, datetime.now(timezone.utc))

        sbx.set_timeout(1)
        deadline = time.monotonic() + 15
        while sbx.is_running():
            assert time.monotonic() < deadline, "sandbox outlived its timeout"
            time.sleep(0.5)
        with pytest.raises(SandboxNotFoundException):
            sbx.get_info()


def test_sandbox_kill():
    sbx = Sandbox.create(timeout=120)
    assert sbx.kill()
    assert not sbx.is_running()
    with pytest.raises(SandboxNotFoundException):
        sbx.get_info()
    with pytest.raises(SandboxNotRunningException):
        sbx.files.read("/etc/hostname")
    assert not Sandbox.kill(sbx.sandbox_id), "killing a killed sandbox reports False"


def test_sandbox_unknown_not_found():
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(UNKNOWN_SANDBOX_ID)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(UNKNOWN_SANDBOX_ID)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.set_timeout(UNKNOWN_SANDBOX_ID, 30)
    assert not Sandbox.kill(UNKNOWN_SANDBOX_ID)


def test_api_key_rejected():
    wrong = os.environ["E2B_API_KEY"] + "-wrong"
    with pytest.raises(AuthenticationException):
        Sandbox.create(timeout=60, api_key=wrong)
    with pytest.raises(AuthenticationException):
        Sandbox.list(api_key=wrong).next_items()
    with pytest.raises(AuthenticationException):
        Template.build(Template().from_template("base"), unique("denied"), api_key=wrong)


def test_template_build(tmp_path):
    (tmp_path / "greeting.txt").write_text("copied from the context\n")
    root = f"/opt/{unique('conformance')}"
    template = (
        Template(file_context_path=tmp_path)
        .from_template("base")
        .set_workdir(root)
        .copy("greeting.txt", f"{root}/greeting.txt")
        .set_envs({"BUILD_FLAVOUR": "vanilla"})
        .run_cmd(['echo "$BUILD_FLAVOUR" > flavour.txt', "pwd > built-in.txt"])
    )
    name = unique("conformance")
    build = Template.build(template, name, cpu_count=2, memory_mb=1024)
    assert build.template_id
    assert build.build_id
    assert build.name == name

    with Sandbox.create(template=build.template_id, timeout=120) as sbx:
        assert sbx.get_info().template_id == build.template_id
        assert sbx.files.read(f"{root}/greeting.txt") == "copied from the context\n"
        assert sbx.files.read(f"{root}/flavour.txt") == "vanilla\n"
        assert sbx.files.read(f"{root}/built-in.txt") == f"{root}\n"
        assert sbx.commands.run("pwd").stdout == f"{root}\n"


def run_in_terminal(sandbox, size, *lines, resize_to=None):
    """Types `lines` into a login shell on a fresh terminal and returns all it printed."""
    printed = bytearray()
    terminal = sandbox.pty.create(size, timeout=30)
    if resize_to:
        sandbox.pty.resize(terminal.pid, resize_to)
    for line in lines:
        sandbox.pty.send_stdin(terminal.pid, line.encode())
    result = terminal.wait(on_pty=printed.extend)
    assert result.exit_code == 0
    return printed.decode(errors="replace")


def test_pty_terminal(sandbox):
    printed = run_in_terminal(
        sandbox,
        PtySize(rows=24, cols=80),
        "tty && echo TERM=$TERM\n",
        "stty size | sed 's/^/size: /'\n",
        "exit\n",
    )
    assert "not a tty" not in printed, printed
    assert "TERM=xterm-256color" in printed, printed
    assert "size: 24 80" in printed, printed


def test_pty_resize_and_stream_input(sandbox):
    printed = bytearray()
    terminal = sandbox.pty.create(PtySize(rows=24, cols=80), timeout=30)
    sandbox.pty.resize(terminal.pid, PtySize(rows=50, cols=132))
    sandbox.pty.stream_input(terminal.pid, ["stty size | sed 's/^/size: /'", "\n", "exit 3\n"])
    with pytest.raises(CommandExitException) as failed:
        terminal.wait(on_pty=printed.extend)
    assert failed.value.exit_code == 3
    assert "size: 50 132" in printed.decode(errors="replace"), printed


def test_pty_bad_input(sandbox):
    terminal = sandbox.pty.create(PtySize(rows=24, cols=80), timeout=30)
    with pytest.raises(InvalidArgumentException):
        sandbox.pty.resize(terminal.pid, PtySize(rows=0, cols=0))
    assert sandbox.pty.kill(terminal.pid)
    with pytest.raises(NotFoundException):
        sandbox.pty.resize(999_999, PtySize(rows=24, cols=80))
    with pytest.raises(InvalidArgumentException):
        sandbox.pty.create(PtySize(rows=0, cols=0), timeout=30)


def test_command_stdin(sandbox):
    handle = sandbox.commands.run("cat", background=True, stdin=True)
    sandbox.commands.send_stdin(handle.pid, "typed\n")
    sandbox.commands.stream_input(handle.pid, ["stre", "amed\n"])
    sandbox.commands.close_stdin(handle.pid)
    result = handle.wait()
    assert (result.stdout, result.exit_code) == ("typed\nstreamed\n", 0)


def test_sandbox_metrics(sandbox):
    sandbox.commands.run("head -c 20000000 /dev/urandom > /tmp/metrics-blob")
    metrics = sandbox.get_metrics()
    assert metrics, "a running sandbox has at least the sample taken now"
    latest = metrics[-1]
    assert latest.cpu_count >= 1
    assert 0 <= latest.cpu_used_pct <= 100
    assert 0 < latest.mem_used <= latest.mem_total
    assert 0 < latest.disk_used <= latest.disk_total
    assert abs(latest.timestamp.timestamp() - time.time()) < 120
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_metrics(UNKNOWN_SANDBOX_ID)
    # The batch form has no SDK method: the latest sample of each sandbox that exists.
    batch = httpx.get(
        f"{os.environ['E2B_API_URL']}/sandboxes/metrics",
        params={"sandbox_ids": f"{sandbox.sandbox_id},{UNKNOWN_SANDBOX_ID}"},
        headers={"X-API-Key": os.environ["E2B_API_KEY"]},
    )
    assert batch.status_code == 200, batch.text
    assert set(batch.json()["sandboxes"]) == {sandbox.sandbox_id}
    assert batch.json()["sandboxes"][sandbox.sandbox_id]["memUsed"] > 0


def test_sandbox_memory_limit(sandbox):
    # tail keeps everything it reads while it looks for the last lines, so it grows past
    # the template's memoryMB and the kernel kills it; bash reports 128 + SIGKILL.
    with pytest.raises(CommandExitException) as killed:
        sandbox.commands.run("head -c 8000M /dev/zero | tail -n 1 >/dev/null", timeout=120)
    assert killed.value.exit_code == 137
    assert "out of memory" in (killed.value.error or ""), killed.value.error
    assert sandbox.commands.run("echo still here").stdout == "still here\n"


def test_sandbox_pause_resume():
    sbx = Sandbox.create(timeout=120)
    try:
        if ON_PODS:
            with pytest.raises(SandboxException, match="not supported by the kubernetes runtime"):
                sbx.pause()
            assert sbx.get_info().state == SandboxState.RUNNING
            return
        sbx.commands.run(
            "i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.05; done",
            background=True,
        )
        time.sleep(0.5)
        assert sbx.pause()
        assert sbx.get_info().state == SandboxState.PAUSED
        assert not sbx.pause(), "pausing a paused sandbox reports False"
        assert Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED])).next_items()
        time.sleep(1)
        resumed = Sandbox.connect(sbx.sandbox_id, timeout=120)
        assert resumed.get_info().state == SandboxState.RUNNING
        first = int(resumed.files.read("/tmp/count"))
        time.sleep(0.5)
        second = int(resumed.files.read("/tmp/count"))
        assert second > first, "the loop froze with the sandbox and goes on after resume"
    finally:
        sbx.kill()
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(sbx.sandbox_id)


def test_sandbox_lifecycle_auto_pause_resume():
    if ON_PODS:
        with pytest.raises(SandboxException, match="not supported by the kubernetes runtime"):
            Sandbox.create(timeout=60).pause()
        # A sandbox asked to pause at its timeout would lose its state there: refused.
        with pytest.raises(SandboxException, match="onTimeout: pause .* not supported by the kubernetes runtime"):
            Sandbox.create(timeout=60, lifecycle={"on_timeout": "pause"})
        return
    sbx = Sandbox.create(timeout=2, lifecycle={"on_timeout": "pause", "auto_resume": True})
    try:
        sbx.files.write("/tmp/kept.txt", "kept")
        deadline = time.monotonic() + 15
        while sbx.get_info().state != SandboxState.PAUSED:
            assert time.monotonic() < deadline, "the sandbox was not paused at its timeout"
            time.sleep(0.5)
        # Traffic resumes it, with what it had.
        assert sbx.commands.run("cat /tmp/kept.txt").stdout == "kept"
        assert sbx.get_info().state == SandboxState.RUNNING
    finally:
        sbx.kill()


# Two busy loops for 2 s, then the CPU seconds they got, from bash's `times`.
BUSY_TWO_LOOPS = "for i in 1 2; do timeout 2 sh -c 'while :; do :; done' & done; wait; times"


def cpu_seconds(times_output: str) -> float:
    children = times_output.strip().splitlines()[-1]
    return sum(
        int(minutes) * 60 + float(seconds)
        for minutes, seconds in re.findall(r"(\d+)m([\d.]+)s", children)
    )


def test_sandbox_cpu_limit(sandbox):
    one_cpu = Template.build(Template().from_template("base"), unique("one-cpu"), cpu_count=1)
    with Sandbox.create(template=one_cpu.template_id, timeout=120) as limited:
        assert limited.get_info().cpu_count == 1
        held = cpu_seconds(limited.commands.run(BUSY_TWO_LOOPS).stdout)
    free = cpu_seconds(sandbox.commands.run(BUSY_TWO_LOOPS).stdout)
    # One CPU for 2 s is 2 CPU seconds however many loops ask; the base template's two
    # CPUs give the same loops more.
    assert held < 2.5, (held, free)
    assert free > held * 1.3, (held, free)
