//! Attention masks and position ids derived from a batch's padding mask. Owns the rules that make
//! right padding (training) and left padding (generation) both give transformers' results: a
//! query attends to non-pad keys at or before it (within a sliding window when the model has
//! one), positions count real tokens only, and a query with nothing to attend to (a left pad)
//! still sees itself so that no row of the softmax is empty.
//!
//! A padding mask may also carry segment ids (1, 2, ...) instead of 1: packed rows hold several
//! examples, and a token attends only within its own segment, with positions counted from the
//! segment's start, as transformers computes packed (padding-free) batches from position ids.

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

/// How attention is restricted in one forward pass.
// One value per forward pass: a boxed tensor would save nothing worth an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum AttentionMask {
    /// Plain causal attention over an unpadded batch without cached keys (the fast path).
    Causal,
    /// Explicit mask, `true` where a key is hidden from a query.
    ///
    /// Shape `[batch, 1, seq_q, seq_k]`, broadcast over heads.
    Explicit(Tensor<4, Bool>),
}

/// Position ids from a padding mask: the number of real tokens of the same segment before each
/// position (`cumsum(mask) - 1` per segment, clamped at 0 for leading pads), as transformers'
/// `generate` computes them.
///
/// # Shapes
/// - padding_mask: `[batch, seq]`, 1 for real tokens, 0 for padding
/// - output: `[batch, seq]`
pub fn positions_from_padding(padding_mask: &[Vec<u8>]) -> Vec<Vec<i64>> {
    padding_mask
        .iter()
        .map(|row| {
            let mut seen = 0i64;
            let mut segment = 0u8;
            row.iter()
                .map(|&m| {
                    if m != 0 && m != segment {
                        segment = m;
                        seen = 0;
                    }
                    seen += i64::from(m != 0);
                    (seen - 1).max(0)
                })
                .collect()
        })
        .collect()
}

/// Builds the mask for `seq_q` new queries attending to `seq_k` keys, the last `seq_q` of which
/// are the queries themselves (the first `seq_k - seq_q` come from a cache).
///
/// `key_padding` has one row per batch element and `seq_k` entries (1 = real token).
/// Returns `true` where attention is forbidden.
pub fn attention_mask_data(
    key_padding: &[Vec<u8>],
    seq_q: usize,
    sliding_window: Option<usize>,
) -> (Vec<bool>, [usize; 4]) {
    let seq_k = key_padding.first().map_or(0, Vec::len);
    attention_mask_data_at(key_padding, seq_k - seq_q, seq_q, sliding_window)
}

/// [`attention_mask_data`] for `seq_q` queries that are keys `query_start..query_start + seq_q`
/// (keys after them are future ones: a cache's slots not written yet).
pub fn attention_mask_data_at(
    key_padding: &[Vec<u8>],
    query_start: usize,
    seq_q: usize,
    sliding_window: Option<usize>,
) -> (Vec<bool>, [usize; 4]) {
    let batch = key_padding.len();
    let seq_k = key_padding.first().map_or(0, Vec::len);
    let offset = query_start;
    let mut out = Vec::with_capacity(batch * seq_q * seq_k);
    for row in key_padding {
        for i in 0..seq_q {
            let qi = offset + i;
            for (j, &real) in row.iter().enumerate() {
                let future = j > qi;
                let outside_window = sliding_window.is_some_and(|w| qi >= j + w);
                let other_segment = real != 0 && row[qi] != 0 && real != row[qi];
                let masked = future || outside_window || other_segment || (real == 0 && j != qi);
                out.push(masked);
            }
        }
    }
    (out, [batch, 1, seq_q, seq_k])
}

impl AttentionMask {
    /// The mask for a forward pass, choosing the causal fast path when nothing is padded, no keys
    /// come from a cache and no sliding window applies.
    pub fn new(
        key_padding: &[Vec<u8>],
        seq_q: usize,
        sliding_window: Option<usize>,
        device: &Device,
    ) -> Self {
        let seq_k = key_padding.first().map_or(0, Vec::len);
        Self::at(key_padding, seq_k - seq_q, seq_q, sliding_window, device)
    }

    /// [`AttentionMask::new`] for queries that are keys `query_start..query_start + seq_q`, as
    /// in a cache whose later slots are not written yet.
    pub fn at(
        key_padding: &[Vec<u8>],
        query_start: usize,
        seq_q: usize,
        sliding_window: Option<usize>,
        device: &Device,
    ) -> Self {
        let seq_k = key_padding.first().map_or(0, Vec::len);
        let unpadded = key_padding.iter().all(|r| r.iter().all(|&m| m != 0));
        let window_inactive = sliding_window.is_none_or(|w| w >= seq_k);
        if unpadded && seq_k == seq_q && window_inactive {
            return AttentionMask::Causal;
        }
        let (data, shape) = attention_mask_data_at(key_padding, query_start, seq_q, sliding_window);
        AttentionMask::Explicit(Tensor::from_data(TensorData::new(data, shape), device))
    }
}

/// Uploads position ids.
pub fn positions_tensor(positions: &[Vec<i64>], device: &Device) -> Tensor<2, Int> {
    let batch = positions.len();
    let seq = positions.first().map_or(0, Vec::len);
    let flat: Vec<i64> = positions.iter().flatten().copied().collect();
    Tensor::from_data(TensorData::new(flat, [batch, seq]), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_skip_left_padding() {
        let p = positions_from_padding(&[vec![0, 0, 1, 1], vec![1, 1, 1, 1], vec![1, 1, 0, 0]]);
        assert_eq!(
            p,
            vec![vec![0, 0, 0, 1], vec![0, 1, 2, 3], vec![0, 1, 1, 1]]
        );
    }

    #[test]
    fn causal_and_padding() {
        // One left-padded row of 3 keys, all 3 as queries.
        let (m, shape) = attention_mask_data(&[vec![0, 1, 1]], 3, None);
        assert_eq!(shape, [1, 1, 3, 3]);
        #[rustfmt::skip]
        let expected = vec![
            false, true, true,   // the pad sees only itself
            true, false, true,   // first real token: not the pad, not the future
            true, false, false,
        ];
        assert_eq!(m, expected);
    }

    #[test]
    fn cached_keys_offset_the_causal_boundary() {
        // 3 cached keys + 1 new query: the query sees every real key.
        let (m, shape) = attention_mask_data(&[vec![0, 1, 1, 1]], 1, None);
        assert_eq!(shape, [1, 1, 1, 4]);
        assert_eq!(m, vec![true, false, false, false]);
    }

    #[test]
    fn packed_segments_attend_within_themselves_from_position_zero() {
        let row = vec![1, 1, 2, 2, 2, 0];
        assert_eq!(
            positions_from_padding(std::slice::from_ref(&row)),
            vec![vec![0, 1, 0, 1, 2, 2]]
        );
        let (m, _) = attention_mask_data(&[row], 6, None);
        // Query 3 (segment 2) sees keys 2 and 3 only.
        assert_eq!(m[3 * 6..4 * 6], [true, true, false, false, true, true]);
        // Query 1 (segment 1) sees keys 0 and 1.
        assert_eq!(m[6..2 * 6], [false, false, true, true, true, true]);
    }

    #[test]
    fn sliding_window_hides_old_keys() {
        let (m, _) = attention_mask_data(&[vec![1, 1, 1]], 3, Some(2));
        assert_eq!(m[2 * 3..], [true, false, false]);
    }
}
