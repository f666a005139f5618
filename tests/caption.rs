//! End-to-end tests of `sdkit caption` on generated kohya-style datasets: file contents
//! after each operation, dry runs, undo byte for byte, invalid files, exit codes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn sdkit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdkit"))
        .args(args)
        .output()
        .expect("run sdkit")
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exit code")
}

/// A dataset under `img/`: (relative image path, caption bytes or none).
fn dataset(files: &[(&str, Option<&[u8]>)]) -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("img");
    for (rel, cap) in files {
        let img = root.join(rel);
        std::fs::create_dir_all(img.parent().unwrap()).unwrap();
        std::fs::write(&img, b"not decoded by caption ops").unwrap();
        if let Some(c) = cap {
            std::fs::write(img.with_extension("txt"), c).unwrap();
        }
    }
    (d, root)
}

fn read(root: &Path, rel: &str) -> String {
    std::fs::read_to_string(root.join(rel)).unwrap()
}

/// Every file under `root` except the `.sdkit` folder, with its bytes.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    walkdir::WalkDir::new(root)
        .into_iter()
        .filter_entry(|e| e.file_name() != ".sdkit")
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .map(|e| (e.path().to_path_buf(), std::fs::read(e.path()).unwrap()))
        .collect()
}

fn standard() -> (tempfile::TempDir, PathBuf) {
    dataset(&[
        (
            "10_ohwx/a.png",
            Some("\u{feff}1girl, red_hair, smile\r\nsecond line\r\n".as_bytes()),
        ),
        (
            "10_ohwx/b.jpg",
            Some(b"1girl,smile,smile, shirt, white shirt"),
        ),
        (
            "10_ohwx/c.webp",
            Some(b"1girl, hat, simple background, white background"),
        ),
        ("5_cat/d.JPEG", None),
        ("5_cat/e.tiff", Some(b"cat, ohwx")),
    ])
}

fn s(root: &Path) -> &str {
    root.to_str().unwrap()
}

#[test]
fn add_trigger_first_keeps_bom_crlf_and_skips_missing() {
    let (_d, root) = standard();
    let o = sdkit(&[
        "caption",
        "add",
        s(&root),
        "ohwx",
        "--position",
        "first",
        "-q",
    ]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        read(&root, "10_ohwx/a.txt"),
        "\u{feff}ohwx, 1girl, red_hair, smile\r\nsecond line\r\n"
    );
    assert_eq!(
        read(&root, "10_ohwx/b.txt"),
        "ohwx, 1girl, smile, smile, shirt, white shirt"
    );
    // Already present: moved to the front, not doubled.
    assert_eq!(read(&root, "5_cat/e.txt"), "ohwx, cat");
    assert!(!root.join("5_cat/d.txt").exists());

    let o = sdkit(&[
        "caption",
        "add",
        s(&root),
        "solo",
        "--position",
        "1",
        "--create-missing",
        "-q",
    ]);
    assert_eq!(code(&o), 0);
    assert_eq!(read(&root, "5_cat/d.txt"), "solo");
    assert_eq!(read(&root, "5_cat/e.txt"), "ohwx, solo, cat");
    let o = sdkit(&["caption", "add", s(&root), "x", "--position", "top"]);
    assert_eq!(code(&o), 2);
}

#[test]
fn remove_replace_with_exact_regex_and_filters() {
    let (_d, root) = standard();
    let o = sdkit(&[
        "caption",
        "remove",
        s(&root),
        "--regex",
        ".* background",
        "-q",
    ]);
    assert_eq!(code(&o), 0);
    assert_eq!(read(&root, "10_ohwx/c.txt"), "1girl, hat");

    // Only captions with `smile` and without `shirt`.
    let o = sdkit(&[
        "caption",
        "remove",
        s(&root),
        "1girl",
        "--where",
        "smile",
        "--where-not",
        "shirt",
        "-q",
    ]);
    assert_eq!(code(&o), 0);
    assert_eq!(
        read(&root, "10_ohwx/a.txt"),
        "\u{feff}red_hair, smile\r\nsecond line\r\n"
    );
    assert!(read(&root, "10_ohwx/b.txt").starts_with("1girl,"));
    assert_eq!(read(&root, "10_ohwx/c.txt"), "1girl, hat");

    let o = sdkit(&[
        "caption",
        "replace",
        s(&root),
        "hat",
        "black hat, hat ornament",
        "-q",
    ]);
    assert_eq!(code(&o), 0);
    assert_eq!(
        read(&root, "10_ohwx/c.txt"),
        "1girl, black hat, hat ornament"
    );
    let o = sdkit(&[
        "caption",
        "replace",
        s(&root),
        "--regex",
        "(.*)_hair",
        "$1 hair",
        "-q",
    ]);
    assert_eq!(code(&o), 0);
    assert!(read(&root, "10_ohwx/a.txt").starts_with("\u{feff}red hair, smile\r\n"));
    let o = sdkit(&["caption", "remove", s(&root), "--regex", "(unclosed"]);
    assert_eq!(code(&o), 2);
    assert!(String::from_utf8_lossy(&o.stderr).contains("invalid pattern"));
}

#[test]
fn dedupe_sort_prune_normalize() {
    let (_d, root) = standard();
    let o = sdkit(&["caption", "dedupe", s(&root), "--subsumed", "-q"]);
    assert_eq!(code(&o), 0);
    assert_eq!(read(&root, "10_ohwx/b.txt"), "1girl, smile, white shirt");

    let o = sdkit(&[
        "caption",
        "sort",
        s(&root),
        "--by",
        "frequency",
        "--keep-first",
        "1",
        "-q",
    ]);
    assert_eq!(code(&o), 0);
    // smile (2 captions) before the tags held once; ties A to Z; first tag kept in place.
    assert_eq!(
        read(&root, "10_ohwx/c.txt"),
        "1girl, hat, simple background, white background"
    );
    assert!(read(&root, "10_ohwx/a.txt").starts_with("\u{feff}1girl, smile, red_hair\r\n"));
    let o = sdkit(&["caption", "sort", s(&root), "-q"]);
    assert_eq!(code(&o), 0);
    assert_eq!(read(&root, "5_cat/e.txt"), "cat, ohwx");

    // 1girl is in 3 of 4 captions (75%): pruned above 0.7, never above 0.8.
    let o = sdkit(&["caption", "prune", s(&root), "--above", "0.8", "--json"]);
    assert_eq!(code(&o), 0);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["changed"], 0);
    let o = sdkit(&[
        "caption",
        "prune",
        s(&root),
        "--above",
        "0.7",
        "--keep",
        "cat",
        "-q",
    ]);
    assert_eq!(code(&o), 0);
    assert_eq!(read(&root, "10_ohwx/b.txt"), "smile, white shirt");
    assert_eq!(read(&root, "5_cat/e.txt"), "cat, ohwx");

    std::fs::write(
        root.join("5_cat/e.txt"),
        " cat_ears ,,ganyu_(genshin impact),  ^_^ ",
    )
    .unwrap();
    let o = sdkit(&[
        "caption",
        "normalize",
        s(&root),
        "--brackets",
        "escape",
        "-q",
    ]);
    assert_eq!(code(&o), 0);
    assert_eq!(
        read(&root, "5_cat/e.txt"),
        "cat ears, ganyu \\(genshin impact\\), ^_^"
    );
    let o = sdkit(&["caption", "prune", s(&root), "--above", "1.5"]);
    assert_eq!(code(&o), 2);
}

#[test]
fn dry_run_changes_nothing() {
    let (_d, root) = standard();
    let before = snapshot(&root);
    for args in [
        vec!["add", "ohwx"],
        vec!["remove", "smile"],
        vec!["replace", "smile", "grin"],
        vec!["dedupe"],
        vec!["sort"],
        vec!["prune", "--above", "0.5"],
        vec!["normalize"],
    ] {
        let mut full = vec!["caption", args[0], s(&root)];
        full.extend(&args[1..]);
        full.push("--dry-run");
        let o = sdkit(&full);
        let out = String::from_utf8_lossy(&o.stdout);
        assert_eq!(
            code(&o),
            0,
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(out.contains("dry run: nothing written"), "{args:?}: {out}");
        assert!(out.contains("selected captions change"), "{out}");
    }
    assert_eq!(snapshot(&root), before);
    assert!(!root.join(".sdkit").exists());
    // The preview shows before and after lines.
    let o = sdkit(&["caption", "remove", s(&root), "smile", "--dry-run"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("  - 1girl, smile, smile, shirt, white shirt\n  + 1girl, shirt, white shirt"),
        "{out}"
    );
}

#[test]
fn undo_restores_every_byte_in_reverse_order() {
    let (_d, root) = standard();
    let before = snapshot(&root);
    for args in [
        vec!["add", "ohwx", "--create-missing"],
        vec!["normalize"],
        vec!["dedupe"],
        vec!["remove", "--regex", "s.*"],
    ] {
        let mut full = vec!["caption", args[0], s(&root), "-q"];
        full.extend(&args[1..]);
        assert_eq!(code(&sdkit(&full)), 0, "{args:?}");
    }
    assert_ne!(snapshot(&root), before);
    assert!(root.join("5_cat/d.txt").exists());
    for _ in 0..3 {
        let o = sdkit(&["caption", "undo", s(&root)]);
        assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    }
    let o = sdkit(&["caption", "undo", s(&root), "--json"]);
    assert_eq!(code(&o), 0);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["remaining"], 0);
    assert_eq!(snapshot(&root), before);
    let o = sdkit(&["caption", "undo", s(&root)]);
    assert_eq!(code(&o), 1);
    assert!(String::from_utf8_lossy(&o.stderr).contains("nothing to undo"));
}

#[test]
fn undo_refuses_to_overwrite_later_hand_edits_unless_forced() {
    let (_d, root) = standard();
    let before = snapshot(&root);
    assert_eq!(code(&sdkit(&["caption", "add", s(&root), "ohwx", "-q"])), 0);
    std::fs::write(root.join("10_ohwx/b.txt"), "edited by hand").unwrap();
    let o = sdkit(&["caption", "undo", s(&root)]);
    assert_eq!(code(&o), 1);
    assert!(String::from_utf8_lossy(&o.stderr).contains("b.txt: changed since the edit"));
    assert_eq!(read(&root, "10_ohwx/b.txt"), "edited by hand");
    assert!(read(&root, "10_ohwx/a.txt").contains("ohwx"));
    let o = sdkit(&["caption", "undo", s(&root), "--force"]);
    assert_eq!(code(&o), 0);
    assert_eq!(snapshot(&root), before);
}

#[test]
fn invalid_utf8_is_reported_untouched_and_fails_the_run() {
    let (_d, root) = dataset(&[
        ("1_x/good.png", Some(b"smile")),
        ("1_x/bad.png", Some(b"smile, \xff\xfe")),
    ]);
    let o = sdkit(&["caption", "add", s(&root), "ohwx", "--json"]);
    assert_eq!(code(&o), 1);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("bad.txt") && err.contains("not valid UTF-8"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(root.join("1_x/bad.txt")).unwrap(),
        b"smile, \xff\xfe"
    );
    assert_eq!(read(&root, "1_x/good.txt"), "ohwx, smile");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (v["written"].as_u64(), v["failed"].as_array().unwrap().len()),
        (Some(1), 1)
    );
    // Undo restores the good file and never touches the bad one.
    assert_eq!(code(&sdkit(&["caption", "undo", s(&root), "-q"])), 0);
    assert_eq!(read(&root, "1_x/good.txt"), "smile");
    assert_eq!(
        std::fs::read(root.join("1_x/bad.txt")).unwrap(),
        b"smile, \xff\xfe"
    );
}

#[test]
fn stats_json_and_text() {
    let (_d, root) = standard();
    std::fs::write(root.join("5_cat/e.txt"), " , ").unwrap();
    let o = sdkit(&["caption", "stats", s(&root), "--json"]);
    assert_eq!(code(&o), 0);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["images"], 5);
    assert_eq!(v["captioned"], 4);
    assert_eq!(v["missing"][0], "5_cat/d.JPEG");
    assert_eq!(v["empty"][0], "5_cat/e.tiff");
    assert_eq!(v["tags"][0]["tag"], "1girl");
    assert_eq!(v["tags"][0]["count"], 3);
    assert_eq!(v["folders"][0]["folder"], "10_ohwx");
    assert_eq!(v["folders"][0]["tags"][0]["share"], 1.0);
    let o = sdkit(&["caption", "stats", s(&root), "--where", "hat"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.starts_with("1 images, 1 captioned"), "{out}");
    let o = sdkit(&["caption", "stats", "/nonexistent/sdkit-test"]);
    assert_eq!(code(&o), 2);
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/sdkit-test"));
}

#[test]
fn help_has_examples() {
    for sub in [
        "add",
        "remove",
        "replace",
        "dedupe",
        "sort",
        "prune",
        "normalize",
        "stats",
        "undo",
    ] {
        let o = sdkit(&["caption", sub, "--help"]);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains("Example:\n  sdkit caption"), "{sub}: {out}");
    }
    let o = sdkit(&["review", "--help"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("Example:\n  sdkit review"));
}
