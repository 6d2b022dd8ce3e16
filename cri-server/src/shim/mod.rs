//! crispd's side of the shim: the client that starts a pod's shim and talks ttrpc to it
//! (`client`: task and sandbox services, one typed call error), and the events endpoint the
//! shims publish task exits and OOMs to (`events`), and the watched socket under each
//! connection (`transport`: a typed "the shim is gone").

pub mod client;
pub mod events;
pub mod transport;
