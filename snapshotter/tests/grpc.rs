//! The `crisp-snapshotter` binary over its unix socket, driven by the generated client the way
//! containerd's proxy plugin drives it.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::Scratch;
use crisp_proto::containerd::services::snapshots::v1 as pb;
use hyper_util::rt::TokioIo;
use pb::snapshots_client::SnapshotsClient;
use tonic::transport::{Channel, Endpoint, Uri};

struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn connect(sock: PathBuf) -> SnapshotsClient<Channel> {
    for _ in 0..200 {
        if sock.exists() {
            let s = sock.clone();
            let ch = Endpoint::try_from("http://[::]:50051")
                .expect("endpoint")
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let s = s.clone();
                    async move { tokio::net::UnixStream::connect(s).await.map(TokioIo::new) }
                }))
                .await;
            if let Ok(ch) = ch {
                return SnapshotsClient::new(ch);
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("server never came up on {}", sock.display());
}

#[tokio::test]
async fn serves_the_snapshots_api() {
    let s = Scratch::new("crisp-grpc");
    let sock = s.path().join("sn.sock");
    let _srv = Server(
        std::process::Command::new(env!("CARGO_BIN_EXE_crisp-snapshotter"))
            .arg("--root")
            .arg(s.path().join("root"))
            .arg("--address")
            .arg(&sock)
            .spawn()
            .expect("start crisp-snapshotter"),
    );
    let mut c = connect(sock).await;
    let snap = "crisp".to_string();
    let m = c
        .prepare(pb::PrepareSnapshotRequest {
            snapshotter: snap.clone(),
            key: "a".into(),
            parent: String::new(),
            labels: Default::default(),
        })
        .await
        .expect("prepare")
        .into_inner()
        .mounts;
    assert_eq!(m[0].r#type, "bind");
    std::fs::write(PathBuf::from(&m[0].source).join("f"), b"x").expect("write");
    c.commit(pb::CommitSnapshotRequest {
        snapshotter: snap.clone(),
        name: "base".into(),
        key: "a".into(),
        labels: Default::default(),
    })
    .await
    .expect("commit");
    let m = c
        .prepare(pb::PrepareSnapshotRequest {
            snapshotter: snap.clone(),
            key: "b".into(),
            parent: "base".into(),
            labels: Default::default(),
        })
        .await
        .expect("prepare")
        .into_inner()
        .mounts;
    assert_eq!(m[0].r#type, "overlay");
    let again = c
        .mounts(pb::MountsRequest {
            snapshotter: snap.clone(),
            key: "b".into(),
        })
        .await
        .expect("mounts")
        .into_inner()
        .mounts;
    assert_eq!(again, m);
    let info = c
        .stat(pb::StatSnapshotRequest {
            snapshotter: snap.clone(),
            key: "base".into(),
        })
        .await
        .expect("stat")
        .into_inner()
        .info
        .expect("info");
    assert_eq!(info.kind, pb::Kind::Committed as i32);
    let mut upd = info.clone();
    upd.labels
        .insert("containerd.io/gc.root".into(), "x".into());
    let out = c
        .update(pb::UpdateSnapshotRequest {
            snapshotter: snap.clone(),
            info: Some(upd),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["labels.containerd.io/gc.root".into()],
            }),
        })
        .await
        .expect("update")
        .into_inner()
        .info
        .expect("info");
    assert_eq!(
        out.labels.get("containerd.io/gc.root").map(String::as_str),
        Some("x")
    );
    let u = c
        .usage(pb::UsageRequest {
            snapshotter: snap.clone(),
            key: "base".into(),
        })
        .await
        .expect("usage")
        .into_inner();
    assert!(u.inodes >= 2 && u.size > 0, "{u:?}");
    let mut stream = c
        .list(pb::ListSnapshotsRequest {
            snapshotter: snap.clone(),
            filters: vec![],
        })
        .await
        .expect("list")
        .into_inner();
    let mut names = Vec::new();
    while let Some(msg) = stream.message().await.expect("stream") {
        names.extend(msg.info.into_iter().map(|i| i.name));
    }
    names.sort();
    assert_eq!(names, vec!["b", "base"]);

    // Error codes as containerd expects them.
    let e = c
        .stat(pb::StatSnapshotRequest {
            snapshotter: snap.clone(),
            key: "nope".into(),
        })
        .await
        .expect_err("missing");
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = c
        .prepare(pb::PrepareSnapshotRequest {
            snapshotter: snap.clone(),
            key: "b".into(),
            parent: String::new(),
            labels: Default::default(),
        })
        .await
        .expect_err("dup");
    assert_eq!(e.code(), tonic::Code::AlreadyExists);
    let e = c
        .remove(pb::RemoveSnapshotRequest {
            snapshotter: snap.clone(),
            key: "base".into(),
        })
        .await
        .expect_err("has child");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);

    c.remove(pb::RemoveSnapshotRequest {
        snapshotter: snap.clone(),
        key: "b".into(),
    })
    .await
    .expect("remove");
    c.remove(pb::RemoveSnapshotRequest {
        snapshotter: snap.clone(),
        key: "base".into(),
    })
    .await
    .expect("remove");
    c.cleanup(pb::CleanupRequest { snapshotter: snap })
        .await
        .expect("cleanup");
    assert_eq!(
        std::fs::read_dir(s.path().join("root/snapshots"))
            .expect("dir")
            .count(),
        0
    );
}
