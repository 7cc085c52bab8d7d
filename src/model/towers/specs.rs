//! The tensor names and shapes of the transformer parts several families share (layer norms,
//! linear layers, a CLIP-style encoder stack and text tower, SigLIP's image tower), for the
//! check that a checkpoint has them all.

use crate::model::loading::TensorSpec;
use candle_transformers::models::siglip;

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

/// The sizes of a CLIP-style text tower.
pub struct TextTowerShape {
    pub vocab: usize,
    pub positions: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
}

/// A CLIP-style text tower under `prefix` (CLIP's and SigLIP's `text_model`): token and
/// position embeddings, the encoder stack and the final layer norm.
pub fn text_tower_specs(specs: &mut Vec<TensorSpec>, prefix: &str, shape: &TextTowerShape) {
    let d = shape.hidden;
    specs.push(TensorSpec::new(
        format!("{prefix}.embeddings.token_embedding.weight"),
        &[shape.vocab, d],
    ));
    specs.push(TensorSpec::new(
        format!("{prefix}.embeddings.position_embedding.weight"),
        &[shape.positions, d],
    ));
    encoder_specs(
        specs,
        &format!("{prefix}.encoder"),
        shape.layers,
        d,
        shape.intermediate,
    );
    layer_norm_specs(specs, &format!("{prefix}.final_layer_norm"), d);
}

/// SigLIP's image tower under `prefix`, without its pooling head (SigLIP's and
/// PaliGemma's): patch and position embeddings, the encoder stack, the last layer norm.
pub fn siglip_vision_specs(specs: &mut Vec<TensorSpec>, prefix: &str, v: &siglip::VisionConfig) {
    let d = v.hidden_size;
    specs.push(TensorSpec::new(
        format!("{prefix}.embeddings.patch_embedding.weight"),
        &[d, v.num_channels, v.patch_size, v.patch_size],
    ));
    specs.push(TensorSpec::new(
        format!("{prefix}.embeddings.patch_embedding.bias"),
        &[d],
    ));
    specs.push(TensorSpec::new(
        format!("{prefix}.embeddings.position_embedding.weight"),
        &[v.num_patches(), d],
    ));
    encoder_specs(
        specs,
        &format!("{prefix}.encoder"),
        v.num_hidden_layers,
        d,
        v.intermediate_size,
    );
    layer_norm_specs(specs, &format!("{prefix}.post_layernorm"), d);
}
