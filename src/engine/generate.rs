//! The generation loop: one prefill of the prompt, then one decode step per
//! token until a stop token, `max_tokens`, or a full context. Each step reads
//! back only the chosen token.

use std::time::Instant;

use crate::error::{Error, Result};
use crate::model::{Model, Readout, TextTokenizer};
use crate::ops::sample::{NO_TOKEN, SamplingParams};

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops after any of these (the token is kept in the output).
    pub stop_ids: Vec<u32>,
}

pub use crate::engine::sequence::StopReason;

#[derive(Clone, Debug)]
pub struct Generation {
    pub prompt_tokens: usize,
    pub tokens: Vec<u32>,
    pub stop: StopReason,
    /// Seconds of the prefill step (prompt in, first token out).
    pub prefill_s: f64,
    /// Seconds of the decode steps after the first token.
    pub decode_s: f64,
}

impl Generation {
    pub fn prefill_tok_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_s.max(1e-9)
    }
    /// Decode steps per second (each step after the first token produces one).
    pub fn decode_tok_s(&self) -> f64 {
        self.tokens.len().saturating_sub(1) as f64 / self.decode_s.max(1e-9)
    }
}

/// Generates from `prompt` (which starts a new sequence). `on_token` sees each
/// token as it is produced and returns false to stop.
pub fn generate(
    model: &mut Model,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Generation> {
    model.set_sampling(opts.sampling)?;
    model.reset();
    let plain_greedy = opts.sampling.is_greedy() && opts.sampling.repetition_penalty == 1.0;
    let readout = if plain_greedy {
        Readout::Argmax
    } else {
        Readout::Sample
    };
    let mut g = Generation {
        prompt_tokens: prompt.len(),
        tokens: vec![],
        stop: StopReason::MaxTokens,
        prefill_s: 0.0,
        decode_s: 0.0,
    };
    if opts.max_tokens == 0 {
        return Ok(g);
    }
    let t0 = Instant::now();
    let mut next = next_token(model, prompt, readout)?;
    g.prefill_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    loop {
        g.tokens.push(next);
        if !on_token(next) {
            g.stop = StopReason::Cancelled;
            break;
        }
        if opts.stop_ids.contains(&next) {
            g.stop = StopReason::Eos;
            break;
        }
        if g.tokens.len() >= opts.max_tokens {
            g.stop = StopReason::MaxTokens;
            break;
        }
        if model.position() >= model.capacity() {
            g.stop = StopReason::Context;
            break;
        }
        next = next_token(model, &[next], readout)?;
    }
    g.decode_s = t1.elapsed().as_secs_f64();
    Ok(g)
}

/// Feeds `tokens` and reads the next token back; non-finite logits are an error.
fn next_token(model: &mut Model, tokens: &[u32], readout: Readout) -> Result<u32> {
    let at = model.position() + tokens.len();
    // Argmax and Sample readouts always return a token.
    let token = model.forward(tokens, readout)?.token.unwrap_or(NO_TOKEN);
    if token == NO_TOKEN {
        return Err(Error::NonFiniteLogits {
            at: format!("position {at}"),
        });
    }
    Ok(token)
}

/// Turns a growing token list into text increments, holding back bytes of
/// an incomplete UTF-8 character.
pub struct TextStream<'t> {
    tokenizer: &'t TextTokenizer,
    tokens: Vec<u32>,
    printed: usize,
}

impl<'t> TextStream<'t> {
    pub fn new(tokenizer: &'t TextTokenizer) -> Self {
        Self {
            tokenizer,
            tokens: vec![],
            printed: 0,
        }
    }

    /// The new text after `token`, if any is complete.
    pub fn push(&mut self, token: u32) -> Result<String> {
        self.tokens.push(token);
        let text = self.tokenizer.decode(&self.tokens, true)?;
        if text.ends_with('\u{FFFD}') || !text.is_char_boundary(self.printed) {
            return Ok(String::new());
        }
        let new = text[self.printed..].to_string();
        self.printed = text.len();
        Ok(new)
    }

    /// The text held back at the end (an incomplete character decodes as
    /// U+FFFD, as in the whole decode): after it, the printed text equals
    /// `decode(tokens)`.
    pub fn finish(&mut self) -> Result<String> {
        let text = self.tokenizer.decode(&self.tokens, true)?;
        let rest = if text.is_char_boundary(self.printed) {
            text[self.printed..].to_string()
        } else {
            String::new()
        };
        self.printed = text.len();
        Ok(rest)
    }
}
