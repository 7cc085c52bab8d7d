//! The network parts several families share: the ViT image tower, CLIP's settings and text
//! side, the transformer weight specs, and the scoring helpers between towers and JSON.

pub mod clip_text;
pub mod scoring;
pub mod specs;
pub mod vit;
