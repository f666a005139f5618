//! The index of a grid folder: `grid.json` (axes, every cell's file, settings, infotext
//! and place in its grid image) and `index.html`, a static page showing each grid with
//! links to its cells.

use super::plan::Settings;
use super::render::Layout;
use std::path::Path;

#[derive(Clone, Debug, serde::Serialize)]
pub struct AxisEntry {
    pub kind: super::axes::AxisKind,
    pub labels: Vec<String>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct CellEntry {
    pub x: usize,
    pub y: usize,
    pub z: usize,
    /// Relative to the grid folder.
    pub file: String,
    /// The cell's rectangle in its grid image: [left, top, width, height].
    pub rect: [usize; 4],
    /// Rendered by this run (false: an identical earlier render was kept).
    pub rendered: bool,
    /// Hash of everything the pixels depend on (also in the PNG's `sdkit-grid` chunk).
    pub key: String,
    pub parameters: String,
    pub settings: Settings,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct GridEntry {
    pub z: usize,
    pub title: Option<String>,
    pub file: String,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Index {
    pub x: Option<AxisEntry>,
    pub y: Option<AxisEntry>,
    pub z: Option<AxisEntry>,
    pub layout: Layout,
    pub grids: Vec<GridEntry>,
    pub cells: Vec<CellEntry>,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A self-contained page: each grid image, then a table of its cells (linked files, the
/// label of their column and row in the headers, the infotext as a tooltip).
pub fn html(ix: &Index) -> String {
    let mut h = String::from(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>sdkit grid</title>\n\
<style>body{font-family:sans-serif;margin:1em}img{image-rendering:auto;max-width:100%}\
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px;font-size:small}\
td img{width:128px}</style></head><body>\n",
    );
    let label = |a: &Option<AxisEntry>, i: usize| {
        a.as_ref()
            .and_then(|a| a.labels.get(i).cloned())
            .unwrap_or_default()
    };
    for g in &ix.grids {
        if let Some(t) = &g.title {
            h.push_str(&format!("<h2>{}</h2>\n", esc(t)));
        }
        h.push_str(&format!(
            "<p><a href=\"{0}\"><img src=\"{0}\" alt=\"grid {1}\"></a></p>\n<table>\n<tr><th></th>",
            esc(&g.file),
            g.z
        ));
        let cells: Vec<&CellEntry> = ix.cells.iter().filter(|c| c.z == g.z).collect();
        let nx = cells.iter().map(|c| c.x + 1).max().unwrap_or(0);
        let ny = cells.iter().map(|c| c.y + 1).max().unwrap_or(0);
        for x in 0..nx {
            h.push_str(&format!("<th>{}</th>", esc(&label(&ix.x, x))));
        }
        h.push_str("</tr>\n");
        for y in 0..ny {
            h.push_str(&format!("<tr><th>{}</th>", esc(&label(&ix.y, y))));
            for c in cells.iter().filter(|c| c.y == y) {
                h.push_str(&format!(
                    "<td><a href=\"{0}\"><img src=\"{0}\" title=\"{1}\" alt=\"cell\"></a></td>",
                    esc(&c.file),
                    esc(&c.parameters)
                ));
            }
            h.push_str("</tr>\n");
        }
        h.push_str("</table>\n");
    }
    h.push_str("</body></html>\n");
    h
}

/// Write `grid.json` and `index.html` into `dir`, atomically.
pub fn write(dir: &Path, ix: &Index) -> anyhow::Result<()> {
    let json = serde_json::to_vec_pretty(ix)?;
    crate::util::atomic::write_atomic(&dir.join("grid.json"), &json)
        .map_err(|e| anyhow::anyhow!("{}: cannot write: {e}", dir.join("grid.json").display()))?;
    crate::util::atomic::write_atomic(&dir.join("index.html"), html(ix).as_bytes())
        .map_err(|e| anyhow::anyhow!("{}: cannot write: {e}", dir.join("index.html").display()))?;
    Ok(())
}
