//! Sample images during training from a kohya prompt file: one prompt a line, `#`
//! comments, options after ` --`: `--n` negative prompt, `--w` / `--h` size, `--d` seed,
//! `--l` CFG scale, `--s` steps (defaults 512x512, 30 steps, CFG 7.5). Files go to
//! `OUT/sample/<name>_<e000001 | 000100>_<idx:02>_<YYYYmmddHHMMSS>.png` with webui's
//! `parameters` chunk.

use crate::formats::png_params::{self, GenParams};
use crate::model::pipeline::{self, Models, Request, SeededNoise};
use crate::model::samplers::SamplerKind;
use candle_core::Device;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplePrompt {
    pub prompt: String,
    pub negative: String,
    pub width: usize,
    pub height: usize,
    pub seed: Option<u64>,
    pub cfg: f64,
    pub steps: usize,
}

/// Parse a prompt file; errors name the line.
pub fn parse(text: &str, file: &Path) -> Result<Vec<SamplePrompt>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split(" --");
        let mut p = SamplePrompt {
            prompt: parts.next().unwrap_or("").trim().to_string(),
            negative: String::new(),
            width: 512,
            height: 512,
            seed: None,
            cfg: 7.5,
            steps: 30,
        };
        for opt in parts {
            let (k, v) = opt.split_once(' ').unwrap_or((opt, ""));
            let v = v.trim();
            let bad = || {
                format!(
                    "{}:{}: `--{k} {v}` is not a valid value",
                    file.display(),
                    n + 1
                )
            };
            match k {
                "n" => p.negative = v.to_string(),
                "w" => p.width = v.parse().map_err(|_| bad())?,
                "h" => p.height = v.parse().map_err(|_| bad())?,
                "d" => p.seed = Some(v.parse().map_err(|_| bad())?),
                "l" => p.cfg = v.parse().map_err(|_| bad())?,
                "s" => p.steps = v.parse().map_err(|_| bad())?,
                _ => {} // kohya ignores options it does not know too
            }
        }
        if p.width % 8 != 0 || p.height % 8 != 0 || p.width == 0 || p.height == 0 || p.steps == 0 {
            return Err(format!(
                "{}:{}: size {}x{} must be a multiple of 8 and steps at least 1",
                file.display(),
                n + 1,
                p.width,
                p.height
            ));
        }
        out.push(p);
    }
    Ok(out)
}

/// `YYYYmmddHHMMSS` (UTC) of now.
pub fn timestamp() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (y, mo, d, h, mi, s) = super::metadata::civil(t);
    format!("{y:04}{mo:02}{d:02}{h:02}{mi:02}{s:02}")
}

/// Render one prompt with the model as it is now (adapters attached) at `seed`: the RGB
/// pixels and webui's generation parameters.
pub fn render_one(
    models: &Models,
    p: &SamplePrompt,
    sampler: SamplerKind,
    clip_skip: usize,
    seed: u64,
) -> Result<(Vec<u8>, GenParams), String> {
    let req = Request {
        prompt: p.prompt.clone(),
        negative: p.negative.clone(),
        steps: p.steps,
        cfg: p.cfg,
        sampler,
        width: p.width,
        height: p.height,
        clip_skip,
    };
    let shape = models
        .latent_shape(p.width, p.height)
        .map_err(|e| e.to_string())?;
    let mut rng = SeededNoise::new(seed);
    let dev = models.unet.conv_in.weight.tensor().device().clone();
    let noise = rng
        .latent(shape, &Device::Cpu)
        .and_then(|n| Ok(n.to_device(&dev)?))
        .map_err(|e| e.to_string())?;
    // No graph: sampling never backpropagates, even through trainable weights.
    let img = crate::model::grad::no_grad(|| {
        pipeline::generate(models, &req, &noise, &mut rng, &mut || {})
    })
    .map_err(|e| format!("sample {:?}: {e}", p.prompt))?;
    let rgb = pipeline::to_rgb8(&img).map_err(|e| e.to_string())?;
    let params = GenParams {
        prompt: p.prompt.clone(),
        negative: p.negative.clone(),
        steps: p.steps,
        sampler: sampler.a1111_name().to_string(),
        cfg_scale: p.cfg,
        seed,
        width: p.width,
        height: p.height,
        model_hash: None,
        model: None,
        clip_skip,
        extra: vec![],
    };
    Ok((rgb, params))
}

/// Render every prompt with the model as it is now (adapters attached); returns the files.
#[allow(clippy::too_many_arguments)]
pub fn render(
    models: &Models,
    prompts: &[SamplePrompt],
    sampler: SamplerKind,
    clip_skip: usize,
    out_dir: &Path,
    name: &str,
    suffix: &str,
    fallback_seed: u64,
) -> Result<Vec<PathBuf>, String> {
    crate::util::atomic::create_dir_all(out_dir).map_err(|e| e.to_string())?;
    let ts = timestamp();
    let mut files = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let seed = p
            .seed
            .unwrap_or(fallback_seed.wrapping_add(i as u64) % 4_294_967_295);
        let (rgb, params) = render_one(models, p, sampler, clip_skip, seed)?;
        let path = out_dir.join(format!("{name}_{suffix}_{i:02}_{ts}.png"));
        png_params::write_png(
            &path,
            &rgb,
            p.width as u32,
            p.height as u32,
            &params.to_infotext(),
        )
        .map_err(|e| format!("{}: {e}", path.display()))?;
        files.push(path);
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kohya_prompt_lines() {
        let t = "# comment\n\nmasterpiece, 1girl --n lowres, bad hands --w 512 --h 768 --d 42 --l 6.5 --s 20\nplain\n";
        let p = parse(t, Path::new("p.txt")).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].prompt, "masterpiece, 1girl");
        assert_eq!(p[0].negative, "lowres, bad hands");
        assert_eq!((p[0].width, p[0].height, p[0].seed), (512, 768, Some(42)));
        assert_eq!((p[0].cfg, p[0].steps), (6.5, 20));
        assert_eq!((p[1].width, p[1].steps, p[1].cfg), (512, 30, 7.5));
        let e = parse("x --w abc", Path::new("p.txt")).unwrap_err();
        assert!(e.contains("p.txt:1"), "{e}");
    }
}
