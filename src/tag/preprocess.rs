//! The two reference preprocessing paths, from a decoded RGBA image to the model's
//! input tensor.
//!
//! - DeepDanbooru (webui `modules/deepbooru.py`): alpha dropped (`convert("RGB")`),
//!   webui "resize and fill": fit inside the square with Pillow LANCZOS, centre it, and
//!   fill the empty bands by stretching the edge rows/columns (Pillow BICUBIC over a
//!   zero-width box); RGB, values / 255.
//! - WD14 (kohya `tag_images_by_wd14_tagger.py`, toriato's webui extension): alpha
//!   composited onto white, padded to a white square (top = dy / 2, left = dx / 2),
//!   OpenCV INTER_AREA when shrinking and INTER_LANCZOS4 when enlarging; BGR, 0..255.

use super::resample::{PadView, PilFilter, Pixels, cv_area, cv_lanczos4, pil_resize};
use image::{DynamicImage, RgbaImage};

/// Which reference tagger's preprocessing to follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    DeepDanbooru,
    Wd14,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::DeepDanbooru => "deepdanbooru",
            Kind::Wd14 => "wd14",
        }
    }
}

/// Tensor layout of the model input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Layout {
    /// `[N, H, W, 3]` (the TF/Keras exports of both tagger families).
    Nhwc,
    /// `[N, 3, H, W]` (PyTorch exports).
    Nchw,
}

/// Everything needed to turn an image into one input tensor slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Contract {
    pub kind: Kind,
    /// Square input side in pixels.
    pub size: u32,
    pub layout: Layout,
}

impl Contract {
    /// Floats per image.
    pub fn len(&self) -> usize {
        self.size as usize * self.size as usize * 3
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One line for messages: what the model is fed.
    pub fn describe(&self) -> String {
        let s = self.size;
        let shape = match self.layout {
            Layout::Nhwc => format!("[N, {s}, {s}, 3]"),
            Layout::Nchw => format!("[N, 3, {s}, {s}]"),
        };
        match self.kind {
            Kind::DeepDanbooru => format!("deepdanbooru: {shape} float32 RGB in 0..1"),
            Kind::Wd14 => format!("wd14: {shape} float32 BGR in 0..255"),
        }
    }
}

/// The 8-bit square image the model sees, in RGB channel order.
pub fn prepare(kind: Kind, img: DynamicImage, size: u32) -> Pixels {
    let size = size as usize;
    if img.color().has_alpha() {
        let rgba = img.into_rgba8();
        match kind {
            Kind::DeepDanbooru => deepdanbooru(&drop_alpha(&rgba), size),
            Kind::Wd14 => wd14(&on_white(&rgba), size),
        }
    } else {
        // Opaque: both paths see plain RGB (grey is replicated, as Pillow does).
        let rgb = img.into_rgb8();
        let p = Pixels {
            w: rgb.width() as usize,
            h: rgb.height() as usize,
            cn: 3,
            data: rgb.into_raw(),
        };
        match kind {
            Kind::DeepDanbooru => deepdanbooru(&p, size),
            Kind::Wd14 => wd14(&p, size),
        }
    }
}

/// Pillow `convert("RGB")` from RGBA: the alpha channel is discarded.
pub fn drop_alpha(rgba: &RgbaImage) -> Pixels {
    let data = rgba
        .as_raw()
        .chunks_exact(4)
        .flat_map(|p| [p[0], p[1], p[2]])
        .collect();
    Pixels {
        w: rgba.width() as usize,
        h: rgba.height() as usize,
        cn: 3,
        data,
    }
}

/// Alpha composited onto white as Pillow's `paste(img, mask=img)` does it:
/// `(fg * a + 255 * (255 - a)) / 255`, rounded to nearest in integers.
pub fn on_white(rgba: &RgbaImage) -> Pixels {
    let data = rgba
        .as_raw()
        .chunks_exact(4)
        .flat_map(|p| {
            let a = p[3] as u32;
            let blend = |c: u8| {
                let t = c as u32 * a + 255 * (255 - a) + 128;
                (((t >> 8) + t) >> 8) as u8
            };
            [blend(p[0]), blend(p[1]), blend(p[2])]
        })
        .collect();
    Pixels {
        w: rgba.width() as usize,
        h: rgba.height() as usize,
        cn: 3,
        data,
    }
}

/// webui `images.resize_image(2, im, size, size)`: resize and fill.
pub fn deepdanbooru(im: &Pixels, size: usize) -> Pixels {
    let (w, h) = (im.w, im.h);
    // ratio = 1 (square target); src_ratio = w / h.
    let (src_w, src_h) = if w > h {
        (size, h * size / w)
    } else {
        (w * size / h, size)
    };
    let (src_w, src_h) = (src_w.max(1), src_h.max(1));
    let resized = if (src_w, src_h) == (w, h) {
        im.clone()
    } else {
        pil_resize(
            im,
            src_w,
            src_h,
            [0.0, 0.0, w as f64, h as f64],
            PilFilter::Lanczos,
        )
    };
    let mut res = Pixels::new(size, size, 3, 0);
    let (x0, y0) = (size / 2 - src_w / 2, size / 2 - src_h / 2);
    res.paste(&resized, x0 as i64, y0 as i64);
    let (rw, rh) = (resized.w as f64, resized.h as f64);
    let bic = PilFilter::Bicubic;
    if w > h {
        let fill = size / 2 - src_h / 2;
        if fill > 0 {
            let top = pil_resize(&resized, size, fill, [0.0, 0.0, size as f64, 0.0], bic);
            res.paste(&top, 0, 0);
            let bottom = pil_resize(&resized, size, fill, [0.0, rh, size as f64, rh], bic);
            res.paste(&bottom, 0, (fill + src_h) as i64);
        }
    } else if w < h {
        let fill = size / 2 - src_w / 2;
        if fill > 0 {
            let left = pil_resize(&resized, fill, size, [0.0, 0.0, 0.0, size as f64], bic);
            res.paste(&left, 0, 0);
            let right = pil_resize(&resized, fill, size, [rw, 0.0, rw, size as f64], bic);
            res.paste(&right, (fill + src_w) as i64, 0);
        }
    }
    res
}

/// White square pad, then area-shrink or Lanczos4-enlarge to `size`.
pub fn wd14(im: &Pixels, size: usize) -> Pixels {
    let side = im.w.max(im.h);
    let view = PadView {
        img: im,
        w: side,
        h: side,
        left: (side - im.w) / 2,
        top: (side - im.h) / 2,
        fill: 255,
    };
    match side.cmp(&size) {
        std::cmp::Ordering::Greater => cv_area(&view, size, size),
        _ => {
            let mut sq = Pixels::new(side, side, im.cn, 255);
            sq.paste(im, view.left as i64, view.top as i64);
            if side == size {
                sq
            } else {
                cv_lanczos4(&sq, size, size)
            }
        }
    }
}

/// Writes a prepared RGB image into one image slot of the input tensor.
pub fn write_tensor(p: &Pixels, c: &Contract, out: &mut [f32]) {
    let n = p.w * p.h;
    debug_assert_eq!(out.len(), n * 3);
    // webui divides by 255 (not a multiply by 1/255: the floats differ in the last bit).
    let (order, div): ([usize; 3], f32) = match c.kind {
        Kind::DeepDanbooru => ([0, 1, 2], 255.0),
        Kind::Wd14 => ([2, 1, 0], 1.0),
    };
    match c.layout {
        Layout::Nhwc => {
            for (o, px) in out.chunks_exact_mut(3).zip(p.data.chunks_exact(3)) {
                for k in 0..3 {
                    o[k] = px[order[k]] as f32 / div;
                }
            }
        }
        Layout::Nchw => {
            for (i, px) in p.data.chunks_exact(3).enumerate() {
                for k in 0..3 {
                    out[k * n + i] = px[order[k]] as f32 / div;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn white_compositing_matches_div255() {
        let img =
            RgbaImage::from_raw(3, 1, vec![0, 0, 0, 0, 10, 20, 30, 255, 100, 0, 200, 128]).unwrap();
        let p = on_white(&img);
        // (100*128 + 255*127 + 128)/255 rounded = 177.2 -> 177; 0 -> 127; 200 -> 227.4 -> 227
        assert_eq!(p.data, vec![255, 255, 255, 10, 20, 30, 177, 127, 227]);
    }

    #[test]
    fn wd14_pads_white_and_centres() {
        let im = Pixels::new(4, 2, 3, 0);
        let out = wd14(&im, 4);
        let row = |y: usize| &out.data[y * 12..(y + 1) * 12];
        assert!(row(0).iter().all(|&v| v == 255));
        assert!(row(1).iter().all(|&v| v == 0));
        assert!(row(2).iter().all(|&v| v == 0));
        assert!(row(3).iter().all(|&v| v == 255));
    }

    #[test]
    fn tensor_layouts_and_channel_order() {
        let p = Pixels {
            w: 1,
            h: 2,
            cn: 3,
            data: vec![1, 2, 3, 4, 5, 6],
        };
        let c = Contract {
            kind: Kind::Wd14,
            size: 1,
            layout: Layout::Nchw,
        };
        let mut out = vec![0f32; 6];
        write_tensor(&p, &c, &mut out);
        assert_eq!(out, vec![3.0, 6.0, 2.0, 5.0, 1.0, 4.0]);
        let c = Contract {
            kind: Kind::DeepDanbooru,
            layout: Layout::Nhwc,
            ..c
        };
        write_tensor(&p, &c, &mut out);
        assert_eq!(out[0], 1.0 / 255.0);
        assert_eq!(out[5], 6.0 / 255.0);
    }
}
