//! The relay fabric's I/O glue: the room directory (Raft) and room links (quinn streams) behind
//! the actors' [`Directory`] trait, the acceptor for links peers open to us, and the hand-over
//! of node connections to the media thread (which sends and reads media datagrams itself).

use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use arbor_actors::fabric::{BoxFuture, Directory, LinkIo, LINK_QUEUE};
use arbor_actors::manager::{AcceptLink, RoomManager};
use arbor_actors::media::{Command, MediaHandle};
use arbor_proto::relay::encode_link_frame;
use arbor_topology::transport::{read_link_frame, NetHandle};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::cluster::ClusterHandle;

/// How long opening a room link waits for the QUIC connection to the peer (the room retries,
/// re-resolving the origin, so a dead origin costs little).
const LINK_CONNECT_WAIT: Duration = Duration::from_secs(1);
/// Room links peers opened and not yet handed to a room.
const ACCEPT_QUEUE: usize = 256;
/// How often the media thread is told about new or replaced node connections.
const CONNECTION_SYNC: Duration = Duration::from_millis(200);
/// Longest room name accepted on a link.
const MAX_ROOM_NAME: usize = 256;

/// [`Directory`] over this node's cluster member.
pub struct ClusterDirectory {
    cluster: ClusterHandle,
    net: NetHandle,
}

impl ClusterDirectory {
    pub fn new(cluster: ClusterHandle, net: NetHandle) -> Arc<Self> {
        Arc::new(ClusterDirectory { cluster, net })
    }
}

impl Directory for ClusterDirectory {
    fn node_id(&self) -> u64 {
        self.net.node_id()
    }

    fn resolve(&self, room: String) -> BoxFuture<Result<u64, String>> {
        let c = self.cluster.clone();
        Box::pin(async move {
            // The applied state usually knows the room; only new rooms cost a Raft write.
            let known = c.list_rooms().await.map_err(|e| e.to_string())?;
            if let Some(r) = known.iter().find(|r| r.name == room) {
                return Ok(r.origin_node);
            }
            let (r, _) = c
                .create_room_with(&room, None)
                .await
                .map_err(|e| e.to_string())?;
            Ok(r.origin_node)
        })
    }

    fn open_link(&self, peer: u64, room: String) -> BoxFuture<Result<LinkIo, String>> {
        let net = self.net.clone();
        Box::pin(async move {
            let (send, recv) = net
                .open_link(peer, &room, LINK_CONNECT_WAIT)
                .await
                .map_err(|e| e.to_string())?;
            Ok(bridge(peer, send, recv))
        })
    }
}

/// Turns a link stream into two bounded queues (see [`LinkIo`]): a writer task encodes what
/// the room sends, a reader task decodes what the peer sends (back-pressure: a slow room
/// stalls the reader, and QUIC flow control the peer). Either end closing ends both.
fn bridge(peer: u64, mut send: quinn::SendStream, mut recv: quinn::RecvStream) -> LinkIo {
    let (to_net, mut to_net_rx) = mpsc::channel(LINK_QUEUE);
    let (from_net_tx, from_net) = mpsc::channel(LINK_QUEUE);
    tokio::spawn(async move {
        while let Some(m) = to_net_rx.recv().await {
            let Ok(bytes) = encode_link_frame(m) else {
                tracing::warn!(peer, "room link frame too large; dropped");
                continue;
            };
            if send.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = send.shutdown().await;
    });
    tokio::spawn(async move {
        loop {
            match read_link_frame(&mut recv).await {
                Ok(Some(m)) => {
                    if from_net_tx.send(m).await.is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(peer, error = %e, "room link closed");
                    break;
                }
            }
        }
        let _ = recv.stop(0u32.into());
    });
    LinkIo {
        tx: to_net,
        rx: from_net,
    }
}

/// Starts the fabric's background tasks: accepting room links, and keeping the media thread's
/// set of node connections current.
pub fn start(net: NetHandle, manager: Addr<RoomManager>, media: MediaHandle) {
    let mut inbound = net.accept_links(ACCEPT_QUEUE);
    tokio::spawn(async move {
        while let Some(l) = inbound.recv().await {
            if l.hello.room.is_empty() || l.hello.room.len() > MAX_ROOM_NAME {
                tracing::warn!(peer = l.peer, "room link with a bad room name; dropped");
                continue;
            }
            let io = bridge(l.peer, l.send, l.recv);
            manager.do_send(AcceptLink {
                room: l.hello.room,
                peer: l.peer,
                io,
            });
        }
    });
    tokio::spawn(async move {
        let mut known: std::collections::BTreeMap<u64, usize> = Default::default();
        let mut tick = tokio::time::interval(CONNECTION_SYNC);
        loop {
            tick.tick().await;
            for (node, conn) in net.connections() {
                if known.get(&node) == Some(&conn.stable_id()) {
                    continue;
                }
                let id = conn.stable_id();
                if media.send(Command::RelayConnection { node, conn }).is_ok() {
                    known.insert(node, id);
                }
            }
        }
    });
}
