//! Each command's reference page, docs/<command>.md, names every option of
//! `sdkit <command> --help` and no option the command does not have, so the two cannot
//! drift apart; every command has a page.
//!
//! - `docs/train-lora.md` is the page of `sdkit train lora` (`-` separates the words).
//! - A command with subcommands (`sdkit caption add`, ...) has one page. A `## ` heading
//!   that names `sdkit caption add` starts the section of that subcommand; the other
//!   sections (the introduction, common options) are shared. Each subcommand's options
//!   must be named in its section or a shared one; a section names only options of its
//!   subcommand, a shared one only options some subcommand has.
//! - ```` ```text ```` blocks show file contents and output (kohya's prompt-file flags,
//!   a report), not sdkit command lines; options in them are not checked.
//! - Pages in `NOT_COMMANDS` are developer material, not command references.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const NOT_COMMANDS: &[&str] = &["internals"];

fn docs_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs")
}

/// The `--help` text of `sdkit <words>`.
fn help(words: &[&str]) -> String {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sdkit"))
        .args(words)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "sdkit {} --help failed (a docs page that is no command's goes in NOT_COMMANDS): {}",
        words.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Long options defined by a `--help` text (the lines that start an option entry).
fn help_options(help: &str) -> BTreeSet<String> {
    let re = regex::Regex::new(r"^\s+(?:-[A-Za-z], )?(--[a-z][a-z0-9-]*)").unwrap();
    help.lines()
        .filter_map(|l| re.captures(l).map(|c| c[1].to_string()))
        .collect()
}

/// The subcommands a `--help` text lists under `Commands:` (without `help`).
fn subcommands(help: &str) -> Vec<String> {
    let mut lines = help.lines().skip_while(|l| l.trim() != "Commands:").skip(1);
    let mut subs = Vec::new();
    for l in lines.by_ref() {
        if l.trim().is_empty() {
            break;
        }
        let name = l.split_whitespace().next().unwrap_or_default();
        if name != "help" {
            subs.push(name.to_string());
        }
    }
    subs
}

/// Every `--option` a piece of a page mentions, outside ```` ```text ```` blocks.
fn doc_options(text: &str) -> BTreeSet<String> {
    let re = regex::Regex::new(r"--[a-z][a-z0-9-]*").unwrap();
    let mut in_text_block = false;
    let mut found = BTreeSet::new();
    for line in text.lines() {
        let t = line.trim_start();
        if in_text_block {
            in_text_block = !t.starts_with("```");
            continue;
        }
        if t.starts_with("```text") {
            in_text_block = true;
            continue;
        }
        found.extend(re.find_iter(line).map(|m| m.as_str().to_string()));
    }
    found
}

/// A page cut at its `## ` headings: the sections naming `sdkit <cmd> <sub>` by
/// subcommand, everything else together as the shared text.
fn sections(text: &str, cmd: &str, subs: &[String]) -> (String, BTreeMap<String, String>) {
    let mut shared = String::new();
    let mut own: BTreeMap<String, String> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if let Some(heading) = line.strip_prefix("## ") {
            current = subs
                .iter()
                .find(|s| {
                    let name = format!("sdkit {cmd} {s}");
                    heading.contains(&format!("{name}`")) || heading.contains(&format!("{name} "))
                })
                .cloned();
        }
        let out = match &current {
            Some(s) => own.entry(s.clone()).or_default(),
            None => &mut shared,
        };
        out.push_str(line);
        out.push('\n');
    }
    (shared, own)
}

/// Checks one page against the `--help` of its command (and of each subcommand).
fn check_page(page: &str, text: &str) {
    // docs/train-lora.md: `sdkit train lora`; a subcommand with a dash in its name keeps
    // it (docs/train-textual-inversion.md: `sdkit train textual-inversion`).
    let words: Vec<&str> = match page.split_once('-') {
        Some((cmd, sub)) => vec![cmd, sub],
        None => vec![page],
    };
    let cmd = words.join(" ");
    let top = help(&words);
    let subs = subcommands(&top);
    let targets: Vec<(String, String)> = if subs.is_empty() {
        vec![(String::new(), top)]
    } else {
        subs.iter()
            .map(|s| {
                let mut w = words.clone();
                w.push(s.as_str());
                (s.clone(), help(&w))
            })
            .collect()
    };
    let (shared, own) = sections(text, &cmd, &subs);
    let shared_docs = doc_options(&shared);
    let mut all_help = BTreeSet::new();
    for (sub, h) in &targets {
        let name = format!("sdkit {cmd} {sub}");
        assert!(h.contains("Example"), "`{name}` --help has no example");
        let opts = help_options(h);
        assert!(
            opts.contains("--help"),
            "{name}: no options found in --help"
        );
        let section = doc_options(own.get(sub).map_or("", String::as_str));
        let undocumented: Vec<_> = opts
            .iter()
            .filter(|f| *f != "--help" && !section.contains(*f) && !shared_docs.contains(*f))
            .collect();
        assert!(
            undocumented.is_empty(),
            "docs/{page}.md does not name {undocumented:?} of `{name}`"
        );
        // --config (recipes) is handled before clap for every command.
        let unknown: Vec<_> = section
            .iter()
            .filter(|f| *f != "--config" && !opts.contains(*f))
            .collect();
        assert!(
            unknown.is_empty(),
            "docs/{page}.md names {unknown:?} under `{name}`, which does not have them"
        );
        all_help.extend(opts);
    }
    assert!(all_help.len() > 2, "{cmd}: no options found in --help");
    let unknown: Vec<_> = shared_docs
        .iter()
        .filter(|f| *f != "--config" && !all_help.contains(*f))
        .collect();
    assert!(
        unknown.is_empty(),
        "docs/{page}.md names {unknown:?}, which `sdkit {cmd}` does not have"
    );
}

#[test]
fn every_docs_page_matches_its_commands_help() {
    let mut pages = 0;
    for e in std::fs::read_dir(docs_dir()).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_none_or(|x| x != "md") {
            continue;
        }
        let page = path.file_stem().unwrap().to_string_lossy().into_owned();
        if NOT_COMMANDS.contains(&page.as_str()) {
            continue;
        }
        check_page(&page, &std::fs::read_to_string(&path).unwrap());
        pages += 1;
    }
    assert!(pages > 0, "no pages in docs/");
}

#[test]
fn every_command_has_a_docs_page() {
    let names: Vec<String> = std::fs::read_dir(docs_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let commands = subcommands(&help(&[]));
    assert!(commands.len() > 3, "no commands found in `sdkit --help`");
    for c in commands {
        assert!(
            names
                .iter()
                .any(|n| *n == format!("{c}.md") || n.starts_with(&format!("{c}-"))),
            "`sdkit {c}` has no page in docs/ (docs/{c}.md, or docs/{c}-<subcommand>.md)"
        );
    }
}

#[test]
fn sections_and_text_blocks_are_read_as_documented() {
    let subs = vec!["add".to_string(), "undo".to_string()];
    let page = "# caption\nshared --where\n## `sdkit caption add`\n--position\n\
                ```text\nprompt --n neg\n```\n## Files\n--json\n## `sdkit caption undo`\n--force\n";
    let (shared, own) = sections(page, "caption", &subs);
    assert_eq!(
        doc_options(&shared),
        BTreeSet::from(["--where".to_string(), "--json".to_string()])
    );
    assert_eq!(
        doc_options(&own["add"]),
        BTreeSet::from(["--position".to_string()])
    );
    assert_eq!(
        doc_options(&own["undo"]),
        BTreeSet::from(["--force".to_string()])
    );
}
