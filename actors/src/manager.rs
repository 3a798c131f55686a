//! The RoomManager actor: room name → running [`Room`]. Creates rooms on demand.

use std::collections::HashMap;
use std::sync::Arc;

use actix::prelude::*;

use crate::config::RoomSettings;
use crate::error::RoomError;
use crate::fabric::Resolved;
use crate::fabric::{Directory, LinkIo};
use crate::media::MediaPlane;
use crate::room::{AttachLink, FabricRole, Room, RoomSummary, Summarize};

/// Owns the set of open rooms of this node.
pub struct RoomManager {
    settings: Arc<RoomSettings>,
    media: MediaPlane,
    rooms: HashMap<String, Addr<Room>>,
    /// Clustered node: the room directory (rooms are origins or edges, see [`crate::fabric`]).
    fabric: Option<Arc<dyn Directory>>,
}

impl RoomManager {
    /// A new manager (not started).
    pub fn new(settings: Arc<RoomSettings>, media: MediaPlane) -> Self {
        RoomManager {
            settings,
            media,
            rooms: HashMap::new(),
            fabric: None,
        }
    }

    /// A manager whose rooms join the relay fabric through `directory`.
    pub fn with_fabric(mut self, directory: Arc<dyn Directory>) -> Self {
        self.fabric = Some(directory);
        self
    }

    fn live(&self, name: &str) -> Option<Addr<Room>> {
        self.rooms.get(name).filter(|a| a.connected()).cloned()
    }

    fn create(
        &mut self,
        name: String,
        resolved: Option<Resolved>,
        ctx: &mut Context<Self>,
    ) -> Result<Addr<Room>, RoomError> {
        if let Some(a) = self.live(&name) {
            return Ok(a);
        }
        if self.rooms.len() >= self.settings.max_rooms {
            return Err(RoomError::TooManyRooms(self.settings.max_rooms));
        }
        let role = match (&self.fabric, resolved) {
            (Some(d), Some(r)) => Some(FabricRole {
                directory: d.clone(),
                origin: r.origin,
                sid: r.sid,
                created_ms: r.created_ms,
            }),
            _ => None,
        };
        let media = self.media.for_room(&name);
        tracing::debug!(room = %name, shard = media.shard(), "room placed on media shard");
        let room = Room::new(
            name.clone(),
            self.settings.clone(),
            media,
            ctx.address(),
            role,
        )
        .start();
        self.rooms.insert(name, room.clone());
        Ok(room)
    }
}

/// A peer node opened a room link to this node: it is the room's origin or the peer's parent
/// in the room's relay tree. The room is created here if needed, in the role the directory
/// gives it (a parent that is not the origin runs it as an edge, which links upward itself).
#[derive(Message)]
#[rtype(result = "()")]
pub struct AcceptLink {
    pub room: String,
    pub peer: u64,
    pub io: LinkIo,
}

impl Handler<AcceptLink> for RoomManager {
    type Result = ResponseActFuture<Self, ()>;
    fn handle(&mut self, msg: AcceptLink, _ctx: &mut Self::Context) -> Self::Result {
        let Some(dir) = self.fabric.clone() else {
            return Box::pin(actix::fut::ready(()));
        };
        if let Some(room) = self.live(&msg.room) {
            room.do_send(AttachLink {
                peer: msg.peer,
                io: msg.io,
            });
            return Box::pin(actix::fut::ready(()));
        }
        let name = msg.room.clone();
        Box::pin(actix::fut::wrap_future(dir.resolve(name)).map(
            move |resolved, act: &mut Self, ctx| {
                let resolved = match resolved {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(peer = msg.peer, error = %e, "room link refused: no origin");
                        return;
                    }
                };
                match act.create(msg.room, Some(resolved), ctx) {
                    Ok(room) => room.do_send(AttachLink {
                        peer: msg.peer,
                        io: msg.io,
                    }),
                    Err(e) => tracing::warn!(peer = msg.peer, error = %e, "room link refused"),
                }
            },
        ))
    }
}

impl Actor for RoomManager {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(1024);
    }
}

/// Find a room, creating it if `create` and the limits allow.
#[derive(Message)]
#[rtype(result = "Result<Addr<Room>, RoomError>")]
pub struct GetRoom {
    pub name: String,
    pub create: bool,
}

/// Sent by a room when it stops.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RoomStopped {
    pub name: String,
    pub addr: Addr<Room>,
}

/// Summaries of every open room.
#[derive(Message)]
#[rtype(result = "Vec<RoomSummary>")]
pub struct ListRooms;

impl Handler<GetRoom> for RoomManager {
    type Result = ResponseActFuture<Self, Result<Addr<Room>, RoomError>>;
    fn handle(&mut self, msg: GetRoom, ctx: &mut Self::Context) -> Self::Result {
        if let Some(a) = self.live(&msg.name) {
            return Box::pin(actix::fut::ready(Ok(a)));
        }
        if !msg.create {
            return Box::pin(actix::fut::ready(Err(RoomError::NotFound)));
        }
        let Some(dir) = self.fabric.clone() else {
            let r = self.create(msg.name, None, ctx);
            return Box::pin(actix::fut::ready(r));
        };
        // Clustered: the directory says who originates the room (creating it with us as
        // origin if it is new); our room is the origin or an edge linked to it.
        let name = msg.name.clone();
        Box::pin(actix::fut::wrap_future(dir.resolve(name.clone())).map(
            move |resolved, act: &mut Self, ctx| {
                let resolved = resolved.map_err(RoomError::Directory)?;
                act.create(name, Some(resolved), ctx)
            },
        ))
    }
}

impl Handler<RoomStopped> for RoomManager {
    type Result = ();
    fn handle(&mut self, msg: RoomStopped, _ctx: &mut Self::Context) {
        if self.rooms.get(&msg.name) == Some(&msg.addr) {
            self.rooms.remove(&msg.name);
        }
    }
}

impl Handler<ListRooms> for RoomManager {
    type Result = ResponseFuture<Vec<RoomSummary>>;
    fn handle(&mut self, _msg: ListRooms, _ctx: &mut Self::Context) -> Self::Result {
        let rooms: Vec<Addr<Room>> = self.rooms.values().cloned().collect();
        Box::pin(async move {
            let mut out = Vec::with_capacity(rooms.len());
            for r in rooms {
                if let Ok(s) = r.send(Summarize).await {
                    out.push(s);
                }
            }
            out.sort_by(|a, b| a.info.name.cmp(&b.info.name));
            out
        })
    }
}
