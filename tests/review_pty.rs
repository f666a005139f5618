//! Drives `sdkit review` in a real pseudo-terminal: presses keys as a user would and
//! checks the caption files afterwards. Every wait is for text on the screen, with a
//! generous timeout; nothing depends on how fast the machine is.

#![cfg(unix)]

use std::path::Path;
use std::process::Command;

use rexpect::session::{PtySession, spawn_command};

const TIMEOUT_MS: u64 = 60_000;
const DOWN: &str = "\x1b[B";

fn png(path: &Path, w: u32, h: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::RgbImage::from_pixel(w, h, image::Rgb([200, 30, 30]))
        .save(path)
        .unwrap();
}

fn spawn(root: &Path) -> PtySession {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sdkit"));
    cmd.arg("review").arg(root).args(["--preview", "none"]);
    cmd.env("TERM", "xterm").env("NO_COLOR", "1");
    for k in [
        "KITTY_WINDOW_ID",
        "TERM_PROGRAM",
        "LC_TERMINAL",
        "TMUX",
        "EDITOR",
        "VISUAL",
    ] {
        cmd.env_remove(k);
    }
    spawn_command(cmd, Some(TIMEOUT_MS)).expect("spawn sdkit review in a pty")
}

/// Waits for `text` on the screen.
fn wait(p: &mut PtySession, text: &str) {
    if let Err(e) = p.exp_string(text) {
        panic!("waiting for {text:?}: {e}");
    }
}

fn key(p: &mut PtySession, keys: &str) {
    p.send(keys).unwrap();
    p.flush().unwrap();
}

#[test]
fn review_edits_in_a_terminal_and_remembers_the_position() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("img");
    let dir = root.join("10_ohwx");
    png(&dir.join("a.png"), 8, 6);
    png(&dir.join("b.png"), 4, 4);
    png(&dir.join("c.png"), 4, 4);
    png(&dir.join("z_bad.png"), 4, 4);
    std::fs::write(
        dir.join("a.txt"),
        "\u{feff}1girl, red_hair, smile\r\nextra\r\n",
    )
    .unwrap();
    std::fs::write(dir.join("b.txt"), "1girl, smile, hat").unwrap();
    std::fs::write(dir.join("z_bad.txt"), b"smile, \xff").unwrap();

    let mut p = spawn(&root);
    wait(&mut p, "[1/3]");
    wait(&mut p, "10_ohwx/a.png");
    wait(&mut p, "8x6");
    wait(&mut p, "1 unreadable caption(s)");
    wait(&mut p, "q quit");

    // Remove the second tag (red_hair) with the multi-select.
    key(&mut p, "r");
    wait(&mut p, "Tags to remove");
    key(&mut p, &format!("{DOWN} \r"));
    wait(&mut p, "tags (2) (unsaved changes)");

    // Add two tags; the second is completed from the dataset's vocabulary with tab.
    key(&mut p, "a");
    wait(&mut p, "Add tags");
    key(&mut p, "blue eyes, ha\t");
    wait(&mut p, "blue eyes, hat");
    key(&mut p, "\r");
    wait(&mut p, "tags (4) (unsaved changes)");

    // Reorder: pick up the first tag and move it one place down.
    key(&mut p, "o");
    wait(&mut p, "Reorder");
    key(&mut p, &format!(" {DOWN} \r"));
    wait(&mut p, "1. smile");

    // Save and move on.
    key(&mut p, "\r");
    wait(&mut p, "[2/3]");
    wait(&mut p, "q quit");

    // Edit the whole caption: delete ", hat" and type a new tag.
    key(&mut p, "e");
    wait(&mut p, "Caption");
    key(&mut p, &"\x7f".repeat(5));
    key(&mut p, ", red scarf\r");
    wait(&mut p, "3. red scarf");

    // Back (saves b), then jump to the third image.
    key(&mut p, "b");
    wait(&mut p, "[1/3]");
    wait(&mut p, "q quit");
    key(&mut p, "j");
    wait(&mut p, "Go to");
    key(&mut p, "3\r");
    wait(&mut p, "[3/3]");
    wait(&mut p, "(none yet)");

    // Add tags, then skip: the edit is dropped and the review ends after the last image.
    key(&mut p, "a");
    wait(&mut p, "Add tags");
    key(&mut p, "dropped\r");
    wait(&mut p, "tags (1) (unsaved changes)");
    key(&mut p, "s");
    wait(&mut p, "reached the last image: 2 captions saved");
    p.exp_eof().unwrap();

    assert_eq!(
        std::fs::read_to_string(dir.join("a.txt")).unwrap(),
        "\u{feff}smile, 1girl, blue eyes, hat\r\nextra\r\n"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("b.txt")).unwrap(),
        "1girl, smile, red scarf"
    );
    assert!(!dir.join("c.txt").exists());
    assert_eq!(
        std::fs::read(dir.join("z_bad.txt")).unwrap(),
        b"smile, \xff"
    );

    // The next run starts where the last one stopped; quitting saves pending edits.
    let mut p = spawn(&root);
    wait(&mut p, "[3/3]");
    wait(&mut p, "q quit");
    key(&mut p, "a");
    wait(&mut p, "Add tags");
    key(&mut p, "ohwx, cat\r");
    wait(&mut p, "tags (2) (unsaved changes)");
    key(&mut p, "q");
    wait(&mut p, "stopped: 1 captions saved");
    p.exp_eof().unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join("c.txt")).unwrap(),
        "ohwx, cat"
    );
    let remembered = std::fs::read_to_string(root.join(".sdkit/review.json")).unwrap();
    assert!(remembered.contains("10_ohwx/c.png"), "{remembered}");
}

#[test]
fn review_of_captionless_images_only() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    png(&root.join("1_x/has.png"), 2, 2);
    png(&root.join("1_x/none.png"), 2, 2);
    std::fs::write(root.join("1_x/has.txt"), "tag").unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sdkit"));
    cmd.arg("review")
        .arg(root)
        .args(["--missing", "--preview", "none"]);
    cmd.env("TERM", "xterm").env("NO_COLOR", "1");
    let mut p = spawn_command(cmd, Some(TIMEOUT_MS)).unwrap();
    wait(&mut p, "[1/1]");
    wait(&mut p, "1_x/none.png");
    wait(&mut p, "q quit");
    key(&mut p, "a");
    wait(&mut p, "Add tags");
    key(&mut p, "new tag\r");
    wait(&mut p, "tags (1) (unsaved changes)");
    key(&mut p, "\r");
    wait(&mut p, "reached the last image: 1 captions saved");
    p.exp_eof().unwrap();
    assert_eq!(
        std::fs::read_to_string(root.join("1_x/none.txt")).unwrap(),
        "new tag"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("1_x/has.txt")).unwrap(),
        "tag"
    );
}
