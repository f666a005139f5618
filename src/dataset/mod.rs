//! Photos to a training set: scan, decode, bucket, resize, layout, manifest, captions.

pub mod bucket;
pub mod caption_io;
pub mod decode;
pub mod encode;
pub mod focal;
pub mod jpeg;
pub mod layout;
pub mod manifest;
pub mod plan;
pub mod prep;
pub mod resize;
pub mod scan;
