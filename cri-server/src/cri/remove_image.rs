//! RemoveImage: refused while a container mounts the image as an image volume (its layers are
//! mounted under the container); otherwise the image service removes it.

use crisp_proto::cri::v1::{RemoveImageRequest, RemoveImageResponse};

use crate::container::service::ContainerService;
use crate::error::CriError;

pub async fn remove_image(
    ctrs: &ContainerService,
    req: &RemoveImageRequest,
) -> Result<RemoveImageResponse, CriError> {
    let images = &ctrs.images;
    let name = req.image.as_ref().map(|i| i.image.as_str()).unwrap_or("");
    // No CreateContainer with image volumes between the check and the removal.
    let _excl = ctrs.image_volume_users.write().await;
    if let Some(rec) = images.status(name)? {
        let users = crate::container::image_volume::users_of(&ctrs.store, &rec.id.to_string())?;
        if !users.is_empty() {
            return Err(CriError::precondition(format!(
                "image {name:?} ({}) is mounted as an image volume by container {}; remove the \
                 container first",
                rec.id,
                users.join(", ")
            )));
        }
    }
    Ok(crisp_image::cri::remove_image(images, req).await?)
}
