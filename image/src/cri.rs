//! The one place CRI types meet the image service: conversions and one function per
//! ImageService call. crispd's tonic layer calls these and maps [`crate::Kind`] to a gRPC
//! code; nothing else in this crate knows about CRI.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use crisp_proto::cri::v1 as cri;

use crate::client::Auth;
use crate::error::{Error, Result};
use crate::images::Images;
use crate::store::ImageRecord;

/// CRI AuthConfig → our credentials; None when it carries nothing.
pub fn auth_from_cri(a: Option<&cri::AuthConfig>) -> Option<Auth> {
    let a = a?;
    let auth = Auth {
        username: a.username.clone(),
        password: a.password.clone(),
        auth: a.auth.clone(),
        identity_token: a.identity_token.clone(),
        registry_token: a.registry_token.clone(),
    };
    if auth.is_empty() { None } else { Some(auth) }
}

/// The image's `User` as CRI wants it: a numeric user becomes uid, a name becomes username.
fn user_of(rec: &ImageRecord) -> (Option<cri::Int64Value>, String) {
    let Some(user) = rec.user() else {
        return (None, String::new());
    };
    let name = user.split(':').next().unwrap_or("");
    match name.parse::<i64>() {
        Ok(uid) => (Some(cri::Int64Value { value: uid }), String::new()),
        Err(_) => (None, name.to_string()),
    }
}

pub fn image_to_cri(rec: &ImageRecord) -> cri::Image {
    let (uid, username) = user_of(rec);
    cri::Image {
        id: rec.id.to_string(),
        repo_tags: rec.repo_tags.clone(),
        repo_digests: rec.repo_digests.clone(),
        size: rec.size,
        uid,
        username,
        spec: Some(cri::ImageSpec {
            image: rec.id.to_string(),
            ..Default::default()
        }),
        pinned: rec.pinned,
    }
}

fn image_name(spec: Option<&cri::ImageSpec>, call: &str) -> Result<String> {
    match spec.map(|s| s.image.trim()) {
        Some(s) if !s.is_empty() => Ok(s.to_string()),
        _ => Err(Error::invalid(format!("{call}: image.image is empty"))),
    }
}

pub fn list_images(
    images: &Images,
    req: &cri::ListImagesRequest,
) -> Result<cri::ListImagesResponse> {
    let filter = req
        .filter
        .as_ref()
        .and_then(|f| f.image.as_ref())
        .map(|s| s.image.trim())
        .filter(|s| !s.is_empty());
    let recs = match filter {
        Some(name) => images.status(name)?.into_iter().collect(),
        None => images.list()?,
    };
    Ok(cri::ListImagesResponse {
        images: recs.iter().map(image_to_cri).collect(),
    })
}

/// ImageStatus: an unknown image is not an error, the response just has no image.
pub fn image_status(
    images: &Images,
    req: &cri::ImageStatusRequest,
) -> Result<cri::ImageStatusResponse> {
    let name = image_name(req.image.as_ref(), "ImageStatus")?;
    let Some(rec) = images.status(&name)? else {
        return Ok(cri::ImageStatusResponse::default());
    };
    let mut info = HashMap::new();
    if req.verbose {
        // containerd's verbose info: the image config as `imageSpec` and the top chain id.
        let spec: serde_json::Value =
            serde_json::from_str(&rec.config).unwrap_or(serde_json::Value::Null);
        let v = serde_json::json!({
            "imageSpec": spec,
            "chainID": rec.chain_ids.last().map(|c| c.to_string()).unwrap_or_default(),
            "manifestDigest": rec.manifest_digest.to_string(),
            "layers": rec.layers.iter().map(|l| l.to_string()).collect::<Vec<_>>(),
            "diffIDs": rec.diff_ids.iter().map(|l| l.to_string()).collect::<Vec<_>>(),
        });
        let v = match &rec.artifact {
            // An artifact's files, as an image volume shows them.
            Some(a) => {
                let mut v = v;
                v["artifactType"] = a.artifact_type.clone().into();
                v["files"] = a
                    .files
                    .iter()
                    .map(|f| serde_json::json!({"path": f.path, "digest": f.digest.to_string(), "size": f.size, "mediaType": f.media_type}))
                    .collect::<Vec<_>>()
                    .into();
                v
            }
            None => v,
        };
        info.insert("info".to_string(), v.to_string());
    }
    Ok(cri::ImageStatusResponse {
        image: Some(image_to_cri(&rec)),
        info,
    })
}

pub async fn pull_image(
    images: &Images,
    req: &cri::PullImageRequest,
) -> Result<cri::PullImageResponse> {
    let name = image_name(req.image.as_ref(), "PullImage")?;
    let id = images.pull(&name, auth_from_cri(req.auth.as_ref())).await?;
    Ok(cri::PullImageResponse {
        image_ref: id.to_string(),
    })
}

/// RemoveImage of an image that does not exist succeeds, as CRI requires.
pub async fn remove_image(
    images: &Images,
    req: &cri::RemoveImageRequest,
) -> Result<cri::RemoveImageResponse> {
    let name = image_name(req.image.as_ref(), "RemoveImage")?;
    images.remove(&name).await?;
    Ok(cri::RemoveImageResponse {})
}

/// One image filesystem: unpacked layers plus content, on the snapshotter's mount point.
pub async fn image_fs_info(images: &Images) -> Result<cri::ImageFsInfoResponse> {
    let fs = images.fs_info().await?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    let usage = cri::FilesystemUsage {
        timestamp: now,
        fs_id: Some(cri::FilesystemIdentifier {
            mountpoint: fs.snapshots.mountpoint.display().to_string(),
        }),
        used_bytes: Some(cri::UInt64Value {
            value: fs.snapshots.used_bytes + fs.content.used_bytes,
        }),
        inodes_used: Some(cri::UInt64Value {
            value: fs.snapshots.inodes_used + fs.content.inodes_used,
        }),
    };
    Ok(cri::ImageFsInfoResponse {
        image_filesystems: vec![usage],
        container_filesystems: vec![],
    })
}
