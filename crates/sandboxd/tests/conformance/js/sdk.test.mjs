// The official E2B JavaScript SDK against an E2B-compatible server.
//
// tests/sdk_conformance.rs starts the server and runs this file with node (its tests are
// node:test tests), with E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY pointing at it.
// Every test is one scenario of ../scenarios.txt or ../sdk_scenarios.txt, named exactly
// as listed there, so the Python suite (../test_sdk.py) and this one answer the same
// list. The assertions follow the Python suite; where the JS SDK's API or documented
// behaviour differs, the test asserts what the JS SDK documents and says so.

import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { after, before, test } from 'node:test'
import { setTimeout as sleep } from 'node:timers/promises'

import {
  AuthenticationError,
  CommandExitError,
  FileNotFoundError,
  FileType,
  FilesystemEventType,
  InvalidArgumentError,
  NotFoundError,
  Sandbox,
  SandboxError,
  SandboxNotFoundError,
  Template,
  TimeoutError,
} from 'e2b'

for (const variable of ['E2B_API_URL', 'E2B_SANDBOX_URL', 'E2B_API_KEY']) {
  assert.ok(process.env[variable], `${variable} is unset: run via tests/sdk_conformance.rs`)
}
assert.equal(process.env.E2B_DEBUG, undefined, 'E2B_DEBUG makes the SDK skip the API; unset it')

// The server's runtime, where the two differ in what they can honestly do (pause).
const ON_PODS = process.env.SANDCASTLE_RUNTIME === 'kubernetes'
const SCENARIO_LISTS = ['scenarios.txt', 'sdk_scenarios.txt'].map((name) =>
  new URL(`../${name}`, import.meta.url),
)
// A well-formed sandbox ID (20 characters of [a-z0-9]) that no server has handed out.
const UNKNOWN_SANDBOX_ID = '0nosuchsandbox000000'
const SCENARIO_CHECK = 'every_scenario_has_one_test'

const scenarios = []

// Every scenario goes through here so the completeness check below sees exactly the
// names node:test runs.
function scenario(name, fn) {
  assert.ok(!scenarios.includes(name), `scenario ${name} is defined twice`)
  scenarios.push(name)
  test(name, fn)
}

function unique(prefix) {
  return `${prefix}-${randomBytes(6).toString('hex')}`
}

// The sandbox ends `seconds` after `since`, give or take clock granularity.
function assertLifetime(info, seconds, since) {
  const expected = since.getTime() + seconds * 1000
  assert.ok(
    Math.abs(info.endAt.getTime() - expected) < 5000,
    `endAt ${info.endAt.toISOString()} is not ${seconds}s after ${since.toISOString()}`,
  )
}

// Like assert.rejects, but hands back the error so the test can look at its fields.
async function rejectsWith(promise, errorClass) {
  let caught
  await assert.rejects(promise, (err) => {
    caught = err
    return err instanceof errorClass
  })
  return caught
}

// The JS SDK has no context manager: kill the sandbox however the body ends.
async function withSandbox(opts, body) {
  const sbx = await Sandbox.create(opts)
  try {
    return await body(sbx)
  } finally {
    await sbx.kill()
  }
}

async function waitFor(condition, seconds, what) {
  const deadline = Date.now() + seconds * 1000
  while (!(await condition())) {
    assert.ok(Date.now() < deadline, `timed out after ${seconds}s waiting for ${what}`)
    await sleep(100)
  }
}

// Waits up to 10s for every `name type` in `wanted` to be among `events`, which the
// watch callback fills as events arrive.
async function assertEventsArrive(events, wanted) {
  const seen = () => new Set(events.map((event) => `${event.name} ${event.type}`))
  const missing = () => wanted.filter((key) => !seen().has(key))
  const deadline = Date.now() + 10_000
  while (missing().length > 0 && Date.now() < deadline) {
    await sleep(100)
  }
  assert.deepEqual(missing(), [], `events seen: ${JSON.stringify([...seen()])}`)
}

let sandbox

before(async () => {
  sandbox = await Sandbox.create({ timeoutMs: 600_000 })
})

after(async () => {
  await sandbox?.kill()
})

async function workdir() {
  const dir = `/tmp/${unique('conformance')}`
  assert.equal(await sandbox.files.makeDir(dir), true)
  return dir
}

scenario('sandbox_create', async () => {
  const metadata = { suite: 'conformance', case: unique('create') }
  const started = new Date()
  await withSandbox(
    { timeoutMs: 120_000, metadata, envs: { GREETING: 'hello from create' } },
    async (sbx) => {
      assert.ok(sbx.sandboxId)
      assert.equal(await sbx.isRunning(), true)
      const info = await sbx.getInfo()
      assert.equal(info.sandboxId, sbx.sandboxId)
      assert.ok(info.templateId)
      assert.deepEqual(info.metadata, metadata)
      assert.equal(info.state, 'running')
      assertLifetime(info, 120, started)
      assert.equal((await sbx.commands.run('echo $GREETING')).stdout, 'hello from create\n')
    },
  )
})

scenario('command_stdout', async () => {
  const result = await sandbox.commands.run('echo one; echo two')
  assert.deepEqual([result.stdout, result.stderr, result.exitCode], ['one\ntwo\n', '', 0])
  const many = await sandbox.commands.run('seq 1 20000')
  const expected = Array.from({ length: 20000 }, (_, i) => `${i + 1}\n`).join('')
  assert.equal(many.stdout, expected)
})

scenario('command_stderr', async () => {
  const result = await sandbox.commands.run('echo oops >&2')
  assert.deepEqual([result.stdout, result.stderr, result.exitCode], ['', 'oops\n', 0])
})

scenario('command_exit_code', async () => {
  assert.equal((await sandbox.commands.run('true')).exitCode, 0)
  const exited = await rejectsWith(sandbox.commands.run('exit 7'), CommandExitError)
  assert.equal(exited.exitCode, 7)
})

scenario('command_env', async () => {
  const result = await sandbox.commands.run('echo "$FIRST-$SECOND"', {
    envs: { FIRST: 'a', SECOND: 'b c' },
  })
  assert.equal(result.stdout, 'a-b c\n')
})

scenario('command_cwd', async () => {
  const dir = await workdir()
  assert.equal((await sandbox.commands.run('pwd', { cwd: dir })).stdout, `${dir}\n`)
  await sandbox.commands.run('echo here > relative.txt', { cwd: dir })
  assert.equal(await sandbox.files.read(`${dir}/relative.txt`), 'here\n')
})

scenario('command_failure', async () => {
  const failed = await rejectsWith(
    sandbox.commands.run('echo partial; ls /definitely/missing'),
    CommandExitError,
  )
  assert.equal(failed.exitCode, 2)
  assert.equal(failed.stdout, 'partial\n')
  assert.match(failed.stderr, /No such file or directory/)
})

scenario('command_background_connect', async () => {
  const handle = await sandbox.commands.run('sleep 2; echo finished', { background: true })
  assert.ok(handle.pid > 0)
  const running = await sandbox.commands.list()
  assert.ok(
    running.some((process) => process.pid === handle.pid),
    `pid ${handle.pid} not in ${JSON.stringify(running.map((process) => process.pid))}`,
  )
  await handle.disconnect()
  const result = await (await sandbox.commands.connect(handle.pid)).wait()
  assert.deepEqual([result.stdout, result.exitCode], ['finished\n', 0])
})

scenario('files_write_read', async () => {
  const dir = await workdir()
  const file = `${dir}/nested/dir/hello.txt`
  const info = await sandbox.files.write(file, 'hello world\n')
  assert.deepEqual([info.path, info.name, info.type], [file, 'hello.txt', FileType.FILE])
  assert.equal(await sandbox.files.read(file), 'hello world\n')
  assert.equal((await sandbox.commands.run(`cat ${file}`)).stdout, 'hello world\n')

  await sandbox.files.write(file, 'replaced')
  assert.equal(await sandbox.files.read(file), 'replaced')

  const binary = new Uint8Array(256 * 64).map((_, i) => i % 256)
  await sandbox.files.write(`${dir}/blob.bin`, binary.buffer)
  const readBack = await sandbox.files.read(`${dir}/blob.bin`, { format: 'bytes' })
  assert.ok(readBack instanceof Uint8Array)
  assert.ok(Buffer.from(readBack).equals(Buffer.from(binary)), 'binary content changed')
})

scenario('files_list', async () => {
  const dir = await workdir()
  await sandbox.files.write(`${dir}/a.txt`, '12345')
  await sandbox.files.makeDir(`${dir}/sub`)
  const entries = Object.fromEntries(
    (await sandbox.files.list(dir)).map((entry) => [entry.name, entry]),
  )
  assert.deepEqual(Object.keys(entries).sort(), ['a.txt', 'sub'])
  assert.deepEqual([entries['a.txt'].type, entries['a.txt'].size], [FileType.FILE, 5])
  assert.equal(entries['a.txt'].path, `${dir}/a.txt`)
  assert.equal(entries.sub.type, FileType.DIR)
})

scenario('files_exists', async () => {
  const dir = await workdir()
  await sandbox.files.write(`${dir}/present.txt`, 'x')
  assert.equal(await sandbox.files.exists(`${dir}/present.txt`), true)
  assert.equal(await sandbox.files.exists(dir), true)
  assert.equal(await sandbox.files.exists(`${dir}/absent.txt`), false)
})

scenario('files_make_dir', async () => {
  const dir = `${await workdir()}/x/y`
  assert.equal(await sandbox.files.makeDir(dir), true)
  assert.equal(
    await sandbox.files.makeDir(dir),
    false,
    'makeDir on an existing directory reports false',
  )
  assert.equal((await sandbox.files.getInfo(dir)).type, FileType.DIR)
  await sandbox.commands.run(`test -d ${dir}`)
})

scenario('files_remove', async () => {
  const dir = await workdir()
  await sandbox.files.write(`${dir}/gone.txt`, 'x')
  await sandbox.files.remove(`${dir}/gone.txt`)
  assert.equal(await sandbox.files.exists(`${dir}/gone.txt`), false)

  await sandbox.files.write(`${dir}/tree/leaf.txt`, 'x')
  await sandbox.files.remove(`${dir}/tree`)
  assert.equal(await sandbox.files.exists(`${dir}/tree`), false)
  assert.deepEqual(await sandbox.files.list(dir), [])
})

scenario('files_read_missing_not_found', async () => {
  const dir = await workdir()
  await rejectsWith(sandbox.files.read(`${dir}/missing.txt`), FileNotFoundError)
  await rejectsWith(sandbox.files.list(`${dir}/missing-dir`), FileNotFoundError)
})

// The Python suite's sync SDK polls a watcher (CreateWatcher/GetWatcherEvents); the JS SDK
// has no polling watcher, only the streaming WatchDir. So here the streaming watch covers
// the full event mix and what stopping it means to the JS SDK: `onExit` fires and no
// later change reaches `onEvent`.
scenario('files_watch', async () => {
  const dir = await workdir()
  await sandbox.files.makeDir(`${dir}/sub`)
  const events = []
  let exited = false
  const handle = await sandbox.files.watchDir(dir, (event) => events.push(event), {
    recursive: true,
    onExit: () => {
      exited = true
    },
  })
  try {
    await sandbox.files.write(`${dir}/new.txt`, 'one')
    await sandbox.commands.run(
      `echo deep > ${dir}/sub/deep.txt; mv ${dir}/new.txt ${dir}/moved.txt; rm ${dir}/moved.txt`,
    )
    await assertEventsArrive(events, [
      `new.txt ${FilesystemEventType.CREATE}`,
      `sub/deep.txt ${FilesystemEventType.CREATE}`,
      `new.txt ${FilesystemEventType.RENAME}`,
      `moved.txt ${FilesystemEventType.REMOVE}`,
    ])
  } finally {
    await handle.stop()
  }
  await waitFor(() => exited, 10, 'onExit after stop')
  const seenBeforeStop = events.length
  await sandbox.files.write(`${dir}/after-stop.txt`, 'x')
  await sleep(500)
  assert.deepEqual(events.slice(seenBeforeStop), [], 'events arrived after stop')
})

scenario('files_watch_stream', async () => {
  const dir = await workdir()
  // A second client connected by ID, as the Python suite does with AsyncSandbox.connect.
  const sbx = await Sandbox.connect(sandbox.sandboxId)
  const events = []
  const handle = await sbx.files.watchDir(dir, (event) => events.push(event), {
    recursive: true,
  })
  try {
    await sbx.files.write(`${dir}/streamed.txt`, 'x')
    await sbx.commands.run(`rm ${dir}/streamed.txt`)
    await assertEventsArrive(events, [
      `streamed.txt ${FilesystemEventType.CREATE}`,
      `streamed.txt ${FilesystemEventType.REMOVE}`,
    ])
  } finally {
    await handle.stop()
  }
})

scenario('sandbox_list_metadata_query', async () => {
  const suite = unique('list')
  // Characters that need URL encoding, which the SDK applies twice.
  const odd = 'a b&c=d/é'
  await withSandbox({ timeoutMs: 120_000, metadata: { suite, role: odd } }, (first) =>
    withSandbox({ timeoutMs: 120_000, metadata: { suite, role: 'second' } }, async (second) => {
      const paginator = Sandbox.list({ query: { metadata: { suite } } })
      const listed = await paginator.nextItems()
      assert.equal(paginator.hasNext, false)
      assert.deepEqual(
        new Set(listed.map((info) => info.sandboxId)),
        new Set([first.sandboxId, second.sandboxId]),
      )
      assert.ok(listed.every((info) => info.state === 'running'), JSON.stringify(listed))

      const narrowed = await Sandbox.list({ query: { metadata: { suite, role: odd } } }).nextItems()
      assert.equal(narrowed.length, 1, JSON.stringify(narrowed))
      assert.equal(narrowed[0].sandboxId, first.sandboxId)
      assert.deepEqual(narrowed[0].metadata, { suite, role: odd })

      const absent = Sandbox.list({ query: { metadata: { suite: unique('nobody') } } })
      assert.deepEqual(await absent.nextItems(), [])
    }),
  )
})

scenario('sandbox_set_timeout', async () => {
  await withSandbox({ timeoutMs: 60_000 }, async (sbx) => {
    await sbx.setTimeout(600_000)
    assertLifetime(await sbx.getInfo(), 600, new Date())
    await Sandbox.setTimeout(sbx.sandboxId, 30_000)
    assertLifetime(await sbx.getInfo(), 30, new Date())

    await sbx.setTimeout(1_000)
    await waitFor(async () => !(await sbx.isRunning()), 15, 'the sandbox to outlive its timeout')
    await rejectsWith(sbx.getInfo(), SandboxNotFoundError)
  })
})

scenario('sandbox_kill', async () => {
  const sbx = await Sandbox.create({ timeoutMs: 120_000 })
  assert.equal(await sbx.kill(), true)
  assert.equal(await sbx.isRunning(), false)
  await rejectsWith(sbx.getInfo(), SandboxNotFoundError)
  // Python raises SandboxNotRunningException (a TimeoutException) here; the JS SDK has no
  // such subclass and maps the same 502 from the sandbox proxy to a plain TimeoutError.
  await rejectsWith(sbx.files.read('/etc/hostname'), TimeoutError)
  assert.equal(await Sandbox.kill(sbx.sandboxId), false, 'killing a killed sandbox reports false')
})

scenario('sandbox_unknown_not_found', async () => {
  await rejectsWith(Sandbox.connect(UNKNOWN_SANDBOX_ID), SandboxNotFoundError)
  await rejectsWith(Sandbox.getInfo(UNKNOWN_SANDBOX_ID), SandboxNotFoundError)
  await rejectsWith(Sandbox.setTimeout(UNKNOWN_SANDBOX_ID, 30_000), SandboxNotFoundError)
  assert.equal(await Sandbox.kill(UNKNOWN_SANDBOX_ID), false)
})

scenario('api_key_rejected', async () => {
  const apiKey = `${process.env.E2B_API_KEY}-wrong`
  await rejectsWith(Sandbox.create({ timeoutMs: 60_000, apiKey }), AuthenticationError)
  await rejectsWith(Sandbox.list({ apiKey }).nextItems(), AuthenticationError)
  await rejectsWith(
    Template.build(Template().fromTemplate('base'), unique('denied'), { apiKey }),
    AuthenticationError,
  )
})

scenario('template_build', async () => {
  const context = fs.mkdtempSync(path.join(os.tmpdir(), 'sandcastle-js-template-'))
  try {
    fs.writeFileSync(path.join(context, 'greeting.txt'), 'copied from the context\n')
    const root = `/opt/${unique('conformance')}`
    const template = Template({ fileContextPath: context })
      .fromTemplate('base')
      .setWorkdir(root)
      .copy('greeting.txt', `${root}/greeting.txt`)
      .setEnvs({ BUILD_FLAVOUR: 'vanilla' })
      .runCmd(['echo "$BUILD_FLAVOUR" > flavour.txt', 'pwd > built-in.txt'])
    const name = unique('conformance')
    const build = await Template.build(template, name, { cpuCount: 2, memoryMB: 1024 })
    assert.ok(build.templateId)
    assert.ok(build.buildId)
    assert.equal(build.name, name)

    await withSandbox({ template: build.templateId, timeoutMs: 120_000 }, async (sbx) => {
      assert.equal((await sbx.getInfo()).templateId, build.templateId)
      assert.equal(await sbx.files.read(`${root}/greeting.txt`), 'copied from the context\n')
      assert.equal(await sbx.files.read(`${root}/flavour.txt`), 'vanilla\n')
      assert.equal(await sbx.files.read(`${root}/built-in.txt`), `${root}\n`)
      assert.equal((await sbx.commands.run('pwd')).stdout, `${root}\n`)
    })
  } finally {
    fs.rmSync(context, { recursive: true, force: true })
  }
})

// A login shell on a fresh terminal: the JS SDK takes the output callback at creation
// (Python passes it to wait()), so the printed bytes are collected from the start.
async function openTerminal(size) {
  const chunks = []
  const terminal = await sandbox.pty.create({
    ...size,
    timeoutMs: 30_000,
    onData: (data) => {
      chunks.push(Buffer.from(data))
    },
  })
  return { terminal, printed: () => Buffer.concat(chunks).toString('utf8') }
}

async function type(terminal, text) {
  await sandbox.pty.sendInput(terminal.pid, new TextEncoder().encode(text))
}

scenario('pty_terminal', async () => {
  const { terminal, printed } = await openTerminal({ rows: 24, cols: 80 })
  await type(terminal, 'tty && echo TERM=$TERM\n')
  await type(terminal, "stty size | sed 's/^/size: /'\n")
  await type(terminal, 'exit\n')
  const result = await terminal.wait()
  assert.equal(result.exitCode, 0)
  assert.doesNotMatch(printed(), /not a tty/)
  assert.match(printed(), /TERM=xterm-256color/)
  assert.match(printed(), /size: 24 80/)
})

// The JS SDK has no streaming-input API (Python's `pty.stream_input` is a client-streaming
// StreamInput RPC, which the JS SDK's fetch-based Connect transport cannot send), so the
// same fragments go as separate SendInput calls, split where the Python stream splits them.
scenario('pty_resize_and_stream_input', async () => {
  const { terminal, printed } = await openTerminal({ rows: 24, cols: 80 })
  await sandbox.pty.resize(terminal.pid, { rows: 50, cols: 132 })
  for (const fragment of ["stty size | sed 's/^/size: /'", '\n', 'exit 3\n']) {
    await type(terminal, fragment)
  }
  const failed = await rejectsWith(terminal.wait(), CommandExitError)
  assert.equal(failed.exitCode, 3)
  assert.match(printed(), /size: 50 132/)
})

scenario('pty_bad_input', async () => {
  const { terminal } = await openTerminal({ rows: 24, cols: 80 })
  await rejectsWith(sandbox.pty.resize(terminal.pid, { rows: 0, cols: 0 }), InvalidArgumentError)
  assert.equal(await sandbox.pty.kill(terminal.pid), true)
  await rejectsWith(sandbox.pty.resize(999_999, { rows: 24, cols: 80 }), NotFoundError)
  await rejectsWith(
    sandbox.pty.create({ rows: 0, cols: 0, timeoutMs: 30_000, onData: () => {} }),
    InvalidArgumentError,
  )
})

// No streaming input in the JS SDK (see pty_resize_and_stream_input): the part Python
// streams goes through the handle's own sendStdin in two fragments instead.
scenario('command_stdin', async () => {
  const handle = await sandbox.commands.run('cat', { background: true, stdin: true })
  await sandbox.commands.sendStdin(handle.pid, 'typed\n')
  await handle.sendStdin('stre')
  await handle.sendStdin(new TextEncoder().encode('amed\n'))
  await sandbox.commands.closeStdin(handle.pid)
  const result = await handle.wait()
  assert.deepEqual([result.stdout, result.exitCode], ['typed\nstreamed\n', 0])
})

scenario('sandbox_metrics', async () => {
  await sandbox.commands.run('head -c 20000000 /dev/urandom > /tmp/metrics-blob')
  const metrics = await sandbox.getMetrics()
  assert.ok(metrics.length > 0, 'a running sandbox has at least the sample taken now')
  const latest = metrics.at(-1)
  assert.ok(latest.cpuCount >= 1, JSON.stringify(latest))
  assert.ok(latest.cpuUsedPct >= 0 && latest.cpuUsedPct <= 100, JSON.stringify(latest))
  assert.ok(latest.memUsed > 0 && latest.memUsed <= latest.memTotal, JSON.stringify(latest))
  assert.ok(latest.diskUsed > 0 && latest.diskUsed <= latest.diskTotal, JSON.stringify(latest))
  assert.ok(Math.abs(latest.timestamp.getTime() - Date.now()) < 120_000, JSON.stringify(latest))
  await rejectsWith(Sandbox.getMetrics(UNKNOWN_SANDBOX_ID), SandboxNotFoundError)
  // The batch form has no SDK method: the latest sample of each sandbox that exists.
  const query = new URLSearchParams({ sandbox_ids: `${sandbox.sandboxId},${UNKNOWN_SANDBOX_ID}` })
  const batch = await fetch(`${process.env.E2B_API_URL}/sandboxes/metrics?${query}`, {
    headers: { 'X-API-Key': process.env.E2B_API_KEY },
  })
  assert.equal(batch.status, 200)
  const { sandboxes } = await batch.json()
  assert.deepEqual(Object.keys(sandboxes), [sandbox.sandboxId])
  assert.ok(sandboxes[sandbox.sandboxId].memUsed > 0)
})

// Two busy loops for 2 s, then the CPU seconds they got, from bash's `times`.
const BUSY_TWO_LOOPS = "for i in 1 2; do timeout 2 sh -c 'while :; do :; done' & done; wait; times"

function cpuSeconds(timesOutput) {
  const children = timesOutput.trim().split('\n').at(-1)
  let total = 0
  for (const [, minutes, seconds] of children.matchAll(/(\d+)m([\d.]+)s/g)) {
    total += Number(minutes) * 60 + Number(seconds)
  }
  return total
}

scenario('sandbox_cpu_limit', async () => {
  const oneCpu = await Template.build(Template().fromTemplate('base'), unique('one-cpu'), {
    cpuCount: 1,
  })
  const held = await withSandbox({ template: oneCpu.templateId, timeoutMs: 120_000 }, async (sbx) => {
    assert.equal((await sbx.getInfo()).cpuCount, 1)
    return cpuSeconds((await sbx.commands.run(BUSY_TWO_LOOPS)).stdout)
  })
  const free = cpuSeconds((await sandbox.commands.run(BUSY_TWO_LOOPS)).stdout)
  // One CPU for 2 s is 2 CPU seconds however many loops ask; the base template's two
  // CPUs give the same loops more.
  assert.ok(held < 2.5, `one CPU gave ${held} s, two gave ${free} s`)
  assert.ok(free > held * 1.3, `one CPU gave ${held} s, two gave ${free} s`)
})

scenario('sandbox_memory_limit', async () => {
  // tail keeps everything it reads while it looks for the last lines, so it grows past
  // the template's memoryMB and the kernel kills it; bash reports 128 + SIGKILL. Unlike
  // the Python suite, its output goes to /dev/null: on a server that does not enforce the
  // limit, the 8 GB line would otherwise overflow the SDK's stdout string (a RangeError
  // after a long wait) instead of failing on the exit code.
  const killed = await rejectsWith(
    sandbox.commands.run('head -c 8000M /dev/zero | tail -n 1 >/dev/null', {
      timeoutMs: 120_000,
    }),
    CommandExitError,
  )
  assert.equal(killed.exitCode, 137)
  assert.match(killed.error ?? '', /out of memory/)
  assert.equal((await sandbox.commands.run('echo still here')).stdout, 'still here\n')
})

async function assertPauseUnsupported(sbx) {
  const refused = await rejectsWith(sbx.pause(), SandboxError)
  assert.match(refused.message, /not supported by the kubernetes runtime/)
}

scenario('sandbox_pause_resume', async () => {
  const sbx = await Sandbox.create({ timeoutMs: 120_000 })
  try {
    if (ON_PODS) {
      await assertPauseUnsupported(sbx)
      assert.equal((await sbx.getInfo()).state, 'running')
      return
    }
    await sbx.commands.run(
      'i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.05; done',
      { background: true },
    )
    await sleep(500)
    assert.equal(await sbx.pause(), true)
    assert.equal((await sbx.getInfo()).state, 'paused')
    assert.equal(await sbx.pause(), false, 'pausing a paused sandbox reports false')
    const paused = await Sandbox.list({ query: { state: ['paused'] } }).nextItems()
    assert.ok(paused.some((info) => info.sandboxId === sbx.sandboxId), JSON.stringify(paused))
    await sleep(1000)
    const resumed = await Sandbox.connect(sbx.sandboxId, { timeoutMs: 120_000 })
    assert.equal((await resumed.getInfo()).state, 'running')
    const first = Number(await resumed.files.read('/tmp/count'))
    await sleep(500)
    const second = Number(await resumed.files.read('/tmp/count'))
    assert.ok(second > first, 'the loop froze with the sandbox and goes on after resume')
  } finally {
    await sbx.kill()
  }
  await rejectsWith(Sandbox.connect(sbx.sandboxId), SandboxNotFoundError)
})

scenario('sandbox_lifecycle_auto_pause_resume', async () => {
  if (ON_PODS) {
    await withSandbox({ timeoutMs: 60_000 }, assertPauseUnsupported)
    // A sandbox asked to pause at its timeout would lose its state there: refused.
    const refused = await rejectsWith(
      Sandbox.create({ timeoutMs: 60_000, lifecycle: { onTimeout: 'pause' } }),
      SandboxError,
    )
    assert.match(refused.message, /onTimeout: pause .* not supported by the kubernetes runtime/)
    return
  }
  await withSandbox(
    { timeoutMs: 2_000, lifecycle: { onTimeout: 'pause', autoResume: true } },
    async (sbx) => {
      await sbx.files.write('/tmp/kept.txt', 'kept')
      await waitFor(
        async () => (await sbx.getInfo()).state === 'paused',
        15,
        'the sandbox to pause at its timeout',
      )
      // Traffic resumes it, with what it had.
      assert.equal((await sbx.commands.run('cat /tmp/kept.txt')).stdout, 'kept')
      assert.equal((await sbx.getInfo()).state, 'running')
    },
  )
})

// Registered last, so every scenario() above has been recorded when it runs.
test(SCENARIO_CHECK, () => {
  const listed = SCENARIO_LISTS.flatMap((list) =>
    fs.readFileSync(list, 'utf8').split(/\s+/).filter(Boolean),
  )
  assert.equal(listed.length, new Set(listed).size, 'the scenario lists name a scenario twice')
  const missing = listed.filter((name) => !scenarios.includes(name))
  const unlisted = scenarios.filter((name) => !listed.includes(name))
  assert.deepEqual(missing, [], 'listed scenarios without a test')
  assert.deepEqual(unlisted, [], 'tests that no scenario list names')
})
