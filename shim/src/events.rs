//! Task events to containerd, and `Any` packing, without protobuf reflection.
//!
//! rust-protobuf builds a message's descriptor lazily, on the first call of
//! `MessageFull::descriptor()`, and it builds the whole `.proto` file with its
//! imports: the task events import gogo.proto, which imports
//! google/protobuf/descriptor.proto. containerd-shim's `RemotePublisher`
//! encodes events through `MessageDyn` (whose writer asks for the descriptor)
//! and names them by `descriptor_dyn().full_name()`, `Any::pack` does the
//! same: the first event cost every shim ~400 KiB of heap for the rest of its
//! life, more than everything else it allocates. The shim only needs the type
//! names, so they are spelled out here; the tests compare them with the
//! descriptors.

use std::time::Duration;

use containerd_shim_protos::{
    events::task::{
        TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskOOM, TaskStart,
    },
    protobuf::{Message, well_known_types::any::Any},
    shim::{event::Envelope, events::ForwardRequest, oci::ProcessDetails},
    shim_async::{Client, EventsClient},
    ttrpc,
};
use tokio::sync::mpsc;
use tracing::warn;

/// A message with its protobuf full name, for `Any::type_url`.
pub trait Named: Message {
    const FULL_NAME: &'static str;
}

macro_rules! named {
    ($($ty:ty => $name:literal),* $(,)?) => {
        $(impl Named for $ty {
            const FULL_NAME: &'static str = $name;
        })*
    };
}

named! {
    TaskCreate => "containerd.events.TaskCreate",
    TaskStart => "containerd.events.TaskStart",
    TaskDelete => "containerd.events.TaskDelete",
    TaskExit => "containerd.events.TaskExit",
    TaskOOM => "containerd.events.TaskOOM",
    TaskExecAdded => "containerd.events.TaskExecAdded",
    TaskExecStarted => "containerd.events.TaskExecStarted",
    ProcessDetails => "containerd.runc.v1.ProcessDetails",
    containerd_shim_protos::cgroups::metrics::Metrics => "io.containerd.cgroups.v1.Metrics",
    containerd_shim_protos::cgroups_v2::metrics::Metrics => "io.containerd.cgroups.v2.Metrics",
}

/// `msg` as an `Any` whose type URL is `prefix` followed by its full name
/// (what `Any::pack` does with `type.googleapis.com/`, minus the reflection).
pub fn pack<M: Named>(prefix: &str, msg: &M) -> Result<Any, ttrpc::Error> {
    Ok(Any {
        type_url: format!("{prefix}{}", M::FULL_NAME),
        value: msg
            .write_to_bytes()
            .map_err(|e| ttrpc::Error::Others(format!("encode {}: {e}", M::FULL_NAME)))?,
        ..Default::default()
    })
}

/// Events waiting for containerd; a full queue makes `publish` wait (3 s at most).
const QUEUE: usize = 1024;
/// Forward attempts per event before it is dropped.
const ATTEMPTS: u32 = 6;
/// One forward attempt. containerd's own publisher gives each forward 5 s; without a bound a
/// peer that accepts and never answers would stall every later event for good.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
/// One connection attempt to the event service.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Forwards events to containerd's event service, one at a time and in
/// publish order (containerd-shim's publisher requeued a failed event behind
/// later ones; here a failed forward is retried before the next event).
///
/// The connection is remade after any failure but an answer from the peer: a
/// restarted containerd or crispd shows up to a ttrpc client as a socket error
/// or a closed channel, never as `RemoteClosed`, which is all containerd-shim's
/// publisher reconnected on (its shims then dropped every later event).
pub struct Publisher {
    queue: mpsc::Sender<Envelope>,
}

impl Publisher {
    /// Starts the forwarding task for containerd's ttrpc address. The first
    /// connection is tried now, so a wrong address is logged at start-up; if
    /// the peer is not there yet the task keeps trying with each event.
    pub async fn connect(address: &str) -> Publisher {
        let mut client = match Self::client(address).await {
            Ok(c) => Some(EventsClient::new(c)),
            Err(e) => {
                warn!(%address, error = %e, "event service not reachable yet; events are forwarded once it answers");
                None
            }
        };
        let address = address.to_string();
        let (queue, mut rx) = mpsc::channel::<Envelope>(QUEUE);
        tokio::spawn(async move {
            while let Some(envelope) = rx.recv().await {
                let req = ForwardRequest {
                    envelope: Some(envelope).into(),
                    ..Default::default()
                };
                for attempt in 1..=ATTEMPTS {
                    if client.is_none() {
                        client = Self::client(&address).await.ok().map(EventsClient::new);
                    }
                    let res = match &client {
                        Some(c) => forward(c, &req).await,
                        None => Err(ttrpc::Error::Others(format!("cannot connect to {address}"))),
                    };
                    let Err(e) = res else {
                        break;
                    };
                    warn!(topic = %req.envelope.topic, attempt, error = %e, "forward event");
                    if let ttrpc::Error::RpcStatus(_) = e {
                        // The peer answered and refused this event: sending it again will
                        // not change its mind, and later events must not wait behind it.
                        break;
                    }
                    client = None;
                    if attempt < ATTEMPTS {
                        tokio::time::sleep(Duration::from_secs(attempt.into())).await;
                    }
                }
            }
        });
        Publisher { queue }
    }

    /// Connects without blocking the shim's one runtime thread: ttrpc's `Client::connect`
    /// is a blocking connect(2), which waits for as long as the peer's listen queue is full
    /// (a busy crispd), and every call the shim serves would wait with it.
    async fn client(address: &str) -> Result<Client, ttrpc::Error> {
        let path = address.strip_prefix("unix://").unwrap_or(address);
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::UnixStream::connect(path))
            .await
            .map_err(|_| {
                ttrpc::Error::Others(format!(
                    "connect to {path}: no answer in {CONNECT_TIMEOUT:?}"
                ))
            })?
            .map_err(|e| ttrpc::Error::Others(format!("connect to {path}: {e}")))?;
        Ok(Client::new(ttrpc::r#async::transport::Socket::from(stream)))
    }

    /// Queues `event` under `topic`.
    pub async fn publish<E: Named>(
        &self,
        topic: &str,
        namespace: &str,
        event: &E,
    ) -> Result<(), ttrpc::Error> {
        let envelope = Envelope {
            timestamp: Some(crate::service::ts(std::time::SystemTime::now())).into(),
            namespace: namespace.to_string(),
            topic: topic.to_string(),
            event: Some(pack("", event)?).into(),
            ..Default::default()
        };
        self.queue
            .send_timeout(envelope, Duration::from_secs(3))
            .await
            .map_err(|e| ttrpc::Error::Others(format!("queue event: {e}")))
    }
}

/// One bounded forward attempt; a timeout counts as a transport failure.
async fn forward(c: &EventsClient, req: &ForwardRequest) -> Result<(), ttrpc::Error> {
    let ctx = ttrpc::context::with_duration(FORWARD_TIMEOUT);
    // The client applies the context's deadline too; the outer timeout holds even if a
    // connect or write inside it blocks.
    match tokio::time::timeout(
        FORWARD_TIMEOUT + Duration::from_secs(1),
        c.forward(ctx, req),
    )
    .await
    {
        Ok(r) => r.map(|_| ()),
        Err(_) => Err(ttrpc::Error::Others(format!(
            "no answer within {FORWARD_TIMEOUT:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use containerd_shim_protos::protobuf::MessageFull;

    use super::*;

    fn same<M: Named + MessageFull>() {
        assert_eq!(M::FULL_NAME, M::descriptor().full_name());
    }

    #[test]
    fn names_are_the_descriptors_full_names() {
        same::<TaskCreate>();
        same::<TaskStart>();
        same::<TaskDelete>();
        same::<TaskExit>();
        same::<TaskOOM>();
        same::<TaskExecAdded>();
        same::<TaskExecStarted>();
        same::<ProcessDetails>();
        same::<containerd_shim_protos::cgroups::metrics::Metrics>();
        same::<containerd_shim_protos::cgroups_v2::metrics::Metrics>();
    }

    #[test]
    fn pack_matches_any_pack() {
        let d = ProcessDetails {
            exec_id: "e1".into(),
            ..Default::default()
        };
        let ours = pack("type.googleapis.com/", &d).expect("pack");
        assert_eq!(ours, Any::pack(&d).expect("Any::pack"));
    }

    /// An events server that records the topics it is forwarded.
    #[derive(Clone, Default)]
    struct Sink(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

    #[async_trait::async_trait]
    impl containerd_shim_protos::shim_async::Events for Sink {
        async fn forward(
            &self,
            _: &ttrpc::r#async::TtrpcContext,
            req: ForwardRequest,
        ) -> ttrpc::Result<containerd_shim_protos::api::Empty> {
            self.0
                .lock()
                .expect("sink lock")
                .push(req.envelope().topic().to_string());
            Ok(Default::default())
        }
    }

    fn serve(path: &std::path::Path, sink: &Sink) -> ttrpc::r#async::Server {
        let _ = std::fs::remove_file(path);
        ttrpc::r#async::Server::new()
            .bind(&format!("unix://{}", path.display()))
            .expect("bind events socket")
            .register_service(containerd_shim_protos::shim_async::create_events(
                std::sync::Arc::new(sink.clone()),
            ))
    }

    async fn wait_for(sink: &Sink, n: usize) -> Vec<String> {
        for _ in 0..200 {
            let got = sink.0.lock().expect("sink lock").clone();
            if got.len() >= n {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        sink.0.lock().expect("sink lock").clone()
    }

    /// A restarted containerd (or crispd) gets the events published after it is back, and a
    /// shim started before its event service answers forwards once it does.
    #[tokio::test]
    async fn forwards_after_the_event_service_restarts_or_comes_late() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.sock");
        let sink = Sink::default();
        let exit = TaskExit {
            container_id: "c1".into(),
            ..Default::default()
        };

        // Nobody listens yet.
        let publisher = Publisher::connect(&format!("unix://{}", path.display())).await;
        publisher
            .publish("/tasks/exit", "k8s.io", &exit)
            .await
            .expect("queue");
        let mut server = serve(&path, &sink);
        server.start().await.expect("start");
        assert_eq!(wait_for(&sink, 1).await, ["/tasks/exit"]);

        // The service goes away and comes back on the same address.
        server.shutdown().await.expect("shutdown");
        let mut server = serve(&path, &sink);
        server.start().await.expect("restart");
        publisher
            .publish("/tasks/oom", "k8s.io", &TaskOOM::default())
            .await
            .expect("queue");
        publisher
            .publish("/tasks/exit", "k8s.io", &exit)
            .await
            .expect("queue");
        assert_eq!(
            wait_for(&sink, 3).await,
            ["/tasks/exit", "/tasks/oom", "/tasks/exit"],
            "events after the restart arrive, in order"
        );
        server.shutdown().await.expect("shutdown");
    }
}
