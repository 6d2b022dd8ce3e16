//! Images: OCI distribution client, hosts.toml registry config, verified content store, safe layer unpacking into snapshots.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod artifact;
pub mod client;
pub mod content;
pub mod cri;
mod download;
pub mod error;
pub mod hosts;
pub mod images;
pub mod manifest;
pub mod reference;
pub mod store;
mod sys;
pub mod unpack;

pub use client::Auth;
pub use error::{Error, Kind, Result};
pub use images::{Config, FsInfo, FsUsage, GcReport, Images};
pub use reference::{Digest, Reference};
pub use store::ImageRecord;
