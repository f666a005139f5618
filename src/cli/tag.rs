//! `sdkit tag`: command-line glue over [`crate::tag`].

use crate::tag::{self, TagOptions};

/// The options of `sdkit tag` (one struct for flags and YAML recipes).
pub type TagArgs = TagOptions;

/// Runs the command; exit code 0 when every image was tagged, 1 when some failed.
pub fn run(o: TagOptions) -> anyhow::Result<i32> {
    let report = tag::run(&o)?;
    for f in &report.failures {
        eprintln!("{}: {}", f.file.display(), f.error);
    }
    if o.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "tagged {} of {} images ({} skipped, {} failed) in {:.1}s, {:.2} images/s",
            report.tagged,
            report.images,
            report.skipped,
            report.failed,
            report.seconds,
            report.images_per_second
        );
        println!("model: {} ({})", report.model.display(), report.contract);
        if !report.tag_counts.is_empty() {
            println!("most frequent tags:");
            for (t, n) in report.tag_counts.iter().take(20) {
                println!("  {n:>6}  {t}");
            }
        }
    }
    Ok(if report.failed > 0 { 1 } else { 0 })
}
