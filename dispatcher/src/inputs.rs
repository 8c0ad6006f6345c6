//! A request's input images (`image`, `mask`): decoded from base64 or a
//! `data:` URL with a byte cap and a pixel cap, converted to what the
//! pipeline takes (RGB; a mask's grey levels), stored as PNG under the job's
//! prefix, and replaced in the request by their keys, so that the queue
//! carries keys and never image data.

use base64::Engine as _;
use common::names::Names;
use common::result_store::{ResultStore, ResultStoreError};
use common::rules::{ImageInput, JobRequest, StoredImage, ValidationError, SIZE_RANGE};
use image::ImageEncoder as _;
use uuid::Uuid;

/// A side longer than this is refused before its pixels are decoded: the
/// largest output side times two, room for a downscale of a large photo.
const MAX_INPUT_SIDE: u32 = 2 * SIZE_RANGE.1 as u32;

/// An input decoded and re-encoded as the PNG the worker reads.
#[derive(Debug, Clone)]
pub struct DecodedInput {
    pub key: String,
    pub png: Vec<u8>,
    pub width: u32,
    pub height: u32,
}

/// The inputs of one request, ready to store.
#[derive(Debug, Default)]
pub struct Inputs {
    pub decoded: Vec<DecodedInput>,
}

impl Inputs {
    /// Decodes the request's inline `image` and `mask` (a stored reference
    /// from a client is refused) and puts their keys under job `id`'s prefix
    /// in their place. `max_bytes`: an input's cap once decoded from base64.
    pub fn take(request: &mut JobRequest, id: Uuid, max_bytes: usize) -> Result<Self, ValidationError> {
        let mut decoded = Vec::new();
        let fields = [
            ("image", &mut request.image, Names::input_object(id), false),
            ("mask", &mut request.mask, Names::mask_object(id), true),
        ];
        for (field, slot, key, is_mask) in fields {
            let Some(input) = slot.take() else { continue };
            let ImageInput::Inline(data) = input else {
                return Err(ValidationError::ImageStoredByClient { field });
            };
            let input = decode(field, &data, max_bytes, is_mask, key)?;
            *slot = Some(ImageInput::Stored(StoredImage {
                key: input.key.clone(),
                width: input.width,
                height: input.height,
            }));
            decoded.push(input);
        }
        Ok(Inputs { decoded })
    }

    pub fn is_empty(&self) -> bool {
        self.decoded.is_empty()
    }

    /// Stores every input under its key.
    pub async fn store(&self, store: &ResultStore) -> Result<(), ResultStoreError> {
        for input in &self.decoded {
            store.put(&input.key, input.png.clone(), "image/png").await?;
        }
        Ok(())
    }
}

/// The bytes of base64 text or of a `data:[type][;base64],` URL.
fn bytes_of(field: &'static str, data: &str, max_bytes: usize) -> Result<Vec<u8>, ValidationError> {
    let undecodable = |reason: String| ValidationError::ImageUndecodable { field, reason };
    let payload = match data.strip_prefix("data:") {
        Some(url) => {
            let (meta, payload) = url
                .split_once(',')
                .ok_or_else(|| undecodable("a `data:` URL needs a `,` before its data".into()))?;
            if !meta.ends_with(";base64") {
                return Err(undecodable(format!(
                    "a `data:` URL must be base64 (`data:image/png;base64,…`), got `data:{}`",
                    meta.chars().take(40).collect::<String>()
                )));
            }
            payload
        }
        None => data,
    };
    let payload: String = payload.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    // Refuse before decoding what is sure to be too large.
    let at_least = payload.trim_end_matches('=').len() * 3 / 4;
    if at_least > max_bytes {
        return Err(ValidationError::ImageTooLarge {
            field,
            bytes: at_least,
            cap: max_bytes,
        });
    }
    let engines = [
        &base64::engine::general_purpose::STANDARD,
        &base64::engine::general_purpose::STANDARD_NO_PAD,
        &base64::engine::general_purpose::URL_SAFE,
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ];
    let mut first_error = None;
    for engine in engines {
        match engine.decode(&payload) {
            Ok(bytes) => return Ok(bytes),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(undecodable(format!(
        "not base64: {}",
        first_error.map(|e| e.to_string()).unwrap_or_default()
    )))
}

fn decode(
    field: &'static str,
    data: &str,
    max_bytes: usize,
    is_mask: bool,
    key: String,
) -> Result<DecodedInput, ValidationError> {
    let undecodable = |reason: String| ValidationError::ImageUndecodable { field, reason };
    let bytes = bytes_of(field, data, max_bytes)?;
    let image =
        sdxl::image_processor::decode_untrusted(&bytes, MAX_INPUT_SIDE).map_err(|e| undecodable(e.to_string()))?;
    let (width, height) = (image.width(), image.height());
    let mut png = Vec::new();
    let encoder = image::codecs::png::PngEncoder::new(&mut png);
    let written = if is_mask {
        let mask = sdxl::image_processor::mask_of(image);
        encoder.write_image(mask.as_raw(), width, height, image::ExtendedColorType::L8)
    } else {
        let rgb = sdxl::image_processor::rgb_of(image);
        encoder.write_image(rgb.as_raw(), width, height, image::ExtendedColorType::Rgb8)
    };
    written.map_err(|e| undecodable(format!("re-encoding as PNG: {e}")))?;
    Ok(DecodedInput {
        key,
        png,
        width,
        height,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let img = image::RgbaImage::from_fn(width, height, |x, y| image::Rgba([x as u8, y as u8, 7, 128]));
        let mut out = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn request(image: Option<String>, mask: Option<String>) -> JobRequest {
        JobRequest {
            prompt: Some("p".into()),
            image: image.map(ImageInput::Inline),
            mask: mask.map(ImageInput::Inline),
            ..Default::default()
        }
    }

    #[test]
    fn inline_images_become_keys_of_the_job() {
        let id = Uuid::new_v4();
        let data_url = format!("data:image/png;base64,{}", b64(&png(40, 24)));
        let mut req = request(Some(data_url), Some(b64(&png(40, 24))));
        let inputs = Inputs::take(&mut req, id, 1 << 20).unwrap();
        let Some(ImageInput::Stored(image)) = &req.image else {
            panic!("{:?}", req.image)
        };
        assert_eq!(
            (image.key.as_str(), image.width, image.height),
            (Names::input_object(id).as_str(), 40, 24)
        );
        let Some(ImageInput::Stored(mask)) = &req.mask else {
            panic!()
        };
        assert_eq!(mask.key, Names::mask_object(id));
        // What is stored decodes to the pixels the pipeline takes.
        let stored = image::load_from_memory(&inputs.decoded[0].png).unwrap();
        assert_eq!(stored.color(), image::ColorType::Rgb8, "alpha dropped");
        assert_eq!(stored.to_rgb8().get_pixel(5, 3).0, [5, 3, 7]);
        let mask = image::load_from_memory(&inputs.decoded[1].png).unwrap();
        assert_eq!(mask.color(), image::ColorType::L8);
    }

    #[test]
    fn bad_inputs_name_the_field_and_the_reason() {
        let id = Uuid::nil();
        let e = Inputs::take(&mut request(Some("not base64 at all!".into()), None), id, 1 << 20).unwrap_err();
        assert_eq!(e.field(), "image");
        assert!(e.to_string().contains("not base64"), "{e}");
        let e = Inputs::take(&mut request(Some(b64(b"GIF89a nope")), None), id, 1 << 20).unwrap_err();
        assert!(
            matches!(e, ValidationError::ImageUndecodable { field: "image", .. }),
            "{e}"
        );
        let e = Inputs::take(&mut request(None, Some(b64(&[0u8; 300]))), id, 100).unwrap_err();
        assert!(
            matches!(
                e,
                ValidationError::ImageTooLarge {
                    field: "mask",
                    cap: 100,
                    ..
                }
            ),
            "{e}"
        );
        let e = Inputs::take(&mut request(Some("data:image/png,raw".into()), None), id, 100).unwrap_err();
        assert!(e.to_string().contains("must be base64"), "{e}");
        let mut stored = request(None, None);
        stored.image = Some(ImageInput::Stored(StoredImage {
            key: "jobs/other/input.png".into(),
            width: 8,
            height: 8,
        }));
        let e = Inputs::take(&mut stored, id, 100).unwrap_err();
        assert_eq!(e, ValidationError::ImageStoredByClient { field: "image" });
    }
}
