// Drives headless Debian Chromium (through playwright-core, never a downloaded browser) for the
// browser end-to-end test. One page publishes fake camera + microphone with livekit-client, a second
// page subscribes and renders. The driver only observes and reports: it prints progress lines on
// stderr and one final line `RESULT {json}` on stdout; pytest (test_browser.py) makes the assertions.
//
// Usage: node drive.mjs '{"pageBase":"http://127.0.0.1:PORT/index.html","wsUrl":"ws://127.0.0.1:7880",
//                         ["subWsUrl":"ws://127.0.0.1:7890" (subscriber page on another node),]
//                         "pubToken":"…","subToken":"…","watchSeconds":10}'
// Every wait is bounded; the whole run is bounded by `hardLimitSeconds` (default 150). With
// `holdSeconds`, the pages stay open after RESULT until stdin gets a line or closes (at most that long).
import { chromium } from 'playwright-core';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const cfg = JSON.parse(process.argv[2]);
const watchSeconds = cfg.watchSeconds ?? 10;
const hardLimit = setTimeout(() => {
  console.error('drive.mjs: hard time limit reached');
  process.stdout.write(`RESULT ${JSON.stringify({ error: 'hard time limit reached', ...result })}\n`);
  process.exit(3);
}, (cfg.hardLimitSeconds ?? 150) * 1000);

const result = { pub: null, sub: null, samples: [] };
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const say = (msg) => {
  const text = String(msg);
  // Long lines (signalling URLs carry whole tokens and join requests) are cut for readability.
  console.error(`[drive ${new Date().toISOString()}] ${text.length > 400 ? `${text.slice(0, 400)}…` : text}`);
};

async function waitFor(page, what, predicate, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const st = await page.evaluate(() => {
      const s = window.arborState;
      return s ? JSON.parse(JSON.stringify({ ...s, _videoTrack: undefined })) : null;
    });
    if (st && st.error) throw new Error(`${what}: page error: ${st.error}\n${st.log.join('\n')}`);
    if (st && predicate(st)) return st;
    if (Date.now() > deadline) {
      throw new Error(`${what}: timed out after ${timeoutMs} ms; state=${JSON.stringify(st)}`);
    }
    await sleep(200);
  }
}

const userDataDir = mkdtempSync(join(tmpdir(), 'arbor-chromium-'));
let context;
try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: cfg.chromium ?? '/usr/bin/chromium',
    headless: true,
    args: [
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
    ],
  });
  const open = async (role, token) => {
    const page = await context.newPage();
    page.on('console', (m) => say(`${role} console.${m.type()}: ${m.text()}`));
    page.on('pageerror', (e) => say(`${role} pageerror: ${e}`));
    // `subWsUrl` (optional): the subscriber page connects to another node of a cluster.
    const url = role === 'subscribe' && cfg.subWsUrl ? cfg.subWsUrl : cfg.wsUrl;
    const q = new URLSearchParams({ url, access_token: token, role });
    await page.goto(`${cfg.pageBase}?${q}`);
    return page;
  };

  say('opening publisher page');
  const pub = await open('publish', cfg.pubToken);
  result.pub = await waitFor(pub, 'publisher connect+publish', (s) => s.connected && s.published.length >= 2, 45000);
  say(`publisher connected in ${result.pub.connectMs} ms, published ${JSON.stringify(result.pub.published)}`);
  process.stdout.write(`PUBLISHED ${JSON.stringify(result.pub.published)}\n`);

  say('opening subscriber page');
  const sub = await open('subscribe', cfg.subToken);
  result.sub = await waitFor(sub, 'subscriber receives video', (s) => s.connected && s.subscribed.some((t) => t.kind === 'video'), 45000);
  say(`subscriber connected in ${result.sub.connectMs} ms, subscribed ${JSON.stringify(result.sub.subscribed)}`);

  // Wait (bounded) for the first decoded frame, then watch decoding progress for `watchSeconds`.
  const firstDeadline = Date.now() + 30000;
  for (;;) {
    const st = await sub.evaluate(() => window.arborVideoStats());
    if (st.framesDecoded > 0 && st.videoWidth > 0) { result.samples.push({ t: Date.now(), ...st }); break; }
    if (Date.now() > firstDeadline) { result.samples.push({ t: Date.now(), ...st }); throw new Error(`no decoded frame within 30 s: ${JSON.stringify(st)}`); }
    await sleep(250);
  }
  for (let i = 0; i < watchSeconds; i++) {
    await sleep(1000);
    result.samples.push({ t: Date.now(), ...(await sub.evaluate(() => window.arborVideoStats())) });
  }
  result.sub = await waitFor(sub, 'subscriber state', () => true, 5000);
  result.pub = await waitFor(pub, 'publisher state', () => true, 5000);
  say(`samples ${JSON.stringify(result.samples)}`);
} catch (e) {
  result.error = String(e && e.stack ? e.stack : e);
  say(`error: ${result.error}`);
} finally {
  process.stdout.write(`RESULT ${JSON.stringify(result)}\n`);
  // Keep the pages (and so the browser's published tracks) alive until the test has finished
  // with them: it closes our stdin or writes a line. Bounded by `holdSeconds`.
  if (cfg.holdSeconds) {
    await new Promise((resolve) => {
      const t = setTimeout(resolve, cfg.holdSeconds * 1000);
      process.stdin.once('data', () => { clearTimeout(t); resolve(); });
      process.stdin.once('end', () => { clearTimeout(t); resolve(); });
      process.stdin.resume();
    });
  }
  clearTimeout(hardLimit);
  if (context) await context.close().catch(() => {});
  rmSync(userDataDir, { recursive: true, force: true });
  process.exit(result.error ? 1 : 0);
}
