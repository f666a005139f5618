//! Textual-inversion embeddings against diffusers, with the fixtures of
//! tests/fixtures/gen_embedding_fixtures.py: the files kohya, diffusers and webui write
//! load, give diffusers' text-encoder output for a prompt using the name, and the vectors'
//! gradient equals PyTorch's; plus webui's init rule, prompt-length accounting, width
//! errors and `sample --embeddings`.

mod common;

use candle_core::{DType, Device, Tensor};
use sdkit::adapters::embedding::{self, Embedding, FileFormat, TrainableEmbedding};
use sdkit::formats::torch_pt;
use sdkit::model::arch::Arch;
use sdkit::model::loader::{self, LoadOptions};
use sdkit::model::pipeline::{Models, encode_prompt};
use sdkit::model::prompt::{ChunkOptions, a1111_prompt_with};
use sdkit::model::tokenizer::{ClipTokenizer, VOCAB_SIZE};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const PROMPT: &str = "a photo of myemb, masterpiece";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/embedding")
}

fn expected() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("expected.safetensors"), &Device::Cpu).unwrap()
}

fn tiny() -> Models {
    let opts = LoadOptions {
        device: common::device(),
        ..LoadOptions::default()
    };
    let ck = loader::open(&common::checkpoints().join("sd1_diffusers"), &opts).unwrap();
    Models::new(ck).unwrap()
}

fn files() -> Vec<PathBuf> {
    [
        "kohya/myemb.safetensors",
        "diffusers/myemb.safetensors",
        "webui/myemb.pt",
        "diffusers_bin/myemb.bin",
    ]
    .iter()
    .map(|f| fixtures().join(f))
    .collect()
}

/// Every tool's file gives the vectors, and the prompt's conditioning equals diffusers'
/// `load_textual_inversion` output (same token layout, same values).
#[test]
fn files_of_every_tool_give_diffusers_text_encoder_output() {
    let exp = expected();
    let want_ids: Vec<i64> = exp["ids"].flatten_all().unwrap().to_vec1().unwrap();
    for f in files() {
        let e = Embedding::load(&f).unwrap();
        assert_eq!(e.name, "myemb");
        assert_eq!(
            common::rel_err(&e.vectors, &exp["vectors"], 1e-6),
            0.0,
            "{f:?}"
        );
        let mut m = tiny();
        embedding::attach(&mut m.clip, &[e]).unwrap();
        let c = encode_prompt(&m.clip, Arch::Sd1, PROMPT, 1).unwrap();
        // diffusers' added tokens are 49408.. as ours.
        let ids: Vec<i64> = c.ids[0].iter().map(|&x| x as i64).collect();
        assert_eq!(ids, want_ids, "{f:?}");
        let e = common::rel_err(
            &c.hidden.to_device(&Device::Cpu).unwrap(),
            &exp["te_out"],
            1e-3,
        );
        common::within(
            e as f64,
            1e-5,
            &format!("text-encoder output, {}", f.display()),
        );
    }
}

/// The vectors are the only trainable tensor and their gradient equals PyTorch's.
#[test]
fn vector_gradient_matches_pytorch() {
    let exp = expected();
    let mut m = tiny();
    let e = Embedding::load(&files()[0]).unwrap();
    let t = TrainableEmbedding::attach(&mut m.clip, &e).unwrap();
    assert_eq!(t.vars().len(), 1);
    assert!(m.clip.token_embedding.var().is_none(), "base table frozen");
    let dev = common::device();
    let ids: Vec<u32> = exp["ids"]
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&x| x as u32)
        .collect();
    let ids = Tensor::new(ids.as_slice(), &dev)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let out = m.clip.encode(&ids, 1).unwrap();
    let w = exp["weight"].to_device(&dev).unwrap();
    let loss = (out * w).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let g = grads
        .get(t.var.as_tensor())
        .expect("gradient of the vectors");
    let err = common::rel_err(&g.to_device(&Device::Cpu).unwrap(), &exp["grad"], 1e-6);
    common::within(err as f64, 1e-4, "embedding gradient");
    // Resume round trip: state tensors restore the vectors exactly.
    let state: BTreeMap<String, Tensor> = t.tensors().unwrap().into_iter().collect();
    t.var.set(&t.var.zeros_like().unwrap()).unwrap();
    t.load_tensors(&state).unwrap();
    assert_eq!(
        common::rel_err(&t.embedding().unwrap().vectors, &exp["vectors"], 1e-6),
        0.0
    );
}

/// Written files hold what kohya's and diffusers' writers hold, and load back.
#[test]
fn written_files_match_other_tools_files() {
    let exp = expected();
    let e = Embedding::load(&files()[0]).unwrap();
    // SDKIT_EMBEDDING_OUT keeps the files (for scripts/check_embedding.py).
    let tmp = tempfile::tempdir().unwrap();
    let dir = std::env::var_os("SDKIT_EMBEDDING_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_path_buf());
    let meta = embedding::kohya_metadata(
        "myemb",
        Arch::Sd1,
        sdkit::model::schedule::Prediction::Epsilon,
        (512, 512),
        1_796_083_200,
    );
    assert_eq!(
        meta["modelspec.architecture"],
        "stable-diffusion-v1/textual-inversion"
    );
    let k = dir.join("kohya/myemb.safetensors");
    let d = dir.join("diffusers/myemb.safetensors");
    std::fs::create_dir_all(k.parent().unwrap()).unwrap();
    std::fs::create_dir_all(d.parent().unwrap()).unwrap();
    e.save(&k, FileFormat::Kohya, DType::F32, &meta).unwrap();
    e.save(&d, FileFormat::Diffusers, DType::F32, &BTreeMap::new())
        .unwrap();
    for (ours, theirs, key) in [(&k, &files()[0], "emb_params"), (&d, &files()[1], "myemb")] {
        let (a, am) = sdkit::formats::safetensors::read_with_metadata(ours).unwrap();
        let (b, _) = sdkit::formats::safetensors::read_with_metadata(theirs).unwrap();
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        assert_eq!(a[key].dtype(), b[key].dtype());
        assert_eq!(common::rel_err(&a[key], &b[key], 1e-6), 0.0);
        if key == "emb_params" {
            assert_eq!(am, meta);
        }
        let back = Embedding::load(ours).unwrap();
        assert_eq!(common::rel_err(&back.vectors, &exp["vectors"], 1e-6), 0.0);
    }
    // webui's .pt beside them (scripts/check_embedding.py checks the folder).
    let w = dir.join("webui/myemb.pt");
    std::fs::create_dir_all(w.parent().unwrap()).unwrap();
    e.save_pt(&w, &pt_meta()).unwrap();
    // f16 as --save-precision fp16 writes it.
    let h = dir.join("half.safetensors");
    e.save(&h, FileFormat::Kohya, DType::F16, &meta).unwrap();
    let (a, _) = sdkit::formats::safetensors::read_with_metadata(&h).unwrap();
    assert_eq!(a["emb_params"].dtype(), DType::F16);
}

fn pt_meta() -> embedding::PtMeta {
    embedding::PtMeta {
        name: "myemb".into(),
        step: 1500,
        sd_checkpoint: Some("e1441589a6".into()),
        sd_checkpoint_name: Some("v1-5-pruned-emaonly".into()),
    }
}

/// The kind of a `.pt` value, as Python's `type(v).__name__` names it.
fn kind(v: &torch_pt::Value) -> &'static str {
    use torch_pt::Value as V;
    match v {
        V::None => "NoneType",
        V::Bool(_) => "bool",
        V::Int(_) => "int",
        V::Float(_) => "float",
        V::Str(_) => "str",
        V::List(_) => "list",
        V::Tuple(_) => "tuple",
        V::Dict(_) => "dict",
        V::OrderedDict(_) => "OrderedDict",
        V::Tensor(_) => "Tensor",
    }
}

fn keys_and_kinds(v: &torch_pt::Value) -> Vec<(String, &'static str)> {
    v.entries()
        .iter()
        .map(|(k, x)| (k.as_str().unwrap().to_string(), kind(x)))
        .collect()
}

/// webui's `.pt` as its `Embedding.save` writes it: read back with sdkit's unpickler it
/// has the keys, order and value types of the file torch wrote for webui's dict
/// (tests/fixtures/embedding/webui), the vectors as an f32 tensor; sdkit's reader loads
/// it; and where a Python with torch exists, `torch.load(weights_only=True)` and webui's
/// loader (restated in scripts/check_embedding.py) take it and give the same vectors.
#[test]
fn written_pt_is_webuis_file() {
    let e = Embedding::load(&files()[0]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("myemb.pt");
    e.save_pt(&path, &pt_meta()).unwrap();

    let ours = torch_pt::load(&path).unwrap();
    let theirs = torch_pt::load(&files()[2]).unwrap();
    let want = [
        ("string_to_token", "dict"),
        ("string_to_param", "dict"),
        ("name", "str"),
        ("step", "int"),
        ("sd_checkpoint", "str"),
        ("sd_checkpoint_name", "str"),
    ];
    let want: Vec<(String, &str)> = want.iter().map(|(k, t)| (k.to_string(), *t)).collect();
    assert_eq!(keys_and_kinds(&ours), want);
    // The fixture (torch.save of webui's dict for a new embedding) has the same keys in
    // the same order; its checkpoint fields are None.
    let fixture_keys: Vec<String> = keys_and_kinds(&theirs).into_iter().map(|k| k.0).collect();
    let our_keys: Vec<String> = want.iter().map(|k| k.0.clone()).collect();
    assert_eq!(fixture_keys, our_keys);
    for key in ["string_to_token", "string_to_param"] {
        assert_eq!(
            keys_and_kinds(ours.get_str(key).unwrap()),
            keys_and_kinds(theirs.get_str(key).unwrap()),
            "{key}"
        );
    }
    let star = |v: &torch_pt::Value, k: &str| v.get_str(k).unwrap().get_str("*").cloned();
    assert_eq!(star(&ours, "string_to_token").unwrap().as_int(), Some(265));
    assert_eq!(
        star(&theirs, "string_to_token").unwrap().as_int(),
        Some(embedding::WEBUI_STAR_TOKEN)
    );
    let torch_pt::Value::Tensor(t) = star(&ours, "string_to_param").unwrap() else {
        panic!("string_to_param['*'] is not a tensor")
    };
    assert_eq!((t.dtype(), t.dims()), (DType::F32, &[3usize, 32][..]));
    assert_eq!(common::rel_err(&t, &e.vectors, 1e-12), 0.0);
    assert_eq!(ours.get_str("name").unwrap().as_str(), Some("myemb"));
    assert_eq!(ours.get_str("step").unwrap().as_int(), Some(1500));
    assert_eq!(
        ours.get_str("sd_checkpoint").unwrap().as_str(),
        Some("e1441589a6")
    );
    assert_eq!(
        ours.get_str("sd_checkpoint_name").unwrap().as_str(),
        Some("v1-5-pruned-emaonly")
    );
    // Unknown checkpoint fields are None, as in a new webui embedding.
    let none = dir.path().join("none.pt");
    let meta = embedding::PtMeta {
        sd_checkpoint: None,
        sd_checkpoint_name: None,
        ..pt_meta()
    };
    e.save_pt(&none, &meta).unwrap();
    let v = torch_pt::load(&none).unwrap();
    assert_eq!(keys_and_kinds(&v)[4], ("sd_checkpoint".into(), "NoneType"));
    assert_eq!(keys_and_kinds(&v), keys_and_kinds(&theirs));

    // sdkit's own reader (candle's pickle reader, as for webui's files).
    let back = Embedding::load(&path).unwrap();
    assert_eq!(back.name, "myemb");
    assert_eq!(common::rel_err(&back.vectors, &e.vectors, 1e-12), 0.0);

    let Some(py) = common::python_with_torch() else {
        eprintln!(
            "skipped the torch.load / webui loader check: no Python with torch ($REFPY or python3)"
        );
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/check_embedding.py");
    let out = std::process::Command::new(&py)
        .arg(&script)
        .arg("--webui-pt")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "torch.load(weights_only=True) / webui's loader rejected the file:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let keys: Vec<(String, String)> = r["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| (k[0].as_str().unwrap().into(), k[1].as_str().unwrap().into()))
        .collect();
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(k, t)| (k.clone(), t.to_string()))
        .collect();
    assert_eq!(keys, want);
    assert_eq!(r["param"]["type"], "Tensor");
    assert_eq!(r["param"]["dtype"], "torch.float32");
    assert_eq!(r["string_to_token"][1], serde_json::json!(["*", 265]));
    assert_eq!(
        (r["vectors"].as_u64(), r["shape"].as_u64()),
        (Some(3), Some(32))
    );
    assert_eq!(r["step"], 1500);
    assert_eq!(r["sd_checkpoint"], "e1441589a6");
    assert_eq!(r["sd_checkpoint_name"], "v1-5-pruned-emaonly");
    assert_eq!(r["name"], "myemb");
    let vec: Vec<f32> = r["vec"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
        })
        .collect();
    let theirs = Tensor::from_vec(vec, (3, 32), &Device::Cpu).unwrap();
    assert_eq!(common::rel_err(&theirs, &e.vectors, 1e-12), 0.0);
}

/// webui's init rule: `vec[i] = emb[i * len / n]` over the init text's tokens; zeros for
/// an empty text.
#[test]
fn init_word_rule_is_webuis() {
    let m = tiny();
    let tok = ClipTokenizer::shared();
    let ids = tok.encode("a photo of a cat");
    assert_eq!(ids.len(), 5);
    let e = Embedding::init(&m.clip, tok, "a photo of a cat", 3, "x").unwrap();
    let table = m
        .clip
        .token_embedding
        .tensor()
        .to_device(&Device::Cpu)
        .unwrap();
    for (i, src) in [0usize, 1, 3].iter().enumerate() {
        // i * 5 / 3 = 0, 1, 3
        let want = table.get(ids[*src] as usize).unwrap();
        let got = e.vectors.get(i).unwrap();
        assert_eq!(common::rel_err(&got, &want, 1e-6), 0.0, "vector {i}");
    }
    let e = Embedding::init(&m.clip, tok, "cat", 4, "x").unwrap();
    let cat = table.get(ids[4] as usize).unwrap();
    for i in 0..4 {
        assert_eq!(common::rel_err(&e.vectors.get(i).unwrap(), &cat, 1e-6), 0.0);
    }
    let z = Embedding::init(&m.clip, tok, "", 2, "x").unwrap();
    assert_eq!(z.vectors.dims(), &[2, 32]);
    let s = z
        .vectors
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(s, 0.0);
}

/// An embedding's n vectors count as n tokens and never straddle two chunks.
#[test]
fn prompt_length_counts_vectors_and_keeps_them_in_one_chunk() {
    let tok = ClipTokenizer::shared();
    let mut names = sdkit::model::placeholders::Placeholders::new(VOCAB_SIZE);
    names.add(tok, "myemb", 8).unwrap();
    let opts = ChunkOptions {
        comma_backtrack: 0,
        ..ChunkOptions::default()
    };
    // 70 one-token words, then the 8-vector name: it does not fit (70 + 8 > 75), so the
    // first chunk closes at 70 and the vectors open the second.
    let words = vec!["cat"; 70].join(" ");
    let (chunks, count) =
        a1111_prompt_with(tok, &format!("{words} myemb dog"), opts, &names).unwrap();
    assert_eq!(chunks.len(), 2);
    assert_eq!(chunks[0].used, 70);
    let v = VOCAB_SIZE as u32;
    assert_eq!(
        &chunks[1].tokens[1..10],
        &[
            v,
            v + 1,
            v + 2,
            v + 3,
            v + 4,
            v + 5,
            v + 6,
            v + 7,
            tok.encode("dog")[0]
        ]
    );
    assert_eq!(count, 75 + 9);
    // Short prompt: 3 words + 8 vectors = 11 tokens, the name's own 2 tokens gone.
    let (chunks, count) = a1111_prompt_with(tok, "a myemb photo", opts, &names).unwrap();
    assert_eq!((chunks.len(), count), (1, 10));
    // Emphasis applies to the vectors.
    let (chunks, _) = a1111_prompt_with(tok, "a (myemb:1.3)", opts, &names).unwrap();
    assert_eq!(chunks[0].weights[2..10], [1.3; 8]);
}

/// A file made for another width names the file and both widths; SDXL files are refused.
#[test]
fn wrong_width_and_sdxl_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let wide = dir.path().join("wide.safetensors");
    let t = Tensor::zeros((2, 768), DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("emb_params".to_string(), t.clone())]),
        &wide,
    )
    .unwrap();
    let mut m = tiny();
    let e = Embedding::load(&wide).unwrap();
    let msg = embedding::attach(&mut m.clip, &[e])
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("wide.safetensors") && msg.contains("768") && msg.contains("32"),
        "{msg}"
    );
    let xl = dir.path().join("xl.safetensors");
    let g = Tensor::zeros((2, 1280), DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("clip_l".to_string(), t), ("clip_g".to_string(), g)]),
        &xl,
    )
    .unwrap();
    let msg = Embedding::load(&xl).unwrap_err().to_string();
    assert!(
        msg.contains("xl.safetensors") && msg.contains("SDXL"),
        "{msg}"
    );
    // In a folder the unusable file is skipped, unless the prompt uses its name.
    let found = embedding::load_dir(dir.path(), 32, &["a photo"]).unwrap();
    assert_eq!((found.embeddings.len(), found.skipped.len()), (0, 2));
    let msg = embedding::load_dir(dir.path(), 32, &["a wide photo"])
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("wide.safetensors"), "{msg}");
}

fn sample(dir: Option<&Path>, prompt: &str, out: &Path) -> (Vec<u8>, serde_json::Value, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sdkit"));
    cmd.args(["sample", "--model"])
        .arg(common::checkpoints().join("sd1_diffusers"))
        .args([
            "--prompt",
            prompt,
            "--steps",
            "3",
            "--sampler",
            "ddim",
            "--seed",
            "5",
        ])
        .args([
            "--width", "32", "--height", "32", "--quiet", "--json", "--out",
        ])
        .arg(out);
    if let Some(d) = dir {
        cmd.arg("--embeddings").arg(d);
    }
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rep: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let png = PathBuf::from(rep["images"][0].as_str().unwrap());
    let text = sdkit::formats::png_params::read_parameters(&png)
        .unwrap()
        .unwrap();
    (image::open(&png).unwrap().to_rgb8().into_raw(), rep, text)
}

/// `sample --embeddings DIR` uses a file by its stem: the image changes only when the
/// name is in the prompt, and the PNG records webui's `TI hashes`.
#[test]
fn sample_embeddings_by_stem_change_the_image_only_when_named() {
    let out = tempfile::tempdir().unwrap();
    let dir = fixtures().join("kohya");
    let (base, _, _) = sample(None, PROMPT, out.path());
    let (with, rep, text) = sample(Some(&dir), PROMPT, out.path());
    assert_ne!(base, with, "the embedding changes the image");
    assert_eq!(rep["embeddings_used"], serde_json::json!(["myemb"]));
    let t = sdkit::formats::png_params::parse(&text);
    let h = t.get("TI hashes").expect("TI hashes");
    assert!(
        h.starts_with("myemb: ") && h.len() == "myemb: ".len() + 12,
        "{h}"
    );
    let plain = "a photo of a cat, masterpiece";
    let (a, _, _) = sample(None, plain, out.path());
    let (b, rep, text) = sample(Some(&dir), plain, out.path());
    assert_eq!(a, b, "unused embeddings leave the image alone");
    assert_eq!(rep["embeddings_used"], serde_json::json!([]));
    assert!(!text.contains("TI hashes"));
}
