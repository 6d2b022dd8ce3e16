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
    ttrpc::{self, context::Context},
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

/// Forwards events to containerd's event service, one at a time and in
/// publish order (containerd-shim's publisher requeued a failed event behind
/// later ones; here a failed forward is retried before the next event).
pub struct Publisher {
    queue: mpsc::Sender<Envelope>,
}

impl Publisher {
    /// Connects to containerd's ttrpc address and starts the forwarding task.
    pub async fn connect(address: &str) -> Result<Publisher, ttrpc::Error> {
        let mut client = EventsClient::new(Self::client(address).await?);
        let address = address.to_string();
        let (queue, mut rx) = mpsc::channel::<Envelope>(QUEUE);
        tokio::spawn(async move {
            while let Some(envelope) = rx.recv().await {
                let req = ForwardRequest {
                    envelope: Some(envelope).into(),
                    ..Default::default()
                };
                for attempt in 1..=ATTEMPTS {
                    let Err(e) = client.forward(Context::default(), &req).await else {
                        break;
                    };
                    warn!(topic = %req.envelope.topic, attempt, error = %e, "forward event");
                    if matches!(e, ttrpc::Error::RemoteClosed | ttrpc::Error::LocalClosed)
                        && let Ok(c) = Self::client(&address).await
                    {
                        client = EventsClient::new(c);
                    }
                    if attempt < ATTEMPTS {
                        tokio::time::sleep(Duration::from_secs(attempt.into())).await;
                    }
                }
            }
        });
        Ok(Publisher { queue })
    }

    async fn client(address: &str) -> Result<Client, ttrpc::Error> {
        let path = address.strip_prefix("unix://").unwrap_or(address);
        Client::connect(&format!("unix://{path}")).await
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
}
