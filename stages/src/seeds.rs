//! Seeds: how every random choice of a stage is derived from the stage's seed, so that a result
//! depends on nothing else (not the batch it was computed in, not a resumed run's history).
//! Owns the one seed mixer and the one seeded permutation; the generators that consume the seeds
//! (sampling, initialisation) are their modules'.

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

/// The 64-bit golden-ratio constant, `2^64 / phi`.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's finaliser over `(seed, salt)`: unrelated generator seeds for the streams of one
/// stage (a batch, an iteration, a round), which a plain `seed + salt` would not give.
pub fn mix(seed: u64, salt: u64) -> u64 {
    let mut z = seed ^ salt.wrapping_add(1).wrapping_mul(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `seed` spread by a golden-ratio multiple of `index`: the cheap per-epoch (per-row) seed of the
/// training loop's shuffles and of the principles' draws.
pub fn stream(seed: u64, index: u64) -> u64 {
    seed ^ index.wrapping_mul(GOLDEN)
}

/// A seeded Fisher-Yates permutation of `0..n`.
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    shuffle(&mut order, &mut ChaCha8Rng::seed_from_u64(seed));
    order
}

/// Fisher-Yates over `items` with `rng`, for draws that continue one generator.
pub fn shuffle<T>(items: &mut [T], rng: &mut ChaCha8Rng) {
    for i in (1..items.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixed_seeds_differ_and_are_stable() {
        assert_eq!(mix(7, 0), mix(7, 0));
        assert_ne!(mix(7, 0), mix(7, 1));
        assert_ne!(mix(7, 0), mix(8, 0));
        assert_ne!(mix(1, 2), mix(1, 3));
    }

    #[test]
    fn permutations_are_seeded_and_complete() {
        let a = permutation(10, 3);
        assert_eq!(a, permutation(10, 3));
        assert_ne!(a, permutation(10, 4));
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_eq!(stream(5, 0), 5);
    }
}
