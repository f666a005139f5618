//! `sdkit prep`: parse, run the library, print the summary.

use crate::dataset::prep::{self, PrepOptions, PrepSummary};

pub fn run(mut opts: PrepOptions) -> anyhow::Result<i32> {
    let hidden = opts.quiet || opts.json;
    // `--matte u2net`: a known matting model, fetched once; a local path wins.
    if let Some(m) = &opts.matte {
        opts.matte = Some(crate::hub::resolve::matte(m, hidden)?);
    }
    let bar = crate::util::progress::bar(0, "prep", hidden);
    let summary = prep::run(&opts, &bar)?;
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_summary(&summary);
    }
    Ok(if !summary.failed.is_empty() && !opts.keep_going {
        1
    } else {
        0
    })
}

fn print_summary(s: &PrepSummary) {
    let verb = if s.dry_run { "would write" } else { "written" };
    let images = s.train_images + s.reg.as_ref().map_or(0, |r| r.images);
    println!(
        "prep: {} sources -> {} images ({verb} {}, unchanged {}){}",
        s.sources,
        images,
        s.written,
        s.unchanged,
        if s.dry_run {
            " [dry run: nothing written]"
        } else {
            ""
        }
    );
    match s.repeats {
        Some(r) => println!(
            "  train: {} images x {r} repeats = {} samples in {}",
            s.train_images, s.train_samples, s.train_dir
        ),
        None => println!("  images in {}", s.train_dir),
    }
    if let Some(r) = &s.reg {
        println!(
            "  reg:   {} images x {} repeats = {} samples in {} (balanced against {} training samples: kohya uses that many reg samples per epoch)",
            r.images, r.repeats, r.samples, r.dir, s.train_samples
        );
    }
    if let Some(m) = &s.matte {
        println!("  matte: {m}");
    }
    if s.captions > 0 {
        println!("  captions carried over: {}", s.captions);
    }
    if s.upscaled > 0 {
        println!(
            "  upscaled (source smaller than its output): {}",
            s.upscaled
        );
    }
    if !s.buckets.is_empty() {
        let mut b: Vec<_> = s.buckets.iter().collect();
        b.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let width = b.iter().map(|(_, n)| **n).max().unwrap_or(1);
        println!("  buckets:");
        for (size, n) in b {
            let bar = "#".repeat(((*n * 30).div_ceil(width)).max(1));
            println!("    {size:>9} {n:>6} {bar}");
        }
    }
    if !s.skipped.is_empty() {
        println!("  skipped {}:", s.skipped.len());
        for i in &s.skipped {
            println!("    {}: {}", i.source, i.reason);
        }
    }
    if s.non_images > 0 {
        println!("  other files ignored: {}", s.non_images);
    }
    if !s.failed.is_empty() {
        println!("  failed {}:", s.failed.len());
        for i in &s.failed {
            println!("    {}: {}", i.source, i.reason);
        }
    }
}
