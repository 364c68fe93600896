//! How batches are right-padded: the pad token and the multiple a batch's sequence length is
//! rounded up to (`pad_to_multiple_of`). Padding is neither attended to nor trained on, so a
//! row's values do not depend on it; rounding lengths up only changes which tensor shapes the
//! backend sees (GPU backends compile and tune kernels per shape). Owns the rounding; the
//! batches that apply it are `logps::CompletionBatch`, `train::lm::Batch` and the reward
//! model's pairs.

/// The pad token of a batch and the multiple its length is rounded up to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pad {
    pub id: u32,
    /// At least 1.
    pub multiple: usize,
}

impl Pad {
    /// Padding with `id` to the multiple `multiple` (0 is taken as 1).
    pub fn new(id: u32, multiple: usize) -> Self {
        Self {
            id,
            multiple: multiple.max(1),
        }
    }

    /// Padding with `id` to the longest row only.
    pub fn exact(id: u32) -> Self {
        Self::new(id, 1)
    }

    /// The length of a batch whose longest row has `longest` tokens: at least `min`, rounded
    /// up to the multiple.
    pub fn length(&self, longest: usize, min: usize) -> usize {
        longest.max(min).div_ceil(self.multiple) * self.multiple
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_round_up_to_the_multiple() {
        let pad = Pad::new(0, 64);
        assert_eq!(pad.length(1, 2), 64);
        assert_eq!(pad.length(64, 2), 64);
        assert_eq!(pad.length(65, 2), 128);
        assert_eq!(Pad::exact(0).length(7, 2), 7);
        assert_eq!(Pad::exact(0).length(0, 2), 2);
        assert_eq!(Pad::new(3, 0), Pad::exact(3));
    }
}
