//! Text corpora for language models: a character vocabulary, the token
//! ids of a training and a validation split, and seeded batches of
//! next-token examples.

use std::io::Read;
use std::path::Path;

use kiln_core::rng::Philox;
use kiln_core::{Error, Result};

/// The bundled corpus: seven of Shakespeare's plays (about 1 MB), built by
/// `scripts/make_shakespeare.py` (see `data/README.md`).
static SHAKESPEARE_GZ: &[u8] = include_bytes!("../data/shakespeare/input.txt.gz");

/// Key mixed into the seed for training batches and for validation batches.
const TRAIN_KEY: u64 = 0x7472_6169_6e5f_6c6d;
const VAL_KEY: u64 = 0x7661_6c5f_6c6d_0000;

/// Which part of a [`TextCorpus`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextSplit {
    /// The first 90 % of the text.
    Train,
    /// The last 10 %.
    Val,
}

/// The distinct characters of a text, sorted: token `i` is `chars[i]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vocab {
    chars: Vec<char>,
}

impl Vocab {
    /// The vocabulary of `text`'s characters.
    pub fn of(text: &str) -> Self {
        let mut chars: Vec<char> = text.chars().collect();
        chars.sort_unstable();
        chars.dedup();
        Vocab { chars }
    }

    /// A vocabulary from its characters in token order (as checkpoints
    /// store it); they must be distinct.
    pub fn from_chars(chars: Vec<char>) -> Result<Self> {
        let mut sorted = chars.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != chars.len() || chars.is_empty() {
            return Err(Error::invalid(
                "a vocabulary needs at least one character and no repeats",
            ));
        }
        Ok(Vocab { chars })
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.chars.len()
    }

    /// Whether there are none (never, for a vocabulary built from text).
    pub fn is_empty(&self) -> bool {
        self.chars.is_empty()
    }

    /// The characters in token order.
    pub fn chars(&self) -> &[char] {
        &self.chars
    }

    /// A prompt every model of this vocabulary can start from: a new line
    /// where the vocabulary has one (a text's lines start there), else its
    /// first character.
    ///
    /// ```
    /// use kiln_data::text::Vocab;
    /// assert_eq!(Vocab::of("ab\ncd").start(), "\n");
    /// assert_eq!(Vocab::of("一二三").start(), "一");
    /// ```
    pub fn start(&self) -> String {
        if self.chars.contains(&'\n') {
            "\n".into()
        } else {
            self.chars.first().map(char::to_string).unwrap_or_default()
        }
    }

    /// The token ids of `text`; a character outside the vocabulary is an
    /// error naming it.
    ///
    /// ```
    /// use kiln_data::text::Vocab;
    /// let v = Vocab::of("to be or not");
    /// assert_eq!(v.decode(&v.encode("be not")?), "be not");
    /// assert!(v.encode("Be").unwrap_err().to_string().contains("'B'"));
    /// # Ok::<(), kiln_core::Error>(())
    /// ```
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let index: std::collections::HashMap<char, u32> = self
            .chars
            .iter()
            .zip(0u32..)
            .map(|(&c, i)| (c, i))
            .collect();
        text.chars()
            .map(|c| {
                index.get(&c).copied().ok_or_else(|| {
                    Error::invalid(format!(
                        "the character {c:?} is not in the model's vocabulary of {} characters: {}",
                        self.chars.len(),
                        self.listed()
                    ))
                })
            })
            .collect()
    }

    /// The characters for a message: all of them, escaped, up to 100.
    fn listed(&self) -> String {
        const SHOWN: usize = 100;
        let shown: String = self.chars.iter().take(SHOWN).collect();
        let more = self.chars.len().saturating_sub(SHOWN);
        match more {
            0 => format!("{shown:?}"),
            _ => format!("{shown:?} and {more} more"),
        }
    }

    /// The text of token ids (ids outside the vocabulary become U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> String {
        ids.iter()
            .map(|&i| self.chars.get(i as usize).copied().unwrap_or('\u{fffd}'))
            .collect()
    }
}

/// A character-level corpus: its vocabulary and the token ids of its two
/// splits (the first 90 % of the characters for training, the rest for
/// validation).
#[derive(Clone, Debug)]
pub struct TextCorpus {
    name: String,
    vocab: Vocab,
    train: Vec<u32>,
    val: Vec<u32>,
}

impl TextCorpus {
    /// A corpus of `text`, named `name`. An empty text is an error.
    pub fn from_text(name: &str, text: &str) -> Result<Self> {
        if text.is_empty() {
            return Err(Error::invalid(format!("text `{name}` is empty")));
        }
        let vocab = Vocab::of(text);
        let ids = vocab.encode(text)?;
        let cut = ids.len() * 9 / 10;
        Ok(TextCorpus {
            name: name.to_string(),
            vocab,
            train: ids[..cut].to_vec(),
            val: ids[cut..].to_vec(),
        })
    }

    /// A corpus read from a UTF-8 file (`--dataset text:FILE`); a missing,
    /// non-UTF-8 or empty file is an error saying so.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = kiln_core::files::read_to_string(path, "text")?;
        Self::from_text(&format!("text:{}", path.display()), &text)
    }

    /// The bundled Shakespeare corpus (1,029,759 characters, 73 distinct).
    pub fn shakespeare() -> Result<Self> {
        let mut text = String::new();
        flate2::read::GzDecoder::new(SHAKESPEARE_GZ)
            .read_to_string(&mut text)
            .map_err(|e| Error::io("decompressing the bundled Shakespeare corpus", e))?;
        Self::from_text("shakespeare", &text)
    }

    /// A corpus by name: `shakespeare`, or `text:FILE`.
    pub fn load(name: &str) -> Result<Self> {
        match name {
            "shakespeare" => Self::shakespeare(),
            _ => match name.strip_prefix("text:") {
                Some(path) if !path.is_empty() => Self::from_file(Path::new(path)),
                _ => Err(Error::invalid(format!(
                    "unknown text dataset `{name}`: use shakespeare, or text:FILE for a UTF-8 file"
                ))),
            },
        }
    }

    /// The corpus' name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The vocabulary.
    pub fn vocab(&self) -> &Vocab {
        &self.vocab
    }

    /// The token ids of a split.
    pub fn tokens(&self, split: TextSplit) -> &[u32] {
        match split {
            TextSplit::Train => &self.train,
            TextSplit::Val => &self.val,
        }
    }

    /// A short hash of the corpus (a resumed run must see the same text).
    pub fn fingerprint(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let chars = self.vocab.chars.iter().map(|&c| u32::from(c));
        for v in chars
            .chain(self.train.iter().copied())
            .chain(self.val.iter().copied())
        {
            h = (h ^ u64::from(v)).wrapping_mul(0x0100_0000_01b3);
        }
        format!("{h:016x}")
    }

    /// Checks that every split holds more than `block` tokens (one example
    /// of `block` inputs and their next tokens).
    pub fn check_block(&self, block: usize) -> Result<()> {
        for (split, ids) in [("training", &self.train), ("validation", &self.val)] {
            if ids.len() <= block {
                return Err(Error::invalid(format!(
                    "the {split} split of `{}` has {} tokens; a context of {block} needs at least {} (a longer text, or a smaller block_size)",
                    self.name,
                    ids.len(),
                    block + 1
                )));
            }
        }
        Ok(())
    }

    /// Batch `index` of `split`: `batch` windows of `block` tokens at
    /// offsets drawn from the Philox stream of `(seed, index)`, and the
    /// tokens that follow each position (`(inputs, targets)`, both
    /// `batch·block` long, row-major). A function of its arguments alone,
    /// so a resumed run draws the same batches.
    ///
    /// ```
    /// use kiln_data::text::{TextCorpus, TextSplit};
    /// let c = TextCorpus::from_text("abc", &"abcdefgh".repeat(20))?;
    /// let (x, y) = c.batch(TextSplit::Train, 3, 4, 7, 0)?;
    /// assert_eq!((x.len(), y.len()), (12, 12));
    /// assert_eq!(x[1..4], y[0..3]); // targets are the inputs shifted by one
    /// assert_eq!(c.batch(TextSplit::Train, 3, 4, 7, 0)?, (x, y));
    /// # Ok::<(), kiln_core::Error>(())
    /// ```
    pub fn batch(
        &self,
        split: TextSplit,
        batch: usize,
        block: usize,
        seed: u64,
        index: u64,
    ) -> Result<(Vec<u32>, Vec<u32>)> {
        self.check_block(block)?;
        let (ids, key) = match split {
            TextSplit::Train => (&self.train, TRAIN_KEY),
            TextSplit::Val => (&self.val, VAL_KEY),
        };
        let starts = u32::try_from(ids.len() - block)
            .map_err(|_| Error::invalid(format!("text `{}` is over 4 G tokens", self.name)))?;
        let mut rng = Philox::new(seed ^ key, index);
        let mut x = Vec::with_capacity(batch * block);
        let mut y = Vec::with_capacity(batch * block);
        for _ in 0..batch {
            let at = rng.below(starts) as usize;
            x.extend_from_slice(&ids[at..at + block]);
            y.extend_from_slice(&ids[at + 1..at + block + 1]);
        }
        Ok((x, y))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bundled_corpus_is_the_one_the_script_builds() {
        let c = TextCorpus::shakespeare().unwrap();
        assert_eq!(c.vocab().len(), 73);
        assert_eq!(
            c.tokens(TextSplit::Train).len() + c.tokens(TextSplit::Val).len(),
            1_029_759
        );
        assert_eq!(c.tokens(TextSplit::Train).len(), 1_029_759 * 9 / 10);
        let head = c.vocab().decode(&c.tokens(TextSplit::Train)[..10]);
        assert_eq!(head, "THE TRAGED");
    }

    #[test]
    fn bad_texts_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::write(&bin, [0x66, 0x6f, 0xff, 0x6f]).unwrap();
        let e = TextCorpus::from_file(&bin).unwrap_err().to_string();
        assert!(e.contains("not UTF-8") && e.contains("offset 2"), "{e}");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "").unwrap();
        assert!(TextCorpus::from_file(&empty)
            .unwrap_err()
            .to_string()
            .contains("empty"));
        let e = TextCorpus::load("text:/no/such/file")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/no/such/file"), "{e}");
        assert!(TextCorpus::load("poems")
            .unwrap_err()
            .to_string()
            .contains("text:FILE"));
        let short = TextCorpus::from_text("short", &"x".repeat(100)).unwrap();
        let e = short.check_block(64).unwrap_err().to_string();
        assert!(
            e.contains("validation split") && e.contains("at least 65"),
            "{e}"
        );
        assert!(short.batch(TextSplit::Train, 2, 64, 0, 0).is_err());
        assert!(Vocab::from_chars(vec!['a', 'a']).is_err());
    }
}
