//! JPEG decoding with libjpeg-turbo (built from source by the `mozjpeg` crates), the
//! decoder inside Pillow, so pixels are bit-identical to what the Python tools see
//! (`Image.open(p).convert("RGB")`, and `draft()` for DCT-domain scaling). The default
//! libjpeg settings are kept on purpose: accurate integer IDCT and fancy upsampling,
//! exactly as Pillow decodes.
//!
//! libjpeg reports errors through a callback that must not return; the `mozjpeg` crate
//! unwinds out of it and we catch that here, so a corrupt file is an `Err`, never a
//! panic. A file that ends early (libjpeg's "Premature end of JPEG file" warning, after
//! which it pads with grey) is an error too, as Pillow raises "image file is truncated".

use image::{DynamicImage, GrayImage, RgbImage};
use mozjpeg_sys::{jpeg_common_struct, jpeg_error_mgr, jpeg_std_error};
use std::os::raw::c_int;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};

/// Decoded pixels, or why not.
pub enum Jpeg {
    Image(DynamicImage),
    /// A colour model this path leaves to the general decoder (CMYK, YCCK).
    Unsupported,
}

/// Decodes a baseline or progressive JPEG to RGB8 (or L8 for greyscale files) at
/// `scale_num / 8` of its size (1, 2, 4 or 8; libjpeg rounds dimensions up, like PIL's
/// `draft`). EXIF orientation is not applied here.
pub fn decode(bytes: &[u8], scale_num: u8) -> Result<Jpeg, String> {
    let r = catch_unwind(AssertUnwindSafe(|| decode_inner(bytes, scale_num)));
    match r {
        Ok(Ok(j)) => Ok(j),
        Ok(Err(e)) => Err(e.to_string()),
        Err(payload) => Err(payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "libjpeg error".into())),
    }
}

fn decode_inner(bytes: &[u8], scale_num: u8) -> std::io::Result<Jpeg> {
    let d = mozjpeg::Decompress::with_err(error_mgr()).from_mem(bytes)?;
    let mut d = d;
    if scale_num != 8 {
        d.scale(scale_num.clamp(1, 8));
    }
    use mozjpeg::ColorSpace as C;
    let grey = match d.color_space() {
        C::JCS_GRAYSCALE => true,
        C::JCS_YCbCr | C::JCS_RGB => false,
        _ => return Ok(Jpeg::Unsupported),
    };
    if grey {
        let mut s = d.grayscale()?;
        let (w, h) = (s.width() as u32, s.height() as u32);
        let px: Vec<u8> = s.read_scanlines()?;
        s.finish()?;
        let img = GrayImage::from_raw(w, h, px).ok_or_else(short)?;
        Ok(Jpeg::Image(DynamicImage::ImageLuma8(img)))
    } else {
        let mut s = d.rgb()?;
        let (w, h) = (s.width() as u32, s.height() as u32);
        let px: Vec<[u8; 3]> = s.read_scanlines()?;
        s.finish()?;
        let img = RgbImage::from_raw(w, h, px.into_flattened()).ok_or_else(short)?;
        Ok(Jpeg::Image(DynamicImage::ImageRgb8(img)))
    }
}

fn short() -> std::io::Error {
    std::io::Error::other("short pixel buffer")
}

fn error_mgr() -> jpeg_error_mgr {
    // SAFETY: jpeg_std_error fills every field of a zeroed struct.
    let mut err: jpeg_error_mgr = unsafe { std::mem::zeroed() };
    unsafe { jpeg_std_error(&mut err) };
    err.error_exit = Some(error_exit);
    err.emit_message = Some(emit_message);
    err
}

fn message(cinfo: &mut jpeg_common_struct) -> String {
    // SAFETY: libjpeg passes a valid cinfo whose `err` is our manager.
    unsafe {
        let err = &*cinfo.err;
        let Some(fmt) = err.format_message else {
            return format!("libjpeg error {}", err.msg_code);
        };
        // libjpeg writes the text into the buffer; the binding declares it `&[u8; 80]`.
        type Fmt = unsafe extern "C-unwind" fn(&mut jpeg_common_struct, *mut [u8; 80]);
        let fmt: Fmt = std::mem::transmute(fmt);
        let mut buf = [0u8; 80];
        fmt(cinfo, &mut buf);
        let end = buf.iter().position(|&c| c == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    }
}

extern "C-unwind" fn error_exit(cinfo: &mut jpeg_common_struct) {
    let m = message(cinfo);
    resume_unwind(Box::new(m));
}

/// Level -1 is a warning about corrupt data. libjpeg recovers from most of them (Pillow
/// ignores those too); the end-of-file one means the picture is cut off.
extern "C-unwind" fn emit_message(cinfo: &mut jpeg_common_struct, level: c_int) {
    if level == -1 {
        let m = message(cinfo);
        if m.starts_with("Premature end of JPEG file") {
            resume_unwind(Box::new("truncated JPEG data".to_string()));
        }
    }
}
