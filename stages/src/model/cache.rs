//! The key/value cache of incremental decoding: per layer, the rotated keys and the values of
//! every token seen so far (concatenated along the sequence), plus the padding mask of those
//! tokens so that later steps derive masks and positions from the whole history.

use burn::tensor::Tensor;

/// Cached keys and values of one attention layer.
///
/// Shapes `[batch, n_kv_heads, seq_so_far, head_dim]`.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    kv: Option<(Tensor<4>, Tensor<4>)>,
}

impl LayerCache {
    /// Appends new keys/values and returns the full history.
    pub fn append(&mut self, k: Tensor<4>, v: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let (k, v) = match self.kv.take() {
            Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
            None => (k, v),
        };
        self.kv = Some((k.clone(), v.clone()));
        (k, v)
    }
}

/// The cache of a whole decoder.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub(crate) layers: Vec<LayerCache>,
    /// One row per batch element: 1 for every real token seen so far, 0 for padding.
    pub(crate) padding: Vec<Vec<u8>>,
}

impl KvCache {
    /// An empty cache for a decoder of `n_layers` layers.
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: (0..n_layers).map(|_| LayerCache { kv: None }).collect(),
            padding: Vec::new(),
        }
    }

    /// Number of tokens cached per row.
    pub fn len(&self) -> usize {
        self.padding.first().map_or(0, Vec::len)
    }

    /// Whether nothing has been cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
