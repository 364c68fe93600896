//! The `tokenizer` stage kind: trains a byte-level BPE (the `tokenizers` crate's `BpeTrainer`)
//! on the text column of a dataset and writes `tokenizer.json` and `tokenizer_config.json`, in
//! the layout `transformers` and [`Tokenizer::from_dir`] load.
//!
//! The tokenizer is GPT-2 style: a byte-level pre-tokenizer without a prefix space, every one of
//! the 256 byte symbols in the base vocabulary (so any text encodes, nothing is unknown), a
//! byte-level decoder, the special tokens at ids `0..` in the order given, and a post-processor
//! that prepends the BOS token when the special tokens include one. The same data and parameters
//! give the same file bytes: the trainer breaks ties between merges by token ids, and the files
//! are written in id order.

use std::collections::HashSet;
use std::path::Path;

use rudder_engine::runner::StageOutcome;
use rudder_schema::kinds::TokenizerParams;
use serde_json::{Map, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer as HfTokenizer};

use crate::error::StageError;
use crate::kind::{HostKind, Stage};
use crate::tokenizer::{TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, Tokenizer};
use crate::train::TrainError;

pub struct TokenizerKind;

impl HostKind for TokenizerKind {
    type Params = TokenizerParams;
    const VERSION: u32 = 1;

    fn run(stage: &Stage<'_, TokenizerParams>) -> Result<StageOutcome, TrainError> {
        let p = stage.params;
        let rows = stage.inputs.rows("data")?;
        let texts = rows
            .rows
            .iter()
            .map(|row| rows.string(row, &p.text_field))
            .collect::<Result<Vec<_>, _>>()?;
        stage
            .progress()
            .set_message(format!("training BPE on {} texts", texts.len()));
        let tokenizer = write_tokenizer(&texts, &BpeOptions::from(p), stage.out_dir())?;
        let mut summary = std::collections::BTreeMap::new();
        summary.insert("vocab_size".into(), tokenizer.vocab_size() as f64);
        summary.insert("texts".into(), texts.len() as f64);
        Ok(StageOutcome { summary })
    }
}

/// Special-token names recognised as BOS, EOS and padding, in order of preference: rudder's own
/// (`<|bos|>`...) and the Llama/SentencePiece ones.
const BOS_NAMES: &[&str] = &["<|bos|>", "<s>"];
const EOS_NAMES: &[&str] = &["<|eos|>", "</s>"];
const PAD_NAMES: &[&str] = &["<|pad|>", "<pad>"];

/// Number of byte symbols every byte-level vocabulary starts with.
const BYTE_SYMBOLS: usize = 256;

/// What to train.
#[derive(Debug, Clone, PartialEq)]
pub struct BpeOptions {
    /// Vocabulary size, special tokens included; fewer when the data run out of merges.
    pub vocab_size: usize,
    /// A merge must occur at least this often.
    pub min_frequency: u64,
    /// Given ids `0..` in this order.
    pub special_tokens: Vec<String>,
    /// Written to tokenizer_config.json.
    pub chat_template: Option<String>,
}

impl From<&TokenizerParams> for BpeOptions {
    fn from(p: &TokenizerParams) -> Self {
        Self {
            vocab_size: p.vocab_size as usize,
            min_frequency: u64::from(p.min_frequency),
            special_tokens: p.special_tokens.clone(),
            chat_template: p.chat_template.clone(),
        }
    }
}

/// The special tokens' roles, found by name among the special tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialRoles {
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub pad: Option<String>,
}

impl SpecialRoles {
    pub fn of(special_tokens: &[String]) -> Self {
        let find = |names: &[&str]| {
            names
                .iter()
                .find(|n| special_tokens.iter().any(|t| t == *n))
                .map(|n| (*n).to_string())
        };
        Self {
            bos: find(BOS_NAMES),
            eos: find(EOS_NAMES),
            pad: find(PAD_NAMES),
        }
    }
}

fn config_error(message: impl Into<String>) -> TrainError {
    TrainError::Config(message.into())
}

impl BpeOptions {
    /// Refuses settings the trainer would silently bend: duplicate or empty special tokens
    /// (their ids would shift), or a vocabulary with no room for the byte symbols.
    pub fn check(&self) -> Result<(), TrainError> {
        let mut seen = HashSet::new();
        for token in &self.special_tokens {
            if token.is_empty() {
                return Err(config_error("special_tokens: a special token is empty"));
            }
            if !seen.insert(token.as_str()) {
                return Err(config_error(format!(
                    "special_tokens: `{token}` is listed twice"
                )));
            }
        }
        if self.special_tokens.len() + BYTE_SYMBOLS > self.vocab_size {
            return Err(config_error(format!(
                "vocab_size {} leaves no room for the {BYTE_SYMBOLS} byte tokens and {} special tokens",
                self.vocab_size,
                self.special_tokens.len()
            )));
        }
        if self.min_frequency == 0 {
            return Err(config_error("min_frequency must be at least 1"));
        }
        Ok(())
    }
}

/// Trains the byte-level BPE on `texts`.
pub fn train_bpe(texts: &[String], opts: &BpeOptions) -> Result<HfTokenizer, TrainError> {
    opts.check()?;
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(opts.vocab_size)
        .min_frequency(opts.min_frequency)
        .show_progress(false)
        .special_tokens(
            opts.special_tokens
                .iter()
                .map(|t| AddedToken::from(t.clone(), true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tokenizer = HfTokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    let fail = |e: tokenizers::Error| TrainError::Input(format!("training the tokenizer: {e}"));
    tokenizer
        .train(&mut TrainerWrapper::from(trainer), texts.iter())
        .map_err(fail)?;
    if let Some(bos) = SpecialRoles::of(&opts.special_tokens).bos {
        let id = tokenizer
            .token_to_id(&bos)
            .ok_or_else(|| TrainError::Input(format!("the trained vocabulary lacks `{bos}`")))?;
        let template = TemplateProcessing::builder()
            .try_single(format!("{bos} $A"))
            .and_then(|b| b.try_pair(format!("{bos} $A $B")))
            .map_err(|e| TrainError::Input(format!("BOS template: {e}")))?
            .special_tokens(vec![(bos.clone(), id)])
            .build()
            .map_err(|e| TrainError::Input(format!("BOS template: {e}")))?;
        tokenizer.with_post_processor(Some(template));
    }
    Ok(tokenizer)
}

/// tokenizer_config.json: the special tokens' roles and the chat template.
pub fn tokenizer_config(opts: &BpeOptions) -> Value {
    let roles = SpecialRoles::of(&opts.special_tokens);
    let mut obj = Map::new();
    for (key, token) in [
        ("bos_token", &roles.bos),
        ("eos_token", &roles.eos),
        ("pad_token", &roles.pad),
    ] {
        if let Some(t) = token {
            obj.insert(key.into(), Value::String(t.clone()));
        }
    }
    if let Some(t) = &opts.chat_template {
        obj.insert("chat_template".into(), Value::String(t.clone()));
    }
    // Loads with transformers' AutoTokenizer (4.x and 5.x) from tokenizer.json alone.
    obj.insert(
        "tokenizer_class".into(),
        Value::String("PreTrainedTokenizerFast".into()),
    );
    obj.insert("padding_side".into(), Value::String("right".into()));
    Value::Object(obj)
}

/// Trains on `texts` and writes tokenizer.json and tokenizer_config.json into `dir`; returns the
/// tokenizer as stages load it.
pub fn write_tokenizer(
    texts: &[String],
    opts: &BpeOptions,
    dir: &Path,
) -> Result<Tokenizer, TrainError> {
    let trained = train_bpe(texts, opts)?;
    std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    let path = dir.join(TOKENIZER_FILE);
    trained
        .save(&path, false)
        .map_err(|e| StageError::Tokenizer {
            path: path.clone(),
            message: e.to_string(),
        })?;
    let path = dir.join(TOKENIZER_CONFIG_FILE);
    let text = serde_json::to_string_pretty(&tokenizer_config(opts)).expect("JSON serialises");
    std::fs::write(&path, text + "\n").map_err(|e| TrainError::io(&path, e))?;
    // Read back what was written, so a file the rest of rudder cannot load fails here.
    Ok(Tokenizer::from_dir(dir)?)
}
