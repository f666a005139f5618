//! Images to VAE latents for training: decode (EXIF applied), scale to cover the bucket and
//! centre-crop (kohya's `trim_and_resize_if_required`), optional horizontal flip, encode,
//! sample the posterior. Cached in memory and optionally on disk, keyed by the image
//! bytes' hash, a fingerprint of the VAE encoder, the bucket and the flip, so a re-run
//! with nothing changed encodes nothing.

use super::data::Item;
use super::rng::Rng;
use crate::dataset::decode::{Rgb8, decode_file};
use crate::dataset::resize::{Filter, Rect, resize_region};
use crate::model::vae::{AutoencoderKL, image_to_tensor};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The image an item trains on: `bucket` pixels, RGB.
pub fn load_image(item: &Item, flip: bool) -> Result<image::RgbImage, String> {
    let d = decode_file(&item.path, Rgb8::WHITE)
        .map_err(|e| format!("{}: {e}", item.path.display()))?;
    let (rw, rh) = item.bucket.resized;
    let (bw, bh) = item.bucket.bucket;
    let src = d.image;
    let (sw, sh) = (src.width() as f64, src.height() as f64);
    // Crop in source coordinates the centre window that covers the bucket after scaling.
    let (sx, sy) = (sw / rw as f64, sh / rh as f64);
    let cx = (rw.saturating_sub(bw) / 2) as f64 * sx;
    let cy = (rh.saturating_sub(bh) / 2) as f64 * sy;
    let crop = Rect {
        x: cx,
        y: cy,
        w: bw.min(rw) as f64 * sx,
        h: bh.min(rh) as f64 * sy,
    };
    let mut img = resize_region(&src, crop, bw, bh, Filter::Lanczos3);
    if flip {
        image::imageops::flip_horizontal_in_place(&mut img);
    }
    Ok(img)
}

/// A fingerprint of the VAE encoder: the hash of the latent of a fixed test image.
pub fn vae_fingerprint(vae: &AutoencoderKL, device: &Device) -> Result<String, String> {
    let img = image::RgbImage::from_fn(64, 64, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 4) as u8, ((x + y) * 2) as u8])
    });
    let x = image_to_tensor(&img, device)
        .and_then(|t| Ok(t.to_dtype(vae.dtype())?))
        .map_err(|e| e.to_string())?;
    let z = vae.encode(&x).map_err(|e| e.to_string())?;
    let v: Vec<f32> = z
        .mode()
        .to_dtype(DType::F32)
        .and_then(|t| t.flatten_all()?.to_vec1())
        .map_err(|e| e.to_string())?;
    let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
    Ok(blake3::hash(&bytes).to_hex()[..16].to_string())
}

/// Latents of items, cached.
pub struct LatentCache {
    dir: Option<PathBuf>,
    keep: bool,
    vae_id: String,
    mem: Mutex<HashMap<(usize, bool), Tensor>>,
    hashes: Mutex<HashMap<usize, String>>,
}

impl LatentCache {
    /// `keep`: hold latents in memory (`--cache-latents`); `dir`: also on disk.
    pub fn new(vae_id: String, keep: bool, dir: Option<PathBuf>) -> Self {
        Self {
            dir,
            keep,
            vae_id,
            mem: Mutex::new(HashMap::new()),
            hashes: Mutex::new(HashMap::new()),
        }
    }

    fn key(&self, idx: usize, item: &Item, flip: bool) -> Result<String, String> {
        let h = {
            let mut m = self.hashes.lock().expect("hash cache");
            match m.get(&idx) {
                Some(h) => h.clone(),
                None => {
                    let b = std::fs::read(&item.path)
                        .map_err(|e| format!("{}: {e}", item.path.display()))?;
                    let h = blake3::hash(&b).to_hex()[..24].to_string();
                    m.insert(idx, h.clone());
                    h
                }
            }
        };
        let (w, hh) = item.bucket.bucket;
        Ok(format!(
            "{h}-{}-{w}x{hh}-{}",
            self.vae_id,
            if flip { "f" } else { "n" }
        ))
    }

    fn disk_path(&self, key: &str) -> Option<PathBuf> {
        self.dir
            .as_ref()
            .map(|d| d.join(format!("{key}.safetensors")))
    }

    /// The posterior sample (unscaled) [1, C, h, w] for `item`, computing it when not
    /// cached. The posterior noise is drawn from a stream named by the cache key, so the
    /// same image gives the same latent in every run.
    pub fn get(
        &self,
        vae: &AutoencoderKL,
        idx: usize,
        item: &Item,
        flip: bool,
        device: &Device,
    ) -> Result<Tensor, String> {
        if let Some(t) = self.mem.lock().expect("latent cache").get(&(idx, flip)) {
            return Ok(t.clone());
        }
        let key = self.key(idx, item, flip)?;
        if let Some(p) = self.disk_path(&key)
            && p.is_file()
            && let Ok(mut m) = candle_core::safetensors::load(&p, device)
            && let Some(t) = m.remove("latent")
        {
            self.remember(idx, flip, &t);
            return Ok(t);
        }
        let t = encode(vae, item, flip, &key, device)?;
        if let Some(p) = self.disk_path(&key) {
            save_latent(&p, &t)?;
        }
        self.remember(idx, flip, &t);
        Ok(t)
    }

    fn remember(&self, idx: usize, flip: bool, t: &Tensor) {
        if self.keep {
            self.mem
                .lock()
                .expect("latent cache")
                .insert((idx, flip), t.clone());
        }
    }
}

fn save_latent(p: &Path, t: &Tensor) -> Result<(), String> {
    if let Some(d) = p.parent() {
        crate::util::atomic::create_dir_all(d).map_err(|e| e.to_string())?;
    }
    let cpu = t.to_device(&Device::Cpu).map_err(|e| e.to_string())?;
    let bytes = crate::formats::safetensors::serialize(
        &[("latent".to_string(), cpu)],
        &Default::default(),
    )?;
    crate::util::atomic::write_atomic(p, &bytes).map_err(|e| format!("{}: {e}", p.display()))
}

fn encode(
    vae: &AutoencoderKL,
    item: &Item,
    flip: bool,
    key: &str,
    device: &Device,
) -> Result<Tensor, String> {
    let img = load_image(item, flip)?;
    let x = image_to_tensor(&img, device)
        .and_then(|t| Ok(t.to_dtype(vae.dtype())?))
        .map_err(|e| e.to_string())?;
    let post = vae
        .encode(&x)
        .map_err(|e| format!("{}: VAE encode: {e}", item.path.display()))?;
    let mean = post.mode();
    let seed = u64::from_str_radix(&key[..16], 16).unwrap_or(0);
    let noise = Tensor::from_vec(
        Rng::new(seed).normals(mean.elem_count()),
        mean.dims(),
        device,
    )
    .and_then(|n| n.to_dtype(mean.dtype()))
    .map_err(|e| e.to_string())?;
    let z = post.sample(&noise).map_err(|e| e.to_string())?;
    z.to_dtype(DType::F32).map_err(|e| e.to_string())
}
