//! One file per CRI call (or per small family of calls). Each handler is a plain async
//! function from the request to `Result<Response, CriError>` that checks the request, takes
//! the object's locks and calls the domain below (`pod`, `container`, `stats`); `server.rs`
//! wraps it with the instrumentation that maps errors to codes. Nothing below `cri/` imports
//! it.

pub mod container_lifecycle;
pub mod container_stats;
pub mod containers;
pub mod exec_sync;
pub mod pod_metrics;
pub mod pod_stats;
pub mod pod_teardown;
pub mod pods;
pub mod remove_image;
pub mod run_pod;
pub mod runtime_config;
pub mod status;
pub mod streaming;
pub mod update;
pub mod version;
