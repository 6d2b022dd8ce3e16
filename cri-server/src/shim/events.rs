//! crispd's events endpoint: the ttrpc `containerd.services.events.ttrpc.v1.Events` service
//! the shims publish to (their `TTRPC_ADDRESS`), as containerd serves it. Task exits and OOMs
//! are decoded into [`ShimEvent`]s on a broadcast channel; container lifecycle code subscribes.
//! Publishing never blocks the shim: a slow subscriber loses events and is told so by tokio.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use containerd_shim_protos::events::task::{TaskExit, TaskOOM};
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::protobuf::well_known_types::empty::Empty;
use containerd_shim_protos::shim::event::Envelope;
use containerd_shim_protos::shim::events::ForwardRequest;
use containerd_shim_protos::shim_async::{Events, create_events};
use containerd_shim_protos::ttrpc;
use containerd_shim_protos::ttrpc::r#async::{Server, TtrpcContext, transport::Listener};
use tokio::sync::broadcast;

/// What crispd cares about from a shim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShimEvent {
    /// A container's init process exited (exec process exits are `Other`).
    TaskExit {
        container_id: String,
        pid: u32,
        exit_status: u32,
        exited_at_ns: i64,
    },
    TaskOom {
        container_id: String,
    },
    Other {
        topic: String,
    },
}

pub const TOPIC_EXIT: &str = "/tasks/exit";
pub const TOPIC_OOM: &str = "/tasks/oom";

/// Where crispd serves the events service.
pub fn socket_path(state: &Path) -> PathBuf {
    state.join("events.sock")
}

/// Decode one envelope. Events whose payload does not decode are reported as `Other` with
/// the topic (and logged), never dropped silently.
pub fn decode(env: &Envelope) -> ShimEvent {
    let other = || ShimEvent::Other {
        topic: env.topic.clone(),
    };
    let value = env
        .event
        .as_ref()
        .map(|a| a.value.as_slice())
        .unwrap_or(&[]);
    match env.topic.as_str() {
        TOPIC_EXIT => match TaskExit::parse_from_bytes(value) {
            // An exec'd process exit carries the exec id in `id`; only the init process's exit
            // is the container's.
            Ok(e) if e.id.is_empty() || e.id == e.container_id => ShimEvent::TaskExit {
                exited_at_ns: e
                    .exited_at
                    .as_ref()
                    .map(|t| t.seconds.saturating_mul(1_000_000_000) + i64::from(t.nanos))
                    .unwrap_or(0),
                container_id: e.container_id,
                pid: e.pid,
                exit_status: e.exit_status,
            },
            Ok(_) => other(),
            Err(err) => {
                tracing::warn!(topic = %env.topic, error = %err, "undecodable shim event");
                other()
            }
        },
        TOPIC_OOM => match TaskOOM::parse_from_bytes(value) {
            Ok(e) => ShimEvent::TaskOom {
                container_id: e.container_id,
            },
            Err(err) => {
                tracing::warn!(topic = %env.topic, error = %err, "undecodable shim event");
                other()
            }
        },
        _ => other(),
    }
}

struct Forwarder {
    tx: broadcast::Sender<ShimEvent>,
}

#[async_trait::async_trait]
impl Events for Forwarder {
    async fn forward(&self, _ctx: &TtrpcContext, req: ForwardRequest) -> ttrpc::Result<Empty> {
        let Some(env) = req.envelope.as_ref() else {
            return Ok(Empty::new());
        };
        let ev = decode(env);
        match &ev {
            ShimEvent::Other { topic } => tracing::debug!(%topic, "shim event"),
            e => tracing::debug!(event = ?e, "shim event"),
        }
        // No subscriber is fine: nobody waits for that container.
        let _ = self.tx.send(ev);
        Ok(Empty::new())
    }
}

/// The running events server; dropping it does not stop it, [`EventsServer::shutdown`] does.
pub struct EventsServer {
    server: Server,
    path: PathBuf,
}

impl std::fmt::Debug for EventsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventsServer")
            .field("path", &self.path)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("events socket {path}: {message}")]
pub struct EventsError {
    pub path: PathBuf,
    pub message: String,
}

impl EventsServer {
    /// Serve at `path` (a stale socket from a killed crispd is replaced).
    pub async fn start(
        path: &Path,
        tx: broadcast::Sender<ShimEvent>,
    ) -> Result<EventsServer, EventsError> {
        let err = |message: String| EventsError {
            path: path.to_path_buf(),
            message,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(format!("removing stale socket: {e}"))),
        }
        let l = std::os::unix::net::UnixListener::bind(path).map_err(|e| err(e.to_string()))?;
        let l = Listener::try_from(l).map_err(|e| err(e.to_string()))?;
        let mut server = Server::new()
            .add_listener(l)
            .register_service(create_events(Arc::new(Forwarder { tx })));
        server.start().await.map_err(|e| err(e.to_string()))?;
        tracing::info!(socket = %path.display(), "serving shim events");
        Ok(EventsServer {
            server,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stop serving and remove the socket.
    pub async fn shutdown(mut self) {
        // Bounded: live shims hold connections, and SIGTERM must not wait on them.
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(2), self.server.shutdown()).await;
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim_protos::protobuf::MessageField;
    use containerd_shim_protos::protobuf::well_known_types::any::Any;
    use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;

    fn envelope(topic: &str, msg: &dyn containerd_shim_protos::protobuf::MessageDyn) -> Envelope {
        Envelope {
            topic: topic.into(),
            namespace: "k8s.io".into(),
            event: MessageField::some(Any {
                type_url: format!("containerd.events.{}", msg.descriptor_dyn().name()),
                value: msg.write_to_bytes_dyn().expect("encode"),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn decodes_exit_oom_and_others() {
        let exit = TaskExit {
            container_id: "c1".into(),
            id: "c1".into(),
            pid: 42,
            exit_status: 137,
            exited_at: MessageField::some(Timestamp {
                seconds: 2,
                nanos: 5,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            decode(&envelope(TOPIC_EXIT, &exit)),
            ShimEvent::TaskExit {
                container_id: "c1".into(),
                pid: 42,
                exit_status: 137,
                exited_at_ns: 2_000_000_005
            }
        );
        // An exec'd process exiting is not the container exiting.
        let exec_exit = TaskExit {
            id: "exec-1".into(),
            ..exit.clone()
        };
        assert_eq!(
            decode(&envelope(TOPIC_EXIT, &exec_exit)),
            ShimEvent::Other {
                topic: TOPIC_EXIT.into()
            }
        );
        let oom = TaskOOM {
            container_id: "c2".into(),
            ..Default::default()
        };
        assert_eq!(
            decode(&envelope(TOPIC_OOM, &oom)),
            ShimEvent::TaskOom {
                container_id: "c2".into()
            }
        );
        assert_eq!(
            decode(&envelope("/tasks/start", &oom)),
            ShimEvent::Other {
                topic: "/tasks/start".into()
            }
        );
        let mut torn = envelope(TOPIC_EXIT, &exit);
        if let Some(a) = torn.event.as_mut() {
            a.value = vec![0xff, 0xff, 0xff];
        }
        assert!(matches!(decode(&torn), ShimEvent::Other { .. }));
    }

    #[tokio::test]
    async fn a_publisher_reaches_subscribers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = socket_path(dir.path());
        let (tx, mut rx) = broadcast::channel(16);
        let srv = EventsServer::start(&path, tx).await.expect("serve");
        let client = ttrpc::r#async::Client::connect(&format!("unix://{}", path.display()))
            .await
            .expect("connect");
        let ev = containerd_shim_protos::shim_async::EventsClient::new(client);
        let oom = TaskOOM {
            container_id: "c9".into(),
            ..Default::default()
        };
        let req = ForwardRequest {
            envelope: MessageField::some(envelope(TOPIC_OOM, &oom)),
            ..Default::default()
        };
        ev.forward(
            crate::shim::client::ctx(std::time::Duration::from_secs(2)),
            &req,
        )
        .await
        .expect("forward");
        let got = rx.recv().await.expect("event");
        assert_eq!(
            got,
            ShimEvent::TaskOom {
                container_id: "c9".into()
            }
        );
        srv.shutdown().await;
        assert!(!path.exists());
    }
}
