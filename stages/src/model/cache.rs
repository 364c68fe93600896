//! The key/value cache of incremental decoding: per layer, the rotated keys and the values of
//! every token seen so far, plus the padding mask of those tokens so that later steps derive
//! masks and positions from the whole history.
//!
//! The cached tensors have a capacity that grows in multiples of a bucket: new keys and values
//! are written in place at the current length, and the slots not yet written are masked as
//! padding, so a GPU backend sees a new tensor shape (and compiles and tunes kernels for it)
//! once per bucket instead of once per generated token. A bucket of 1 (the `cpu` default)
//! grows the tensors by exactly what is appended, as concatenation does.

use burn::tensor::Tensor;

/// Cached keys and values of one attention layer.
///
/// Shapes `[batch, n_kv_heads, capacity, head_dim]`; slots from the cache's length on are not
/// written yet.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    kv: Option<(Tensor<4>, Tensor<4>)>,
}

impl LayerCache {
    /// Writes new keys/values (`[batch, n_kv_heads, seq_q, head_dim]`) at slot `start`, growing
    /// the tensors to `capacity` slots when they are smaller, and returns them whole.
    pub fn append(
        &mut self,
        k: Tensor<4>,
        v: Tensor<4>,
        start: usize,
        capacity: usize,
    ) -> (Tensor<4>, Tensor<4>) {
        let (k, v) = match self.kv.take() {
            Some((pk, pv)) if pk.dims()[2] == capacity => {
                let [b, h, seq_q, d] = k.dims();
                let at = [0..b, 0..h, start..start + seq_q, 0..d];
                (pk.slice_assign(at.clone(), k), pv.slice_assign(at, v))
            }
            Some((pk, pv)) => (
                grow(Some(pk), k, start, capacity),
                grow(Some(pv), v, start, capacity),
            ),
            None => (
                grow(None, k, start, capacity),
                grow(None, v, start, capacity),
            ),
        };
        self.kv = Some((k.clone(), v.clone()));
        (k, v)
    }
}

/// The first `start` slots of `old`, then `new`, then unwritten (zero) slots up to `capacity`.
fn grow(old: Option<Tensor<4>>, new: Tensor<4>, start: usize, capacity: usize) -> Tensor<4> {
    let [b, h, seq_q, d] = new.dims();
    let mut parts = Vec::with_capacity(3);
    if let Some(old) = old {
        parts.push(match old.dims()[2] == start {
            true => old,
            false => old.slice([0..b, 0..h, 0..start, 0..d]),
        });
    }
    let (device, dtype) = (new.device(), new.dtype());
    parts.push(new);
    let rest = capacity - start - seq_q;
    if rest > 0 {
        let zeros = Tensor::<4>::zeros([b, h, rest, d], &device);
        parts.push(crate::precision::cast(zeros, dtype));
    }
    match parts.len() {
        1 => parts.pop().expect("one part"),
        _ => Tensor::cat(parts, 2),
    }
}

/// The cache of a whole decoder.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub(crate) layers: Vec<LayerCache>,
    /// One row per batch element: 1 for every real token seen so far, 0 for padding.
    pub(crate) padding: Vec<Vec<u8>>,
    /// The multiple the cached tensors' capacity grows by (at least 1).
    bucket: usize,
    /// Slots the cached tensors hold, written or not.
    capacity: usize,
}

impl KvCache {
    /// An empty cache for a decoder of `n_layers` layers, whose tensors grow by exactly what is
    /// appended.
    pub fn new(n_layers: usize) -> Self {
        Self::with_bucket(n_layers, 1)
    }

    /// An empty cache whose tensors' capacity grows in multiples of `bucket` (0 is taken as 1).
    pub fn with_bucket(n_layers: usize, bucket: usize) -> Self {
        Self {
            layers: (0..n_layers).map(|_| LayerCache { kv: None }).collect(),
            padding: Vec::new(),
            bucket: bucket.max(1),
            capacity: 0,
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

    /// Slots the cached tensors hold after `extra` more tokens: the current capacity, or the
    /// length rounded up to the bucket when it no longer fits. Call before the tokens are added
    /// to `padding`; the layers' [`LayerCache::append`] must then be given this capacity.
    pub(crate) fn reserve(&mut self, extra: usize) -> usize {
        let needed = self.len() + extra;
        if needed > self.capacity {
            self.capacity = needed.div_ceil(self.bucket) * self.bucket;
        }
        self.capacity
    }

    /// The padding history extended with unwritten slots (0, so masked) up to `capacity`: the
    /// key padding of the cached tensors.
    pub(crate) fn key_padding(&self, capacity: usize) -> Vec<Vec<u8>> {
        self.padding
            .iter()
            .map(|row| {
                let mut row = row.clone();
                row.resize(capacity, 0);
                row
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_grows_in_buckets_and_keys_land_at_the_length() {
        let device = crate::test_device();
        let mut cache = KvCache::with_bucket(1, 4);
        let step = |cache: &mut KvCache, values: &[f32]| {
            let n = values.len();
            let start = cache.len();
            let capacity = cache.reserve(n);
            for row in &mut cache.padding {
                row.extend(std::iter::repeat_n(1, n));
            }
            if cache.padding.is_empty() {
                cache.padding = vec![vec![1; n]];
            }
            let k = Tensor::<1>::from_floats(values, &device).reshape([1, 1, n, 1]);
            let (k, _) = cache.layers[0].append(k.clone(), k, start, capacity);
            k.into_data().try_to_vec::<f32>().unwrap()
        };
        assert_eq!(step(&mut cache, &[1.0, 2.0, 3.0]), [1.0, 2.0, 3.0, 0.0]);
        assert_eq!(step(&mut cache, &[4.0]), [1.0, 2.0, 3.0, 4.0]);
        assert_eq!(
            step(&mut cache, &[5.0]),
            [1.0, 2.0, 3.0, 4.0, 5.0, 0.0, 0.0, 0.0]
        );
        assert_eq!(cache.key_padding(8), [vec![1, 1, 1, 1, 1, 0, 0, 0]]);
    }
}
