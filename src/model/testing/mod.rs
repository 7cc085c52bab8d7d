//! Models and weights for tests and demos: the null and test-colour models, synthetic
//! weights written in each family's real layout (`free-roam model make`), and the parity
//! helpers that check the families against the reference implementations.

pub mod colour;
pub mod null;
#[cfg(test)]
mod parity;
#[cfg(test)]
mod parity_jpeg;
#[cfg(test)]
mod parity_yoloworld;
pub mod stub;
pub mod synthetic;
#[cfg(test)]
pub(crate) mod util;
