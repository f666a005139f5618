//! AutoencoderKL against diffusers (tiny random model with the real SD structure and key
//! names). Fixtures: tests/fixtures/gen_vae_fixtures.py.

mod common;

use candle_core::{DType, Device, Tensor};
use sdkit::model::Weights;
use sdkit::model::vae::{AutoencoderKL, VaeConfig, image_to_tensor, tensor_to_images};
use std::collections::HashMap;
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/vae")
        .join(name)
}

fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("tiny_vae_expected.safetensors"), &Device::Cpu).unwrap()
}

/// max |a - b| / max(max |b|, 1e-3).
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    common::rel_err(a, b, 1e-3)
}

/// Encode and decode against diffusers (PyTorch CPU), f32: measured 2.8e-7..3.2e-6
/// (31x margin; decode goes through the most convolutions). Other CPUs' gemm/conv
/// kernels sum in other orders, ~1e-6 relative per convolution, about what is
/// measured again. Catches any wrong op, weight or layout (O(1e-2..1)), and half
/// precision anywhere (f16 rounding alone is 4.9e-4 per value).
const TOL: f64 = 1e-4;

#[test]
fn tiny_vae_encode_decode_match_diffusers() {
    let exp = expected();
    let vae =
        AutoencoderKL::from_diffusers(&fixture("tiny_vae"), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(vae.config.block_out_channels, vec![8, 16, 24, 24]);
    assert_eq!(vae.config.downscale(), 8);

    let post = vae.encode(&exp["image"]).unwrap();
    for (name, got) in [("mean", &post.mean), ("logvar", &post.logvar)] {
        let e = rel_err(got, &exp[name]);
        common::within(e as f64, TOL, &format!("encode {name}"));
    }
    let e = rel_err(&post.sample(&exp["noise"]).unwrap(), &exp["sample"]);
    common::within(e as f64, TOL, "posterior sample");

    let e = rel_err(&vae.decode(&exp["z"]).unwrap(), &exp["decoded_z"]);
    common::within(e as f64, TOL, "decode");
    let e = rel_err(&vae.decode(post.mode()).unwrap(), &exp["decoded_mean"]);
    common::within(e as f64, TOL, "decode(mean)");

    // Latent scaling round trip.
    let z = &exp["z"];
    let back = vae.unscale(&vae.scale(z).unwrap()).unwrap();
    assert!(rel_err(&back, z) < 1e-6);
    let scaled = vae.scale(z).unwrap();
    assert!(rel_err(&scaled, &(z * 0.18215).unwrap()) < 1e-6);
}

#[test]
fn config_parses_diffusers_json_and_sd_preset_is_valid() {
    let cfg = VaeConfig::from_file(&fixture("tiny_vae/config.json")).unwrap();
    assert_eq!(cfg.norm_num_groups, 4);
    assert_eq!(cfg.layers_per_block, 2);
    assert!((cfg.scaling_factor - 0.18215).abs() < 1e-12);
    let sd = VaeConfig::sd();
    sd.validate().unwrap();
    assert_eq!(sd.block_out_channels, vec![128, 256, 512, 512]);
    assert_eq!(sd.downscale(), 8);
    let mut bad = sd.clone();
    bad.norm_num_groups = 7;
    assert!(bad.validate().unwrap_err().contains("norm groups"));
}

#[test]
fn missing_and_misshapen_tensors_are_named() {
    let path = fixture("tiny_vae/diffusion_pytorch_model.safetensors");
    let cfg = VaeConfig::from_file(&fixture("tiny_vae/config.json")).unwrap();
    let mut w = Weights::from_safetensors(&path, DType::F32, &Device::Cpu).unwrap();
    w.remove("decoder.up_blocks.1.upsamplers.0.conv.weight")
        .unwrap();
    let err = AutoencoderKL::load(&mut w, &cfg).err().unwrap().to_string();
    assert!(
        err.contains("decoder.up_blocks.1.upsamplers.0.conv.weight"),
        "{err}"
    );

    let mut wrong = cfg.clone();
    wrong.block_out_channels = vec![8, 16, 32, 32];
    let mut w = Weights::from_safetensors(&path, DType::F32, &Device::Cpu).unwrap();
    let err = AutoencoderKL::load(&mut w, &wrong)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("has shape"), "{err}");
}

/// Legacy attention names (`query`/`key`/`value`/`proj_attn`, 1x1-conv shaped) load to the
/// same model.
#[test]
fn legacy_attention_keys_load() {
    let exp = expected();
    let path = fixture("tiny_vae/diffusion_pytorch_model.safetensors");
    let cfg = VaeConfig::from_file(&fixture("tiny_vae/config.json")).unwrap();
    let mut w = Weights::from_safetensors(&path, DType::F32, &Device::Cpu).unwrap();
    let p = "decoder.mid_block.attentions.0";
    for (new, old) in [("to_q", "query"), ("to_out.0", "proj_attn")] {
        let t = w.remove(&format!("{p}.{new}.weight")).unwrap();
        let t = t.reshape((24, 24, 1, 1)).unwrap();
        w.insert(format!("{p}.{old}.weight"), t);
        let b = w.remove(&format!("{p}.{new}.bias")).unwrap();
        w.insert(format!("{p}.{old}.bias"), b);
    }
    let vae = AutoencoderKL::load(&mut w, &cfg).unwrap();
    let e = rel_err(&vae.decode(&exp["z"]).unwrap(), &exp["decoded_z"]);
    common::within(e as f64, TOL, "decode with legacy keys");
}

#[test]
fn image_tensor_round_trip() {
    let img = image::RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8 * 50, y as u8 * 100, 255]));
    let t = image_to_tensor(&img, &Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[1, 3, 3, 5]);
    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(v[0], -1.0);
    assert_eq!(v[2 * 15], 1.0);
    let back = tensor_to_images(&t).unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0], img);
    // Out-of-range values clamp.
    let t = Tensor::new(&[3f32, -3.0, 0.0], &Device::Cpu)
        .unwrap()
        .reshape((1, 3, 1, 1))
        .unwrap();
    assert_eq!(
        tensor_to_images(&t).unwrap()[0].get_pixel(0, 0).0,
        [255, 0, 128]
    );
}
