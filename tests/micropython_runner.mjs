// Run a Python script under the real MicroPython interpreter (its
// WebAssembly port, npm @micropython/micropython-webassembly-pyscript, which
// `make micropython` installs into .cache/micropython).
//
// usage: node tests/micropython_runner.mjs <script.py>
//
// Every firmware/*.py is copied to /lib in MicroPython's in-memory file
// system (on sys.path) and the script to /tests, then run as __main__.
// Exit status: 0 the script ran through, 1 it raised (traceback on stderr),
// 2 the runner could not start (the message says what to do).
import { existsSync, readFileSync, readdirSync } from "node:fs";
import { basename, dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const firmware = join(root, "firmware");
const pkg = join(root, ".cache/micropython/node_modules/@micropython/micropython-webassembly-pyscript/micropython.mjs");

function fail(message) {
  process.stderr.write(`micropython_runner: ${message}\n`);
  process.exit(2);
}

const [script, ...extra] = process.argv.slice(2);
if (!script || extra.length) fail("usage: node tests/micropython_runner.mjs <script.py>");
if (!existsSync(script)) fail(`no such script: ${script}`);
if (!existsSync(pkg)) fail(`MicroPython is not installed (${pkg} is missing): run 'make micropython'`);

const { loadMicroPython } = await import(pkg);
const mp = await loadMicroPython({
  stdout: (line) => process.stdout.write(line + "\n"),  // line-buffered: lines come without "\n"
  stderr: (line) => process.stderr.write(line + "\n"),
});

mp.FS.mkdir("/lib");
for (const name of readdirSync(firmware).filter((n) => n.endsWith(".py") && n !== "__init__.py")) {
  mp.FS.writeFile(`/lib/${name}`, readFileSync(join(firmware, name)));
}
mp.FS.mkdir("/tests");
const target = `/tests/${basename(script)}`;
mp.FS.writeFile(target, readFileSync(script));

// compile() with the file's name, so tracebacks point at the script's own lines.
const launch = `import sys
sys.path.insert(0, "/lib")
with open(${JSON.stringify(target)}) as f:
    exec(compile(f.read(), ${JSON.stringify(target)}, "exec"), {"__name__": "__main__"})
`;
try {
  mp.runPython(launch);
} catch (error) {
  if (error.name !== "PythonError") throw error;
  process.stderr.write(error.message.endsWith("\n") ? error.message : error.message + "\n");
  process.exit(1);
}
