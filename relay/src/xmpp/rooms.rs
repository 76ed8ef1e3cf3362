//! The group chat rooms a session sends to (XEP-0045), as plain state: the
//! session task asks what to send and is told what happened.
//!
//! A `groupchat` message goes to a room the session has joined (as the
//! account's nick, no history): the first one for a room joins it and waits
//! for the room's self-presence; a room that refuses the join fails the
//! waiting jobs with its error condition. A room that answers `conflict`
//! (the nick is taken, e.g. by another relay replica on a server without
//! multi-session nicks) is joined again as `nick-suffix`. Rooms are joined
//! again after every new stream (a resumed stream keeps them).

use std::collections::HashMap;

use tokio_xmpp::parsers::{
    jid::BareJid,
    muc::{
        Muc,
        muc::History,
        user::{MucUser, Status},
    },
    presence::{Presence, Type as PresenceType},
};

use super::{session::Outgoing, stanza};
use crate::error::DeliveryError;

enum Room {
    /// Join presence sent as `nick`; these jobs wait for the room's answer.
    Joining {
        nick: String,
        waiting: Vec<Outgoing>,
    },
    Joined {
        nick: String,
    },
}

impl Room {
    fn nick(&self) -> &str {
        match self {
            Room::Joining { nick, .. } | Room::Joined { nick } => nick,
        }
    }
}

pub(super) struct Rooms {
    nick: String,
    /// The nick to try when `nick` is taken.
    suffixed: String,
    rooms: HashMap<BareJid, Room>,
}

/// What to do with a job for a room.
pub(super) enum Wait {
    /// The room is joined: send the job.
    SendNow(Outgoing),
    /// The job waits for the room's answer; send this join first if given.
    Queued(Option<Presence>),
    /// The job can never go to this room.
    Refused(Outgoing, DeliveryError),
}

/// What a presence meant.
pub(super) enum Joined {
    /// Not about a room we are in or joining.
    NotARoom,
    /// Joined: send these jobs.
    Ready(BareJid, Vec<Outgoing>),
    /// The nick was taken: send this join as the suffixed nick.
    TryAnotherNick(Presence),
    /// The room refused the join: fail these jobs.
    Refused(BareJid, Vec<Outgoing>, DeliveryError),
    /// We are no longer in the room.
    Left(BareJid),
}

impl Rooms {
    pub(super) fn new(nick: String, suffix: String) -> Self {
        let suffixed = format!("{nick}-{suffix}");
        Self { nick, suffixed, rooms: HashMap::new() }
    }

    /// Where a job for `room` goes.
    pub(super) fn wait_for(&mut self, room: &BareJid, job: Outgoing) -> Wait {
        match self.rooms.get_mut(room) {
            Some(Room::Joined { .. }) => Wait::SendNow(job),
            Some(Room::Joining { nick, waiting }) => {
                // Jobs whose own wait ended (ack timeout) are gone: keep
                // only the live ones. If none was left, the room has not
                // answered for that long: ask again.
                let before = waiting.len();
                waiting.retain(|w| !w.reply.is_closed());
                let unanswered = before > 0 && waiting.is_empty();
                waiting.push(job);
                if !unanswered {
                    return Wait::Queued(None);
                }
                let nick = nick.clone();
                match join(room, &nick) {
                    Ok(presence) => Wait::Queued(Some(presence)),
                    Err(_) => Wait::Queued(None),
                }
            }
            None => match join(room, &self.nick) {
                Ok(presence) => {
                    self.rooms.insert(room.clone(), Room::Joining { nick: self.nick.clone(), waiting: vec![job] });
                    Wait::Queued(Some(presence))
                }
                Err(error) => Wait::Refused(job, error),
            },
        }
    }

    /// After a new stream: every room must be joined again.
    pub(super) fn rejoin_all(&mut self) -> Vec<Presence> {
        let mut joins = Vec::new();
        for (room, state) in &mut self.rooms {
            if let Room::Joined { nick } = state {
                *state = Room::Joining { nick: nick.clone(), waiting: Vec::new() };
            }
            if let Ok(presence) = join(room, state.nick()) {
                joins.push(presence);
            }
        }
        joins
    }

    pub(super) fn on_presence(&mut self, presence: &Presence) -> Joined {
        let Some(from) = presence.from.as_ref() else { return Joined::NotARoom };
        let room = from.to_bare();
        let Some(state) = self.rooms.get(&room) else { return Joined::NotARoom };
        let own = from.resource().is_some_and(|r| r.as_str() == state.nick())
            || presence
                .payloads
                .iter()
                .filter_map(|p| MucUser::try_from(p.clone()).ok())
                .any(|u| u.status.contains(&Status::SelfPresence));
        match presence.type_ {
            PresenceType::Error => {
                let (kind, condition) = stanza::error_in(&presence.payloads);
                if condition == "conflict" && state.nick() == self.nick {
                    let suffixed = self.suffixed.clone();
                    if let (Ok(presence), Some(Room::Joining { nick, .. })) =
                        (join(&room, &suffixed), self.rooms.get_mut(&room))
                    {
                        *nick = suffixed;
                        return Joined::TryAnotherNick(presence);
                    }
                }
                let reason = format!("room {room} refused the join: {condition} ({kind})");
                let error =
                    if kind == "wait" { DeliveryError::Transient(reason) } else { DeliveryError::Permanent(reason) };
                match self.rooms.remove(&room) {
                    Some(Room::Joining { waiting, .. }) => Joined::Refused(room, waiting, error),
                    _ => Joined::Refused(room, Vec::new(), error),
                }
            }
            PresenceType::Unavailable if own => {
                self.rooms.remove(&room);
                Joined::Left(room)
            }
            PresenceType::None if own => {
                let nick = state.nick().to_owned();
                match self.rooms.insert(room.clone(), Room::Joined { nick }) {
                    Some(Room::Joining { waiting, .. }) => Joined::Ready(room, waiting),
                    _ => Joined::NotARoom,
                }
            }
            _ => Joined::NotARoom,
        }
    }
}

/// The join presence for `room` as `nick`, with no history.
fn join(room: &BareJid, nick: &str) -> Result<Presence, DeliveryError> {
    let occupant = room
        .with_resource_str(nick)
        .map_err(|e| DeliveryError::Permanent(format!("nick {nick:?} is not valid in room {room}: {e}")))?;
    let mut presence = Presence::available().with_to(occupant);
    presence.add_payload(Muc::new().with_history(History::new().with_maxstanzas(0)));
    Ok(presence)
}
