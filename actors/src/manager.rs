//! The RoomManager actor: room name → running [`Room`]. Creates rooms on demand.

use std::collections::HashMap;
use std::sync::Arc;

use actix::prelude::*;

use crate::config::RoomSettings;
use crate::error::RoomError;
use crate::media::MediaHandle;
use crate::room::{Room, RoomSummary, Summarize};

/// Owns the set of open rooms of this node.
pub struct RoomManager {
    settings: Arc<RoomSettings>,
    media: MediaHandle,
    rooms: HashMap<String, Addr<Room>>,
}

impl RoomManager {
    /// A new manager (not started).
    pub fn new(settings: Arc<RoomSettings>, media: MediaHandle) -> Self {
        RoomManager {
            settings,
            media,
            rooms: HashMap::new(),
        }
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
    type Result = Result<Addr<Room>, RoomError>;
    fn handle(&mut self, msg: GetRoom, ctx: &mut Self::Context) -> Self::Result {
        if let Some(a) = self.rooms.get(&msg.name) {
            if a.connected() {
                return Ok(a.clone());
            }
        }
        if !msg.create {
            return Err(RoomError::NotFound);
        }
        if self.rooms.len() >= self.settings.max_rooms {
            return Err(RoomError::TooManyRooms(self.settings.max_rooms));
        }
        let room = Room::new(
            msg.name.clone(),
            self.settings.clone(),
            self.media.clone(),
            ctx.address(),
        )
        .start();
        self.rooms.insert(msg.name, room.clone());
        Ok(room)
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
