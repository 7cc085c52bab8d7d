//! The tensor names and shapes of the transformer parts several families share (layer norms,
//! linear layers, a CLIP-style encoder stack), for the check that a checkpoint has them all.

use crate::model::loading::TensorSpec;

pub fn layer_norm_specs(specs: &mut Vec<TensorSpec>, prefix: &str, dim: usize) {
    specs.push(TensorSpec::new(format!("{prefix}.weight"), &[dim]));
    specs.push(TensorSpec::new(format!("{prefix}.bias"), &[dim]));
}

pub fn linear_specs(specs: &mut Vec<TensorSpec>, prefix: &str, out: usize, inp: usize) {
    specs.push(TensorSpec::new(format!("{prefix}.weight"), &[out, inp]));
    specs.push(TensorSpec::new(format!("{prefix}.bias"), &[out]));
}

pub fn encoder_specs(
    specs: &mut Vec<TensorSpec>,
    prefix: &str,
    layers: usize,
    d: usize,
    inter: usize,
) {
    for i in 0..layers {
        let p = format!("{prefix}.layers.{i}");
        for proj in ["k_proj", "v_proj", "q_proj", "out_proj"] {
            linear_specs(specs, &format!("{p}.self_attn.{proj}"), d, d);
        }
        layer_norm_specs(specs, &format!("{p}.layer_norm1"), d);
        linear_specs(specs, &format!("{p}.mlp.fc1"), inter, d);
        linear_specs(specs, &format!("{p}.mlp.fc2"), d, inter);
        layer_norm_specs(specs, &format!("{p}.layer_norm2"), d);
    }
}
