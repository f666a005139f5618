//! `sdkit review`: walk a dataset's images in the terminal and fix their captions by
//! hand. `state` is the session as data, `ui` the dialoguer front end, `preview` the
//! inline image support.

pub mod preview;
pub mod state;
pub mod ui;

use crate::caption::ops::tag_counts;
use crate::caption::select::Dataset;

/// Every tag of the dataset, most frequent first (completion order).
pub fn vocabulary(ds: &Dataset) -> Vec<String> {
    let lists: Vec<Vec<String>> = ds.items.iter().map(|i| i.tags()).collect();
    let mut v: Vec<(String, usize)> = tag_counts(lists.iter().map(|l| l.as_slice()))
        .into_iter()
        .collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v.into_iter().map(|(t, _)| t).collect()
}
