//! `sdkit models`: the known model names and what is on disk (`list`), downloads ahead of
//! time (`fetch`). The work is in [`crate::hub`].

use crate::hub::{self, cache::Cache, download::Client, registry, resolve, wheel};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, Args, Serialize, Deserialize)]
#[command(
    after_help = "Example:\n  sdkit models list\n  sdkit models fetch wd14-convnext-v2 onnxruntime"
)]
pub struct ModelsArgs {
    #[command(subcommand)]
    pub op: ModelsOp,
}

#[derive(Debug, Clone, Subcommand, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum ModelsOp {
    /// Known model names, where each comes from, and whether it is on disk.
    #[command(after_help = "Example:\n  sdkit models list\n  sdkit models list --json")]
    List(ListArgs),
    /// Download models now: known names, owner/repo (diffusers), owner/repo:file, onnxruntime.
    #[command(
        after_help = "Example:\n  sdkit models fetch wd14-convnext-v2\n  sdkit models fetch onnxruntime\n  \
sdkit models fetch stable-diffusion-v1-5/stable-diffusion-v1-5:v1-5-pruned-emaonly.safetensors\n\n\
Hub files go to HF_HUB_CACHE (else $HF_HOME/hub, else ~/.cache/huggingface/hub), shared with\n\
Python's huggingface_hub; HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE=1 are honoured. Other files\n\
(onnxruntime, rembg models) go to SDKIT_CACHE (else ~/.cache/sdkit)."
    )]
    Fetch(FetchArgs),
}

#[derive(Debug, Clone, Default, Args, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct ListArgs {
    /// Print the list as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Default, Args, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct FetchArgs {
    /// Names to fetch.
    #[arg(required = true)]
    pub names: Vec<String>,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
    /// Print what was fetched as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// One row of `models list`.
#[derive(Debug, Serialize)]
pub struct Row {
    pub name: String,
    #[serde(rename = "use")]
    pub use_: &'static str,
    pub source: String,
    pub licence: String,
    pub about: String,
    /// Files present / files listed.
    pub on_disk: (usize, usize),
    pub paths: Vec<PathBuf>,
}

fn rows() -> Vec<Row> {
    let cache = Cache::from_env();
    registry::all()
        .into_iter()
        .map(|e| {
            let (source, paths): (String, Vec<Option<PathBuf>>) = if e.pypi.is_some() {
                let (pkg, version) = wheel::package();
                let lib = wheel::installed().ok().flatten();
                (format!("pypi:{pkg}=={version}"), vec![lib])
            } else {
                let src = match (&e.repo, &e.url) {
                    (Some(r), _) => format!("hf:{r}"),
                    (None, Some(u)) => u.clone(),
                    _ => String::new(),
                };
                (src, resolve::on_disk(&e, &cache))
            };
            let have: Vec<PathBuf> = paths.iter().flatten().cloned().collect();
            Row {
                name: e.name,
                use_: e.use_.name(),
                source,
                licence: e.licence,
                about: e.about,
                on_disk: (have.len(), paths.len()),
                paths: have,
            }
        })
        .collect()
}

/// One fetched name.
#[derive(Debug, Serialize)]
pub struct Fetched {
    pub name: String,
    pub paths: Vec<PathBuf>,
}

fn fetch_one(client: &Client, cache: &Cache, name: &str) -> Result<Vec<PathBuf>, hub::HubError> {
    if name.eq_ignore_ascii_case("onnxruntime") {
        return Ok(vec![wheel::fetch(client)?]);
    }
    if let Some(spec) = resolve::parse_repo(name) {
        return Ok(vec![match &spec.file {
            Some(_) => resolve::checkpoint(std::path::Path::new(name), client.quiet)?,
            None => resolve::diffusers_repo(client, cache, &spec)?,
        }]);
    }
    let e = registry::find(name, None)?;
    resolve::fetch_entry(client, cache, &e)
}

pub fn run(a: ModelsArgs) -> anyhow::Result<i32> {
    match a.op {
        ModelsOp::List(o) => {
            let rows = rows();
            if o.json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
                return Ok(0);
            }
            println!(
                "{:<20} {:<10} {:<8} {:<21} source",
                "name", "use", "on disk", "licence"
            );
            for r in &rows {
                let disk = match r.on_disk {
                    (0, _) => "-".to_string(),
                    (h, n) if h == n => "yes".to_string(),
                    (h, n) => format!("{h}/{n}"),
                };
                println!(
                    "{:<20} {:<10} {:<8} {:<21} {}",
                    r.name, r.use_, disk, r.licence, r.source
                );
            }
            println!(
                "\nhub cache: {}\nsdkit cache: {}\nAny hub repo works too: owner/repo (diffusers) or owner/repo:file.safetensors",
                Cache::from_env().root.display(),
                hub::sdkit_cache().display()
            );
            Ok(0)
        }
        ModelsOp::Fetch(o) => {
            let client = Client::new(o.quiet || o.json);
            let cache = Cache::from_env();
            let mut done = Vec::new();
            for name in &o.names {
                let paths = fetch_one(&client, &cache, name)?;
                if !o.json {
                    for p in &paths {
                        println!("{name}: {}", p.display());
                    }
                }
                done.push(Fetched {
                    name: name.clone(),
                    paths,
                });
            }
            if o.json {
                println!("{}", serde_json::to_string_pretty(&done)?);
            }
            Ok(0)
        }
    }
}
