// Run a script under the real MicroPython interpreter (WebAssembly port, in Node).
// usage: node tests/micropython_runner.mjs <dir to mount at /lib> <script.py>
// Exits 1 if the script raises; its output goes to stdout.
import { readFileSync, readdirSync } from "node:fs";
import { join, resolve } from "node:path";

const root = resolve(new URL("..", import.meta.url).pathname);
const pkg = join(root, ".cache/micropython/node_modules/@micropython/micropython-webassembly-pyscript/micropython.mjs");
let loadMicroPython;
try {
  ({ loadMicroPython } = await import(pkg));
} catch (e) {
  console.error(`MicroPython is not installed at ${pkg}: run 'make micropython'`);
  process.exit(2);
}
const [libDir, script] = process.argv.slice(2);
const mp = await loadMicroPython({
  stdout: (line) => process.stdout.write(line.endsWith("\n") ? line : line + "\n"),
  stderr: (line) => process.stderr.write(line.endsWith("\n") ? line : line + "\n"),
});
mp.FS.mkdir("/lib");
for (const name of readdirSync(libDir).filter((n) => n.endsWith(".py"))) {
  mp.FS.writeFile(`/lib/${name}`, readFileSync(join(libDir, name)));
}
try {
  mp.runPython(`import sys\nsys.path.insert(0, "/lib")\n` + readFileSync(script, "utf8"));
} catch (e) {
  console.error(String(e));
  process.exit(1);
}
