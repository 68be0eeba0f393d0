//! What a `run_code` call is and what it answers, and the reading of an interpreter's
//! output back into answers. Pure: the interpreter's I/O lives in `interpreter`.

use serde::{Deserialize, Serialize};

/// The most code one call takes. Larger is almost surely a mistake, and it travels in
/// one line of the interpreter's stdin.
pub const MAX_CODE_BYTES: usize = 256 * 1024;
/// The most stdout (and, apart, stderr) one answer carries; the rest is counted.
pub const MAX_OUTPUT_BYTES: usize = 256 * 1024;
/// The longest a call may ask to run.
pub const MAX_TIMEOUT_SECONDS: u64 = 3600;
/// How far back the end of the stream is searched once output is over its cap: enough for
/// an answer line (the interpreters cut a rich result and a traceback well below it).
const ANSWER_WINDOW: usize = 1024 * 1024;

/// A language `run_code` runs, and the interpreter that keeps a context of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    Python,
    Javascript,
    Bash,
}

impl Language {
    pub const ALL: [Language; 3] = [Language::Python, Language::Javascript, Language::Bash];

    /// The names a caller may use, as the seed's clients and E2B's code interpreter do.
    pub fn parse(name: &str) -> Result<Language, String> {
        match name.trim().to_ascii_lowercase().as_str() {
            "python" | "python3" | "py" => Ok(Language::Python),
            "javascript" | "js" | "node" | "nodejs" => Ok(Language::Javascript),
            "bash" | "shell" | "sh" => Ok(Language::Bash),
            other => Err(format!(
                "unknown language {other:?}: use python, javascript or bash"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::Javascript => "javascript",
            Language::Bash => "bash",
        }
    }
}

/// Checks a call before anything is started for it.
pub fn check_call(code: &str, timeout_seconds: Option<u64>) -> Result<(), String> {
    if code.len() > MAX_CODE_BYTES {
        return Err(format!(
            "the code is {} bytes; run_code takes at most {} KiB ({MAX_CODE_BYTES} bytes): \
             write large inputs to a file from smaller calls",
            code.len(),
            MAX_CODE_BYTES / 1024
        ));
    }
    match timeout_seconds {
        Some(0) => Err("timeoutSeconds must be at least 1".into()),
        Some(seconds) if seconds > MAX_TIMEOUT_SECONDS => Err(format!(
            "timeoutSeconds is {seconds}; at most {MAX_TIMEOUT_SECONDS}"
        )),
        _ => Ok(()),
    }
}

/// An exception or a failed shell: kept apart from stderr, as the seed's clients expect.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CodeError {
    pub name: String,
    pub value: String,
    pub traceback: String,
}

/// The value of the code's last expression, when it has one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RichResult {
    /// Its `repr` (Python) or `util.inspect` (JavaScript): the `text/plain` form.
    pub text: String,
}

/// What one `run_code` call answers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Execution {
    pub stdout: String,
    pub stderr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<CodeError>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<RichResult>,
    /// Output beyond the cap, in bytes, that the answer leaves out.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub stdout_cut_bytes: usize,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub stderr_cut_bytes: usize,
}

fn is_zero(value: &usize) -> bool {
    *value == 0
}

/// The interpreter's own part of an answer, after the mark on stdout.
#[derive(Debug, Deserialize)]
struct Answer {
    result: Option<RichResult>,
    error: Option<CodeError>,
}

/// One stream of a call's output: what the caller gets (up to the cap), and a window on
/// the end where the mark is looked for.
#[derive(Debug, Default)]
struct Stream {
    kept: Vec<u8>,
    cut: usize,
    tail: Vec<u8>,
}

impl Stream {
    fn push(&mut self, data: &[u8]) {
        let room = MAX_OUTPUT_BYTES.saturating_sub(self.kept.len());
        let (keep, rest) = data.split_at(room.min(data.len()));
        self.kept.extend_from_slice(keep);
        self.tail.extend_from_slice(rest);
        if self.tail.len() > ANSWER_WINDOW {
            let drop = self.tail.len() - ANSWER_WINDOW;
            self.cut += drop;
            self.tail.drain(..drop);
        }
    }

    /// Everything the stream holds from the mark on, removed from it; `None` until the
    /// mark has arrived.
    fn take_from(&mut self, mark: &[u8]) -> Option<Vec<u8>> {
        if let Some(at) = find(&self.tail, mark) {
            let found = self.tail.split_off(at);
            self.cut += self.tail.len();
            self.tail.clear();
            return Some(found);
        }
        // The mark may straddle the cap: look at both sides of it together.
        let mut joined = self.kept.clone();
        joined.extend_from_slice(&self.tail);
        let at = find(&joined, mark)?;
        let found = joined.split_off(at);
        self.kept = joined;
        self.tail.clear();
        Some(found)
    }

    fn into_text(self) -> (String, usize) {
        (
            String::from_utf8_lossy(&self.kept).into_owned(),
            self.cut + self.tail.len(),
        )
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// Reads one call's answer out of an interpreter's stdout and stderr as they arrive. The
/// interpreter ends each answer with a mark (a secret token between two U+001E) on stderr,
/// then the mark and the answer's JSON on stdout; the code never learns the token.
#[derive(Debug)]
pub struct Collector {
    mark: Vec<u8>,
    stdout: Stream,
    stderr: Stream,
    /// The mark and what followed it, while the answer's line is not whole.
    pending: Option<Vec<u8>>,
    answer: Option<Result<Answer, String>>,
    stderr_done: bool,
}

impl Collector {
    pub fn new(token: &str) -> Collector {
        Collector {
            mark: format!("\u{1e}{token}\u{1e}").into_bytes(),
            stdout: Stream::default(),
            stderr: Stream::default(),
            pending: None,
            answer: None,
            stderr_done: false,
        }
    }

    pub fn push_stdout(&mut self, data: &[u8]) {
        if self.answer.is_some() {
            return;
        }
        match &mut self.pending {
            // The mark has come; what follows is the answer's line, until its newline.
            Some(pending) => pending.extend_from_slice(data),
            None => {
                self.stdout.push(data);
                match self.stdout.take_from(&self.mark) {
                    Some(found) => self.pending = Some(found),
                    None => return,
                }
            }
        }
        let pending = self.pending.as_deref().unwrap_or_default();
        let line = &pending[self.mark.len()..];
        if let Some(end) = line.iter().position(|&byte| byte == b'\n') {
            self.answer = Some(
                serde_json::from_slice::<Answer>(&line[..end])
                    .map_err(|error| format!("the interpreter's answer is not JSON: {error}")),
            );
        }
    }

    pub fn push_stderr(&mut self, data: &[u8]) {
        if self.stderr_done {
            return;
        }
        self.stderr.push(data);
        if self.stderr.take_from(&self.mark).is_some() {
            self.stderr_done = true;
        }
    }

    /// Whether both streams have reached this call's end.
    pub fn is_complete(&self) -> bool {
        self.answer.is_some() && self.stderr_done
    }

    /// The call's answer once complete; what arrived so far otherwise (its `error` then
    /// says why the answer is missing, given by the caller).
    pub fn finish(self, missing: Option<CodeError>) -> Result<Execution, String> {
        let (stdout, stdout_cut_bytes) = self.stdout.into_text();
        let (stderr, stderr_cut_bytes) = self.stderr.into_text();
        let (result, error) = match self.answer {
            Some(Ok(answer)) => (answer.result, answer.error),
            Some(Err(error)) => return Err(error),
            None => (None, missing),
        };
        Ok(Execution {
            stdout,
            stderr,
            error,
            result,
            stdout_cut_bytes,
            stderr_cut_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "t0k3n";

    fn mark() -> String {
        format!("\u{1e}{TOKEN}\u{1e}")
    }

    #[test]
    fn languages_by_the_names_callers_use() {
        let cases = [
            ("python", Ok(Language::Python)),
            ("Py", Ok(Language::Python)),
            ("python3", Ok(Language::Python)),
            ("js", Ok(Language::Javascript)),
            ("node", Ok(Language::Javascript)),
            ("javascript", Ok(Language::Javascript)),
            ("sh", Ok(Language::Bash)),
            (" bash ", Ok(Language::Bash)),
            ("shell", Ok(Language::Bash)),
        ];
        for (name, expected) in cases {
            assert_eq!(Language::parse(name), expected, "{name}");
        }
        let refused = Language::parse("cobol").unwrap_err();
        assert!(refused.contains("\"cobol\"") && refused.contains("python, javascript or bash"));
        for language in Language::ALL {
            assert_eq!(Language::parse(language.as_str()), Ok(language));
        }
    }

    #[test]
    fn calls_over_the_limits_are_refused_before_they_run() {
        assert!(check_call("print(1)", None).is_ok());
        assert!(check_call("print(1)", Some(MAX_TIMEOUT_SECONDS)).is_ok());
        assert!(check_call(&"x".repeat(MAX_CODE_BYTES), Some(1)).is_ok());
        let big = check_call(&"x".repeat(MAX_CODE_BYTES + 1), None).unwrap_err();
        assert!(
            big.contains(&format!("{} bytes", MAX_CODE_BYTES + 1)),
            "{big}"
        );
        assert!(check_call("1", Some(0)).unwrap_err().contains("at least 1"));
        assert!(check_call("1", Some(MAX_TIMEOUT_SECONDS + 1)).is_err());
    }

    #[test]
    fn an_answer_arrives_in_pieces_and_output_stays_apart() {
        let answer = r#"{"result":{"text":"42"},"error":null}"#;
        let stdout = format!("hello\n{}{answer}\n", mark());
        let stderr = format!("warning\n{}", mark());
        // Every split point of both streams gives the same answer.
        for split in 0..stdout.len() {
            let mut collector = Collector::new(TOKEN);
            collector.push_stdout(&stdout.as_bytes()[..split]);
            assert!(!collector.is_complete());
            collector.push_stderr(&stderr.as_bytes()[..split.min(stderr.len())]);
            collector.push_stdout(&stdout.as_bytes()[split..]);
            collector.push_stderr(&stderr.as_bytes()[split.min(stderr.len())..]);
            assert!(collector.is_complete(), "split at {split}");
            let execution = collector.finish(None).unwrap();
            assert_eq!(execution.stdout, "hello\n");
            assert_eq!(execution.stderr, "warning\n");
            assert_eq!(execution.result.unwrap().text, "42");
            assert!(execution.error.is_none());
        }
    }

    #[test]
    fn code_that_prints_a_fake_answer_does_not_end_the_call() {
        let mut collector = Collector::new(TOKEN);
        collector.push_stdout("\u{1e}guess\u{1e}{\"result\":null,\"error\":null}\n".as_bytes());
        collector.push_stderr(mark().as_bytes());
        assert!(!collector.is_complete());
    }

    #[test]
    fn an_error_comes_with_its_traceback() {
        let mut collector = Collector::new(TOKEN);
        collector.push_stderr(mark().as_bytes());
        collector.push_stdout(
            format!(
                "{}{}\n",
                mark(),
                r#"{"result":null,"error":{"name":"ZeroDivisionError","value":"division by zero","traceback":"Traceback ...\n"}}"#
            )
            .as_bytes(),
        );
        let error = collector.finish(None).unwrap().error.unwrap();
        assert_eq!(error.name, "ZeroDivisionError");
        assert_eq!(error.value, "division by zero");
        assert!(error.traceback.starts_with("Traceback"));
    }

    #[test]
    fn output_over_the_cap_is_cut_and_counted_and_the_answer_still_found() {
        let mut collector = Collector::new(TOKEN);
        let chunk = vec![b'a'; 64 * 1024];
        let chunks = 40; // 2.5 MiB: over the cap and over the window behind it
        for _ in 0..chunks {
            collector.push_stdout(&chunk);
        }
        collector.push_stdout(format!("{}{{\"result\":null,\"error\":null}}\n", mark()).as_bytes());
        collector.push_stderr(mark().as_bytes());
        assert!(collector.is_complete());
        let execution = collector.finish(None).unwrap();
        assert_eq!(execution.stdout.len(), MAX_OUTPUT_BYTES);
        assert_eq!(
            execution.stdout_cut_bytes,
            chunks * chunk.len() - MAX_OUTPUT_BYTES
        );
    }

    #[test]
    fn a_mark_across_the_cap_is_found() {
        let mut collector = Collector::new(TOKEN);
        collector.push_stdout(&vec![b'a'; MAX_OUTPUT_BYTES - 3]);
        collector.push_stdout(format!("{}{{\"result\":null,\"error\":null}}\n", mark()).as_bytes());
        collector.push_stderr(mark().as_bytes());
        let execution = collector.finish(None).unwrap();
        assert_eq!(execution.stdout.len(), MAX_OUTPUT_BYTES - 3);
        assert_eq!(execution.stdout_cut_bytes, 0);
    }

    #[test]
    fn a_missing_answer_reports_what_arrived_and_why() {
        let mut collector = Collector::new(TOKEN);
        collector.push_stdout(b"partial");
        let why = CodeError {
            name: "InterpreterLost".into(),
            value: "killed".into(),
            traceback: String::new(),
        };
        let execution = collector.finish(Some(why.clone())).unwrap();
        assert_eq!(execution.stdout, "partial");
        assert_eq!(execution.error, Some(why));
    }

    #[test]
    fn a_garbled_answer_is_an_error_not_a_result() {
        let mut collector = Collector::new(TOKEN);
        collector.push_stdout(format!("{}not json\n", mark()).as_bytes());
        collector.push_stderr(mark().as_bytes());
        assert!(collector.finish(None).unwrap_err().contains("not JSON"));
    }
}
