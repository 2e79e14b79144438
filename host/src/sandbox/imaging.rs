//! The WIT `imaging` interface: images held by the host on a handler's behalf.
//!
//! The pixel code is `tessera-imaging`, the same the guest SDK compiles into handlers, here
//! running natively. Every image is charged to the calling store's memory limit (its own cap
//! and the server-wide handler pool) for as long as its handle lives, and so is the transient
//! buffer a decode needs; nothing may grow past the archive's pixel limit. Time spent here is
//! the handler's: the epoch deadline interrupts the handler as soon as a call returns.
use super::{bindings::tessera::handler::imaging as wit_img, wit, MemoryExceeded, State};
use crate::runtime::{DType, HostTensor};
use std::sync::Arc;
use tessera_imaging::{self as imaging, Failure};
use wasmtime::component::Resource;

/// Least bytes charged per live image, so that handles alone cannot pile up uncharged.
const MIN_CHARGE: u64 = 256;
/// However high an archive sets `max_pixels`, no host image may have more pixels than this.
const PIXELS_CEILING: u64 = 1 << 31;
/// Model inputs a handler may stage at once with `as-input`.
const MAX_STAGED: usize = 64;
/// Images one `decode-base64-all` call decodes.
const MAX_BATCH: usize = 8;

/// Working memory a decode of a `w`x`h` image into `format` needs besides its result: the
/// decoder's buffer (up to 8 bytes a pixel, at most 4 bytes a pixel of the limit) and the
/// conversion to RGB (and from it to luma).
fn decode_scratch((w, h): (u32, u32), format: wit_img::PixelFormat, max_pixels: u64) -> u64 {
    let pixels = w as u64 * h as u64;
    (8 * pixels).min(4 * max_pixels) + pixels * (2 + channels(format) as u64)
}

/// PNG/JPEG bytes decoded into `format`'s pixels.
fn decode_pixels(
    field: &str,
    bytes: &[u8],
    format: wit_img::PixelFormat,
    max_pixels: u64,
) -> Result<Vec<u8>, Failure> {
    imaging::decode(field, bytes, max_pixels).map(|img| match format {
        wit_img::PixelFormat::Rgb => img.into_rgb8().into_raw(),
        wit_img::PixelFormat::Luma => imaging::luma_pil(img).into_raw(),
    })
}

/// An image owned by the host: 8-bit interleaved pixels, 1 (luma) or 3 (rgb) channels.
pub struct HostImage {
    width: usize,
    height: usize,
    format: wit_img::PixelFormat,
    /// Shared with the model input `as-input` staged from it, so that an image whose handle
    /// is dropped before `preprocess` returns becomes the input without a copy.
    data: Arc<Vec<u8>>,
    /// Bytes charged to the store for this image.
    charged: u64,
}

/// A model input staged by `as-input`, until `preprocess` returns.
pub struct Staged {
    name: String,
    shape: Vec<u64>,
    data: Arc<Vec<u8>>,
    /// Bytes charged to the store while staged.
    charged: u64,
}

impl HostImage {
    fn channels(&self) -> usize {
        channels(self.format)
    }

    fn shape(&self) -> Vec<u64> {
        match self.format {
            wit_img::PixelFormat::Rgb => vec![self.height as u64, self.width as u64, 3],
            wit_img::PixelFormat::Luma => vec![self.height as u64, self.width as u64],
        }
    }

    fn dynamic(&self) -> imaging::DynamicImage {
        let (w, h) = (self.width as u32, self.height as u32);
        match self.format {
            wit_img::PixelFormat::Rgb => imaging::DynamicImage::ImageRgb8(
                imaging::Rgb::from_raw(w, h, self.data.to_vec()).expect("size matches"),
            ),
            wit_img::PixelFormat::Luma => imaging::DynamicImage::ImageLuma8(
                imaging::GrayImage::from_raw(w, h, self.data.to_vec()).expect("size matches"),
            ),
        }
    }
}

fn channels(format: wit_img::PixelFormat) -> usize {
    match format {
        wit_img::PixelFormat::Rgb => 3,
        wit_img::PixelFormat::Luma => 1,
    }
}

fn to_wit(f: Failure) -> wit::HandlerError {
    match f {
        Failure::BadRequest(m) => wit::HandlerError::BadRequest(m),
        Failure::UnsupportedMediaType(m) => wit::HandlerError::UnsupportedMediaType(m),
        Failure::PayloadTooLarge(m) => wit::HandlerError::PayloadTooLarge(m),
        Failure::Internal(m) => wit::HandlerError::Internal(m),
    }
}

/// What an imaging call returns: the WIT result inside, a trap (memory over the limit) outside.
type Call<T> = wasmtime::Result<Result<T, wit::HandlerError>>;

impl State {
    fn max_pixels(&self) -> u64 {
        self.env
            .params
            .get("max_pixels")
            .and_then(|v| v.parse().ok())
            .unwrap_or(imaging::DEFAULT_MAX_PIXELS)
            .min(PIXELS_CEILING)
    }

    /// A `w`x`h` result against the pixel limit (a 413 over it, as decoding says).
    fn check_output(&self, what: &str, w: usize, h: usize) -> Result<(), wit::HandlerError> {
        let max = self.max_pixels();
        if (w as u64).saturating_mul(h as u64) > max {
            return Err(wit::HandlerError::PayloadTooLarge(format!(
                "{what} would be {w}x{h}, over the limit of {max} pixels"
            )));
        }
        if w == 0 || h == 0 {
            return Err(wit::HandlerError::BadRequest(format!(
                "{what} would be {w}x{h}: empty"
            )));
        }
        Ok(())
    }

    /// Charges `bytes` to the store (a trap over its limits) for as long as the caller holds
    /// them; [`State::release`] gives them back.
    fn charge(&mut self, bytes: u64) -> wasmtime::Result<()> {
        self.limits
            .charge(bytes)
            .map_err(|e: MemoryExceeded| wasmtime::Error::new(e))
    }

    fn release(&mut self, bytes: u64) {
        self.limits.release(bytes);
    }

    /// Keeps `data` as a new image handle, charged to the store.
    fn keep(
        &mut self,
        size: (usize, usize),
        format: wit_img::PixelFormat,
        data: Vec<u8>,
    ) -> wasmtime::Result<Resource<HostImage>> {
        self.keep_shared(size, format, Arc::new(data))
    }

    /// [`Self::keep`] of pixels another image may hold too (charged all the same: the
    /// charge is per handle, so releasing one never frees what another still holds).
    fn keep_shared(
        &mut self,
        (width, height): (usize, usize),
        format: wit_img::PixelFormat,
        data: Arc<Vec<u8>>,
    ) -> wasmtime::Result<Resource<HostImage>> {
        if data.len() as u64 != width as u64 * height as u64 * channels(format) as u64 {
            return Err(wasmtime::Error::msg(format!(
                "internal error: a {width}x{height} image of {} bytes",
                data.len()
            )));
        }
        let charged = (data.len() as u64).max(MIN_CHARGE);
        self.charge(charged)?;
        let image = HostImage {
            width,
            height,
            format,
            data,
            charged,
        };
        match self.table.push(image) {
            Ok(handle) => Ok(handle),
            Err(e) => {
                self.release(charged);
                Err(e.into())
            }
        }
    }

    /// Runs `f` with `bytes` of transient working memory charged while it runs.
    fn with_scratch<T>(&mut self, bytes: u64, f: impl FnOnce(&Self) -> T) -> wasmtime::Result<T> {
        self.charge(bytes)?;
        let out = f(self);
        self.release(bytes);
        Ok(out)
    }

    fn decode_bytes(
        &mut self,
        field: &str,
        bytes: &[u8],
        format: wit_img::PixelFormat,
    ) -> Call<Resource<HostImage>> {
        let max = self.max_pixels();
        let (w, h) = match imaging::dimensions(field, bytes, max) {
            Ok(size) => size,
            Err(e) => return Ok(Err(to_wit(e))),
        };
        let scratch = decode_scratch((w, h), format, max);
        let decoded = self.with_scratch(scratch, |_| decode_pixels(field, bytes, format, max))?;
        match decoded {
            Ok(data) => Ok(Ok(self.keep((w as usize, h as usize), format, data)?)),
            Err(e) => Ok(Err(to_wit(e))),
        }
    }

    fn image(&self, handle: &Resource<HostImage>) -> wasmtime::Result<&HostImage> {
        Ok(self.table.get(handle)?)
    }

    /// A new handle on `handle`'s pixels, unchanged: what a resize, pad or crop to the
    /// image's own size makes (PIL and OpenCV copy; the pixels are never written, so sharing
    /// them is the same).
    fn same(&mut self, handle: &Resource<HostImage>) -> Call<Resource<HostImage>> {
        let img = self.image(handle)?;
        let (size, format, data) = ((img.width, img.height), img.format, img.data.clone());
        Ok(Ok(self.keep_shared(size, format, data)?))
    }

    /// A new image made from `handle`'s by `f` (which returns the new size and pixels), checked
    /// against the pixel limit first; `extra` is the working memory `f` needs besides its
    /// result, charged while it runs.
    fn derive(
        &mut self,
        handle: &Resource<HostImage>,
        what: &str,
        (w, h): (usize, usize),
        extra: u64,
        f: impl FnOnce(&HostImage) -> Result<Vec<u8>, wit::HandlerError>,
    ) -> Call<Resource<HostImage>> {
        if let Err(e) = self.check_output(what, w, h) {
            return Ok(Err(e));
        }
        let image = self.image(handle)?;
        let format = image.format;
        // Both at most PIXELS_CEILING pixels of 3 bytes: no overflow.
        let bytes = w as u64 * h as u64 * image.channels() as u64 + extra;
        let made = self.with_scratch(bytes, |s| f(s.image(handle).expect("checked above")))?;
        match made {
            Ok(data) => Ok(Ok(self.keep((w, h), format, data)?)),
            Err(e) => Ok(Err(e)),
        }
    }

    /// Staged model inputs (`as-input`), taken by the sandbox after `preprocess` returns:
    /// the image's pixels themselves when its handle is gone, else a copy.
    pub(super) fn take_staged(&mut self, name: &str) -> Option<HostTensor> {
        let i = self.staged.iter().position(|t| t.name == name)?;
        let t = self.staged.swap_remove(i);
        self.release(t.charged);
        let data = Arc::try_unwrap(t.data).unwrap_or_else(|shared| shared.to_vec());
        Some(
            HostTensor::new(t.name, DType::U8, t.shape, data)
                .expect("an image's shape matches its pixels"),
        )
    }
}

impl wit_img::Host for State {}

impl wit_img::HostImage for State {
    fn decode(
        &mut self,
        field: String,
        bytes: Vec<u8>,
        format: wit_img::PixelFormat,
    ) -> Call<Resource<HostImage>> {
        self.decode_bytes(&field, &bytes, format)
    }

    fn decode_base64(
        &mut self,
        field: String,
        text: Vec<u8>,
        format: wit_img::PixelFormat,
    ) -> Call<Resource<HostImage>> {
        let one = wit_img::Base64Image {
            field,
            text,
            format,
        };
        Ok(self
            .decode_base64_all(vec![one])?
            .map(|mut images| images.pop().expect("one image asked, one decoded")))
    }

    fn decode_base64_all(
        &mut self,
        items: Vec<wit_img::Base64Image>,
    ) -> Call<Vec<Resource<HostImage>>> {
        if items.len() > MAX_BATCH {
            return Ok(Err(wit::HandlerError::Internal(format!(
                "decode-base64-all takes at most {MAX_BATCH} images, got {}",
                items.len()
            ))));
        }
        let max = self.max_pixels();
        // The texts, whitespace-free copies and decoded bytes, as decode-base64 charges them.
        let texts: u64 = items
            .iter()
            .map(|i| 2 * i.text.len() as u64 + (i.text.len() as u64).div_ceil(4) * 3)
            .sum();
        self.charge(texts)?;
        let bytes = imaging::par_map(&items, |i| imaging::base64_decode(&i.field, &i.text));
        let sizes: Vec<Result<(u32, u32), Failure>> = items
            .iter()
            .zip(&bytes)
            .map(|(i, b)| {
                b.as_ref()
                    .map_err(Clone::clone)
                    .and_then(|b| imaging::dimensions(&i.field, b, max))
            })
            .collect();
        let scratch: u64 = items
            .iter()
            .zip(&sizes)
            .filter_map(|(i, s)| Some(decode_scratch(*s.as_ref().ok()?, i.format, max)))
            .sum();
        if let Err(e) = self.charge(scratch) {
            self.release(texts);
            return Err(e);
        }
        let work: Vec<_> = items.iter().zip(&bytes).zip(&sizes).collect();
        let pixels = imaging::par_map(&work, |((i, b), s)| match (b, s) {
            (Ok(b), Ok(_)) => decode_pixels(&i.field, b, i.format, max),
            (Err(e), _) | (_, Err(e)) => Err(e.clone()),
        });
        drop(work);
        drop(bytes);
        self.release(scratch + texts);
        let mut images = Vec::with_capacity(items.len());
        for ((i, s), p) in items.iter().zip(&sizes).zip(pixels) {
            // A failed earlier step failed the decode with its own error.
            match (s, p) {
                (Ok((w, h)), Ok(data)) => images.push((*w as usize, *h as usize, i.format, data)),
                (_, p) => return Ok(Err(to_wit(p.err().expect("no size, no pixels")))),
            }
        }
        let mut handles = Vec::with_capacity(images.len());
        for (w, h, format, data) in images {
            handles.push(self.keep((w, h), format, data)?);
        }
        Ok(Ok(handles))
    }

    fn dimensions(&mut self, field: String, bytes: Vec<u8>) -> Call<(u32, u32)> {
        Ok(imaging::dimensions(&field, &bytes, self.max_pixels()).map_err(to_wit))
    }

    fn from_tensor(&mut self, t: wit::Tensor) -> Call<Resource<HostImage>> {
        let shape: Vec<u64> = t.shape.clone();
        let format = match (t.dtype, &shape[..]) {
            (wit::Dtype::U8, [_, _, 3]) => wit_img::PixelFormat::Rgb,
            (wit::Dtype::U8, [_, _] | [_, _, 1]) => wit_img::PixelFormat::Luma,
            _ => {
                return Ok(Err(wit::HandlerError::Internal(format!(
                    "tensor '{}' is not an image: {:?} {:?} (want u8 [H, W, 3], [H, W] or \
                     [H, W, 1])",
                    t.name, t.dtype, shape
                ))))
            }
        };
        let (h, w) = (shape[0] as usize, shape[1] as usize);
        let want = (h as u64)
            .checked_mul(w as u64)
            .and_then(|n| n.checked_mul(channels(format) as u64));
        if want != Some(t.data.len() as u64) {
            return Ok(Err(wit::HandlerError::Internal(format!(
                "tensor '{}' is shaped {shape:?} but holds {} bytes",
                t.name,
                t.data.len()
            ))));
        }
        if let Err(e) = self.check_output("the image", w, h) {
            return Ok(Err(e));
        }
        Ok(Ok(self.keep((w, h), format, t.data)?))
    }

    fn width(&mut self, handle: Resource<HostImage>) -> wasmtime::Result<u32> {
        Ok(self.image(&handle)?.width as u32)
    }

    fn height(&mut self, handle: Resource<HostImage>) -> wasmtime::Result<u32> {
        Ok(self.image(&handle)?.height as u32)
    }

    fn format(&mut self, handle: Resource<HostImage>) -> wasmtime::Result<wit_img::PixelFormat> {
        Ok(self.image(&handle)?.format)
    }

    fn resize(
        &mut self,
        handle: Resource<HostImage>,
        width: u32,
        height: u32,
        filter: wit_img::ResizeFilter,
    ) -> Call<Resource<HostImage>> {
        let (w, h) = (width as usize, height as usize);
        let img = self.image(&handle)?;
        let (sw, sh, cn) = (img.width as u64, img.height as u64, img.channels() as u64);
        let extra = match filter {
            // Pillow's convolution runs one pass into an image as wide as one side and as
            // tall as the other, plus a weight table per axis.
            wit_img::ResizeFilter::PilBilinear => {
                let between = (sw * height as u64).max(width as u64 * sh);
                if between > self.max_pixels() {
                    return Ok(Err(wit::HandlerError::PayloadTooLarge(format!(
                        "resizing {sw}x{sh} to {width}x{height} goes through {between} pixels, \
                         over the limit of {}",
                        self.max_pixels()
                    ))));
                }
                between * cn + 16 * (sw + sh + width as u64 + height as u64)
            }
            // Two rows of the horizontal pass and the taps.
            wit_img::ResizeFilter::Cv2Linear => {
                8 * width as u64 * cn + 32 * (width + height) as u64
            }
            // The source copied into an image first.
            wit_img::ResizeFilter::Nearest => sw * sh * cn,
        };
        if (w, h) == (img.width, img.height) {
            return self.same(&handle);
        }
        self.derive(&handle, "the resized image", (w, h), extra, |img| {
            let (size, cn) = ((img.width, img.height), img.channels());
            Ok(match filter {
                wit_img::ResizeFilter::Cv2Linear => {
                    imaging::resize_cv2_linear(&img.data, size, cn, (w, h), None)
                }
                wit_img::ResizeFilter::PilBilinear => {
                    imaging::resize_pil_bilinear(&img.data, size, cn, (w, h))
                }
                wit_img::ResizeFilter::Nearest => {
                    imaging::resize(&img.dynamic(), width, height, imaging::FilterType::Nearest)
                        .into_bytes()
                }
            })
        })
    }

    fn pad(
        &mut self,
        handle: Resource<HostImage>,
        width: u32,
        height: u32,
        mode: wit_img::PadMode,
    ) -> Call<Resource<HostImage>> {
        let (pw, ph) = (width as usize, height as usize);
        let img = self.image(&handle)?;
        if pw < img.width || ph < img.height {
            return Ok(Err(wit::HandlerError::Internal(format!(
                "cannot pad a {}x{} image to {pw}x{ph}",
                img.width, img.height
            ))));
        }
        if (pw, ph) == (img.width, img.height) {
            return self.same(&handle);
        }
        self.derive(&handle, "the padded image", (pw, ph), 0, |img| {
            let (w, h, c) = (img.width, img.height, img.channels());
            Ok(match mode {
                wit_img::PadMode::Symmetric => imaging::pad_symmetric(&img.data, w, h, c, pw, ph),
                wit_img::PadMode::Zero => imaging::pad_zero(&img.data, w, h, c, pw, ph),
            })
        })
    }

    fn crop(
        &mut self,
        handle: Resource<HostImage>,
        x: u32,
        y: u32,
        width: u32,
        height: u32,
    ) -> Call<Resource<HostImage>> {
        let (x, y, cw, ch) = (x as usize, y as usize, width as usize, height as usize);
        let img = self.image(&handle)?;
        if x.saturating_add(cw) > img.width || y.saturating_add(ch) > img.height {
            return Ok(Err(wit::HandlerError::Internal(format!(
                "cannot crop {cw}x{ch} at ({x}, {y}) from a {}x{} image",
                img.width, img.height
            ))));
        }
        if (x, y, cw, ch) == (0, 0, img.width, img.height) {
            return self.same(&handle);
        }
        self.derive(&handle, "the cropped image", (cw, ch), 0, |img| {
            let size = (img.width, img.height, img.channels());
            Ok(imaging::crop(&img.data, size, (x, y, cw, ch)).expect("checked above"))
        })
    }

    fn dilate(&mut self, handle: Resource<HostImage>, kernel: u32) -> Call<Resource<HostImage>> {
        let img = self.image(&handle)?;
        if img.format != wit_img::PixelFormat::Luma {
            return Ok(Err(wit::HandlerError::Internal(
                "dilate needs a luma image (a mask)".into(),
            )));
        }
        let size = (img.width, img.height);
        // The 0/1 copy, the row pass and a count per column.
        let extra = 2 * (img.width * img.height) as u64 + 4 * img.width as u64;
        self.derive(&handle, "the dilated mask", size, extra, |img| {
            let k = kernel as usize;
            let mut out = imaging::dilate_square(&img.data, img.width, img.height, k);
            out.iter_mut().for_each(|v| *v *= 255);
            Ok(out)
        })
    }

    fn encode(
        &mut self,
        handle: Resource<HostImage>,
        encoding: wit_img::Encoding,
        quality: u8,
    ) -> Call<Vec<u8>> {
        let img = self.image(&handle)?;
        // PNG: the strips and the output they are laid into, each at most 1.5 bytes a pixel
        // byte (12-bit codes), and row buffers; JPEG: a copy of the pixels as an image, as
        // RGB, and the output.
        let scratch = match encoding {
            wit_img::Encoding::Png => img.data.len() as u64 * 3 + 64 * img.width as u64,
            wit_img::Encoding::Jpeg => (img.data.len() + 6 * img.width * img.height) as u64,
        };
        let encoded = self.with_scratch(scratch, |s| {
            let img = s.image(&handle).expect("checked above");
            match encoding {
                wit_img::Encoding::Png => imaging::encode_png_pixels(
                    &img.data,
                    (img.width as u32, img.height as u32),
                    img.channels(),
                ),
                wit_img::Encoding::Jpeg => imaging::encode_jpeg(&img.dynamic(), quality),
            }
        })?;
        Ok(encoded.map_err(to_wit))
    }

    fn encode_base64(
        &mut self,
        handle: Resource<HostImage>,
        encoding: wit_img::Encoding,
        quality: u8,
    ) -> Call<Vec<u8>> {
        let encoded = match self.encode(handle, encoding, quality)? {
            Ok(bytes) => bytes,
            Err(e) => return Ok(Err(e)),
        };
        let text_len = encoded.len().div_ceil(3) as u64 * 4 + encoded.len() as u64;
        let text = self.with_scratch(text_len, |_| imaging::base64_encode(&encoded))?;
        Ok(Ok(text.into_bytes()))
    }

    fn pixels(&mut self, handle: Resource<HostImage>) -> wasmtime::Result<Vec<u8>> {
        Ok(self.image(&handle)?.data.to_vec())
    }

    fn to_tensor(
        &mut self,
        handle: Resource<HostImage>,
        name: String,
    ) -> wasmtime::Result<wit::Tensor> {
        let img = self.image(&handle)?;
        Ok(wit::Tensor {
            name,
            dtype: wit::Dtype::U8,
            shape: img.shape(),
            data: img.data.to_vec(),
        })
    }

    fn as_input(
        &mut self,
        handle: Resource<HostImage>,
        name: String,
    ) -> wasmtime::Result<wit::Tensor> {
        let img = self.image(&handle)?;
        let (shape, data) = (img.shape(), img.data.clone());
        if let Some(i) = self.staged.iter().position(|t| t.name == name) {
            let old = self.staged.swap_remove(i);
            self.release(old.charged);
        }
        if self.staged.len() >= MAX_STAGED {
            return Err(wasmtime::Error::msg(format!(
                "a handler may stage at most {MAX_STAGED} model inputs"
            )));
        }
        // Charged again while staged: the handle may live on, and its pixels with it.
        let charged = (data.len() as u64).max(MIN_CHARGE) + name.len() as u64;
        self.charge(charged)?;
        self.staged.push(Staged {
            name: name.clone(),
            shape: shape.clone(),
            data,
            charged,
        });
        Ok(wit::Tensor {
            name,
            dtype: wit::Dtype::U8,
            shape,
            data: Vec::new(),
        })
    }

    fn drop(&mut self, handle: Resource<HostImage>) -> wasmtime::Result<()> {
        let image = self.table.delete(handle)?;
        self.release(image.charged);
        Ok(())
    }
}
