//! A pure parser of Claude Code's `--output-format stream-json --verbose` output.
//!
//! The CLI prints one JSON object per line: a `system/init` line, `assistant` lines
//! (one per content block, so a message spans several lines sharing `message.id`),
//! `user` lines with tool results, optional `system/api_retry` lines, and finally a
//! `result` line. The result line is the only trustworthy verdict: the exit code is 1
//! for every kind of failure, API errors come back as `subtype: "success"` with
//! `is_error: true`, and a killed CLI prints no result at all.
//!
//! Parsing is by JSON, never by position or key order (the CLI does not keep `type`
//! first), and lenient: unknown line types and unknown fields are ignored because new
//! ones appear with every CLI release, and a malformed line is counted rather than
//! fatal, so one bad line cannot hide the verdict that follows it.

use serde::Deserialize;
use serde_json::value::RawValue;

/// What the run has done so far, for progress reporting while it runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Model turns so far: distinct top-level assistant messages from the model.
    pub turns: u32,
    /// The tool the model most recently asked for.
    pub last_tool: Option<String>,
    /// From the init line.
    pub session_id: Option<String>,
}

/// Token counts from the result line, summed over the session by the CLI.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub cache_read_input_tokens: u64,
}

/// An error the CLI got from the Messages API, as reported on the result line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status; `None` when no response arrived (connection refused, timeout,
    /// no credentials).
    pub status: Option<u16>,
    /// The API's error type, e.g. `authentication_error`, when it sent one.
    pub kind: Option<String>,
    /// What the CLI made of it, e.g. "Failed to authenticate. API Error: 401 …".
    pub message: String,
}

/// Everything the result line says about how the run ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// `success`, `error_max_turns`, or whatever a later CLI adds.
    pub subtype: String,
    pub is_error: bool,
    /// The final text, whole: secret values are redacted from it before it is cut to a
    /// status field's size, or a cut through a value would leave a piece of it behind.
    /// Absent for max turns.
    pub result: Option<String>,
    /// `completed`, `api_error`, `max_turns`, `malformed_tool_use_exhausted`, …
    pub terminal_reason: Option<String>,
    pub num_turns: Option<u32>,
    pub duration_ms: Option<u64>,
    /// A decimal to a billionth of a dollar: the CLI prints the error of its float sums
    /// (`0.0024000000000000002`), which a user should read as `0.0024`.
    pub total_cost_usd: Option<String>,
    pub usage: Usage,
    pub session_id: Option<String>,
    pub permission_denials: usize,
    /// Present when the run ended on an API error.
    pub api_error: Option<ApiError>,
    /// The `errors` array, e.g. "Reached maximum number of turns (2)".
    pub errors: Vec<String>,
    /// The object the model answered with under `--json-schema`, as the CLI printed it.
    pub structured_output: Option<String>,
}

/// Why a finished run failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailureReason {
    /// The run hit `--max-turns`.
    MaxTurns,
    /// The model gave no answer matching `--json-schema` within the CLI's retries.
    StructuredOutput,
    /// The Messages API refused or failed; `status` is the HTTP status when there was one.
    ApiError { status: Option<u16> },
    /// The CLI found no credentials for the model and asked for none: it sent no
    /// request ("Not logged in").
    NotLoggedIn,
    /// Any other error result.
    AgentError,
}

/// How a run ended, as far as the operator is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Succeeded,
    Failed {
        reason: FailureReason,
        message: String,
    },
    /// No result line: the CLI was killed or crashed. The run says nothing about the
    /// task, so the caller treats it as an infrastructure failure and may retry.
    Incomplete,
}

/// Classifies a run by its result line (`None` when there was none).
pub fn classify(outcome: Option<&Outcome>) -> Verdict {
    let Some(outcome) = outcome else {
        return Verdict::Incomplete;
    };
    if outcome.subtype == "success" && !outcome.is_error {
        return Verdict::Succeeded;
    }
    let message = outcome
        .result
        .clone()
        .or_else(|| (!outcome.errors.is_empty()).then(|| outcome.errors.join("; ")))
        .unwrap_or_else(|| format!("agent ended with {}", outcome.subtype));
    let reason = if outcome.subtype == "error_max_turns" {
        FailureReason::MaxTurns
    } else if outcome.subtype == "error_max_structured_output_retries" {
        FailureReason::StructuredOutput
    } else if let Some(api) = &outcome.api_error {
        FailureReason::ApiError { status: api.status }
    } else {
        FailureReason::AgentError
    };
    Verdict::Failed { reason, message }
}

/// Incremental parser: feed it stdout as it arrives, in chunks of any size.
#[derive(Debug, Default)]
pub struct StreamParser {
    pending: Vec<u8>,
    /// The CLI reported a failed authentication of its own (a synthetic message).
    authentication_failed: bool,
    progress: Progress,
    last_message_id: Option<String>,
    outcome: Option<Outcome>,
    malformed: usize,
}

impl StreamParser {
    pub fn new() -> StreamParser {
        StreamParser::default()
    }

    /// Parses every complete line in `bytes`, keeping a trailing partial line until the
    /// rest of it arrives.
    pub fn feed(&mut self, bytes: &[u8]) {
        // Only the new bytes can hold a newline: rescanning the pending part would make
        // a long line arriving in small chunks quadratic.
        let old_len = self.pending.len();
        self.pending.extend_from_slice(bytes);
        let Some(found) = self.pending[old_len..].iter().rposition(|&b| b == b'\n') else {
            return;
        };
        let last_newline = old_len + found;
        let complete: Vec<u8> = self.pending.drain(..=last_newline).collect();
        for line in complete.split(|&b| b == b'\n') {
            self.parse_bytes(line);
        }
    }

    /// Parses what is left once the stream has ended: a final line without a newline.
    /// A CLI killed mid-write leaves half a line here, which counts as malformed.
    pub fn finish(&mut self) {
        let rest = std::mem::take(&mut self.pending);
        self.parse_bytes(&rest);
    }

    fn parse_bytes(&mut self, line: &[u8]) {
        match std::str::from_utf8(line) {
            Ok(line) => self.parse_line(line),
            Err(_) => self.malformed += 1,
        }
    }

    /// Parses one line (without its newline). Blank lines are skipped.
    pub fn parse_line(&mut self, line: &str) {
        let line = line.trim();
        if line.is_empty() {
            return;
        }
        if self.apply(line).is_err() {
            self.malformed += 1;
        }
    }

    fn apply(&mut self, line: &str) -> serde_json::Result<()> {
        let head: Head = serde_json::from_str(line)?;
        match (head.kind.as_deref(), head.subtype.as_deref()) {
            (Some("system"), Some("init")) => {
                self.progress.session_id = head.session_id.or(self.progress.session_id.take());
            }
            (Some("assistant"), _) => {
                let line: AssistantLine = serde_json::from_str(line)?;
                self.assistant(line);
            }
            (Some("result"), _) => {
                let line: ResultLine = serde_json::from_str(line)?;
                self.outcome = Some(line.into_outcome());
            }
            // user, api_retry, status, stream_event and whatever later releases add.
            _ => {}
        }
        Ok(())
    }

    fn assistant(&mut self, line: AssistantLine) {
        if line.is_api_error_message && line.error.as_deref() == Some("authentication_failed") {
            self.authentication_failed = true;
        }
        let message = line.message;
        for block in &message.content {
            if block.kind == "tool_use" {
                self.progress.last_tool = block.name.clone();
            }
        }
        // Synthetic messages are the CLI reporting an API error, not a model turn, and
        // subagent messages (with a parent tool use) are turns of a different agent.
        let synthetic =
            line.is_api_error_message || message.model.as_deref() == Some("<synthetic>");
        if synthetic || line.parent_tool_use_id.is_some() {
            return;
        }
        // One line per content block: a message is new when its id changes.
        if message.id.is_none() || message.id != self.last_message_id {
            self.progress.turns += 1;
            self.last_message_id = message.id;
        }
    }

    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    /// The last result line seen, if any.
    pub fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref()
    }

    /// Lines that were not JSON objects of a known shape.
    pub fn malformed_lines(&self) -> usize {
        self.malformed
    }

    pub fn verdict(&self) -> Verdict {
        match classify(self.outcome.as_ref()) {
            // Refused before any request was sent: no credentials at all, as opposed to
            // credentials the API refused (a 401).
            Verdict::Failed {
                reason: FailureReason::ApiError { status: None },
                message,
            } if self.authentication_failed => Verdict::Failed {
                reason: FailureReason::NotLoggedIn,
                message,
            },
            verdict => verdict,
        }
    }
}

/// Just enough of any line to dispatch on.
#[derive(Deserialize)]
struct Head {
    #[serde(rename = "type")]
    kind: Option<String>,
    subtype: Option<String>,
    session_id: Option<String>,
}

#[derive(Deserialize)]
struct AssistantLine {
    message: AssistantMessage,
    #[serde(default)]
    parent_tool_use_id: Option<String>,
    #[serde(default)]
    is_api_error_message: bool,
    /// The CLI's own kind of a synthetic error message, e.g. `authentication_failed`.
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct AssistantMessage {
    id: Option<String>,
    model: Option<String>,
    #[serde(default)]
    content: Vec<ContentBlock>,
}

#[derive(Deserialize)]
struct ContentBlock {
    #[serde(rename = "type")]
    kind: String,
    name: Option<String>,
}

#[derive(Deserialize)]
struct ResultLine {
    subtype: String,
    #[serde(default)]
    is_error: bool,
    result: Option<String>,
    terminal_reason: Option<String>,
    num_turns: Option<u32>,
    duration_ms: Option<u64>,
    total_cost_usd: Option<Box<RawValue>>,
    #[serde(default)]
    usage: Option<Usage>,
    session_id: Option<String>,
    #[serde(default)]
    permission_denials: Vec<serde::de::IgnoredAny>,
    api_error_status: Option<u16>,
    api_error_type: Option<String>,
    #[serde(default)]
    errors: Vec<String>,
    structured_output: Option<Box<RawValue>>,
}

impl ResultLine {
    fn into_outcome(self) -> Outcome {
        let result = self.result;
        let api_failed = self.terminal_reason.as_deref() == Some("api_error")
            || self.api_error_status.is_some()
            || self.api_error_type.is_some();
        let api_error = (self.is_error && api_failed).then(|| ApiError {
            status: self.api_error_status,
            kind: self.api_error_type,
            message: result.clone().unwrap_or_default(),
        });
        Outcome {
            subtype: self.subtype,
            is_error: self.is_error,
            result,
            terminal_reason: self.terminal_reason,
            num_turns: self.num_turns,
            duration_ms: self.duration_ms,
            // `null` stays absent rather than becoming the string "null".
            total_cost_usd: self
                .total_cost_usd
                .and_then(|raw| raw.get().parse::<f64>().ok())
                .map(dollars),
            usage: self.usage.unwrap_or_default(),
            session_id: self.session_id,
            permission_denials: self.permission_denials.len(),
            api_error,
            errors: self.errors,
            // `null` stays absent.
            structured_output: self
                .structured_output
                .map(|raw| raw.get().to_string())
                .filter(|raw| raw != "null"),
        }
    }
}

/// A cost as a decimal string, to a billionth of a dollar: what the CLI's float meant,
/// without the digits its float arithmetic added.
fn dollars(cost: f64) -> String {
    let fixed = format!("{cost:.9}");
    let trimmed = fixed.trim_end_matches('0').trim_end_matches('.');
    if trimmed.is_empty() || trimmed == "-" || trimmed == "-0" {
        "0".to_string()
    } else {
        trimmed.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> StreamParser {
        let mut parser = StreamParser::new();
        parser.feed(text.as_bytes());
        parser.finish();
        parser
    }

    fn result_line(result: &str) -> String {
        serde_json::json!({
            "subtype": "success", "is_error": false, "result": result, "num_turns": 1,
            "total_cost_usd": 0.5, "type": "result",
        })
        .to_string()
    }

    // Transcripts captured from the pinned CLI by tests/claude_cli.rs.
    const SUCCESS: &str = include_str!("../../tests/fixtures/claude/success.jsonl");
    const UNAUTHORIZED: &str = include_str!("../../tests/fixtures/claude/unauthorized.jsonl");
    const SERVER_ERROR: &str = include_str!("../../tests/fixtures/claude/server_error.jsonl");
    const MAX_TURNS: &str = include_str!("../../tests/fixtures/claude/max_turns.jsonl");
    const KILLED: &str = include_str!("../../tests/fixtures/claude/killed.jsonl");

    #[test]
    fn success_transcript() {
        let parser = parse(SUCCESS);
        assert_eq!(parser.malformed_lines(), 0);
        assert_eq!(parser.verdict(), Verdict::Succeeded);
        let session = "75ed9f3a-e3f1-45f6-b262-7c4dc75e94c2";
        assert_eq!(
            parser.progress(),
            &Progress {
                turns: 3,
                last_tool: Some("Bash".into()),
                session_id: Some(session.into())
            }
        );
        assert_eq!(
            parser.outcome().unwrap(),
            &Outcome {
                subtype: "success".into(),
                is_error: false,
                result: Some("done".into()),
                terminal_reason: Some("completed".into()),
                num_turns: Some(3),
                duration_ms: Some(977),
                total_cost_usd: Some("0.0024".into()),
                usage: Usage {
                    input_tokens: 300,
                    output_tokens: 60,
                    cache_creation_input_tokens: 0,
                    cache_read_input_tokens: 0
                },
                session_id: Some(session.into()),
                permission_denials: 0,
                api_error: None,
                errors: vec![],
                structured_output: None,
            }
        );
    }

    #[test]
    fn success_transcript_fed_byte_by_byte() {
        let mut parser = StreamParser::new();
        for byte in SUCCESS.as_bytes() {
            parser.feed(std::slice::from_ref(byte));
        }
        parser.finish();
        assert_eq!(parser.outcome(), parse(SUCCESS).outcome());
        assert_eq!(parser.progress().turns, 3);
    }

    #[test]
    fn unauthorized_transcript() {
        let parser = parse(UNAUTHORIZED);
        assert_eq!(parser.malformed_lines(), 0);
        let message = "Failed to authenticate. API Error: 401 scripted 401 authentication_error";
        assert_eq!(
            parser.verdict(),
            Verdict::Failed {
                reason: FailureReason::ApiError { status: Some(401) },
                message: message.into()
            }
        );
        let outcome = parser.outcome().unwrap();
        assert_eq!(
            outcome.api_error,
            Some(ApiError {
                status: Some(401),
                kind: Some("authentication_error".into()),
                message: message.into()
            })
        );
        // The CLI reports an API error as subtype success with is_error set.
        assert_eq!(
            (outcome.subtype.as_str(), outcome.is_error),
            ("success", true)
        );
        assert_eq!(outcome.terminal_reason.as_deref(), Some("api_error"));
        assert_eq!(outcome.total_cost_usd.as_deref(), Some("0"));
        assert_eq!(parser.progress().turns, 0);
        assert!(parser.progress().session_id.is_some());
    }

    #[test]
    fn server_error_transcript() {
        let parser = parse(SERVER_ERROR);
        assert_eq!(parser.malformed_lines(), 0);
        let Verdict::Failed { reason, message } = parser.verdict() else {
            panic!("{:?}", parser.verdict())
        };
        assert_eq!(reason, FailureReason::ApiError { status: Some(500) });
        assert!(
            message.starts_with("API Error: 500 scripted 500 api_error."),
            "{message}"
        );
        assert_eq!(
            parser
                .outcome()
                .unwrap()
                .api_error
                .as_ref()
                .unwrap()
                .kind
                .as_deref(),
            Some("api_error")
        );
    }

    #[test]
    fn max_turns_transcript() {
        let parser = parse(MAX_TURNS);
        assert_eq!(parser.malformed_lines(), 0);
        assert_eq!(
            parser.verdict(),
            Verdict::Failed {
                reason: FailureReason::MaxTurns,
                message: "Reached maximum number of turns (2)".into()
            }
        );
        let outcome = parser.outcome().unwrap();
        assert_eq!(outcome.result, None, "max turns carries no result text");
        assert_eq!(
            outcome.num_turns,
            Some(3),
            "the CLI counts the refused turn too"
        );
        assert_eq!(outcome.terminal_reason.as_deref(), Some("max_turns"));
        assert_eq!(outcome.api_error, None);
        assert_eq!(outcome.total_cost_usd.as_deref(), Some("0.0016"));
        assert_eq!(parser.progress().turns, 2);
        assert_eq!(parser.progress().last_tool.as_deref(), Some("Bash"));
    }

    #[test]
    fn killed_transcript_is_incomplete_but_shows_progress() {
        let parser = parse(KILLED);
        assert_eq!(parser.malformed_lines(), 0);
        assert_eq!(parser.verdict(), Verdict::Incomplete);
        assert_eq!(parser.outcome(), None);
        assert_eq!(parser.progress().turns, 3);
        assert_eq!(parser.progress().last_tool.as_deref(), Some("Bash"));

        // Killed in the middle of writing a line: the half line is malformed, nothing more.
        let cut = &SUCCESS[..SUCCESS.len() - 100];
        let parser = parse(cut);
        assert_eq!(parser.malformed_lines(), 1);
        assert_eq!(parser.verdict(), Verdict::Incomplete);
    }

    #[test]
    fn partial_lines_are_joined_across_chunks() {
        let text = format!(
            "{}\n{}\n",
            r#"{"type":"system","subtype":"init","session_id":"s-1"}"#,
            result_line("done ✅")
        );
        // Every split point, including inside multi-byte text, gives the same answer.
        for split in 0..text.len() {
            let mut parser = StreamParser::new();
            parser.feed(&text.as_bytes()[..split]);
            parser.feed(&text.as_bytes()[split..]);
            parser.finish();
            assert_eq!(parser.progress().session_id.as_deref(), Some("s-1"));
            assert_eq!(parser.verdict(), Verdict::Succeeded, "split at {split}");
            assert_eq!(parser.malformed_lines(), 0);
        }
    }

    #[test]
    fn a_chunk_without_newline_waits_for_the_rest() {
        let mut parser = StreamParser::new();
        let line = result_line("done");
        parser.feed(line.as_bytes());
        assert_eq!(parser.outcome(), None, "the line may not be complete yet");
        parser.feed(b"\r\n");
        assert_eq!(parser.verdict(), Verdict::Succeeded, "CRLF is accepted");
    }

    #[test]
    fn huge_result_text_is_kept_whole() {
        let text = "é".repeat(100_000);
        let outcome = parse(&result_line(&text)).outcome().cloned().unwrap();
        assert_eq!(outcome.result.unwrap(), text);
    }

    #[test]
    fn unicode_survives() {
        let outcome = parse(&result_line("fertig ✅ — 完成 🎉"))
            .outcome()
            .cloned()
            .unwrap();
        assert_eq!(outcome.result.as_deref(), Some("fertig ✅ — 完成 🎉"));
    }

    #[test]
    fn malformed_lines_are_counted_not_fatal() {
        let text = format!(
            "not json\n[1,2]\n{{\"type\":\"result\",\"subtype\":7}}\n\n{{\"type\":\"mystery\"}}\n{}\n{{\"trunc",
            result_line("done")
        );
        let mut parser = StreamParser::new();
        parser.feed(&[0xff, 0xfe, b'\n']);
        parser.feed(text.as_bytes());
        parser.finish();
        // invalid UTF-8, not json, an array, a result with a bad subtype and the cut-off
        // line; the blank line and the unknown type are not errors.
        assert_eq!(parser.malformed_lines(), 5);
        assert_eq!(parser.verdict(), Verdict::Succeeded);
    }

    #[test]
    fn no_credentials_is_not_an_api_error() {
        let parser = parse(include_str!(
            "../../tests/fixtures/claude/not_logged_in.jsonl"
        ));
        match parser.verdict() {
            Verdict::Failed { reason, message } => {
                assert_eq!(reason, FailureReason::NotLoggedIn);
                assert!(message.contains("Not logged in"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        // Credentials the API refused stay an API error with its status.
        assert!(matches!(
            parse(UNAUTHORIZED).verdict(),
            Verdict::Failed {
                reason: FailureReason::ApiError { status: Some(401) },
                ..
            }
        ));
    }

    #[test]
    fn cost_reads_as_the_decimal_the_cli_meant() {
        // The CLI sums per-model costs as JavaScript numbers and prints the float error.
        let line = r#"{"type":"result","subtype":"success","is_error":false,"total_cost_usd":0.0024000000000000002}"#;
        let outcome = parse(line).outcome().cloned().unwrap();
        assert_eq!(outcome.total_cost_usd.as_deref(), Some("0.0024"));
        for (printed, shown) in [
            ("0", "0"),
            ("0.5", "0.5"),
            ("12", "12"),
            ("1.0000000000000002", "1"),
            ("0.123456789012", "0.123456789"),
        ] {
            let line = format!(
                r#"{{"type":"result","subtype":"success","is_error":false,"total_cost_usd":{printed}}}"#
            );
            assert_eq!(
                parse(&line).outcome().unwrap().total_cost_usd.as_deref(),
                Some(shown),
                "{printed}"
            );
        }
        let line =
            r#"{"type":"result","subtype":"success","is_error":false,"total_cost_usd":null}"#;
        assert_eq!(parse(line).outcome().unwrap().total_cost_usd, None);
    }

    #[test]
    fn no_result_line_is_incomplete() {
        let parser = parse(r#"{"type":"system","subtype":"init","session_id":"s"}"#);
        assert_eq!(parser.verdict(), Verdict::Incomplete);
        assert_eq!(classify(None), Verdict::Incomplete);
    }

    #[test]
    fn an_unknown_error_result_is_an_agent_error() {
        let line = r#"{"type":"result","subtype":"error_during_execution","is_error":true,"errors":["boom"]}"#;
        let verdict = parse(line).verdict();
        assert_eq!(
            verdict,
            Verdict::Failed {
                reason: FailureReason::AgentError,
                message: "boom".into()
            }
        );
        // is_error without an API error is not a success even with subtype success.
        let line = r#"{"type":"result","subtype":"success","is_error":true,"result":"hmm"}"#;
        let verdict = parse(line).verdict();
        assert_eq!(
            verdict,
            Verdict::Failed {
                reason: FailureReason::AgentError,
                message: "hmm".into()
            }
        );
    }

    #[test]
    fn turns_count_messages_not_blocks_and_skip_subagents_and_synthetic_errors() {
        let text = [
            r#"{"type":"assistant","message":{"id":"m1","content":[{"type":"text","text":"a"}]},"parent_tool_use_id":null}"#,
            r#"{"type":"assistant","message":{"id":"m1","content":[{"type":"tool_use","name":"Write","input":{}}]},"parent_tool_use_id":null}"#,
            r#"{"type":"assistant","message":{"id":"s1","content":[{"type":"tool_use","name":"Grep","input":{}}]},"parent_tool_use_id":"toolu_1"}"#,
            r#"{"type":"assistant","message":{"id":"m2","content":[{"type":"tool_use","name":"Bash","input":{}}]},"parent_tool_use_id":null}"#,
            r#"{"type":"assistant","message":{"id":"x","model":"<synthetic>","content":[{"type":"text","text":"API Error"}]},"is_api_error_message":true}"#,
        ]
        .join("\n");
        let parser = parse(&text);
        assert_eq!(parser.progress().turns, 2);
        assert_eq!(parser.progress().last_tool.as_deref(), Some("Bash"));
    }
}
