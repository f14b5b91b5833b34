//! `tokenizer.json` through the tokenizers crate, the chat template of
//! `tokenizer_config.json` (or `chat_template.jinja`) rendered with minijinja
//! the way transformers renders it (trim_blocks, lstrip_blocks, Python string
//! methods), and the stop tokens of `generation_config.json`.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::weights::read_text;

/// A chat message.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    chat_template: Option<String>,
    /// The file the chat template came from (for its errors).
    template_path: PathBuf,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

/// `bos_token` / `eos_token` in tokenizer_config.json: a string or an AddedToken object.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

impl TextTokenizer {
    /// The tokenizer of a model directory (`tokenizer.json`,
    /// `tokenizer_config.json`) or of a GGUF file's `tokenizer.*` metadata.
    pub fn load(dir: &Path) -> Result<Self> {
        if crate::model::weights::is_gguf(dir) {
            return Self::load_gguf(dir);
        }
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::Tokenizer {
                path,
                reason: "missing (kvsift needs the fast tokenizer's tokenizer.json)".into(),
            });
        }
        let text = read_text(&path)?;
        let inner = parse_tokenizer(&text).map_err(|reason| Error::Tokenizer {
            path: path.clone(),
            reason,
        })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = if cfg_path.exists() {
            crate::model::config::parse_object(&cfg_path, &read_text(&cfg_path)?)?
        } else {
            Value::Null
        };
        let jinja = dir.join("chat_template.jinja");
        let (chat_template, template_path) = if jinja.exists() {
            (Some(read_text(&jinja)?), jinja)
        } else {
            let bad = |reason: &str| Error::BadConfig {
                path: cfg_path.clone(),
                reason: format!("chat_template: {reason}"),
            };
            let template = match cfg.get("chat_template") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                // A list of named templates: take "default".
                Some(Value::Array(list)) => Some(
                    list.iter()
                        .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                        .or(list.first())
                        .and_then(|t| t.get("template"))
                        .and_then(|t| t.as_str())
                        .map(str::to_string)
                        .ok_or_else(|| {
                            bad("a list without a {\"name\", \"template\"} entry holding a string")
                        })?,
                ),
                Some(other) => {
                    return Err(bad(&format!("expected a string or a list, got {other}")));
                }
            };
            (template, cfg_path)
        };
        Ok(Self {
            inner,
            path,
            chat_template,
            template_path,
            bos_token: token_text(cfg.get("bos_token")),
            eos_token: token_text(cfg.get("eos_token")),
        })
    }

    fn load_gguf(path: &Path) -> Result<Self> {
        let file = crate::model::gguf::GgufFile::open(path)?;
        let t = crate::model::gguf::model::tokenizer(&file)?;
        let inner = parse_tokenizer(&t.tokenizer_json).map_err(|reason| Error::Tokenizer {
            path: path.to_path_buf(),
            reason: format!("the vocabulary of tokenizer.ggml.*: {reason}"),
        })?;
        Ok(Self {
            inner,
            path: path.to_path_buf(),
            chat_template: t.chat_template,
            template_path: path.to_path_buf(),
            bos_token: t.bos_token,
            eos_token: t.eos_token,
        })
    }

    fn err(&self, reason: impl std::fmt::Display) -> Error {
        Error::Tokenizer {
            path: self.path.clone(),
            reason: reason.to_string(),
        }
    }

    /// Token ids of `text`; `add_special_tokens` applies the post-processor
    /// (e.g. Llama's BOS), as transformers' `tokenizer(text)` does.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        // A malformed tokenizer.json can make the tokenizers crate panic
        // here (a post-processor naming a missing token): an error instead.
        crate::error::catch_panic(|| self.inner.encode(text, add_special_tokens))
            .ok_or_else(|| self.err("malformed: the tokenizers library failed to encode"))?
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| self.err(e))
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        crate::error::catch_panic(|| self.inner.decode(ids, skip_special_tokens))
            .ok_or_else(|| self.err("malformed: the tokenizers library failed to decode"))?
            .map_err(|e| self.err(e))
    }

    /// The bytes token `id` stands for: what it adds to the text, even when
    /// that is part of a UTF-8 character (a byte-level BPE piece, a
    /// `<0xHH>` byte-fallback piece); added tokens give their text.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let decoded = || self.decode(&[id], false).unwrap_or_default().into_bytes();
        let Some(piece) = self.inner.id_to_token(id) else {
            return vec![];
        };
        if self.inner.get_added_tokens_decoder().contains_key(&id) {
            return decoded();
        }
        if let Some(hex) = piece.strip_prefix("<0x").and_then(|p| p.strip_suffix('>'))
            && hex.len() == 2
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            return vec![b];
        }
        if matches!(
            self.inner.get_decoder(),
            Some(tokenizers::DecoderWrapper::ByteLevel(_))
        ) && let Some(bytes) = piece.chars().map(byte_of_char).collect::<Option<Vec<u8>>>()
        {
            return bytes;
        }
        decoded()
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The id of the tokenizer's eos token, if it names one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_id(t))
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders the chat template for `messages` (as `apply_chat_template(...,
    /// tokenize=False)`); encode the result without special tokens.
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.apply_chat_template_with(messages, add_generation_prompt, &serde_json::Map::new())
    }

    /// [`TextTokenizer::apply_chat_template`] with extra template variables
    /// (`chat_template_kwargs`, e.g. `enable_thinking`); the standard ones
    /// (`messages`, `add_generation_prompt`, `bos_token`, `eos_token`) win.
    pub fn apply_chat_template_with(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, Value>,
    ) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| self.err("--chat needs a chat_template (tokenizer_config.json or chat_template.jinja); this model has none"))?;
        let terr = |reason: String| Error::Tokenizer {
            path: self.template_path.clone(),
            reason,
        };
        let mut env = minijinja::Environment::new();
        // A template is code from the checkpoint: bound its work (instructions)
        // and its output, so a runaway loop is an error, not a hang.
        env.set_fuel(Some(TEMPLATE_FUEL));
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| terr(e.to_string()))?;
        env.set_syntax(syntax);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_function("strftime_now", strftime_now);
        env.add_template("chat", template)
            .map_err(|e| terr(format!("chat template does not parse: {e}")))?;
        let mut vars: std::collections::BTreeMap<String, minijinja::Value> = extra
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    minijinja::Value::from(minijinja::value::Serde(v)),
                )
            })
            .collect();
        for (k, v) in [
            (
                "messages",
                minijinja::Value::from(minijinja::value::Serde(messages)),
            ),
            (
                "add_generation_prompt",
                minijinja::Value::from(add_generation_prompt),
            ),
            (
                "bos_token",
                minijinja::Value::from(self.bos_token.clone().unwrap_or_default()),
            ),
            (
                "eos_token",
                minijinja::Value::from(self.eos_token.clone().unwrap_or_default()),
            ),
        ] {
            vars.insert(k.to_string(), v);
        }
        let ctx = minijinja::Value::from(vars);
        let mut out = BoundedText::default();
        let rendered = env
            .get_template("chat")
            .and_then(|t| t.render_captured_to(ctx, &mut out).map(|_| ()));
        if out.overflowed {
            return Err(terr(format!(
                "chat template failed: its output passed {TEMPLATE_MAX_OUTPUT} bytes"
            )));
        }
        rendered.map_err(|e| {
            let why = if e.kind() == minijinja::ErrorKind::OutOfFuel {
                format!("ran past {TEMPLATE_FUEL} steps (a runaway loop?)")
            } else {
                e.to_string()
            };
            terr(format!("chat template failed: {why}"))
        })?;
        String::from_utf8(out.bytes).map_err(|e| terr(format!("chat template failed: {e}")))
    }
}

/// Steps a chat template may take (a long conversation under a real
/// template takes well under a million).
pub const TEMPLATE_FUEL: u64 = 50_000_000;
/// Bytes a chat template may write.
pub const TEMPLATE_MAX_OUTPUT: usize = 64 << 20;

/// The template's output, refusing to grow past [`TEMPLATE_MAX_OUTPUT`].
#[derive(Default)]
struct BoundedText {
    bytes: Vec<u8>,
    overflowed: bool,
}

impl std::io::Write for BoundedText {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > TEMPLATE_MAX_OUTPUT {
            self.overflowed = true;
            return Err(std::io::Error::other("chat template output too long"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `tokenizer.json` through the tokenizers crate. Its parser is third-party
/// code fed a user's file: a panic inside it becomes an error too.
fn parse_tokenizer(text: &str) -> std::result::Result<tokenizers::Tokenizer, String> {
    match crate::error::catch_panic(|| text.parse::<tokenizers::Tokenizer>()) {
        Some(Ok(t)) => Ok(t),
        Some(Err(e)) => Err(e.to_string()),
        None => Err("malformed: the tokenizers library could not parse it".into()),
    }
}

/// `strftime_now(format)` for templates that print today's date (Llama 3.x):
/// supports %d %m %Y %y %b %B %H %M %S.
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let name = MONTHS[(month - 1) as usize];
    format
        .replace("%d", &format!("{day:02}"))
        .replace("%m", &format!("{month:02}"))
        .replace("%Y", &year.to_string())
        .replace("%y", &format!("{:02}", year % 100))
        .replace("%b", &name[..3])
        .replace("%B", name)
        .replace("%H", &format!("{:02}", rem / 3600))
        .replace("%M", &format!("{:02}", rem % 3600 / 60))
        .replace("%S", &format!("{:02}", rem % 60))
}

/// The byte a byte-level BPE character stands for (GPT-2's table: the
/// printable bytes map to themselves, the other 68 to U+0100 onward, in
/// byte order). The tokenizers crate keeps its copy private.
fn byte_of_char(c: char) -> Option<u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let c = c as u32;
    if c < 0x100 {
        return printable(c as u8).then_some(c as u8);
    }
    (0..=255u8)
        .filter(|&b| !printable(b))
        .nth((c - 0x100) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_table_is_a_bijection_onto_bytes() {
        let mut seen = [false; 256];
        for c in (0x21u32..0x1A0).filter_map(char::from_u32) {
            if let Some(b) = byte_of_char(c) {
                assert!(!seen[b as usize], "{c:?} maps to {b} twice");
                seen[b as usize] = true;
            }
        }
        assert!(seen.iter().all(|&s| s), "every byte has a character");
        assert_eq!(byte_of_char('Ġ'), Some(b' '));
        assert_eq!(byte_of_char('Ċ'), Some(b'\n'));
        assert_eq!(byte_of_char('a'), Some(b'a'));
    }

    #[test]
    fn token_bytes_rebuild_the_text_byte_for_byte() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        for model in ["tiny-llama", "tiny-qwen3", "tiny-reasoner"] {
            let t = TextTokenizer::load(&dir.join(model)).unwrap();
            for text in [
                "héllo wörld, naïve café",
                "snow ☃ and crab 🦀!",
                "a\n\tb  c",
            ] {
                let ids = t.encode(text, false).unwrap();
                let bytes: Vec<u8> = ids.iter().flat_map(|&id| t.token_bytes(id)).collect();
                let back = t.decode(&ids, false).unwrap();
                assert_eq!(
                    String::from_utf8_lossy(&bytes),
                    back,
                    "{model}: {text:?} -> {ids:?}"
                );
            }
        }
    }

    #[test]
    fn strftime_formats_a_plausible_date() {
        let s = strftime_now("%d %b %Y".into());
        let parts: Vec<&str> = s.split(' ').collect();
        assert_eq!(parts.len(), 3, "{s}");
        assert!(parts[2].parse::<i32>().unwrap() >= 2024, "{s}");
    }

    #[test]
    fn a_missing_tokenizer_is_a_clear_error() {
        let e = TextTokenizer::load(Path::new("/nonexistent-kvsift-dir"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("tokenizer.json") && e.contains("missing"), "{e}");
    }
}

#[cfg(test)]
mod template_tests {
    use super::*;

    /// A tokenizer dir with the given chat template, reusing a shipped tokenizer.json.
    fn with_template(tag: &str, template: &str) -> TextTokenizer {
        let d = std::env::temp_dir().join(format!("kvsift-tpl-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-qwen2/tokenizer.json");
        std::fs::copy(src, d.join("tokenizer.json")).unwrap();
        let cfg = serde_json::json!({"bos_token": {"content": "<s>"}, "eos_token": "</s>", "chat_template": template});
        std::fs::write(d.join("tokenizer_config.json"), cfg.to_string()).unwrap();
        TextTokenizer::load(&d).unwrap()
    }

    fn msgs(pairs: &[(&str, &str)]) -> Vec<Message> {
        pairs
            .iter()
            .map(|(r, c)| Message {
                role: r.to_string(),
                content: c.to_string(),
            })
            .collect()
    }

    #[test]
    fn templates_use_what_real_checkpoints_use() {
        // The constructs of the Qwen2.5 / DeepSeek-R1-Distill / Llama 3 templates:
        // whitespace control, namespace(), Python string methods, loop
        // variables, undefined `tools`, raise_exception, tojson, strftime_now.
        let t = with_template(
            "rich",
            "{%- set ns = namespace(system='') -%}\n\
             {%- for m in messages -%}\n\
               {%- if m['role'] == 'system' -%}{%- set ns.system = m['content'] | trim -%}{%- endif -%}\n\
             {%- endfor -%}\n\
             {{ bos_token }}{% if tools %}TOOLS{{ tools | tojson }}{% endif %}\n\
             {%- if ns.system %}[SYS]{{ ns.system }}{% endif %}\n\
             {%- for m in messages if m.role != 'system' %}\n\
               {%- if m.role not in ['user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}\n\
               <|{{ m.role }}|>{{ m.content.split('</think>')[-1].strip() }}{% if not loop.last %}\\n{% endif %}\n\
             {%- endfor %}\n\
             {%- if add_generation_prompt %}<|assistant|>{% endif %}",
        );
        let out = t
            .apply_chat_template(
                &msgs(&[
                    ("system", "  Be brief. "),
                    ("user", "hi"),
                    ("assistant", "<think>x</think> 19 "),
                    ("user", "ok"),
                ]),
                true,
            )
            .unwrap();
        assert_eq!(
            out,
            "<s>[SYS]Be brief.<|user|>hi\\n<|assistant|>19\\n<|user|>ok<|assistant|>"
        );
        let e = t
            .apply_chat_template(&msgs(&[("tool", "x")]), true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad role"), "{e}");
        let date = with_template("date", "{{ strftime_now('%Y') }}");
        assert!(
            date.apply_chat_template(&[], false)
                .unwrap()
                .starts_with("20")
        );
    }

    #[test]
    fn a_broken_template_or_none_is_a_clear_error() {
        let t = with_template("broken", "{% for m in messages %}{{ m.content ");
        let e = t
            .apply_chat_template(&msgs(&[("user", "hi")]), true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("chat template"), "{e}");
    }

    #[test]
    fn runaway_templates_are_bounded_errors_naming_their_file() {
        for (tag, template, needle) in [
            (
                "loops",
                "{% for i in range(99999) %}{% for j in range(99999) %}{{ j }}{% endfor %}{% endfor %}",
                "steps",
            ),
            (
                "output",
                "{% for i in range(90000) %}{{ 'x' * 100000 }}{% endfor %}",
                "bytes",
            ),
        ] {
            let t = with_template(tag, template);
            let e = t
                .apply_chat_template(&msgs(&[("user", "hi")]), true)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("tokenizer_config.json") && e.contains(needle),
                "{e}"
            );
        }
    }
}

/// Turns a growing token list into text increments, holding back bytes of
/// an incomplete UTF-8 character.
pub struct TextStream<'t> {
    tokenizer: &'t TextTokenizer,
    tokens: Vec<u32>,
    /// `tokens[..read]` are printed; `tokens[prefix..read]`, the last
    /// printed piece, is decoded again as the context of what follows (a
    /// decoder may treat a piece's start specially). Each push decodes only
    /// from `prefix`: a few tokens, not the whole text.
    prefix: usize,
    read: usize,
}

impl<'t> TextStream<'t> {
    pub fn new(tokenizer: &'t TextTokenizer) -> Self {
        Self {
            tokenizer,
            tokens: vec![],
            prefix: 0,
            read: 0,
        }
    }

    /// What `tokens[prefix..]` adds to `tokens[prefix..read]`: (text, complete).
    fn tail(&self) -> Result<(String, bool)> {
        let before = self
            .tokenizer
            .decode(&self.tokens[self.prefix..self.read], true)?;
        let now = self.tokenizer.decode(&self.tokens[self.prefix..], true)?;
        if now.len() <= before.len() || !now.is_char_boundary(before.len()) {
            return Ok((String::new(), false));
        }
        let complete = !now.ends_with('\u{FFFD}');
        Ok((now[before.len()..].to_string(), complete))
    }

    /// The new text after `token`, if any is complete.
    pub fn push(&mut self, token: u32) -> Result<String> {
        self.tokens.push(token);
        let (new, complete) = self.tail()?;
        if !complete {
            return Ok(String::new());
        }
        self.prefix = self.read;
        self.read = self.tokens.len();
        Ok(new)
    }

    /// The text held back at the end (an incomplete character decodes as
    /// U+FFFD, as in the whole decode): after it, the printed text equals
    /// `decode(tokens)`.
    pub fn finish(&mut self) -> Result<String> {
        let (rest, _) = self.tail()?;
        self.prefix = self.read;
        self.read = self.tokens.len();
        Ok(rest)
    }
}
