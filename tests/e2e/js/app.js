// Browser side of Arbor's end-to-end tests: a page that runs the real `livekit-client` SDK.
//
// The page is bundled with esbuild into `public/app.js` and opened by `drive.mjs` as
//   index.html?url=ws://127.0.0.1:PORT&access_token=JWT&role=publish|subscribe
// It never decides pass/fail itself: it exposes what it observed on `window.arborState`, and the
// driver polls that object. Every field is filled from the SDK's own events or from WebRTC stats.
import { Room, RoomEvent, Track, VideoPresets } from 'livekit-client';

const params = new URLSearchParams(location.search);
const state = {
  role: params.get('role') || 'subscribe',
  connected: false,
  connectMs: null,
  error: null,
  published: [],
  subscribed: [],
  remoteParticipants: [],
  video: null,
  qualityUpdates: [],
  log: [],
};
window.arborState = state;

function log(msg) {
  state.log.push(`${new Date().toISOString()} ${msg}`);
  if (state.log.length > 200) state.log.shift();
}

// Current decoder statistics of the subscribed video and audio tracks, from `RTCRtpReceiver.getStats()`.
window.arborVideoStats = async () => {
  const el = document.querySelector('video');
  const out = {
    videoWidth: el ? el.videoWidth : 0,
    videoHeight: el ? el.videoHeight : 0,
    framesDecoded: 0,
    framesReceived: 0,
    audioSamplesReceived: 0,
    audioConcealedSamples: 0,
  };
  const track = state._videoTrack;
  if (track && track.receiver) {
    const report = await track.receiver.getStats();
    report.forEach((s) => {
      if (s.type === 'inbound-rtp' && s.kind === 'video') {
        out.framesDecoded = s.framesDecoded || 0;
        out.framesReceived = s.framesReceived || 0;
        out.frameWidth = s.frameWidth || 0;
        out.frameHeight = s.frameHeight || 0;
        out.codecId = s.codecId;
      }
    });
  }
  const audio = state._audioTrack;
  if (audio && audio.receiver) {
    const report = await audio.receiver.getStats();
    report.forEach((s) => {
      if (s.type === 'inbound-rtp' && s.kind === 'audio') {
        out.audioSamplesReceived = s.totalSamplesReceived || 0;
        out.audioConcealedSamples = s.concealedSamples || 0;
      }
    });
  }
  return out;
};

// Per-layer sender statistics of the published camera (role=simulcast): for each rid, the
// outbound-rtp counters and the `active` flag of its encoding in `RTCRtpSender.getParameters()`
// (which livekit-client flips on SubscribedQualityUpdate when dynacast is on).
window.arborSenderStats = async () => {
  const pub = state._cameraPub;
  const sender = pub && pub.track && pub.track.sender;
  const out = { t: Date.now(), layers: {}, encodings: [] };
  if (!sender) return out;
  for (const e of sender.getParameters().encodings || []) {
    out.encodings.push({ rid: e.rid, active: e.active, maxBitrate: e.maxBitrate, scale: e.scaleResolutionDownBy });
  }
  const report = await sender.getStats();
  report.forEach((s) => {
    if (s.type === 'outbound-rtp' && s.kind === 'video') {
      out.layers[s.rid || '-'] = {
        bytesSent: s.bytesSent || 0,
        framesEncoded: s.framesEncoded || 0,
        frameWidth: s.frameWidth || 0,
        frameHeight: s.frameHeight || 0,
        active: s.active,
        qualityLimitationReason: s.qualityLimitationReason,
        targetBitrate: s.targetBitrate,
        nackCount: s.nackCount || 0,
        pliCount: s.pliCount || 0,
        firCount: s.firCount || 0,
        keyFramesEncoded: s.keyFramesEncoded || 0,
        retransmittedPacketsSent: s.retransmittedPacketsSent || 0,
        scalabilityMode: s.scalabilityMode,
        encoderImplementation: s.encoderImplementation,
        mimeType: s.codecId && report.get(s.codecId) ? report.get(s.codecId).mimeType : undefined,
      };
    }
  });
  return out;
};

// Asks the server for a resolution instead of a quality, as adaptive stream does: every remote
// video publication gets `setVideoDimensions` (UpdateTrackSettings with width/height).
window.arborSetDimensions = (width, height) => {
  let n = 0;
  for (const p of window.arborRoom.remoteParticipants.values()) {
    for (const pub of p.videoTrackPublications.values()) {
      pub.setVideoDimensions({ width, height });
      n += 1;
    }
  }
  log(`setVideoDimensions ${width}x${height} on ${n} publications`);
  return n;
};

// Asks the server for a frame rate, as `RemoteTrackPublication.setVideoFPS` does
// (UpdateTrackSettings.fps: the server forwards the temporal layers that give it).
window.arborSetFps = (fps) => {
  let n = 0;
  for (const p of window.arborRoom.remoteParticipants.values()) {
    for (const pub of p.videoTrackPublications.values()) {
      pub.setVideoFPS(fps);
      n += 1;
    }
  }
  log(`setVideoFPS ${fps} on ${n} publications`);
  return n;
};

// Reads the counter grid (see tests/e2e/helpers.py: 8x4 cells, rows 0-1 the 16 bits, rows 2-3
// their complement) from every decoded frame, so a corrupt decode is caught in the browser too.
// Each frame is drawn onto a 64x32 canvas; the centre of each cell is averaged.
const grid = { frames: 0, readable: 0, unreadable: 0, sizes: {}, bad: [], last: null };
state.grid = grid;
// Decides whether the 64x32 RGBA pixels of a downscaled frame show a valid counter grid.
function readGrid(px) {
  const bits = [];
  for (let row = 0; row < 4; row++) {
    for (let col = 0; col < 8; col++) {
      // Cell (row, col) covers x 8*col..8*col+7, y 8*row..8*row+7: average its 4x4 centre.
      let sum = 0;
      for (let y = 8 * row + 2; y < 8 * row + 6; y++) {
        for (let x = 8 * col + 2; x < 8 * col + 6; x++) {
          const i = (y * 64 + x) * 4;
          sum += 0.299 * px[i] + 0.587 * px[i + 1] + 0.114 * px[i + 2];
        }
      }
      const mean = sum / 16;
      if (mean >= 80 && mean <= 176) return null;
      bits.push(mean > 128 ? 1 : 0);
    }
  }
  for (let i = 0; i < 16; i++) if (bits[i] === bits[i + 16]) return null;
  return bits.slice(0, 16).reduce((v, b, i) => v | (b << i), 0);
}

function recordGrid(value, size) {
  grid.frames += 1;
  grid.sizes[size] = (grid.sizes[size] || 0) + 1;
  if (value !== null) {
    grid.readable += 1;
    grid.last = value;
  } else {
    grid.unreadable += 1;
    if (grid.bad.length < 20) grid.bad.push({ frame: grid.frames, size, after: grid.last, t: Date.now() });
  }
}

// Every frame the decoder outputs, read with MediaStreamTrackProcessor (not only the frames the
// compositor happens to present, which can skip a frame that arrives right behind another).
async function watchGrid(mediaStreamTrack) {
  const canvas = new OffscreenCanvas(64, 32);
  const ctx = canvas.getContext('2d', { willReadFrequently: true });
  if (typeof MediaStreamTrackProcessor === 'undefined') {
    grid.error = 'MediaStreamTrackProcessor unavailable';
    return;
  }
  grid.mode = 'MediaStreamTrackProcessor';
  const reader = new MediaStreamTrackProcessor({ track: mediaStreamTrack, maxBufferSize: 30 }).readable.getReader();
  for (;;) {
    const { value: frame, done } = await reader.read();
    if (done) return;
    try {
      ctx.drawImage(frame, 0, 0, 64, 32);
      recordGrid(readGrid(ctx.getImageData(0, 0, 64, 32).data), `${frame.displayWidth}x${frame.displayHeight}`);
    } finally {
      frame.close();
    }
  }
}

async function main() {
  const url = params.get('url');
  const token = params.get('access_token');
  // role=svc: one SVC-encoded camera track (codec=vp9|av1, scalabilityMode L3T3_KEY), the
  // layered stream the server thins per subscriber; dynacast on, as for role=simulcast.
  const svcRole = state.role === 'svc';
  const simulcastRole = state.role === 'simulcast' || svcRole;
  const svcCodec = params.get('codec') || 'vp9';
  const width = Number(params.get('width') || 960);
  const height = Number(params.get('height') || 540);
  const fps = Number(params.get('fps') || 30);
  const room = new Room({
    adaptiveStream: false,
    dynacast: simulcastRole,
    // Plain roles capture 640x360 (layers 320x180 + 640x360): two tabs stay affordable on 2 cores.
    videoCaptureDefaults: simulcastRole
      ? { resolution: { width, height, frameRate: fps } }
      : { resolution: VideoPresets.h360.resolution },
    publishDefaults: svcRole
      ? { videoCodec: svcCodec, scalabilityMode: 'L3T3_KEY', backupCodec: false, degradationPreference: 'maintain-resolution' }
      : simulcastRole
        ? { simulcast: true, videoCodec: 'vp8', videoSimulcastLayers: [VideoPresets.h180, VideoPresets.h360] }
        : undefined,
  });
  window.arborRoom = room;
  // What this Chromium can encode (the SVC test skips a codec it lacks).
  state.sendCodecs = [...new Set(((RTCRtpSender.getCapabilities && RTCRtpSender.getCapabilities('video')) || { codecs: [] })
    .codecs.map((c) => c.mimeType))];
  // Record the server's dynacast requests as they arrive (the SDK acts on them itself).
  room.engine.on('subscribedQualityUpdate', (u) => {
    const qualities = (u.subscribedCodecs && u.subscribedCodecs[0] ? u.subscribedCodecs[0].qualities : u.subscribedQualities) || [];
    const entry = { t: Date.now(), trackSid: u.trackSid, qualities: qualities.map((q) => ({ quality: q.quality, enabled: q.enabled })) };
    state.qualityUpdates.push(entry);
    if (state.qualityUpdates.length > 100) state.qualityUpdates.shift();
    log(`SubscribedQualityUpdate ${JSON.stringify(entry)}`);
  });

  room
    .on(RoomEvent.TrackSubscribed, (track, pub, participant) => {
      log(`subscribed ${track.kind} ${pub.trackSid} from ${participant.identity}`);
      state.subscribed.push({ kind: track.kind, sid: pub.trackSid, identity: participant.identity });
      const el = track.attach();
      el.muted = true;
      document.body.appendChild(el);
      if (track.kind === Track.Kind.Video && state.role === 'subscribe' && params.get('grid') === '1') {
        watchGrid(track.mediaStreamTrack).catch((e) => { grid.error = String(e); });
      }
      if (track.kind === Track.Kind.Video) state._videoTrack = track;
      if (track.kind === Track.Kind.Audio) state._audioTrack = track;
    })
    .on(RoomEvent.ParticipantConnected, (p) => {
      log(`participant connected ${p.identity}`);
      state.remoteParticipants.push(p.identity);
    })
    .on(RoomEvent.LocalTrackPublished, (pub) => {
      log(`published ${pub.kind} ${pub.trackSid}`);
      state.published.push({ kind: pub.kind, sid: pub.trackSid });
    })
    .on(RoomEvent.Disconnected, (reason) => {
      log(`disconnected reason=${reason}`);
      state.connected = false;
      state.disconnectReason = reason;
    });

  const t0 = performance.now();
  await room.connect(url, token, { autoSubscribe: state.role === 'subscribe' });
  state.connectMs = performance.now() - t0;
  state.connected = true;
  state.identity = room.localParticipant.identity;
  for (const p of room.remoteParticipants.values()) state.remoteParticipants.push(p.identity);
  log(`connected in ${state.connectMs.toFixed(0)} ms as ${state.identity}`);

  if (state.role === 'publish') {
    await room.localParticipant.enableCameraAndMicrophone();
  } else if (simulcastRole) {
    const pub = await room.localParticipant.setCameraEnabled(true);
    state._cameraPub = pub;
    const settings = pub.track.mediaStreamTrack.getSettings();
    state.capture = { width: settings.width, height: settings.height, frameRate: settings.frameRate };
    log(`camera ${JSON.stringify(state.capture)} layers ${JSON.stringify(window.arborSenderStats && (pub.track.sender.getParameters().encodings || []).map((e) => e.rid))}`);
  }
}

main().catch((e) => {
  state.error = `${e && e.name}: ${e && e.message}`;
  log(`error ${state.error}`);
});
