// Browser side of Arbor's end-to-end tests: a page that runs the real `livekit-client` SDK.
//
// The page is bundled with esbuild into `public/app.js` and opened by `drive.mjs` as
//   index.html?url=ws://127.0.0.1:PORT&access_token=JWT&role=publish|subscribe
// It never decides pass/fail itself: it exposes what it observed on `window.arborState`, and the
// driver polls that object. Every field is filled from the SDK's own events or from WebRTC stats.
import { Room, RoomEvent, Track } from 'livekit-client';

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
  log: [],
};
window.arborState = state;

function log(msg) {
  state.log.push(`${new Date().toISOString()} ${msg}`);
  if (state.log.length > 200) state.log.shift();
}

// Current decoder statistics of the first subscribed video track, from `RTCRtpReceiver.getStats()`.
window.arborVideoStats = async () => {
  const el = document.querySelector('video');
  const out = { videoWidth: el ? el.videoWidth : 0, videoHeight: el ? el.videoHeight : 0, framesDecoded: 0, framesReceived: 0 };
  const track = state._videoTrack;
  if (track && track.receiver) {
    const report = await track.receiver.getStats();
    report.forEach((s) => {
      if (s.type === 'inbound-rtp' && s.kind === 'video') {
        out.framesDecoded = s.framesDecoded || 0;
        out.framesReceived = s.framesReceived || 0;
        out.codecId = s.codecId;
      }
    });
  }
  return out;
};

async function main() {
  const url = params.get('url');
  const token = params.get('access_token');
  const room = new Room({ adaptiveStream: false, dynacast: false });
  window.arborRoom = room;

  room
    .on(RoomEvent.TrackSubscribed, (track, pub, participant) => {
      log(`subscribed ${track.kind} ${pub.trackSid} from ${participant.identity}`);
      state.subscribed.push({ kind: track.kind, sid: pub.trackSid, identity: participant.identity });
      const el = track.attach();
      el.muted = true;
      document.body.appendChild(el);
      if (track.kind === Track.Kind.Video) state._videoTrack = track;
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
  }
}

main().catch((e) => {
  state.error = `${e && e.name}: ${e && e.message}`;
  log(`error ${state.error}`);
});
