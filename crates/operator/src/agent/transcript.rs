//! The transcript kept with a finished task: the agent's redacted output, cut to a size a
//! ConfigMap holds comfortably, keeping what matters most when it is long: the start
//! (the init line, the first turns), the end, and the result line wherever it falls.

/// The most bytes of transcript kept.
pub const TRANSCRIPT_LIMIT: usize = 256 * 1024;

/// Cuts `text` to at most `limit` bytes (on line boundaries), keeping its head, its tail
/// and the stream-json result line, with a line saying how much was left out.
pub fn cap(text: &str, limit: usize) -> String {
    if text.len() <= limit {
        return text.to_string();
    }
    let result_line = text
        .lines()
        .rev()
        .find(|line| line.contains(r#""type":"result""#))
        .unwrap_or_default();
    let budget = limit.saturating_sub(result_line.len() + 128);
    let head = take_lines(text.lines(), budget / 2);
    let tail = {
        let mut tail = take_lines(text.lines().rev(), budget / 2);
        tail.reverse();
        tail
    };
    let kept: usize = head
        .iter()
        .chain(tail.iter())
        .map(|line| line.len() + 1)
        .sum();
    let mut capped = String::with_capacity(limit);
    for line in &head {
        capped.push_str(line);
        capped.push('\n');
    }
    capped.push_str(&format!(
        "[… {} bytes left out …]\n",
        text.len().saturating_sub(kept)
    ));
    if !result_line.is_empty() && !tail.contains(&result_line) {
        capped.push_str(result_line);
        capped.push('\n');
    }
    for line in &tail {
        capped.push_str(line);
        capped.push('\n');
    }
    capped
}

fn take_lines<'a>(lines: impl Iterator<Item = &'a str>, budget: usize) -> Vec<&'a str> {
    let mut used = 0;
    let mut taken = Vec::new();
    for line in lines {
        if used + line.len() + 1 > budget {
            break;
        }
        used += line.len() + 1;
        taken.push(line);
    }
    taken
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_transcripts_are_kept_whole() {
        assert_eq!(cap("a\nb\n", 100), "a\nb\n");
    }

    #[test]
    fn long_transcripts_keep_head_tail_and_the_result_line() {
        let mut text = String::from("{\"type\":\"system\",\"subtype\":\"init\"}\n");
        for n in 0..10_000 {
            text.push_str(&format!("{{\"type\":\"assistant\",\"n\":{n}}}\n"));
        }
        text.push_str("{\"type\":\"result\",\"subtype\":\"success\"}\n");
        for n in 0..2_000 {
            text.push_str(&format!("trailing noise line {n} {}\n", "x".repeat(100)));
        }
        let capped = cap(&text, 64 * 1024);
        assert!(capped.len() <= 64 * 1024, "{}", capped.len());
        assert!(capped.starts_with("{\"type\":\"system\""));
        assert!(capped.contains("{\"type\":\"result\",\"subtype\":\"success\"}"));
        assert!(capped.trim_end().ends_with(&"x".repeat(100)));
        assert!(capped.contains("trailing noise line 1999 "));
        assert!(capped.contains("bytes left out"));
    }
}
