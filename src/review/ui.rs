//! Terminal front end of `sdkit review`: one screen per image, single keys for the main
//! actions, dialoguer prompts for removing (multi-select), adding (with completion from
//! the dataset's vocabulary), reordering (sort prompt) and editing the caption.

use std::io;
use std::path::Path;

use console::{Key, Term, style};
use dialoguer::theme::ColorfulTheme;
use dialoguer::{Completion, Editor, Input, MultiSelect, Sort};

use super::preview::{self, Protocol};
use super::state::{Nav, Session, complete, save_position};
use crate::caption::select::relative;
use crate::dataset::caption_io::{join_tags, write_caption};

const HELP: &str = "enter save+next, b back, s skip, r remove, a add, o reorder, e edit, \
E $EDITOR, j jump, u undo changes, q quit";

struct Vocab<'a>(&'a [String]);

impl Completion for Vocab<'_> {
    fn get(&self, input: &str) -> Option<String> {
        complete(self.0, input)
    }
}

fn dialog_err(e: dialoguer::Error) -> io::Error {
    match e {
        dialoguer::Error::IO(e) => e,
    }
}

fn human_size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.0} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

fn image_info(path: &Path) -> String {
    let size = std::fs::metadata(path).map(|m| human_size(m.len()));
    let dims = image::image_dimensions(path);
    match (dims, size) {
        (Ok((w, h)), Ok(s)) => format!("{w}x{h}, {s}"),
        (Err(e), Ok(s)) => format!("{s}, unreadable image: {e}"),
        (_, Err(e)) => format!("cannot read: {e}"),
    }
}

fn show(term: &Term, root: &Path, s: &Session, protocol: Protocol, note: &str) -> io::Result<()> {
    term.clear_screen()?;
    let item = s.current();
    term.write_line(&format!(
        "{} {}  ({})",
        style(format!("[{}/{}]", s.position() + 1, s.len())).bold(),
        style(&item.rel).cyan(),
        image_info(&item.image)
    ))?;
    if protocol != Protocol::None {
        match preview::thumbnail(&item.image, 384) {
            Ok(img) => term.write_str(&preview::encode(&img, protocol))?,
            Err(e) => term.write_line(&format!("(no preview: {e})"))?,
        }
    }
    let rel = relative(root, &item.caption_path);
    let caption = if item.saved.is_some() {
        rel
    } else {
        format!("{rel} (none yet)")
    };
    term.write_line(&format!("caption: {caption}"))?;
    let dirty = if s.is_dirty() {
        " (unsaved changes)"
    } else {
        ""
    };
    term.write_line(&format!("tags ({}){dirty}:", s.tags().len()))?;
    if s.tags().is_empty() {
        term.write_line("  (none)")?;
    }
    for (i, t) in s.tags().iter().enumerate() {
        term.write_line(&format!("  {:>2}. {t}", i + 1))?;
    }
    if !note.is_empty() {
        term.write_line(&format!("{}", style(note).yellow()))?;
    }
    term.write_line(&format!("{}", style(HELP).dim()))?;
    term.flush()
}

/// Writes the pending edits of the current item. On failure returns the message and
/// the session stays where it is.
fn save(s: &mut Session) -> Result<(), String> {
    let Some(save) = s.pending_save() else {
        return Ok(());
    };
    write_caption(&save.path, &save.caption).map_err(|e| e.to_string())?;
    s.mark_saved(save);
    Ok(())
}

/// How a review ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    Finished,
    Quit,
}

/// Runs the review until the user quits or passes the last image. Every move saves the
/// current caption first and remembers the position in `root/.sdkit/review.json`.
/// `note` is shown on the first screen (e.g. how many captions could not be read).
pub fn run(
    term: &Term,
    root: &Path,
    s: &mut Session,
    vocab: &[String],
    protocol: Protocol,
    note: &str,
) -> io::Result<End> {
    let theme = ColorfulTheme::default();
    let mut note = note.to_string();
    loop {
        show(term, root, s, protocol, &note)?;
        note.clear();
        let nav = match term.read_key()? {
            Key::Enter | Key::Char('n') | Key::ArrowRight => Some(Nav::Next),
            Key::Char('b') | Key::ArrowLeft => Some(Nav::Back),
            Key::Char('s') => {
                s.revert();
                Some(Nav::Next)
            }
            Key::Char('q') | Key::Escape => {
                if let Err(e) = save(s) {
                    note = e;
                    continue;
                }
                save_position(root, s)?;
                return Ok(End::Quit);
            }
            Key::Char('u') => {
                s.revert();
                None
            }
            Key::Char('r') if !s.tags().is_empty() => {
                let picked = MultiSelect::with_theme(&theme)
                    .with_prompt("Tags to remove (space marks, enter confirms, esc cancels)")
                    .items(s.tags())
                    .interact_on_opt(term)
                    .map_err(dialog_err)?;
                if let Some(p) = picked {
                    s.remove(&p);
                }
                None
            }
            Key::Char('a') => {
                let text: String = Input::with_theme(&theme)
                    .with_prompt("Add tags (comma-separated, tab completes)")
                    .allow_empty(true)
                    .completion_with(&Vocab(vocab))
                    .interact_text_on(term)
                    .map_err(dialog_err)?;
                s.add(&text);
                None
            }
            Key::Char('o') if s.tags().len() > 1 => {
                let order = Sort::with_theme(&theme)
                    .with_prompt("Reorder (space picks a tag up, arrows move it, enter confirms)")
                    .items(s.tags())
                    .interact_on_opt(term)
                    .map_err(dialog_err)?;
                if let Some(o) = order {
                    s.reorder(&o);
                }
                None
            }
            Key::Char('e') => {
                let text: String = Input::with_theme(&theme)
                    .with_prompt("Caption")
                    .with_initial_text(join_tags(s.tags()))
                    .allow_empty(true)
                    .interact_text_on(term)
                    .map_err(dialog_err)?;
                s.set_text(&text);
                None
            }
            Key::Char('E') => {
                match Editor::new().edit(&join_tags(s.tags())) {
                    Ok(Some(text)) => s.set_text(text.lines().next().unwrap_or("")),
                    Ok(None) => {}
                    Err(e) => note = format!("editor failed: {e}"),
                }
                None
            }
            Key::Char('j') => {
                let q: String = Input::with_theme(&theme)
                    .with_prompt(format!("Go to (1-{} or part of a file name)", s.len()))
                    .allow_empty(true)
                    .interact_text_on(term)
                    .map_err(dialog_err)?;
                match s.find(&q) {
                    Some(i) => Some(Nav::Jump(i)),
                    None if q.trim().is_empty() => None,
                    None => {
                        note = format!("no image matches {q:?}");
                        None
                    }
                }
            }
            _ => None,
        };
        let Some(nav) = nav else { continue };
        if let Err(e) = save(s) {
            note = e;
            continue;
        }
        let moved = s.go(nav);
        save_position(root, s)?;
        if !moved {
            return Ok(End::Finished);
        }
    }
}
