// `npm test`: runs every compiled test file with node's own test runner.
// Node 20's --test does not expand globs, so the files are listed here.
// STAGEDOOR_TEST_FILTER=<substring> runs only matching files.

import { spawn } from 'node:child_process';
import { readdirSync, statSync } from 'node:fs';
import { join, relative } from 'node:path';

const root = new URL('../dist/test/', import.meta.url).pathname;

function find(dir) {
  const out = [];
  for (const name of readdirSync(dir)) {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) out.push(...find(p));
    else if (name.endsWith('.test.js')) out.push(p);
  }
  return out;
}

const filter = process.env.STAGEDOOR_TEST_FILTER;
const files = find(root)
  .filter((f) => !filter || f.includes(filter))
  .sort();
if (files.length === 0) {
  console.error('no test files found under dist/test (did the build run?)');
  process.exit(1);
}
console.error(`running ${files.length} test files: ${files.map((f) => relative(root, f)).join(', ')}`);
const child = spawn(process.execPath, ['--test', `--test-concurrency=${process.env.STAGEDOOR_TEST_CONCURRENCY ?? 2}`, ...files], { stdio: 'inherit' });
child.on('exit', (code, signal) => process.exit(code ?? (signal ? 1 : 0)));
