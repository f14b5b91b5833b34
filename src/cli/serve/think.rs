//! Reasoning models' answers split in two, as llama.cpp's
//! `--reasoning-format deepseek` does: the text inside `<think>` ...
//! `</think>` goes to `reasoning_content`, the rest to `content`. The block
//! is open from the start when the chat template's generation prompt opens
//! it (DeepSeek-R1-Distill, Qwen3), or when the answer begins with `<think>`.
//! Tags split across tokens are held back until they are whole.

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Nothing shown yet: the answer may still open a block.
    Start,
    Thinking,
    /// After the block (or without one); `trim`: drop the answer's leading
    /// whitespace (the newlines after `</think>`).
    Answer {
        trim: bool,
    },
}

pub struct Think {
    state: State,
    held: String,
}

/// The longest tail of `s` that is a proper prefix of `tag`.
fn partial_tail(s: &str, tag: &str) -> usize {
    (1..tag.len())
        .rev()
        .find(|&k| {
            k <= s.len() && s.is_char_boundary(s.len() - k) && tag.starts_with(&s[s.len() - k..])
        })
        .unwrap_or(0)
}

impl Think {
    /// `opened`: the prompt ends inside a `<think>` block.
    pub fn new(opened: bool) -> Self {
        Self {
            state: if opened {
                State::Thinking
            } else {
                State::Start
            },
            held: String::new(),
        }
    }

    /// The (reasoning, content) text `delta` adds.
    pub fn push(&mut self, delta: &str) -> (String, String) {
        self.held.push_str(delta);
        let (mut reasoning, mut content) = (String::new(), String::new());
        loop {
            match self.state {
                State::Start => {
                    let t = self.held.trim_start();
                    if let Some(rest) = t.strip_prefix(OPEN) {
                        self.held = rest.to_string();
                        self.state = State::Thinking;
                        continue;
                    }
                    if t.is_empty() || OPEN.starts_with(t) {
                        return (reasoning, content);
                    }
                    self.state = State::Answer { trim: false };
                }
                State::Thinking => {
                    if let Some(at) = self.held.find(CLOSE) {
                        reasoning.push_str(&self.held[..at]);
                        self.held.drain(..at + CLOSE.len());
                        self.state = State::Answer { trim: true };
                        continue;
                    }
                    let cut = self.held.len() - partial_tail(&self.held, CLOSE);
                    reasoning.push_str(&self.held[..cut]);
                    self.held.drain(..cut);
                    return (reasoning, content);
                }
                State::Answer { trim } => {
                    if trim {
                        let t = self.held.trim_start().len();
                        self.held.drain(..self.held.len() - t);
                        if self.held.is_empty() {
                            return (reasoning, content);
                        }
                        self.state = State::Answer { trim: false };
                    }
                    content.push_str(&self.held);
                    self.held.clear();
                    return (reasoning, content);
                }
            }
        }
    }

    /// What is held back, at the end.
    pub fn finish(&mut self) -> (String, String) {
        let rest = std::mem::take(&mut self.held);
        match self.state {
            State::Thinking => (rest, String::new()),
            State::Answer { trim: true } => (String::new(), rest.trim_start().to_string()),
            _ => (String::new(), rest),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `text` cut into pieces of `step` characters.
    fn split(text: &str, opened: bool, step: usize) -> (String, String) {
        let mut t = Think::new(opened);
        let (mut r, mut c) = (String::new(), String::new());
        let chars: Vec<char> = text.chars().collect();
        for piece in chars.chunks(step) {
            let (a, b) = t.push(&piece.iter().collect::<String>());
            r += &a;
            c += &b;
        }
        let (a, b) = t.finish();
        (r + &a, c + &b)
    }

    #[test]
    fn the_block_goes_to_reasoning_wherever_the_tokens_cut_the_tags() {
        for step in 1..12 {
            let want = ("let me see: 7 + 5".to_string(), "12".to_string());
            assert_eq!(split("let me see: 7 + 5</think>\n\n12", true, step), want);
            assert_eq!(
                split("  <think>let me see: 7 + 5</think>\n12", false, step),
                want
            );
            assert_eq!(
                split("just an answer <think>", false, step),
                (String::new(), "just an answer <think>".into())
            );
            assert_eq!(
                split("unfinished </thi", true, step),
                ("unfinished </thi".into(), String::new())
            );
            assert_eq!(split("<thi", false, step), (String::new(), "<thi".into()));
            assert_eq!(split("é</think>ü", true, step), ("é".into(), "ü".into()));
        }
    }
}
