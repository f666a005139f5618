//! The CLIP tokenizer and prompt handling against reference outputs written by
//! tests/fixtures/gen_tokenizer_fixtures.py (open_clip's SimpleTokenizer, transformers'
//! CLIPTokenizer, A1111's prompt algorithms, kohya's max_token_length layout).

use std::path::Path;
use std::process::Command;

use sdkit::model::prompt::{self, ChunkOptions, Pad};
use sdkit::model::{BOS, ClipTokenizer, EOS};
use serde_json::Value;

fn fixture(name: &str) -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tokenizer")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// `[head, value, count]` -> head + [value] * count (the generator's packing).
fn unpack(v: &Value) -> Vec<f64> {
    let a = v.as_array().unwrap();
    let mut out: Vec<f64> = a[0]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let n = a[2].as_u64().unwrap() as usize;
    out.extend(std::iter::repeat_n(a[1].as_f64().unwrap(), n));
    out
}

fn unpack_ids(v: &Value) -> Vec<u32> {
    unpack(v).into_iter().map(|x| x as u32).collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * a.abs().max(1.0)
}

#[test]
fn corpus_matches_open_clip_and_transformers() {
    let tok = ClipTokenizer::shared();
    let corpus = fixture("corpus_ids.json");
    let corpus = corpus.as_array().unwrap();
    assert!(corpus.len() >= 290);
    let mut mismatches = Vec::new();
    for e in corpus {
        let p = e["prompt"].as_str().unwrap();
        // Literal special tokens: OpenAI's tokenizer and transformers map them to their
        // ids; open_clip, which renamed its specials, splits them as text.
        let literal_special = p.contains("<|startoftext|>") || p.contains("<|endoftext|>");
        let expect = if literal_special {
            ids(&e["hf"])
        } else {
            ids(&e["ids"])
        };
        let got = tok.encode(p);
        if got != expect {
            mismatches.push(format!("{p:?}\n  got    {got:?}\n  expect {expect:?}"));
        }
        if let Some(hf) = e.get("hf") {
            // transformers 5's CLIPTokenizer has no ftfy / HTML cleanup: the prompts where it
            // differs are exactly those with characters that cleanup changes.
            let cleanup_sensitive = literal_special
                || p.chars().any(|c| {
                    matches!(c, '&' | '\u{2018}'..='\u{201F}' | '\u{FB00}'..='\u{FB06}'
                        | '\u{FF00}'..='\u{FFEF}' | '\u{3000}' | '\u{FEFF}' | 'Σ')
                        || (c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
                });
            assert!(cleanup_sensitive, "transformers differs on {p:?}: {hf}");
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

#[test]
fn emphasis_example_from_a1111_docs() {
    let f = prompt::parse_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).").unwrap();
    let expect = [
        ("a ", 1.0),
        ("house", 1.573),
        (" ", 1.1),
        ("on", 1.0),
        (" a ", 1.1),
        ("hill", 0.55),
        (", sun, ", 1.1),
        ("sky", 1.4641),
        (".", 1.1),
    ];
    assert_eq!(f.len(), expect.len(), "{f:?}");
    for (g, (t, w)) in f.iter().zip(expect) {
        assert_eq!(g.text, t);
        assert!((g.weight - w).abs() < 1e-9, "{g:?}");
    }
}

#[test]
fn a1111_parse_and_chunks_match_reference() {
    let tok = ClipTokenizer::shared();
    let cases = fixture("a1111.json");
    for c in cases.as_array().unwrap() {
        let p = c["prompt"].as_str().unwrap();
        let parsed = prompt::parse_attention(p);
        if c.get("error").is_some() {
            assert!(parsed.is_err(), "{p:?} should fail to parse");
            continue;
        }
        let frags = parsed.unwrap();
        let want = c["fragments"].as_array().unwrap();
        assert_eq!(frags.len(), want.len(), "{p:?}: {frags:?}");
        for (g, w) in frags.iter().zip(want) {
            assert_eq!(g.text, w[0].as_str().unwrap(), "{p:?}");
            assert!(
                close(g.weight, w[1].as_f64().unwrap()),
                "{p:?}: {g:?} vs {w}"
            );
        }
        let backtrack = c["backtrack"].as_u64().unwrap() as usize;
        for (pad, key) in [(Pad::Sd1, "sd1"), (Pad::Sd2, "sd2")] {
            let opts = ChunkOptions {
                pad,
                comma_backtrack: backtrack,
            };
            let (chunks, count) = prompt::a1111_chunks(tok, &frags, opts);
            assert_eq!(count, c["token_count"].as_u64().unwrap() as usize, "{p:?}");
            let want = c[key].as_array().unwrap();
            assert_eq!(chunks.len(), want.len(), "{p:?} {key}");
            for (k, (g, w)) in chunks.iter().zip(want).enumerate() {
                assert_eq!(g.tokens, unpack_ids(w), "{p:?} {key} chunk {k}");
                let ww = unpack(&c["weights"][k]);
                assert_eq!(g.weights.len(), 77);
                for (a, b) in g.weights.iter().zip(&ww) {
                    assert!(close(*a, *b), "{p:?} chunk {k}: {:?} vs {ww:?}", g.weights);
                }
            }
        }
    }
}

#[test]
fn kohya_layout_matches_reference() {
    let tok = ClipTokenizer::shared();
    let cases = fixture("kohya.json");
    let mut long = 0;
    for c in cases.as_array().unwrap() {
        let caption = c["caption"].as_str().unwrap();
        if tok.count(caption) > 75 {
            long += 1;
        }
        for l in c["layouts"].as_array().unwrap() {
            let mtl = l["max_token_length"].as_u64().unwrap() as usize;
            for (pad, key) in [(Pad::Sd1, "sd1"), (Pad::Sd2, "sd2")] {
                let got = prompt::kohya_chunks(tok, caption, mtl, pad);
                let want: Vec<Vec<u32>> =
                    l[key].as_array().unwrap().iter().map(unpack_ids).collect();
                assert_eq!(got, want, "{caption:?} max_token_length {mtl} {key}");
            }
        }
    }
    assert!(long >= 5, "fixture should hold captions past 75 tokens");
}

#[test]
fn chunk_layout_bos_eos_padding_break_and_commas() {
    let tok = ClipTokenizer::shared();
    let sd1 = ChunkOptions::default();
    let sd2 = ChunkOptions {
        pad: Pad::Sd2,
        ..sd1
    };
    // Empty prompt: one chunk, BOS then EOS everywhere (SD1) or EOS then zeros (SD2).
    let (c, n) = prompt::a1111_prompt(tok, "", sd1).unwrap();
    assert_eq!((c.len(), n), (1, 0));
    assert_eq!(c[0].tokens[0], BOS);
    assert!(c[0].tokens[1..].iter().all(|&t| t == EOS));
    let (c, _) = prompt::a1111_prompt(tok, "a cat", sd2).unwrap();
    assert_eq!(&c[0].tokens[..4], &[BOS, 320, 2368, EOS]);
    assert!(c[0].tokens[4..].iter().all(|&t| t == 0));

    // BREAK: a new chunk even though the first is nearly empty.
    let (c, n) = prompt::a1111_prompt(tok, "a cat BREAK a dog", sd1).unwrap();
    assert_eq!(c.len(), 2);
    assert_eq!(n, 75 + 2);
    assert_eq!(&c[1].tokens[..4], &[BOS, 320, 1929, EOS]);

    // 80 words with no comma: 75 + 5.
    let long = vec!["cat"; 80].join(" ");
    let (c, n) = prompt::a1111_prompt(tok, &long, sd1).unwrap();
    assert_eq!((c.len(), c[0].used, c[1].used, n), (2, 75, 5, 80));
    assert!(
        c.iter()
            .all(|x| x.tokens.len() == 77 && x.tokens[76] == EOS)
    );

    // A comma 10 tokens before the end of a full chunk: the 10 tokens after it move on.
    let text = format!(
        "{}, {}",
        vec!["cat"; 64].join(" "),
        vec!["dog"; 20].join(" ")
    );
    let (c, _) = prompt::a1111_prompt(tok, &text, sd1).unwrap();
    assert_eq!(c[0].used, 65);
    assert_eq!(c[0].tokens[65], 267);
    assert_eq!(c[1].used, 20);
    // ...unless the rule is off, or the comma is further back than the limit.
    let off = ChunkOptions {
        comma_backtrack: 0,
        ..sd1
    };
    let (c, _) = prompt::a1111_prompt(tok, &text, off).unwrap();
    assert_eq!((c[0].used, c[1].used), (75, 10));
    let far = format!(
        "{}, {}",
        vec!["cat"; 40].join(" "),
        vec!["dog"; 40].join(" ")
    );
    let (c, _) = prompt::a1111_prompt(tok, &far, sd1).unwrap();
    assert_eq!((c[0].used, c[1].used), (75, 6));

    // The limit is inclusive: a comma exactly 20 tokens back moves the tail, 21 does not.
    let at20 = format!(
        "{}, {}",
        vec!["cat"; 55].join(" "),
        vec!["dog"; 20].join(" ")
    );
    let (c, _) = prompt::a1111_prompt(tok, &at20, sd1).unwrap();
    assert_eq!((c[0].used, c[1].used), (56, 20));
    let at21 = format!(
        "{}, {}",
        vec!["cat"; 54].join(" "),
        vec!["dog"; 21].join(" ")
    );
    let (c, _) = prompt::a1111_prompt(tok, &at21, sd1).unwrap();
    assert_eq!((c[0].used, c[1].used), (75, 1));

    // kohya: 225 always gives three chunks; the tail past the limit is dropped.
    let k = prompt::kohya_chunks(tok, &vec!["cat"; 300].join(" "), 225, Pad::Sd1);
    assert_eq!(k.len(), 3);
    assert!(
        k.iter()
            .all(|c| c[0] == BOS && c[76] == EOS && c[1..76].iter().all(|&t| t == 2368))
    );
}

fn sdkit(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sdkit"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cli_prompt_text_and_json() {
    let (code, out, _) = sdkit(&["tokens", "a (red:1.5) cat BREAK dog"]);
    assert_eq!(code, 0);
    assert!(
        out.starts_with("4 tokens in 2 chunks (76/150 as A1111 counts)"),
        "{out}"
    );
    assert!(out.contains("  2    736  red</w>  x1.5000"), "{out}");
    assert!(out.contains("chunk 2/2: 1 tokens, 74 free"), "{out}");

    let (code, out, _) = sdkit(&["tokens", "--json", "--pad", "sd2", "a photo of sks dog"]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["token_count"], 5);
    assert_eq!(v["target"], 75);
    let t = ids(&v["chunks"][0]["tokens"]);
    assert_eq!(t.len(), 77);
    assert_eq!(&t[..7], &[BOS, 320, 1125, 539, 48136, 1929, EOS]);
    assert!(t[7..].iter().all(|&x| x == 0));
    assert_eq!(v["chunks"][0]["pieces"][3], "sks</w>");

    let (code, _, err) = sdkit(&["tokens", "(x:1.2.3)"]);
    assert_eq!(code, 2);
    assert!(err.contains("not a number"), "{err}");
}

#[test]
fn cli_captions_report_spill_strict_and_failures() {
    let dir = tempfile::tempdir().unwrap();
    let long = vec!["red hair"; 40].join(", "); // 40 * 3 - 1 = 119 tokens
    std::fs::write(dir.path().join("a.txt"), "1girl, solo, smile").unwrap();
    std::fs::create_dir(dir.path().join("10_sub")).unwrap();
    std::fs::write(
        dir.path().join("10_sub/b.txt"),
        format!("\u{feff}{long}\r\nsecond line"),
    )
    .unwrap();
    std::fs::write(dir.path().join("c.caption"), long.as_bytes()).unwrap();
    let d = dir.path().to_str().unwrap();

    let (code, out, _) = sdkit(&["tokens", "--captions", d]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("    6  a.txt"), "{out}");
    assert!(
        out.contains("  119  10_sub/b.txt  SPILL +44, kohya drops 44: \"red hair , red hair"),
        "{out}"
    );
    assert!(
        out.contains("2 captions: 1 within 75 tokens, 1 spill past the first chunk"),
        "{out}"
    );

    let (code, _, _) = sdkit(&["tokens", "--captions", d, "--strict"]);
    assert_eq!(code, 1);
    let (code, out, _) = sdkit(&[
        "tokens",
        "--captions",
        d,
        "--strict",
        "--max-token-length",
        "150",
    ]);
    assert_eq!(code, 1, "still spills past the first chunk");
    assert!(out.contains("0 truncated at max_token_length 150"), "{out}");

    let (code, out, _) = sdkit(&[
        "tokens",
        "--captions",
        d,
        "--caption-ext",
        "caption",
        "--json",
    ]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["summary"]["captions"], 1);
    assert_eq!(v["captions"][0]["tokens"], 119);
    assert_eq!(v["captions"][0]["dropped"], 44);

    std::fs::write(dir.path().join("bad.txt"), b"ok \xff\xfe").unwrap();
    let (code, out, err) = sdkit(&["tokens", "--captions", d, "--quiet"]);
    assert_eq!(code, 1, "a failed caption makes the run fail");
    assert!(err.contains("bad.txt: caption is not valid UTF-8"), "{err}");
    assert!(
        !out.contains("a.txt"),
        "--quiet lists only spilling captions: {out}"
    );
    assert!(out.contains("1 failed"), "{out}");
    assert_eq!(
        std::fs::read(dir.path().join("bad.txt")).unwrap(),
        b"ok \xff\xfe"
    );

    let (code, _, err) = sdkit(&["tokens", "--captions", "/nonexistent/dir"]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/dir: not a folder"), "{err}");
}
