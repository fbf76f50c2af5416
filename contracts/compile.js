#!/usr/bin/env node
// Compiles every .sol file under contracts/src and contracts/test with the pinned solcjs (npm `solc`,
// no compiler download) and writes one JSON artifact per deployable contract:
//   src/  -> <out>/<Name>.json        test/ -> <out>/test/<Name>.json
// The output is byte-reproducible (sorted keys, 2-space indent, trailing newline), so CI can recompile
// into a temp dir and compare with the committed build/ byte for byte.
//
// usage: node contracts/compile.js [--out DIR]     (DIR defaults to contracts/build)
'use strict';

const fs = require('fs');
const path = require('path');

const ROOT = __dirname;
const NODE_MODULES = path.join(ROOT, 'node_modules');
const SOURCE_DIRS = ['src', 'test'];
const EIP170_LIMIT = 24576; // bytes of runtime code a contract may have on mainnet (EIP-170)
const SETTINGS = {
  optimizer: { enabled: true, runs: 200 },
  evmVersion: 'cancun',
  viaIR: false,
  outputSelection: { '*': { '*': ['abi', 'evm.bytecode.object', 'evm.deployedBytecode.object'] } },
};
const EXPECT = { solc: '0.8.28', openzeppelin: '5.4.0' };

function fail(message) {
  process.stderr.write(`compile.js: ${message}\n`);
  process.exit(1);
}

function parseArgs(argv) {
  let out = path.join(ROOT, 'build');
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--out' && i + 1 < argv.length) out = path.resolve(argv[++i]);
    else if (argv[i].startsWith('--out=')) out = path.resolve(argv[i].slice('--out='.length));
    else fail(`unknown argument ${JSON.stringify(argv[i])} (usage: node contracts/compile.js [--out DIR])`);
  }
  return out;
}

function requirePinned() {
  let solc, ozVersion;
  try {
    solc = require(path.join(NODE_MODULES, 'solc'));
    ozVersion = JSON.parse(fs.readFileSync(path.join(NODE_MODULES, '@openzeppelin/contracts/package.json'), 'utf8')).version;
  } catch (e) {
    fail(`npm packages missing (${e.code || e.message}); run \`make contracts\` (npm ci in contracts/)`);
  }
  const solcVersion = solc.version();
  if (!solcVersion.startsWith(EXPECT.solc + '+')) fail(`solc ${solcVersion} installed, ${EXPECT.solc} pinned; run \`make contracts\``);
  if (ozVersion !== EXPECT.openzeppelin) fail(`@openzeppelin/contracts ${ozVersion} installed, ${EXPECT.openzeppelin} pinned; run \`make contracts\``);
  return { solc, solcVersion, ozVersion };
}

// Source unit names are paths relative to contracts/ with forward slashes ("src/Staking.sol"), so the
// metadata hash embedded in the bytecode does not depend on where the checkout lives.
function collectSources() {
  const sources = {};
  const walk = (rel) => {
    for (const entry of fs.readdirSync(path.join(ROOT, rel), { withFileTypes: true }).sort((a, b) => (a.name < b.name ? -1 : 1))) {
      const child = rel + '/' + entry.name;
      if (entry.isDirectory()) walk(child);
      else if (entry.isFile() && entry.name.endsWith('.sol')) sources[child] = { content: fs.readFileSync(path.join(ROOT, child), 'utf8') };
    }
  };
  for (const dir of SOURCE_DIRS) if (fs.existsSync(path.join(ROOT, dir))) walk(dir);
  if (Object.keys(sources).length === 0) fail('no .sol files under contracts/src or contracts/test');
  return sources;
}

// Only OpenZeppelin imports come from node_modules; local files are all passed in as sources, so any
// other unresolved import is an error rather than a silent read from somewhere on disk.
function findImports(importPath) {
  const normalized = path.posix.normalize(importPath);
  if (!normalized.startsWith('@openzeppelin/contracts/') || normalized.includes('..')) {
    return { error: `import ${importPath} not found (only @openzeppelin/contracts/... is resolved from node_modules)` };
  }
  const file = path.join(NODE_MODULES, normalized);
  if (!fs.existsSync(file)) return { error: `import ${importPath} not found in ${NODE_MODULES}` };
  return { contents: fs.readFileSync(file, 'utf8') };
}

function sortKeys(value) {
  if (Array.isArray(value)) return value.map(sortKeys);
  if (value && typeof value === 'object') {
    const sorted = {};
    for (const key of Object.keys(value).sort()) sorted[key] = sortKeys(value[key]);
    return sorted;
  }
  return value;
}

// Only files this script wrote earlier are removed, so `--out` pointed at a shared folder is harmless.
function isArtifact(file) {
  try {
    const a = JSON.parse(fs.readFileSync(file, 'utf8'));
    return typeof a.contractName === 'string' && a.compiler && typeof a.compiler.solc === 'string';
  } catch (e) {
    return false;
  }
}

function main() {
  const outDir = parseArgs(process.argv.slice(2));
  const { solc, solcVersion, ozVersion } = requirePinned();
  const sources = collectSources();
  const input = { language: 'Solidity', sources, settings: SETTINGS };
  const output = JSON.parse(solc.compile(JSON.stringify(input), { import: findImports }));

  const diagnostics = output.errors || [];
  for (const d of diagnostics.filter((d) => d.severity !== 'error')) process.stderr.write(d.formattedMessage + '\n');
  const errors = diagnostics.filter((d) => d.severity === 'error');
  if (errors.length) {
    // formattedMessage carries "file:line:col" and the offending source line.
    for (const d of errors) process.stderr.write(d.formattedMessage + '\n');
    fail(`${errors.length} compile error(s)`);
  }

  const artifacts = []; // [relative output path, artifact]
  const seen = new Map();
  for (const sourceName of Object.keys(sources).sort()) {
    const contracts = (output.contracts || {})[sourceName] || {};
    for (const name of Object.keys(contracts).sort()) {
      const evm = contracts[name].evm;
      if (!evm.bytecode.object) continue; // interfaces and abstract contracts have no code
      if (seen.has(name)) fail(`contract name ${name} defined in both ${seen.get(name)} and ${sourceName}`);
      seen.set(name, sourceName);
      const runtimeBytes = evm.deployedBytecode.object.length / 2;
      const initBytes = evm.bytecode.object.length / 2;
      if (runtimeBytes > EIP170_LIMIT) fail(`${sourceName}:${name} runtime code is ${runtimeBytes} bytes, over the EIP-170 limit of ${EIP170_LIMIT}`);
      const sub = sourceName.startsWith('test/') ? 'test/' : '';
      artifacts.push([sub + name + '.json', {
        contractName: name,
        sourceName,
        abi: contracts[name].abi,
        bytecode: '0x' + evm.bytecode.object,
        deployedBytecode: '0x' + evm.deployedBytecode.object,
        compiler: { solc: solcVersion, openzeppelin: ozVersion, optimizerRuns: SETTINGS.optimizer.runs, evmVersion: SETTINGS.evmVersion },
      }, runtimeBytes, initBytes]);
    }
  }

  // Write, then drop artifacts of contracts that no longer exist, so build/ mirrors the sources exactly.
  const written = new Set();
  for (const [rel, artifact, runtimeBytes, initBytes] of artifacts) {
    const file = path.join(outDir, rel);
    fs.mkdirSync(path.dirname(file), { recursive: true });
    fs.writeFileSync(file, JSON.stringify(sortKeys(artifact), null, 2) + '\n');
    written.add(path.resolve(file));
    const pct = ((100 * runtimeBytes) / EIP170_LIMIT).toFixed(1);
    process.stdout.write(`${artifact.contractName.padEnd(16)} ${artifact.sourceName.padEnd(26)} runtime ${String(runtimeBytes).padStart(5)} bytes (${pct.padStart(4)}% of EIP-170)  init ${String(initBytes).padStart(5)} bytes\n`);
  }
  for (const dir of [outDir, path.join(outDir, 'test')]) {
    if (!fs.existsSync(dir)) continue;
    for (const f of fs.readdirSync(dir)) {
      const full = path.resolve(dir, f);
      if (f.endsWith('.json') && !written.has(full) && isArtifact(full)) {
        fs.unlinkSync(full);
        process.stdout.write(`removed stale ${path.relative(process.cwd(), full)}\n`);
      }
    }
  }
}

main();
