//! The model families computed in the worker, one module each. Only the registry
//! ([`super::registry`]) names them.

pub mod blip;
pub mod clip;
pub mod owlvit;
pub mod paligemma;
pub mod siglip;
pub mod yoloworld;
