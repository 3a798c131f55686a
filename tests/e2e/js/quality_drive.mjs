// Interactive driver of headless Debian Chromium for the media-quality tests (test_quality.py).
//
// Unlike drive.mjs (one fixed scenario), this one takes commands as JSON lines on stdin and
// answers each with one line `REPLY {json}` on stdout, so the Python test can interleave browser
// observations with its own clients and network changes. Progress goes to stderr.
//
//   node quality_drive.mjs '{"videoFile": "/path/counter.y4m", "hardLimitSeconds": 300}'
//   stdin  {"seq": 1, "cmd": "open", "page": "pub", "url": "http://127.0.0.1:P/index.html?..."}
//          -> opens the page and waits (bounded) until it is connected and has published
//   stdin  {"seq": 2, "cmd": "state", "page": "pub"}   -> window.arborState
//   stdin  {"seq": 3, "cmd": "sender", "page": "pub"}  -> window.arborSenderStats()
//   stdin  {"seq": 4, "cmd": "video", "page": "sub"}   -> window.arborVideoStats() (decoder stats)
//   stdin  {"seq": 5, "cmd": "dims", "page": "sub", "width": 320, "height": 180}
//          -> setVideoDimensions on every remote video publication of that page
//   stdin  {"seq": 6, "cmd": "fps", "page": "sub", "fps": 5}  -> setVideoFPS likewise
//   stdin  {"seq": 7, "cmd": "quit"}                   -> closes the browser and exits
//
// `videoFile` (a .y4m) replaces Chromium's built-in fake camera picture, so the receivers can
// check every decoded frame. Every wait is bounded and the whole process ends by itself after
// `hardLimitSeconds`.
import { chromium } from 'playwright-core';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';

const cfg = JSON.parse(process.argv[2] || '{}');
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const say = (msg) => console.error(`[qdrive ${new Date().toISOString()}] ${msg}`);
const reply = (obj) => process.stdout.write(`REPLY ${JSON.stringify(obj)}\n`);

const userDataDir = mkdtempSync(join(tmpdir(), 'arbor-chromium-'));
let context;
const pages = new Map();

async function shutdown(code) {
  if (context) await context.close().catch(() => {});
  rmSync(userDataDir, { recursive: true, force: true });
  process.exit(code);
}

const hardLimit = setTimeout(() => {
  say('hard time limit reached');
  shutdown(3);
}, (cfg.hardLimitSeconds ?? 300) * 1000);

const pageState = (page) =>
  page.evaluate(() => {
    const s = window.arborState;
    return s ? JSON.parse(JSON.stringify({ ...s, _videoTrack: undefined, _cameraPub: undefined })) : null;
  });

async function open(name, url, timeoutMs) {
  const page = await context.newPage();
  page.on('console', (m) => say(`${name} console.${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => say(`${name} pageerror: ${e}`));
  pages.set(name, page);
  await page.goto(url);
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const st = await pageState(page);
    if (st && st.error) throw new Error(`page error: ${st.error}\n${st.log.join('\n')}`);
    const done = st && st.connected && (st.role === 'subscribe' || st.published.length > 0);
    if (done) return st;
    if (Date.now() > deadline) throw new Error(`not connected+published within ${timeoutMs} ms: ${JSON.stringify(st)}`);
    await sleep(200);
  }
}

async function handle(msg) {
  const page = msg.page ? pages.get(msg.page) : null;
  switch (msg.cmd) {
    case 'open':
      return { state: await open(msg.page, msg.url, msg.timeoutMs ?? 45000) };
    case 'state':
      if (!page) throw new Error(`no page ${msg.page}`);
      return { state: await pageState(page) };
    case 'sender':
      if (!page) throw new Error(`no page ${msg.page}`);
      return { sender: await page.evaluate(() => window.arborSenderStats()) };
    case 'video':
      if (!page) throw new Error(`no page ${msg.page}`);
      return { video: await page.evaluate(() => window.arborVideoStats()) };
    case 'dims':
      if (!page) throw new Error(`no page ${msg.page}`);
      return { n: await page.evaluate(([w, h]) => window.arborSetDimensions(w, h), [msg.width, msg.height]) };
    case 'fps':
      if (!page) throw new Error(`no page ${msg.page}`);
      return { n: await page.evaluate((f) => window.arborSetFps(f), msg.fps) };
    case 'quit':
      return { bye: true };
    default:
      throw new Error(`unknown command ${msg.cmd}`);
  }
}

try {
  const args = [
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    '--use-fake-ui-for-media-stream',
    '--use-fake-device-for-media-stream=fps=30',
    '--autoplay-policy=no-user-gesture-required',
  ];
  if (cfg.videoFile) args.push(`--use-file-for-fake-video-capture=${cfg.videoFile}`);
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: cfg.chromium ?? '/usr/bin/chromium',
    headless: true,
    args,
  });
  reply({ seq: 0, ready: true });
} catch (e) {
  reply({ seq: 0, error: String(e && e.stack ? e.stack : e) });
  await shutdown(1);
}

const rl = createInterface({ input: process.stdin });
for await (const line of rl) {
  let msg;
  try {
    msg = JSON.parse(line);
  } catch {
    continue;
  }
  try {
    const out = await handle(msg);
    reply({ seq: msg.seq, ...out });
  } catch (e) {
    reply({ seq: msg.seq, error: String(e && e.stack ? e.stack : e) });
  }
  if (msg.cmd === 'quit') break;
}
clearTimeout(hardLimit);
await shutdown(0);
