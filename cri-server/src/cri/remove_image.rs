//! RemoveImage: refused while a container mounts the image as an image volume (its layers are
//! mounted under the container); otherwise the image service removes it.

use crisp_proto::cri::v1::{RemoveImageRequest, RemoveImageResponse};

use crate::error::CriError;
use crate::store::Store;

pub async fn remove_image(
    store: &Store,
    images: &crisp_image::Images,
    req: &RemoveImageRequest,
) -> Result<RemoveImageResponse, CriError> {
    let name = req.image.as_ref().map(|i| i.image.as_str()).unwrap_or("");
    if let Some(rec) = images.status(name)? {
        let users = crate::container::image_volume::users_of(store, &rec.id.to_string())?;
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
