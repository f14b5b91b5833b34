//! Reading the final answer out of generated text (`kvsift eval --extract`),
//! and comparing it with the reference the way evaluations do.

/// `--extract`: how an answer is read from generated text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Extract {
    /// The whole text, trimmed, against the trimmed answer.
    Exact,
    /// The first line, trimmed (needle: "the key is " -> "80636").
    FirstLine,
    /// The last number in the text (commas and a trailing ".0" dropped).
    LastNumber,
    /// The last `\boxed{...}` (nested braces), normalised as math
    /// evaluations do: spaces, `\left`/`\right`, `\!`, `$` and a trailing
    /// `.0` or `.` dropped; `\dfrac`/`\tfrac` read as `\frac`.
    Boxed,
    /// The tally task's end line `<item> end s=<sum>` -> letter + sum ("p7").
    Tally,
    /// What follows the last `=` of the last line holding one (`x=73` -> "73").
    LastValue,
    /// Boxed if the text has a `\boxed`, tally if it has an end line, else
    /// the first line or, failing that, the whole text.
    Auto,
}

impl Extract {
    /// The mode auto picks for `text` (any other mode is itself).
    fn resolve(self, text: &str) -> Extract {
        match self {
            Extract::Auto if text.contains("\\boxed") => Extract::Boxed,
            Extract::Auto if tally_answer(text).is_some() => Extract::Tally,
            Extract::Auto => Extract::FirstLine,
            other => other,
        }
    }

    /// The answer `text` gives, or None when there is none to read.
    pub fn answer(self, text: &str) -> Option<String> {
        match self {
            Extract::Exact => Some(text.trim().to_string()),
            Extract::FirstLine => text.trim().lines().next().map(|l| l.trim().to_string()),
            Extract::LastNumber => last_number(text),
            Extract::Boxed => last_boxed(text).map(|b| normalize_math(&b)),
            Extract::Tally => tally_answer(text),
            Extract::LastValue => text
                .trim()
                .lines()
                .rev()
                .find_map(|l| l.split_once('=').map(|(_, v)| v.trim().to_string())),
            Extract::Auto => self.resolve(text).answer(text),
        }
    }

    /// Whether `text` answers `reference` under this extraction (the
    /// reference normalised the same way: a boxed reference's braces and
    /// spacing do not count; under auto, the first line or the whole text).
    pub fn is_correct(self, text: &str, reference: &str) -> bool {
        let reference = reference.trim();
        match self {
            Extract::LastNumber => {
                last_number(text).is_some_and(|a| Some(a) == last_number(reference))
            }
            Extract::Boxed => {
                let want = last_boxed(reference).unwrap_or_else(|| reference.to_string());
                Extract::Boxed
                    .answer(text)
                    .is_some_and(|a| a == normalize_math(&want))
            }
            Extract::Auto => match self.resolve(text) {
                Extract::FirstLine => {
                    Extract::FirstLine.answer(text).as_deref() == Some(reference)
                        || text.trim() == reference
                }
                mode => mode.is_correct(text, reference),
            },
            _ => self.answer(text).as_deref() == Some(reference),
        }
    }
}

/// The last `<item> end s=<sum>` line's letter and sum.
pub fn tally_answer(text: &str) -> Option<String> {
    text.lines().rev().find_map(|line| {
        let mut parts = line.split_whitespace();
        let (item, end, sum) = (parts.next()?, parts.next()?, parts.next()?);
        let sum = sum.strip_prefix("s=")?;
        let letter = item.chars().next()?;
        (end == "end" && parts.next().is_none() && !sum.is_empty())
            .then(|| format!("{letter}{sum}"))
    })
}

/// The last number: an optional sign, digits with optional thousands
/// commas, an optional fraction; "1,000.0" -> "1000".
pub fn last_number(text: &str) -> Option<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut found = None;
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_ascii_digit() {
            let start = if i > 0 && chars[i - 1] == '-' {
                i - 1
            } else {
                i
            };
            let mut j = i;
            while j < chars.len()
                && (chars[j].is_ascii_digit()
                    || (chars[j] == ',' && j + 1 < chars.len() && chars[j + 1].is_ascii_digit())
                    || (chars[j] == '.' && j + 1 < chars.len() && chars[j + 1].is_ascii_digit()))
            {
                j += 1;
            }
            let number: String = chars[start..j].iter().filter(|c| **c != ',').collect();
            found = Some(trim_zero_fraction(&number));
            i = j;
        } else {
            i += 1;
        }
    }
    found
}

fn trim_zero_fraction(n: &str) -> String {
    match n.split_once('.') {
        Some((int, frac)) if frac.chars().all(|c| c == '0') => int.to_string(),
        _ => n.to_string(),
    }
}

/// The content of the last `\boxed{...}` (braces nested), or of `\fbox{...}`.
pub fn last_boxed(text: &str) -> Option<String> {
    let at = text.rfind("\\boxed").or_else(|| text.rfind("\\fbox"))?;
    let rest = &text[at..];
    let open = rest.find('{')?;
    // `\boxed 5` (no braces): up to the next space or `$`.
    if !rest[..open]
        .trim_start_matches("\\boxed")
        .trim_start_matches("\\fbox")
        .trim()
        .is_empty()
    {
        return None;
    }
    let mut depth = 0usize;
    for (i, c) in rest[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(rest[open + 1..open + i].to_string());
                }
            }
            _ => {}
        }
    }
    None
}

/// A math answer compared as evaluations compare them: no spaces, no
/// `\left`/`\right`/`\!`/`$`, `\dfrac`/`\tfrac` as `\frac`, no trailing
/// `.` or `.0`, no surrounding braces.
pub fn normalize_math(answer: &str) -> String {
    let mut s: String = answer.chars().filter(|c| !c.is_whitespace()).collect();
    for (from, to) in [
        ("\\left", ""),
        ("\\right", ""),
        ("\\!", ""),
        ("$", ""),
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
    ] {
        s = s.replace(from, to);
    }
    while s.starts_with('{')
        && s.ends_with('}')
        && last_boxed(&format!("\\boxed{s}")).as_deref() == Some(&s[1..s.len() - 1])
    {
        s = s[1..s.len() - 1].to_string();
    }
    let s = s.trim_end_matches('.').to_string();
    trim_zero_fraction(&s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxed_answers_take_the_last_box_with_nested_braces_normalised() {
        let t = "so x = \\boxed{3}. Wait, recheck: \\boxed{\\frac{1}{2}}";
        assert_eq!(last_boxed(t).as_deref(), Some("\\frac{1}{2}"));
        assert!(Extract::Boxed.is_correct(t, "\\frac{1}{2}"));
        assert!(Extract::Boxed.is_correct(t, "\\dfrac{1}{ 2}"));
        assert!(Extract::Boxed.is_correct("\\boxed{\\left( 1, 2 \\right)}", "(1,2)"));
        assert!(Extract::Boxed.is_correct("The answer is $\\boxed{12.0}$.", "12"));
        assert!(Extract::Boxed.is_correct("\\boxed{{5}}", "\\boxed{5}"));
        assert!(!Extract::Boxed.is_correct("\\boxed{13}", "12"));
        assert!(!Extract::Boxed.is_correct("no box, 12", "12"));
        assert_eq!(last_boxed("\\boxed{unclosed"), None);
    }

    #[test]
    fn last_numbers_drop_commas_and_zero_fractions() {
        assert_eq!(
            last_number("it costs 1,234.50 then -7.0 left").as_deref(),
            Some("-7")
        );
        assert_eq!(last_number("x=12, y=3.25.").as_deref(), Some("3.25"));
        assert_eq!(last_number("none"), None);
        assert!(Extract::LastNumber.is_correct("so 1,000 apples", "1000"));
        assert!(!Extract::LastNumber.is_correct("so 100 apples", "1000"));
    }

    #[test]
    fn tally_answers_are_the_end_lines_letter_and_sum() {
        let sol = "k2>m9 s=1\ncheck k2>m9 s=1\nm9>q7 s=8\nq7 end s=8\n";
        assert_eq!(tally_answer(sol).as_deref(), Some("q8"));
        assert!(Extract::Tally.is_correct(sol, "q8"));
        assert!(Extract::Auto.is_correct(sol, "q8"));
        assert!(!Extract::Auto.is_correct(sol, "q7"));
        // A trace that never ends has no answer.
        assert_eq!(tally_answer("k2>m9 s=1\ncheck k2>m9 s=1\n"), None);
        assert!(!Extract::Tally.is_correct("k2>m9 s=1\n", "k1"));
    }

    #[test]
    fn chain_answers_are_the_last_value() {
        let solution = "wk>cm\ncm>kb\ncheck wk>cm\ntn=72\n";
        assert!(Extract::LastValue.is_correct(solution, "72"));
        assert!(Extract::LastValue.is_correct("ab=1\ncd=35", "35"));
        assert_eq!(Extract::LastValue.answer("wk>cm\ncm>kb\n"), None);
    }

    #[test]
    fn exact_first_line_and_auto() {
        assert!(Extract::Exact.is_correct("  42 \n", "42"));
        assert!(!Extract::Exact.is_correct("42\nmore", "42"));
        assert!(Extract::FirstLine.is_correct(" 80636\nq: more", "80636"));
        assert!(Extract::Auto.is_correct(" 80636\nq: more", "80636"));
        assert!(Extract::Auto.is_correct("so \\boxed{7}", "7"));
        assert!(!Extract::Auto.is_correct("", "7"));
    }
}
