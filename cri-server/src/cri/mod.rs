//! One file per CRI call (or per small family of calls). Each handler is a plain async
//! function from the request to `Result<Response, CriError>`; `server.rs` wraps it with the
//! instrumentation that maps errors to codes.

pub mod container_lifecycle;
pub mod container_stats;
pub mod containers;
pub mod exec_sync;
pub mod pod_teardown;
pub mod pods;
pub mod run_pod;
pub mod runtime_config;
pub mod status;
pub mod update;
pub mod version;

use crate::error::CriError;
use crate::store::{Record, Store};

/// A pod or container by full id or unique prefix (crictl accepts prefixes, as containerd
/// does). `field` names the request field for the empty case, `what` the object in messages.
pub(crate) fn find_by_id_or_prefix<T: Record>(
    store: &Store,
    id: &str,
    field: &str,
    what: &str,
    id_of: fn(&T) -> &str,
) -> Result<T, CriError> {
    if id.is_empty() {
        return Err(CriError::invalid(format!("{field} is empty")));
    }
    if let Some(r) = store.get::<T>(id)? {
        return Ok(r);
    }
    let mut hits: Vec<T> = store
        .list::<T>()?
        .into_iter()
        .map(|(_, r)| r)
        .filter(|r| id_of(r).starts_with(id))
        .collect();
    match hits.len() {
        1 => Ok(hits.remove(0)),
        0 => Err(CriError::not_found(format!("{what} {id} not found"))),
        n => Err(CriError::invalid(format!(
            "{what} id prefix {id} is ambiguous ({n} matches)"
        ))),
    }
}
