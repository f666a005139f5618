//! Photos to a training set: scan, decode, bucket, resize, layout, manifest, captions.

pub mod bucket;
pub mod decode;
pub mod resize;
