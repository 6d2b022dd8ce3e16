//! Images: OCI distribution client, hosts.toml registry config, verified content store, safe layer unpacking into snapshots.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod client;
pub mod content;
pub mod error;
pub mod hosts;
pub mod manifest;
pub mod reference;
mod sys;
pub mod unpack;

pub use error::{Error, Kind, Result};
pub use reference::{Digest, Reference};
