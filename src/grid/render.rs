//! Grid images: the cells side by side on a white sheet, X labels in a band above the
//! columns, Y labels in a band left of the rows, the Z value as a title line; text set in
//! DejaVu Sans (assets/fonts, Bitstream Vera licence), which is built into the binary.

use ab_glyph::{Font, FontRef, PxScale, ScaleFont, point};

static FONT_BYTES: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

fn font() -> FontRef<'static> {
    FontRef::try_from_slice(FONT_BYTES).expect("the bundled font parses")
}

/// Where everything sits in one grid image (pixels).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Layout {
    pub width: usize,
    pub height: usize,
    pub cell_width: usize,
    pub cell_height: usize,
    /// Width of the Y label band (0 without a Y axis).
    pub left: usize,
    /// Height of the title and X label bands (0 without X axis and Z axis).
    pub top: usize,
    /// Height of the title line (the Z label; 0 without a Z axis).
    pub title: usize,
    pub font_px: f32,
}

impl Layout {
    /// Top-left corner of cell (x, y).
    pub fn cell_origin(&self, x: usize, y: usize) -> (usize, usize) {
        (
            self.left + x * self.cell_width,
            self.top + y * self.cell_height,
        )
    }
}

/// Labels of one grid image.
pub struct Labels<'a> {
    pub x: &'a [String],
    pub y: &'a [String],
    pub title: Option<&'a str>,
}

const PAD: usize = 4;

/// Text size for a cell size: about webui's (w + h) / 25, at least 12 px.
pub fn font_px(cell_w: usize, cell_h: usize) -> f32 {
    ((cell_w + cell_h) as f32 / 25.0).max(12.0)
}

fn line_height(px: f32) -> usize {
    let f = font();
    let s = f.as_scaled(PxScale::from(px));
    (s.height() + s.line_gap()).ceil() as usize
}

/// Width in pixels of one line of text.
pub fn text_width(text: &str, px: f32) -> f32 {
    let f = font();
    let s = f.as_scaled(PxScale::from(px));
    let mut w = 0.0;
    let mut prev = None;
    for c in text.chars() {
        let id = f.glyph_id(c);
        if let Some(p) = prev {
            w += s.kern(p, id);
        }
        w += s.h_advance(id);
        prev = Some(id);
    }
    w
}

/// Break `text` into lines no wider than `max` pixels: at spaces where it can, inside a
/// word where one word alone is too wide.
pub fn wrap(text: &str, px: f32, max: f32) -> Vec<String> {
    let mut lines = Vec::new();
    let mut cur = String::new();
    for word in text.split(' ') {
        let cand = if cur.is_empty() {
            word.to_string()
        } else {
            format!("{cur} {word}")
        };
        if text_width(&cand, px) <= max {
            cur = cand;
            continue;
        }
        if !cur.is_empty() {
            lines.push(std::mem::take(&mut cur));
        }
        for c in word.chars() {
            let mut next = cur.clone();
            next.push(c);
            if !cur.is_empty() && text_width(&next, px) > max {
                lines.push(std::mem::take(&mut cur));
                cur.push(c);
            } else {
                cur = next;
            }
        }
    }
    if !cur.is_empty() || lines.is_empty() {
        lines.push(cur);
    }
    lines
}

/// The layout for `nx` x `ny` cells with these labels.
pub fn layout(cell_w: usize, cell_h: usize, nx: usize, ny: usize, labels: &Labels) -> Layout {
    let px = font_px(cell_w, cell_h);
    let lh = line_height(px);
    let x_lines = labels
        .x
        .iter()
        .map(|l| wrap(l, px, cell_w.saturating_sub(2 * PAD) as f32).len())
        .max()
        .unwrap_or(0);
    let left = if labels.y.is_empty() {
        0
    } else {
        // As wide as the widest label, between one cell and two.
        let widest = labels
            .y
            .iter()
            .map(|l| text_width(l, px).ceil() as usize)
            .max()
            .unwrap_or(0);
        (widest + 2 * PAD).clamp(cell_w.max(48), (2 * cell_w).max(96))
    };
    let title = if labels.title.is_some() {
        lh + 2 * PAD
    } else {
        0
    };
    let xband = if x_lines > 0 {
        x_lines * lh + 2 * PAD
    } else {
        0
    };
    Layout {
        width: left + nx * cell_w,
        height: title + xband + ny * cell_h,
        cell_width: cell_w,
        cell_height: cell_h,
        left,
        top: title + xband,
        title,
        font_px: px,
    }
}

/// An RGB sheet.
pub struct Canvas {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
}

impl Canvas {
    pub fn white(width: usize, height: usize) -> Self {
        Self {
            width,
            height,
            rgb: vec![255; width * height * 3],
        }
    }

    /// Copy an RGB image of `w` x `h` with its top-left at (x0, y0).
    pub fn paste(&mut self, rgb: &[u8], w: usize, h: usize, x0: usize, y0: usize) {
        for y in 0..h.min(self.height.saturating_sub(y0)) {
            let n = w.min(self.width.saturating_sub(x0)) * 3;
            let dst = ((y0 + y) * self.width + x0) * 3;
            self.rgb[dst..dst + n].copy_from_slice(&rgb[y * w * 3..y * w * 3 + n]);
        }
    }

    /// Black text centred in the box (x0, y0, w, h), wrapped to its width.
    pub fn text_in_box(
        &mut self,
        text: &str,
        px: f32,
        (x0, y0, w, h): (usize, usize, usize, usize),
    ) {
        let lines = wrap(text, px, w.saturating_sub(2 * PAD) as f32);
        let lh = line_height(px);
        let total = lines.len() * lh;
        let mut y = y0 as f32 + (h as f32 - total as f32).max(0.0) / 2.0;
        for line in lines {
            let tw = text_width(&line, px);
            let x = x0 as f32 + ((w as f32 - tw) / 2.0).max(0.0);
            self.draw_line(&line, px, x, y, (x0, y0, w, h));
            y += lh as f32;
        }
    }

    /// One line with its top at (x, y), clipped to `clip`.
    fn draw_line(
        &mut self,
        text: &str,
        px: f32,
        x: f32,
        y: f32,
        clip: (usize, usize, usize, usize),
    ) {
        let f = font();
        let scale = PxScale::from(px);
        let s = f.as_scaled(scale);
        let base = y + s.ascent();
        let mut pen = x;
        let mut prev = None;
        for c in text.chars() {
            let id = f.glyph_id(c);
            if let Some(p) = prev {
                pen += s.kern(p, id);
            }
            let g = id.with_scale_and_position(scale, point(pen, base));
            pen += s.h_advance(id);
            prev = Some(id);
            let Some(og) = f.outline_glyph(g) else {
                continue;
            };
            let b = og.px_bounds();
            og.draw(|gx, gy, cov| {
                let px_x = b.min.x as i64 + gx as i64;
                let px_y = b.min.y as i64 + gy as i64;
                let (cx, cy, cw, ch) = clip;
                let inside = px_x >= cx as i64
                    && px_y >= cy as i64
                    && px_x < (cx + cw) as i64
                    && px_y < (cy + ch) as i64;
                if !inside || px_x as usize >= self.width || px_y as usize >= self.height {
                    return;
                }
                let i = (px_y as usize * self.width + px_x as usize) * 3;
                for v in &mut self.rgb[i..i + 3] {
                    // black over what is there, by coverage
                    *v = (*v as f32 * (1.0 - cov.clamp(0.0, 1.0))).round() as u8;
                }
            });
        }
    }
}

/// Draw the labels of a layout onto a white canvas (the cells are pasted by the caller).
pub fn sheet(l: &Layout, labels: &Labels) -> Canvas {
    let mut c = Canvas::white(l.width, l.height);
    if let Some(t) = labels.title {
        c.text_in_box(t, l.font_px, (0, 0, l.width, l.title));
    }
    let band = l.top - l.title;
    for (i, t) in labels.x.iter().enumerate() {
        let (x0, _) = l.cell_origin(i, 0);
        c.text_in_box(t, l.font_px, (x0, l.title, l.cell_width, band));
    }
    for (i, t) in labels.y.iter().enumerate() {
        let (_, y0) = l.cell_origin(0, i);
        c.text_in_box(t, l.font_px, (0, y0, l.left, l.cell_height));
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dark(c: &Canvas, (x0, y0, w, h): (usize, usize, usize, usize)) -> usize {
        let mut n = 0;
        for y in y0..y0 + h {
            for x in x0..x0 + w {
                let i = (y * c.width + x) * 3;
                n += (c.rgb[i] < 128) as usize;
            }
        }
        n
    }

    #[test]
    fn labels_sit_in_their_bands() {
        let x = vec!["cfg: 3".to_string(), "cfg: 9".to_string()];
        let y = vec!["seed: 1".to_string()];
        let labels = Labels {
            x: &x,
            y: &y,
            title: Some("steps: 4"),
        };
        let l = layout(64, 64, 2, 1, &labels);
        assert_eq!(l.width, l.left + 128);
        assert_eq!(l.height, l.top + 64);
        assert!(l.title > 0 && l.top > l.title);
        let c = sheet(&l, &labels);
        // ink in the title, above each column and left of the row; none where cells go
        assert!(dark(&c, (0, 0, l.width, l.title)) > 10);
        for i in 0..2 {
            let (x0, _) = l.cell_origin(i, 0);
            assert!(
                dark(&c, (x0, l.title, 64, l.top - l.title)) > 10,
                "column {i}"
            );
        }
        assert!(dark(&c, (0, l.top, l.left, 64)) > 10);
        assert_eq!(dark(&c, (l.left, l.top, 128, 64)), 0);
        // different labels, different ink
        let (a, b) = (l.cell_origin(0, 0).0, l.cell_origin(1, 0).0);
        let band = |x0: usize| -> Vec<u8> {
            (l.title..l.top)
                .flat_map(|y| c.rgb[(y * c.width + x0) * 3..(y * c.width + x0 + 64) * 3].to_vec())
                .collect()
        };
        assert_ne!(band(a), band(b));
    }

    #[test]
    fn long_labels_wrap_to_the_cell() {
        let px = 12.0;
        let lines = wrap("lora: a-very-long-adapter-name-000010", px, 60.0);
        assert!(lines.len() > 1, "{lines:?}");
        for l in &lines {
            assert!(text_width(l, px) <= 60.0, "{l:?}");
        }
        assert_eq!(
            lines.concat().replace(' ', ""),
            "lora:a-very-long-adapter-name-000010"
        );
        assert_eq!(wrap("", px, 60.0), [""]);
    }

    #[test]
    fn no_axes_no_bands() {
        let l = layout(
            32,
            48,
            1,
            1,
            &Labels {
                x: &[],
                y: &[],
                title: None,
            },
        );
        assert_eq!((l.left, l.top, l.width, l.height), (0, 0, 32, 48));
    }
}
