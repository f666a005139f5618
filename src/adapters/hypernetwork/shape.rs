//! The options of a hypernetwork, with webui's names and defaults
//! (`modules/hypernetworks/hypernetwork.py`: `create_hypernetwork`, `Hypernetwork`).

use serde::{Deserialize, Serialize};

/// The activation after each linear layer (webui's `activation_func`; `swish` is torch's
/// Hardswish, as webui maps it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    Linear,
    Relu,
    Leakyrelu,
    Elu,
    Swish,
    Tanh,
    Sigmoid,
    Gelu,
    Mish,
    Silu,
}

impl Activation {
    pub const ALL: [Activation; 10] = [
        Activation::Linear,
        Activation::Relu,
        Activation::Leakyrelu,
        Activation::Elu,
        Activation::Swish,
        Activation::Tanh,
        Activation::Sigmoid,
        Activation::Gelu,
        Activation::Mish,
        Activation::Silu,
    ];

    /// webui's name (what the file's `activation_func` holds).
    pub fn name(self) -> &'static str {
        match self {
            Activation::Linear => "linear",
            Activation::Relu => "relu",
            Activation::Leakyrelu => "leakyrelu",
            Activation::Elu => "elu",
            Activation::Swish => "swish",
            Activation::Tanh => "tanh",
            Activation::Sigmoid => "sigmoid",
            Activation::Gelu => "gelu",
            Activation::Mish => "mish",
            Activation::Silu => "silu",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == s)
    }
}

/// Initialisation of new weights (webui's `weight_initialization`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum WeightInit {
    #[value(name = "Normal")]
    Normal,
    #[value(name = "XavierUniform")]
    XavierUniform,
    #[value(name = "XavierNormal")]
    XavierNormal,
    #[value(name = "KaimingUniform")]
    KaimingUniform,
    #[value(name = "KaimingNormal")]
    KaimingNormal,
}

impl WeightInit {
    pub const ALL: [WeightInit; 5] = [
        WeightInit::Normal,
        WeightInit::XavierUniform,
        WeightInit::XavierNormal,
        WeightInit::KaimingUniform,
        WeightInit::KaimingNormal,
    ];

    pub fn name(self) -> &'static str {
        match self {
            WeightInit::Normal => "Normal",
            WeightInit::XavierUniform => "XavierUniform",
            WeightInit::XavierNormal => "XavierNormal",
            WeightInit::KaimingUniform => "KaimingUniform",
            WeightInit::KaimingNormal => "KaimingNormal",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|w| w.name() == s)
    }
}

/// The shape of a hypernetwork module (one per context width, for keys and for values).
#[derive(Debug, Clone, PartialEq, clap::Args, Serialize, Deserialize)]
#[serde(default)]
pub struct HypernetworkShape {
    /// Layer widths as multiples of the context width; starts and ends with 1
    /// (webui's "1, 2, 1": Linear(d, 2d), Linear(2d, d)).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,2,1",
        value_name = "LIST"
    )]
    pub layer_structure: Vec<f64>,
    /// Activation after each linear layer but the last (see --activate-output).
    #[arg(long, value_enum, default_value_t = Activation::Linear)]
    pub activation_func: Activation,
    /// Initialisation of the new weights (LayerNorm weights are always Normal).
    #[arg(long, value_enum, default_value_t = WeightInit::Normal)]
    pub weight_init: WeightInit,
    /// A LayerNorm after each linear layer (webui "Add layer normalization").
    #[arg(long)]
    pub layer_norm: bool,
    /// Dropout while training (webui "Use dropout"); with no --dropout-structure, 0.3
    /// after every hidden layer as webui derives it.
    #[arg(long = "dropout")]
    pub use_dropout: bool,
    /// Dropout probability after each layer, one per --layer-structure entry, first and
    /// last 0 (webui's "0, 0.3, 0"); implies --dropout.
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    pub dropout_structure: Option<Vec<f64>>,
    /// With --dropout and no structure: also drop before the last layer (webui's default).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub last_layer_dropout: bool,
    /// Apply the activation after the last layer too.
    #[arg(long)]
    pub activate_output: bool,
}

impl Default for HypernetworkShape {
    fn default() -> Self {
        Self {
            layer_structure: vec![1.0, 2.0, 1.0],
            activation_func: Activation::Linear,
            weight_init: WeightInit::Normal,
            layer_norm: false,
            use_dropout: false,
            dropout_structure: None,
            last_layer_dropout: true,
            activate_output: false,
        }
    }
}

/// webui's `parse_dropout_structure`: no dropout, or 0.3 after every hidden layer but
/// the one before the output, which gets 0.3 only with `last_layer_dropout`.
pub fn parse_dropout_structure(
    layer_structure: &[f64],
    use_dropout: bool,
    last_layer_dropout: bool,
) -> Vec<f64> {
    let n = layer_structure.len();
    if !use_dropout || n < 2 {
        return vec![0.0; n];
    }
    let mut d = vec![0.0];
    d.extend(std::iter::repeat_n(0.3, n.saturating_sub(3)));
    d.push(if last_layer_dropout { 0.3 } else { 0.0 });
    d.push(0.0);
    d
}

impl HypernetworkShape {
    /// The dropout probability after each layer (`[i + 1]` follows linear `i`).
    pub fn dropout(&self) -> Vec<f64> {
        match &self.dropout_structure {
            Some(d) => d.clone(),
            None => parse_dropout_structure(
                &self.layer_structure,
                self.use_dropout,
                self.last_layer_dropout,
            ),
        }
    }

    /// Whether any layer drops (webui's `use_dropout` as written to the file).
    pub fn uses_dropout(&self) -> bool {
        self.use_dropout || self.dropout().iter().any(|&p| p > 0.0)
    }

    /// The checks webui makes (its asserts), as one-line errors naming the option.
    pub fn validate(&self) -> Result<(), String> {
        let ls = &self.layer_structure;
        if ls.len() < 2 || ls[0] != 1.0 || ls[ls.len() - 1] != 1.0 {
            return Err(format!(
                "--layer-structure {}: must have at least two entries and start and end with 1",
                join(ls)
            ));
        }
        if let Some(x) = ls.iter().find(|&&x| !(x > 0.0 && x.is_finite())) {
            return Err(format!(
                "--layer-structure {}: {x} is not a positive width",
                join(ls)
            ));
        }
        let d = self.dropout();
        if d.len() != ls.len() {
            return Err(format!(
                "--dropout-structure {}: needs one entry per --layer-structure entry ({})",
                join(&d),
                ls.len()
            ));
        }
        if let Some(p) = d.iter().find(|&&p| !(0.0..1.0).contains(&p)) {
            return Err(format!(
                "--dropout-structure {}: {p} is not a probability in [0, 1)",
                join(&d)
            ));
        }
        Ok(())
    }

    /// The width of each layer for context width `dim` (webui's `int(dim * ls[i])`).
    pub fn widths(&self, dim: usize) -> Vec<usize> {
        self.layer_structure
            .iter()
            .map(|&m| (dim as f64 * m) as usize)
            .collect()
    }
}

fn join(v: &[f64]) -> String {
    v.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_structure_as_webui_derives_it() {
        let p = parse_dropout_structure;
        assert_eq!(p(&[1., 2., 1.], false, true), vec![0., 0., 0.]);
        assert_eq!(p(&[1., 2., 1.], true, true), vec![0., 0.3, 0.]);
        assert_eq!(p(&[1., 2., 1.], true, false), vec![0., 0., 0.]);
        assert_eq!(p(&[1., 2., 2., 1.], true, false), vec![0., 0.3, 0., 0.]);
        assert_eq!(p(&[1., 2., 2., 1.], true, true), vec![0., 0.3, 0.3, 0.]);
    }

    #[test]
    fn bad_shapes_name_the_option() {
        let s = HypernetworkShape {
            layer_structure: vec![2.0, 1.0],
            ..Default::default()
        };
        assert!(s.validate().unwrap_err().contains("--layer-structure"));
        let s = HypernetworkShape {
            dropout_structure: Some(vec![0.0, 1.5, 0.0]),
            ..Default::default()
        };
        assert!(s.validate().unwrap_err().contains("--dropout-structure"));
        let s = HypernetworkShape {
            dropout_structure: Some(vec![0.0, 0.1]),
            ..Default::default()
        };
        assert!(s.validate().unwrap_err().contains("one entry per"));
        assert!(HypernetworkShape::default().validate().is_ok());
        assert_eq!(
            HypernetworkShape::default().widths(320),
            vec![320, 640, 320]
        );
    }
}
