// One RoomService call through the official Node server SDK (livekit-server-sdk, JSON bodies).
//
//   node server_api.mjs <http-url> <method> '<json args>'
//
// Prints one JSON line: {"ok": <result as proto3 JSON>} or {"error": {"status", "code", "message"}}.
// pytest (test_server_api.py) calls it once per step, so it can watch the effect of each call on
// real participants in between. Credentials come from LIVEKIT_API_KEY / LIVEKIT_API_SECRET.
import {
  RoomServiceClient,
  DataPacket_Kind,
} from "livekit-server-sdk";
import { PerformRpcRequest, PerformRpcResponse } from "@livekit/protocol";

const [url, method, rawArgs] = process.argv.slice(2);
const a = JSON.parse(rawArgs || "{}");
const key = process.env.LIVEKIT_API_KEY ?? "devkey";
const secret = process.env.LIVEKIT_API_SECRET ?? "secret";
const client = new RoomServiceClient(url, key, secret, { failover: false, requestTimeout: 30 });

const toJson = (m) => (m && typeof m.toJson === "function" ? m.toJson() : m ?? null);

async function call() {
  switch (method) {
    case "CreateRoom":
      return client.createRoom(a);
    case "ListRooms":
      return { rooms: (await client.listRooms(a.names)).map(toJson) };
    case "DeleteRoom":
      await client.deleteRoom(a.room);
      return {};
    case "ListParticipants":
      return { participants: (await client.listParticipants(a.room)).map(toJson) };
    case "GetParticipant":
      return client.getParticipant(a.room, a.identity);
    case "RemoveParticipant":
      await client.removeParticipant(a.room, a.identity);
      return {};
    case "MutePublishedTrack":
      // The SDK returns the response's `track`; report it as the response message.
      return { track: toJson(await client.mutePublishedTrack(a.room, a.identity, a.trackSid, a.muted)) };
    case "UpdateParticipant":
      return client.updateParticipant(a.room, a.identity, {
        metadata: a.metadata,
        name: a.name,
        attributes: a.attributes ?? {},
        permission: a.permission,
      });
    case "UpdateSubscriptions":
      await client.updateSubscriptions(a.room, a.identity, a.trackSids, a.subscribe);
      return {};
    case "SendData":
      await client.sendData(
        a.room,
        new TextEncoder().encode(a.data),
        a.lossy ? DataPacket_Kind.LOSSY : DataPacket_Kind.RELIABLE,
        { destinationIdentities: a.destinationIdentities ?? [], topic: a.topic },
      );
      return {};
    case "UpdateRoomMetadata":
      return client.updateRoomMetadata(a.room, a.metadata);
    case "PerformRpc": {
      // livekit-server-sdk 2.19 has no performRpc helper: use its Twirp client directly.
      const req = new PerformRpcRequest({
        room: a.room,
        destinationIdentity: a.destinationIdentity,
        method: a.method,
        payload: a.payload,
        responseTimeoutMs: a.responseTimeoutMs ?? 10000,
      });
      const data = await client.rpc.request(
        "RoomService",
        "PerformRpc",
        req.toJson(),
        await client.authHeader({ roomAdmin: true, room: a.room }),
      );
      return PerformRpcResponse.fromJson(data, { ignoreUnknownFields: true });
    }
    default:
      throw new Error(`unknown method ${method}`);
  }
}

try {
  const result = await call();
  console.log(JSON.stringify({ ok: toJson(result) }));
} catch (e) {
  console.log(
    JSON.stringify({ error: { status: e.status ?? null, code: e.code ?? null, message: String(e.message) } }),
  );
}
process.exit(0);
