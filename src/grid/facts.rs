//! What the cells' infotexts and cache keys need to know about their files, read (and so
//! checked) before anything renders: checkpoint and LoRA hashes, the embedding files of an
//! axis and of `--embeddings` (their widths checked against the model's text encoder when
//! its config or tensor headers tell it), hypernetworks.
//!
//! An embedding axis attaches each file under the word the prompt uses
//! ([`Settings::embedding_name`]). webui calls an embedding by its file stem, so a cell's
//! infotext writes the file's stem where the prompt has that word, and names the stem in
//! `TI hashes`: with the file in webui's `embeddings/` folder, PNG Info gives the same
//! conditioning (the same vectors in the same place).

use super::plan::Settings;
use crate::adapters::embedding::{self, Embedding};
use crate::adapters::hypernetwork::{self, Hypernetwork};
use crate::formats::png_params::{self, GenParams};
use crate::model::placeholders::Placeholders;
use crate::model::tokenizer::{ClipTokenizer, VOCAB_SIZE};
use anyhow::{Context, bail};
use candle_core::Device;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// What the infotext of a cell needs to know about its files.
#[derive(Clone, Debug, Default)]
pub struct FileFacts {
    /// Checkpoint path -> (webui short hash, name).
    pub models: HashMap<PathBuf, (Option<String>, String)>,
    /// LoRA path -> `name: hash12` (webui's `Lora hashes` entry).
    pub loras: HashMap<PathBuf, String>,
    /// Embedding-axis and hypernetwork files -> SHA-256 (64 hex digits; `TI hashes` and
    /// `Hypernet hash` carry the first 12 / 10 of it, the cache key all of it).
    pub sha256: HashMap<PathBuf, String>,
    /// Embedding-axis files, read.
    pub embeddings: HashMap<PathBuf, Embedding>,
    /// (`--embeddings` folder, checkpoint) -> the folder's embeddings for that checkpoint.
    pub dirs: HashMap<(PathBuf, PathBuf), Vec<Embedding>>,
}

/// Whether two embedding names are the same name to webui (equal tokens).
pub fn same_name(a: &str, b: &str) -> bool {
    let tok = ClipTokenizer::shared();
    tok.encode(a) == tok.encode(b)
}

/// Hash every checkpoint and check and hash every adapter file of the cells, before
/// rendering: a missing or unreadable file, a LoRA that is not a safetensors file, an
/// embedding that is not one or is made for another text-encoder width, a hypernetwork
/// that is not webui's `.pt` is an error naming it.
pub fn file_facts<'a>(
    cells: impl Iterator<Item = &'a Settings> + Clone,
) -> anyhow::Result<FileFacts> {
    let mut f = FileFacts::default();
    let mut widths: HashMap<PathBuf, Option<usize>> = HashMap::new();
    let mut checked: HashSet<(PathBuf, PathBuf)> = HashSet::new();
    for s in cells.clone() {
        if !f.models.contains_key(&s.model) {
            let h = png_params::model_hash_and_name(&s.model)
                .with_context(|| format!("{}: cannot read", s.model.display()))?;
            f.models.insert(s.model.clone(), h);
        }
        if let Some(l) = &s.lora
            && !f.loras.contains_key(l)
        {
            f.loras.insert(l.clone(), lora_hash(l)?);
        }
        let width = *widths
            .entry(s.model.clone())
            .or_insert_with(|| crate::model::loader::text_width(&s.model));
        if let Some(e) = &s.embedding {
            if !f.embeddings.contains_key(e) {
                f.embeddings.insert(e.clone(), Embedding::load(e)?);
                f.sha256.insert(e.clone(), sha256(e)?);
            }
            if let Some(w) = width
                && checked.insert((e.clone(), s.model.clone()))
            {
                f.embeddings[e].check_width(w)?;
            }
        }
        if let Some(d) = &s.embeddings
            && let std::collections::hash_map::Entry::Vacant(slot) =
                f.dirs.entry((d.clone(), s.model.clone()))
        {
            // The prompts of every cell on this checkpoint: a file they call that
            // cannot be used is an error now.
            let prompts: Vec<&str> = cells
                .clone()
                .filter(|c| c.model == s.model)
                .flat_map(|c| [c.prompt.as_str(), c.negative.as_str()])
                .collect();
            let found = embedding::scan_dir(d, width, &prompts)?;
            slot.insert(found.embeddings);
        }
        if let Some(h) = &s.hypernetwork
            && !f.sha256.contains_key(h)
        {
            Hypernetwork::load(h, &Device::Cpu).map_err(anyhow::Error::msg)?;
            f.sha256.insert(h.clone(), sha256(h)?);
        }
    }
    Ok(f)
}

fn sha256(path: &Path) -> anyhow::Result<String> {
    png_params::sha256_hex(path).with_context(|| format!("{}: cannot read", path.display()))
}

fn lora_hash(path: &Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    if let Err(e) = safetensors::SafeTensors::read_metadata(&bytes) {
        bail!("{}: not a safetensors file: {e}", path.display());
    }
    let (h, _) = crate::formats::kohya_lora::addnet_hashes(&bytes);
    Ok(format!("{}: {}", stem(path), &h[..12]))
}

pub fn stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `text` with every use of the embedding name `word` replaced by `new`: case-insensitive
/// (the tokenizer lowercases), where no letter touches it on either side (where the
/// tokenizer starts and ends a word, so webui finds the name there).
pub fn rename_word(text: &str, word: &str, new: &str) -> String {
    if word.is_empty() || word == new {
        return text.to_string();
    }
    // ASCII lowercasing keeps byte offsets, so positions in `hay` are positions in `text`.
    let hay = text.to_ascii_lowercase();
    let needle = word.to_ascii_lowercase();
    let letter = |c: Option<char>| c.is_some_and(char::is_alphabetic);
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for (i, _) in hay.match_indices(&needle) {
        let end = i + needle.len();
        if letter(text[..i].chars().next_back()) || letter(text[end..].chars().next()) {
            continue;
        }
        out.push_str(&text[last..i]);
        out.push_str(new);
        last = end;
    }
    out.push_str(&text[last..]);
    out
}

/// The embeddings a cell's text encoder gets: the `--embeddings` folder's (`dir`, those
/// for the cell's checkpoint), less any called by the `reserved` name (the embedding
/// axis') or by the axis file's name, then the axis file (`axis`) under the name given.
pub fn cell_embeddings(
    dir: &[Embedding],
    axis: Option<(&Embedding, &str)>,
    reserved: Option<&str>,
) -> Vec<Embedding> {
    let mut out: Vec<Embedding> = dir
        .iter()
        .filter(|e| {
            let clash = |n: Option<&str>| n.is_some_and(|n| same_name(&e.name, n));
            !clash(reserved) && !clash(axis.map(|(_, n)| n))
        })
        .cloned()
        .collect();
    if let Some((e, name)) = axis {
        let mut e = e.clone();
        e.name = name.to_string();
        out.push(e);
    }
    out
}

/// webui's infotext of a cell: the prompt carries the embedding file's stem where the
/// prompt calls the embedding axis' name, `<lora:name:weight>` and
/// `<hypernet:name:strength>` as webui's own would; `TI hashes`, `Lora hashes` and
/// `Hypernet` / `Hypernet hash` / `Hypernet strength` name the files.
pub fn cell_params(s: &Settings, facts: &FileFacts) -> GenParams {
    let (hash, name) = facts.models.get(&s.model).cloned().unwrap_or_default();
    let (mut prompt, mut negative) = (s.prompt.clone(), s.negative.clone());
    let mut extra = vec![];
    let axis = match (&s.embedding, &s.embedding_name) {
        (Some(f), Some(word)) => {
            let st = stem(f);
            prompt = rename_word(&prompt, word, &st);
            negative = rename_word(&negative, word, &st);
            facts.embeddings.get(f).map(|e| (e, st))
        }
        _ => None,
    };
    let no_dir = Vec::new();
    let dir = s
        .embeddings
        .as_ref()
        .and_then(|d| facts.dirs.get(&(d.clone(), s.model.clone())))
        .unwrap_or(&no_dir);
    let list = cell_embeddings(
        dir,
        axis.as_ref().map(|(e, st)| (*e, st.as_str())),
        s.embedding_name.as_deref(),
    );
    let mut names = Placeholders::new(VOCAB_SIZE);
    let tok = ClipTokenizer::shared();
    for e in &list {
        let _ = names.add(tok, &e.name, e.n());
    }
    let ti = embedding::ti_hashes_of(&names, &list, &[&prompt, &negative]);
    if !ti.is_empty() {
        extra.push(("TI hashes".to_string(), ti));
    }
    if let Some(l) = &s.lora {
        let w = super::axes::fmt_float(s.weight);
        prompt = format!("{prompt} <lora:{}:{w}>", stem(l));
        if let Some(h) = facts.loras.get(l) {
            extra.push(("Lora hashes".to_string(), h.clone()));
        }
    }
    if let Some(h) = &s.hypernetwork {
        let st = super::axes::fmt_float(s.strength);
        prompt = format!("{prompt} <hypernet:{}:{st}>", stem(h));
        let hash = facts.sha256.get(h).map(|x| &x[..10]).unwrap_or_default();
        extra.extend(hypernetwork::infotext(&stem(h), hash, s.strength));
    }
    GenParams {
        prompt,
        negative,
        steps: s.steps,
        sampler: s.sampler.a1111_name().to_string(),
        cfg_scale: s.cfg,
        seed: s.seed,
        width: s.width,
        height: s.height,
        model_hash: hash,
        model: Some(name),
        clip_skip: s.clip_skip,
        extra,
    }
}

/// What the cache key of a cell holds besides its infotext: the whole SHA-256 of its
/// embedding and hypernetwork files and the name the embedding is attached under.
pub fn file_key(s: &Settings, facts: &FileFacts) -> String {
    let h = |p: &Option<PathBuf>| {
        p.as_ref()
            .and_then(|p| facts.sha256.get(p))
            .cloned()
            .unwrap_or_default()
    };
    format!(
        "embedding {} {:?}\nhypernetwork {}",
        h(&s.embedding),
        s.embedding_name,
        h(&s.hypernetwork)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rename_word_where_webui_finds_the_name() {
        let r = |t: &str| rename_word(t, "mycat", "mycat-000004");
        assert_eq!(r("a photo of mycat"), "a photo of mycat-000004");
        assert_eq!(
            r("(MyCat:1.2), mycat's toy, mycat2"),
            "(mycat-000004:1.2), mycat-000004's toy, mycat-0000042"
        );
        // inside another word the tokenizer sees another word: left alone
        assert_eq!(r("mycats, amycat"), "mycats, amycat");
        assert_eq!(rename_word("a mycat", "mycat", "mycat"), "a mycat");
        // the renamed prompt calls the renamed file where the original called the name
        let t = ClipTokenizer::shared();
        for p in ["a photo of mycat", "mycat's toy", "(mycat:1.2)"] {
            assert!(Placeholders::mentions(t, p, "mycat"));
            assert!(Placeholders::mentions(t, &r(p), "mycat-000004"), "{p}");
        }
    }
}
