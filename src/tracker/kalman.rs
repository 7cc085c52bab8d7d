//! The constant-velocity Kalman filter on a box's corners `[x1, y1, x2, y2]`, with the
//! noise ByteTrack uses: process noise 0.01 and measurement noise 0.1 on every component,
//! initial covariance the identity, velocities starting at 0.
//!
//! Every corner coordinate has the same model (position plus velocity, one frame per step)
//! and the same noise, and all are predicted and measured together, so the 8 x 8 covariance
//! of the full state is always four copies of one 2 x 2 block. The filter keeps that block
//! alone: the same numbers as the full filter, in a few multiplications per coordinate.

use serde::{Deserialize, Serialize};

/// Process noise added to the position and the velocity variance on each step.
const PROCESS_NOISE: f64 = 0.01;
/// The variance of a measured corner.
const MEASUREMENT_NOISE: f64 = 0.1;

/// One box's filter state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BoxFilter {
    /// The corners `[x1, y1, x2, y2]`.
    #[serde(rename = "box")]
    corners: [f64; 4],
    /// Each corner coordinate's velocity, in pixels per step.
    velocity: [f64; 4],
    /// The covariance block shared by all four coordinates: `[position variance,
    /// position-velocity covariance, velocity variance]`.
    cov: [f64; 3],
}

impl BoxFilter {
    /// A filter at its first measurement, standing still.
    pub fn new(corners: [f64; 4]) -> Self {
        Self {
            corners,
            velocity: [0.0; 4],
            cov: [1.0, 0.0, 1.0],
        }
    }

    /// The box as the filter estimates it now.
    pub fn corners(&self) -> [f64; 4] {
        self.corners
    }

    /// Moves the box one step along its velocity and widens the uncertainty.
    pub fn predict(&mut self) {
        for (x, v) in self.corners.iter_mut().zip(&self.velocity) {
            *x += v;
        }
        let [p, pv, v] = self.cov;
        self.cov = [p + 2.0 * pv + v + PROCESS_NOISE, pv + v, v + PROCESS_NOISE];
    }

    /// Corrects the estimate with a measured box (the covariance in Joseph form, as the
    /// reference computes it).
    pub fn update(&mut self, measured: [f64; 4]) {
        let [p, pv, v] = self.cov;
        let s = p + MEASUREMENT_NOISE;
        let (k_pos, k_vel) = (p / s, pv / s);
        let state = self.corners.iter_mut().zip(&mut self.velocity);
        for ((x, v), z) in state.zip(measured) {
            let residual = z - *x;
            *x += k_pos * residual;
            *v += k_vel * residual;
        }
        let keep = 1.0 - k_pos;
        let r = MEASUREMENT_NOISE;
        self.cov = [
            keep * keep * p + r * k_pos * k_pos,
            keep * (pv - k_vel * p) + r * k_pos * k_vel,
            v - 2.0 * k_vel * pv + k_vel * k_vel * p + r * k_vel * k_vel,
        ];
    }

    /// Whether every number is finite (a saved state read back may not be).
    pub fn is_finite(&self) -> bool {
        self.corners
            .iter()
            .chain(&self.velocity)
            .chain(&self.cov)
            .all(|x| x.is_finite())
    }
}

#[cfg(test)]
// Matrix algebra reads best with its indices.
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::*;

    /// The full 8 x 8 filter, written out plainly, to check the block form against.
    struct FullFilter {
        x: [f64; 8],
        p: [[f64; 8]; 8],
    }

    fn matmul(a: &[[f64; 8]; 8], b: &[[f64; 8]; 8]) -> [[f64; 8]; 8] {
        let mut c = [[0.0; 8]; 8];
        for i in 0..8 {
            for j in 0..8 {
                c[i][j] = (0..8).map(|k| a[i][k] * b[k][j]).sum();
            }
        }
        c
    }

    fn transpose(a: &[[f64; 8]; 8]) -> [[f64; 8]; 8] {
        let mut t = [[0.0; 8]; 8];
        for i in 0..8 {
            for j in 0..8 {
                t[j][i] = a[i][j];
            }
        }
        t
    }

    impl FullFilter {
        fn new(z: [f64; 4]) -> Self {
            let mut x = [0.0; 8];
            x[..4].copy_from_slice(&z);
            let mut p = [[0.0; 8]; 8];
            for (i, row) in p.iter_mut().enumerate() {
                row[i] = 1.0;
            }
            Self { x, p }
        }

        fn predict(&mut self) {
            let mut f = [[0.0; 8]; 8];
            for i in 0..8 {
                f[i][i] = 1.0;
            }
            for i in 0..4 {
                f[i][i + 4] = 1.0;
            }
            let x = self.x;
            for i in 0..8 {
                self.x[i] = (0..8).map(|k| f[i][k] * x[k]).sum();
            }
            self.p = matmul(&matmul(&f, &self.p), &transpose(&f));
            for i in 0..8 {
                self.p[i][i] += PROCESS_NOISE;
            }
        }

        /// H = [I 0]; S is diagonal here, so the gain is P's first four columns over S.
        fn update(&mut self, z: [f64; 4]) {
            let mut k = [[0.0; 8]; 8]; // only the first 4 columns are used
            for i in 0..8 {
                for j in 0..4 {
                    k[i][j] = self.p[i][j] / (self.p[j][j] + MEASUREMENT_NOISE);
                }
            }
            let y: Vec<f64> = (0..4).map(|j| z[j] - self.x[j]).collect();
            for i in 0..8 {
                self.x[i] += (0..4).map(|j| k[i][j] * y[j]).sum::<f64>();
            }
            let mut ikh = [[0.0; 8]; 8];
            for i in 0..8 {
                ikh[i][i] = 1.0;
                for j in 0..4 {
                    ikh[i][j] -= k[i][j];
                }
            }
            let mut krk = [[0.0; 8]; 8];
            for i in 0..8 {
                for j in 0..8 {
                    krk[i][j] = (0..4).map(|m| k[i][m] * MEASUREMENT_NOISE * k[j][m]).sum();
                }
            }
            let joseph = matmul(&matmul(&ikh, &self.p), &transpose(&ikh));
            for i in 0..8 {
                for j in 0..8 {
                    self.p[i][j] = joseph[i][j] + krk[i][j];
                }
            }
        }
    }

    #[test]
    fn the_block_form_equals_the_full_filter() {
        let measurements = [
            [10.0, 20.0, 50.0, 110.0],
            [14.0, 21.0, 55.0, 112.0],
            [19.0, 23.5, 59.0, 113.0],
            [23.0, 24.0, 64.0, 116.0],
        ];
        let mut block = BoxFilter::new(measurements[0]);
        let mut full = FullFilter::new(measurements[0]);
        // Two steps with a measurement, one without, then one more with.
        for (step, z) in measurements.iter().enumerate().skip(1) {
            block.predict();
            full.predict();
            if step != 2 {
                block.update(*z);
                full.update(*z);
            }
        }
        for i in 0..4 {
            assert!((block.corners[i] - full.x[i]).abs() < 1e-9);
            assert!((block.velocity[i] - full.x[i + 4]).abs() < 1e-9);
            assert!((block.cov[0] - full.p[i][i]).abs() < 1e-9);
            assert!((block.cov[1] - full.p[i][i + 4]).abs() < 1e-9);
            assert!((block.cov[2] - full.p[i + 4][i + 4]).abs() < 1e-9);
        }
    }

    #[test]
    fn a_box_moving_steadily_is_predicted_where_it_goes() {
        let mut f = BoxFilter::new([0.0, 0.0, 10.0, 10.0]);
        for step in 1..20 {
            f.predict();
            let x = 5.0 * step as f64;
            f.update([x, 0.0, x + 10.0, 10.0]);
        }
        f.predict();
        let [x1, y1, x2, _] = f.corners();
        assert!((x1 - 100.0).abs() < 1.0, "{x1}");
        assert!((x2 - 110.0).abs() < 1.0, "{x2}");
        assert!(y1.abs() < 1e-9);
    }
}
