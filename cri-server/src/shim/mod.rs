//! crispd's side of the shim: the client that starts a pod's shim and talks ttrpc to it
//! (`client`: task and sandbox services, one typed call error), and the events endpoint the
//! shims publish task exits and OOMs to (`events`).

pub mod client;
pub mod events;
