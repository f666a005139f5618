//! Each command's reference page, docs/<command>.md, names every option of
//! `sdkit <command> --help` and no option the command does not have, so the two cannot
//! drift apart.

use std::collections::BTreeSet;
use std::path::Path;

/// Long options defined by a `--help` text (the lines that start an option entry).
fn help_options(help: &str) -> BTreeSet<String> {
    let re = regex::Regex::new(r"^\s+(?:-[A-Za-z], )?(--[a-z][a-z0-9-]*)").unwrap();
    help.lines()
        .filter_map(|l| re.captures(l).map(|c| c[1].to_string()))
        .collect()
}

/// Every `--option` a page mentions.
fn doc_options(text: &str) -> BTreeSet<String> {
    let re = regex::Regex::new(r"--[a-z][a-z0-9-]*").unwrap();
    re.find_iter(text).map(|m| m.as_str().to_string()).collect()
}

#[test]
fn every_docs_page_matches_its_commands_help() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    let mut pages = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_none_or(|x| x != "md") {
            continue;
        }
        let cmd = path.file_stem().unwrap().to_string_lossy().into_owned();
        let words: Vec<&str> = cmd.split('-').collect(); // docs/train-lora.md: `train lora`
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_sdkit"))
            .args(&words)
            .arg("--help")
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "sdkit {cmd} --help failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let help = help_options(&String::from_utf8_lossy(&o.stdout));
        assert!(help.len() > 2, "{cmd}: no options found in --help");
        let text = std::fs::read_to_string(&path).unwrap();
        let docs = doc_options(&text);
        let undocumented: Vec<_> = help
            .iter()
            .filter(|f| *f != "--help" && !docs.contains(*f))
            .collect();
        assert!(
            undocumented.is_empty(),
            "docs/{cmd}.md does not name {undocumented:?}"
        );
        // --config (recipes) is handled before clap for every command.
        let unknown: Vec<_> = docs
            .iter()
            .filter(|f| *f != "--config" && !help.contains(*f))
            .collect();
        assert!(
            unknown.is_empty(),
            "docs/{cmd}.md names {unknown:?}, which `sdkit {cmd}` does not have"
        );
        pages += 1;
    }
    assert!(pages > 0, "no pages in docs/");
}
