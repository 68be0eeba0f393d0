// Sandcastle's interpreter for MCP run_code in JavaScript: one long-lived Node process
// per context, in the sandbox. Requests arrive one JSON per line; each answer follows a
// marker only the server knows.
"use strict";
const fs = require("fs");
const readline = require("readline");
const util = require("util");
const vm = require("vm");

const MARK = "\x1e" + process.env.SANDCASTLE_MCP_TOKEN + "\x1e";
delete process.env.SANDCASTLE_MCP_TOKEN;
// The code runs in this process's own global scope, as in Node's REPL, so what it
// declares stays for the next call; `require` is put there since scripts lack it.
globalThis.require = require;

let cells = 0;

function describe(error) {
  if (error && error.code === "ERR_SCRIPT_EXECUTION_TIMEOUT") {
    return {
      name: "TimeoutError",
      value: "interrupted after " + error.timeout + "s; the context keeps its state",
      traceback: "",
    };
  }
  if (error instanceof Error || (error && typeof error.stack === "string")) {
    const stack = String(error.stack || "");
    // The frames of the code only: the interpreter's own are noise to the caller.
    const mine = stack.split("\n").filter((line) => !line.includes(__filename) && !line.includes("node:"));
    return { name: error.name || "Error", value: String(error.message), traceback: mine.join("\n") };
  }
  return { name: "Error", value: util.inspect(error), traceback: "" };
}

async function execute(request) {
  const timeout = Number(request.timeout || 60);
  cells += 1;
  try {
    const script = new vm.Script(request.code, { filename: "<cell-" + cells + ">" });
    let value = script.runInThisContext({ timeout: Math.ceil(timeout * 1000), breakOnSigint: true });
    if (value && typeof value.then === "function") {
      let timer;
      const expired = new Promise((_, reject) => {
        timer = setTimeout(() => reject(Object.assign(new Error("timeout"), { code: "ERR_SCRIPT_EXECUTION_TIMEOUT" })), timeout * 1000);
      });
      try {
        value = await Promise.race([value, expired]);
      } finally {
        clearTimeout(timer);
      }
    }
    return { result: value === undefined ? null : { text: util.inspect(value) }, error: null };
  } catch (error) {
    if (error && error.code === "ERR_SCRIPT_EXECUTION_TIMEOUT") error.timeout = timeout;
    return { result: null, error: describe(error) };
  }
}

const lines = readline.createInterface({ input: process.stdin, terminal: false });
const queue = [];
let busy = false;
async function drain() {
  if (busy) return;
  busy = true;
  while (queue.length) {
    const answer = await execute(JSON.parse(queue.shift()));
    fs.writeSync(2, MARK);
    fs.writeSync(1, MARK + JSON.stringify(answer) + "\n");
  }
  busy = false;
}
lines.on("line", (line) => {
  queue.push(line);
  drain();
});
