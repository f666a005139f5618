//! Photos to a training set: scan, decode, bucket, resize, layout, manifest, captions.

pub mod bucket;
pub mod caption_io;
pub mod decode;
pub mod resize;
